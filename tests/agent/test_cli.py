"""bpfinit-agent's command line: per-subcommand options, help, one-line errors, istio's
--network-namespace, and typed env values that istio ignores when invalid."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.agent.conftest import run_agent
from tests.agent.test_agent_lifecycle import MiniPod, attached


def one_line_usage_error(r) -> bool:
    return r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["setup", "--help"], ["setup", "-h"], ["setup", "-i", "*", "--help"]])
def test_setup_help_prints_usage_and_exits_0(args):
    r = run_agent(args)
    assert r.returncode == 0 and r.stdout.startswith("usage: bpfinit-agent setup"), r.stderr
    assert "--network-namespace" in r.stdout and "--egress-allow" in r.stdout


@pytest.mark.parametrize("args", [
    ["gc", "--netns", "/run/netns/x"], ["doctor", "--netns", "/run/netns/x"], ["cleanup", "--all"],
    ["cleanup", "--json"], ["cleanup", "--cgroup2-root", "/sys/fs/cgroup"], ["status", "--cgroup2-root", "/x"],
    ["status", "--bogus"], ["gc", "extra"], ["doctor", "--all"], ["gc", "--js"], ["status", "--bpffs"],
])
def test_subcommands_reject_what_is_not_theirs(args):
    r = run_agent(args)
    assert one_line_usage_error(r), (args, r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("command,own,foreign", [
    ("gc", ["--json", "--bpffs", "--cgroup2-root", "--every"], ["--all", "--netns"]),
    ("status", ["--json", "--bpffs", "--netns", "--all"], ["--cgroup2-root", "--every"]),
    ("cleanup", ["--bpffs", "--netns"], ["--all", "--json", "--cgroup2-root", "--every"]),
    ("doctor", ["--json", "--bpffs"], ["--all", "--netns", "--cgroup2-root", "--every"]),
])
def test_subcommand_help_lists_only_its_options(command, own, foreign):
    r = run_agent([command, "--help"])
    assert r.returncode == 0 and r.stdout.startswith(f"usage: bpfinit-agent {command}"), r.stderr
    assert all(o in r.stdout for o in own) and not any(f in r.stdout for f in foreign), r.stdout


def test_observe_bad_value_is_one_line():
    r = run_agent(["observe", "--set-rate", "abc"])
    assert one_line_usage_error(r) and "--set-rate" in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["status", "cleanup", "gc"])
def test_missing_bpffs_is_an_error(command):
    r = run_agent([command, "--bpffs", "/nonexistent-bpffs"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "/nonexistent-bpffs does not exist" in r.stderr, \
        (r.returncode, r.stdout, r.stderr)


def test_invalid_typed_env_warns_and_keeps_default_cli_fails():
    r = run_agent(["setup", "-n"], env_extra={"IPTABLES_PROBE_PORT": "abc", "PROBE_TIMEOUT": "soon"})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["probe_port"] == 15002 and cfg["probe_timeout_s"] == 5.0
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and "IPTABLES_PROBE_PORT" in lines[0] and "PROBE_TIMEOUT" in lines[1], r.stderr
    assert all(line.startswith("bpfinit-agent: warning: ") for line in lines)
    for args in (["--iptables-probe-port", "abc"], ["--probe-timeout=soon"]):
        r = run_agent(["setup", "-n", *args])
        assert one_line_usage_error(r), (args, r.stderr)


# ------------------------------------------------------------------ kernel: --network-namespace
@pytest.mark.kernel
def test_network_namespace_is_the_netns_to_configure(build, bpffs):
    """istio's --network-namespace / NETWORK_NAMESPACE (contract §1.2, the CNI path): setup and cleanup
    work in that netns, exactly like bpfinit's --netns."""
    with MiniPod() as pod:
        base = ["setup", "-i", "*", "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs)]
        r = run_agent(base + ["--network-namespace", pod.netns_path])
        assert r.returncode == 0, r.stderr
        status = run_agent(["status", "--json", "--bpffs", str(bpffs), "--netns", pod.netns_path])
        assert status.returncode == 0, status.stdout + status.stderr
        mine = run_agent(["status", "--json", "--bpffs", str(bpffs)])      # the test's own netns: untouched
        assert mine.returncode == 3
        assert json.loads(status.stdout)["netns_cookie"] != json.loads(mine.stdout)["netns_cookie"]
        # --cleanup-only honours it too
        r = run_agent(base + ["--cleanup-only", "--network-namespace", pod.netns_path])
        assert r.returncode == 0, r.stderr
        assert run_agent(["status", "--bpffs", str(bpffs), "--netns", pod.netns_path]).returncode == 3
        assert attached(pod.cgroup) == {}
        # the env form, with a /proc/<pid>/ns/net path; --netns naming the same netns is fine
        holder = subprocess.Popen(["ip", "netns", "exec", pod.name, "sleep", "60"])
        try:
            proc_path = f"/proc/{holder.pid}/ns/net"
            for _ in range(100):   # wait until `ip netns exec` has entered the pod's netns
                try:
                    if os.stat(proc_path).st_ino == os.stat(pod.netns_path).st_ino:
                        break
                except OSError:
                    pass
                time.sleep(0.02)
            r = run_agent(base + ["--netns", pod.netns_path], env_extra={"NETWORK_NAMESPACE": proc_path})
            assert r.returncode == 0, r.stderr
            assert run_agent(["status", "--bpffs", str(bpffs), "--netns", proc_path]).returncode == 0
        finally:
            holder.kill()
            holder.wait()
        run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


@pytest.mark.kernel
def test_network_namespace_errors_are_one_line(bpffs):
    with MiniPod() as pod, MiniPod() as other:
        base = ["setup", "-i", "*", "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs)]
        r = run_agent(base + ["--network-namespace", "/nonexistent/netns"])
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "/nonexistent/netns" in r.stderr, r.stderr
        r = run_agent(base + ["--netns", pod.netns_path, "--network-namespace", other.netns_path])
        assert one_line_usage_error(r) and "different network namespaces" in r.stderr, r.stderr
        r = run_agent(base + ["--cleanup-only"], env_extra={"NETWORK_NAMESPACE": "/nonexistent/netns"})
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "/nonexistent/netns" in r.stderr, r.stderr
        assert attached(pod.cgroup) == {}
