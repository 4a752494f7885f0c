"""Kernel fixtures for the agent tests: one private bpffs and ONE compile per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# Parts compiled for these tests: every part present (the product), unless BPFINIT_TEST_PARTS names a
# subset, e.g. "connect.c,sockops.c,getsockopt.c" to test the core alone while another part is mid-change.
TEST_PARTS = os.environ.get("BPFINIT_TEST_PARTS", "")


def agent_env(**extra) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"), "PYTHONPATH": str(REPO)}
    if TEST_PARTS:
        env["BPFINIT_PARTS"] = TEST_PARTS
    env.update(extra)
    return env


def run_agent(args: list[str], env_extra: dict | None = None, timeout: float = 120,
              prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    env = agent_env(**(env_extra or {}))
    return subprocess.run((prefix or []) + [PYTHON, "-m", "initagent.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# UDP (and UDP-Lite) echo server for the cluster netns (and the pod's loopback): answers every datagram
# with a JSON line naming itself and the sender; exits after `timeout` seconds.
# argv: name timeout [[addr, port], ...]
UDP_SERVER = r"""
import json, select, socket, sys, time
name, timeout, binds = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
socks = []
for addr, port in binds:
    for proto in (socket.IPPROTO_UDP, 136):   # 136: UDP-Lite
        try:
            s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM, proto)
        except PermissionError:   # in a guarded pod UDP-Lite sockets are refused (sock_create.c)
            continue
        s.bind((addr, port))
        socks.append(s)
print("READY", flush=True)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    for s in select.select(socks, [], [], 0.5)[0]:
        data, peer = s.recvfrom(2048)
        s.sendto(json.dumps({"server": name, "to": list(s.getsockname()[:2]), "from": peer[0]}).encode(), peer)
"""


def pod_rows(bpffs, name: str) -> dict:
    """One pod's non-zero decision counters {(direction, verdict, reason): count}."""
    from initagent import counters
    pods = [p for p in counters.pod_counters(bpffs) if p["pod"] == name]
    assert len(pods) == 1, pods
    return {(r["direction"], r["verdict"], r["reason"]): r["count"] for r in pods[0]["counters"]}


def denied_flows(bpffs, pod_ref: str, ip_version: bool = False) -> list[tuple]:
    """(reason, l4, [IP version,] destination, port) of each DENIED event of pod `namespace/name`."""
    import json
    res = run_agent(["observe", "--bpffs", str(bpffs), "--pod", pod_ref, "--verdict", "DENIED"])
    assert res.returncode == 0, res.stderr
    out = []
    for line in res.stdout.splitlines():
        f = json.loads(line)["flow"]
        (proto, l4), = f["l4"].items()
        version = (f["IP"]["ipVersion"],) if ip_version else ()
        out.append((f["bpfinit"]["reason"], proto, *version, f["IP"]["destination"], l4["destination_port"]))
    return out


@pytest.fixture(scope="session")
def bpffs():
    from tests.podenv import bpffs_mount, require_kernel
    require_kernel()
    with bpffs_mount() as path:
        yield path


@pytest.fixture(scope="session")
def build(bpffs):
    """Compile and pin once per session; every test after that is a warm setup."""
    from initagent import loader
    parts = tuple(p for p in TEST_PARTS.split(",") if p) or None
    b = loader.load(bpffs, parts=parts)
    yield b
    b.close()
