"""The warm setup path stays lean: what it must not import, and the cheap stand-ins it uses instead.

A warm `bpfinit-agent setup` (programs already pinned) is what the kubelet waits for on every pod start,
so it opens pins with raw bpf(2) and avoids heavy imports (bcc, pyroute2, OpenSSL through hashlib, the
socket module). Timing itself is measured by bench/setup_time.py, never asserted here.
"""
from __future__ import annotations

import hashlib
import re
import socket

import pytest

from initagent import digest, loader, netns
from tests.agent.conftest import run_agent
from tests.podenv import Pod

# modules the warm path must not load (each costs ms; bcc/pyroute2 tens of ms)
HEAVY = ("bcc", "pyroute2", "_hashlib", "hashlib", "socket", "secrets", "threading", "shutil", "platform")


def imported_modules(importtime_stderr: str) -> set[str]:
    """Modules the agent imported, from `-X importtime` output (`import time: self | cumulative | name`,
    printed as each import completes): those after interpreter start-up (`site` and its .pth files)."""
    names: list[str] = []
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name == "site":
                names.clear()    # everything so far was start-up, not the agent
            elif name != "imported package":
                names.append(name)
    return set(names)


@pytest.mark.kernel
def test_warm_setup_loads_no_heavy_module_and_still_reports(build, bpffs):
    with Pod("warm") as pod:
        args = ["setup", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                "-b", "*", "-d", "15090,15021,15020", "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs),
                "--netns", pod.netns_path]
        try:
            r = run_agent(args, env_extra={"PYTHONPROFILEIMPORTTIME": "1", "POD_NAME": "warm-0",
                                           "POD_NAMESPACE": "default"})
            assert r.returncode == 0, r.stderr[-3000:]
            # the summary line survives the fast exit (flushed before os._exit)
            assert re.search(r"pod configured: pod_idx=\d+ build=\w+ .* in \d+ ms", r.stdout), r.stdout
            modules = imported_modules(r.stderr)
            assert "initagent.attach" in modules and "initagent.identity" in modules   # the real warm path ran
            loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
            assert loaded == [], f"warm setup imported {loaded}"
            # a re-run with the same config is a no-op and also exits cleanly
            again = run_agent(args, env_extra={"POD_NAME": "warm-0", "POD_NAMESPACE": "default"})
            assert again.returncode == 0 and "already configured (no change)" in again.stdout, again.stdout
        finally:
            run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


@pytest.mark.kernel
def test_setup_with_exclude_interfaces_still_resolves_routes(build, bpffs):
    """-c needs the pod's routes: pyroute2 is imported then, and only then."""
    with Pod("warmc") as pod:
        args = ["setup", "-p", "15001", "-u", "1337", "-i", "*", "-c", "eth0", "--cgroup", str(pod.cgroup),
                "--bpffs", str(bpffs), "--netns", pod.netns_path]
        try:
            r = run_agent(args, env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
            assert r.returncode == 0, r.stderr[-3000:]
            assert "pyroute2" in imported_modules(r.stderr)
            assert "pod configured" in r.stdout
        finally:
            run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


def test_netns_cookie_and_ifindex_match_the_socket_module():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        expected = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, netns.SO_NETNS_COOKIE, 8), "little")
    assert netns.cookie() == expected != 0
    assert netns.interface_index("lo") == socket.if_nametoindex("lo")
    assert netns.interface_index("no-such-nic0") == 0


def test_builtin_sha256_is_hashlibs():
    for data in (b"", b"bpfinit", bytes(range(256)) * 400):
        assert digest.sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    incremental = digest.sha256()
    incremental.update(b"a")
    incremental.update(b"b")
    assert incremental.digest() == hashlib.sha256(b"ab").digest()


def test_int_function_scan_agrees_with_a_word_boundary_regex():
    text = loader.expand_source()
    for spec in loader.PROGRAMS:
        by_regex = bool(re.search(rf"\bint\s+{re.escape(spec.name)}\s*\(", text))
        assert (spec.name in loader.defined_int_functions(text)) == by_regex, spec.name
    tricky = "uint bpfinit_a(void);\n_int bpfinit_b(x)\nint\n  bpfinit_c (x)\nint bpfinit_d;\n(int bpfinit_e(\nint"
    assert loader.defined_int_functions(tricky) == {"bpfinit_c", "bpfinit_e"}
