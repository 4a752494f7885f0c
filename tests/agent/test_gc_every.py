"""`bpfinit-agent gc --every`: the loop the exporter DaemonSet runs on every node. Real pods (netns +
cgroup), a private bpffs, the agent as a subprocess; every wait is bounded."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time

import pytest

from tests.agent.conftest import PYTHON, REPO, agent_env, run_agent
from tests.agent.test_agent_lifecycle import MiniPod, pod_dirs
from tests.agent.test_gc_safety import configured, dead_pod, fresh, registry  # noqa: F401 (fixture)
from tests.podenv import CGROUP2_ROOT

INTERVAL_S = 10          # the CLI's minimum: the test waits for three rounds (~20 s)
ROUND_TIMEOUT_S = INTERVAL_S + 30


class Lines:
    """Whole lines of a pipe, read with a deadline (select on the fd, no buffered readline)."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.buf = b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no line within {timeout} s (have {self.buf!r})"
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"pipe closed (have {self.buf!r})"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


@pytest.mark.kernel
def test_gc_every_collects_dead_pods_in_later_rounds_survives_a_failed_round_and_stops_on_sigterm(fresh, tmp_path):
    bpffs, _build = fresh
    link = tmp_path / "bpffs"            # --bpffs goes through a symlink the test removes for one round
    link.symlink_to(bpffs)
    gone = dead_pod(bpffs, _build)       # dead before the loop starts: round 1 collects it
    live = MiniPod().__enter__()
    proc = None
    try:
        assert run_agent(live.setup_args(bpffs)).returncode == 0
        proc = subprocess.Popen([PYTHON, "-m", "initagent.cli", "gc", "--every", f"{INTERVAL_S}s", "--json",
                                 "--bpffs", str(link), "--cgroup2-root", str(CGROUP2_ROOT)], cwd=REPO,
                                env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        # round 1: the dead pod goes, the live one stays
        first = json.loads(out.next(ROUND_TIMEOUT_S))
        assert first["pods_removed"] == 1 and first["pods_kept"] == 1, first
        assert configured(bpffs, live)
        assert gone not in {i["netns_cookie"] for i in registry(_build).values()}
        # round 2 fails (the bpffs path is gone): one line on stderr, and the loop goes on
        link.unlink()
        live.__exit__(None, None, None)   # the kubelet removes the pod: netns and cgroup
        line = err.next(ROUND_TIMEOUT_S)
        assert line.startswith("bpfinit-agent: gc failed:") and "does not exist" in line, line
        assert proc.poll() is None
        # round 3: the path is back and the pod whose cgroup was deleted is collected
        link.symlink_to(bpffs)
        third = json.loads(out.next(ROUND_TIMEOUT_S))
        assert third["pods_removed"] == 1 and third["pods_kept"] == 0, third
        assert registry(_build) == {} and pod_dirs(bpffs) == []
        # SIGTERM mid-sleep: exit 0 at once, not at the end of the interval
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 3
        assert proc.stderr.read() == b"" and err.buf == b""
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
        live.__exit__(None, None, None)


@pytest.mark.kernel
def test_gc_every_stops_on_sigint_during_the_first_sleep(fresh):
    bpffs, _build = fresh
    proc = subprocess.Popen([PYTHON, "-m", "initagent.cli", "gc", "--every", "1h", "--bpffs", str(bpffs),
                             "--cgroup2-root", str(CGROUP2_ROOT)], cwd=REPO, env=agent_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = Lines(proc.stdout).next(ROUND_TIMEOUT_S)
        assert line.startswith("bpfinit-agent: gc removed 0 dead pods"), line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("value", ["10", "soon", "5s", "0", "-10m", "9.9s", ""])
def test_gc_every_rejects_a_bad_or_too_short_duration(value):
    r = run_agent(["gc", "--every", value, "--bpffs", "/nonexistent-bpffs"])
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.returncode, r.stderr)
    assert "--every" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.kernel
def test_gc_runs_with_only_cap_bpf(fresh):
    """What the DaemonSet's gc container gets (manifests: capabilities add [BPF], uid 0, no other caps):
    enough to open the pins, walk the read-only cgroup tree and unpin a dead pod. (Kernels from 6.5 need not
    even CAP_BPF for this; earlier ones refuse every bpf() command without it when unprivileged BPF is off.)"""
    bpffs, build = fresh
    gone = dead_pod(bpffs, build)
    caps = "-all,+bpf"
    prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    r = run_agent(["gc", "--json", "--bpffs", str(bpffs), "--cgroup2-root", str(CGROUP2_ROOT)], prefix=prefix)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pods_removed"] == 1
    assert gone not in {i["netns_cookie"] for i in registry(build).values()} and pod_dirs(bpffs) == []
