"""Agent lifecycle on the real kernel: idempotent re-runs, cleanup, gc after pod churn, concurrent setups,
a kill in the middle of setup, least privilege, and one-line refusals of bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from initagent import attach, bpfsys, loader, podconfig
from tests.agent.conftest import PYTHON, REPO, agent_env, run_agent
from tests.podenv import TEST_CGROUP_PARENT, _unique, require_kernel

pytestmark = pytest.mark.kernel


class MiniPod:
    """Just what the agent needs: a netns and a cgroup v2 dir (cheap enough for hundreds of cycles)."""

    def __init__(self):
        require_kernel()
        self.name = _unique("bpm")
        self.cgroup = TEST_CGROUP_PARENT / self.name
        self.netns_path = f"/run/netns/{self.name}"

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        TEST_CGROUP_PARENT.mkdir(exist_ok=True)
        self.cgroup.mkdir()
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        for _ in range(50):
            try:
                self.cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)

    def setup_args(self, bpffs, *extra) -> list[str]:
        return ["setup", "-i", "*", *extra, "--cgroup", str(self.cgroup), "--bpffs", str(bpffs),
                "--netns", self.netns_path]


def cgroup_types(build) -> set[str]:
    """Attach types this build puts on a pod cgroup (depends on the compiled parts)."""
    return {spec.attach_type for spec in build.programs if spec.target == "cgroup"}


def attached(cgroup) -> dict:
    return {k: v for k, v in attach.attached_ids(cgroup).items() if v}


def entry_count(build) -> dict:
    counts = {name: len(bpfsys.map_keys(build.map_fd(name), size)) for name, size in podconfig.LIST_MAPS.items()}
    counts["pod_by_netns"] = len(bpfsys.map_keys(build.map_fd("pod_by_netns"), 8))
    counts["pod_registry"] = len(bpfsys.map_keys(build.map_fd("pod_registry"), 4))
    return counts


def pod_dirs(bpffs) -> list[str]:
    root = attach.pods_root(bpffs)
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_rerun_is_noop_and_cleanup_detaches(build, bpffs):
    with MiniPod() as pod:
        first = run_agent(pod.setup_args(bpffs))
        assert first.returncode == 0, first.stderr
        ids = attached(pod.cgroup)
        assert set(ids) == cgroup_types(build) >= {"inet4_connect", "inet6_connect", "sock_ops", "getsockopt"}
        again = run_agent(pod.setup_args(bpffs))
        assert again.returncode == 0 and "no change" in again.stdout, again.stdout + again.stderr
        assert attached(pod.cgroup) == ids     # same programs, nothing attached twice
        changed = run_agent(pod.setup_args(bpffs, "-x", "10.0.0.0/8"))
        assert changed.returncode == 0 and "configured" in changed.stdout
        assert {k: len(v) for k, v in attached(pod.cgroup).items()} == {k: 1 for k in ids}
        status = run_agent(["status", "--json", "--bpffs", str(bpffs), "--netns", pod.netns_path])
        assert status.returncode == 0, status.stderr
        assert '"configured": true' in status.stdout
        gone = run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])
        assert gone.returncode == 0, gone.stderr
        assert attached(pod.cgroup) == {}
        status = run_agent(["status", "--bpffs", str(bpffs), "--netns", pod.netns_path])
        assert status.returncode == 3 and "not configured" in status.stdout


def test_bad_input_one_line_nonzero(bpffs):
    with MiniPod() as pod:
        for args in (["-x", "10.0.0.1"], ["-o", "http"], ["--bogus"], ["-m", "TPROXY"], ["-i", "*", "extra"]):
            r = run_agent(pod.setup_args(bpffs, *args))
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        r = run_agent(["setup", "--cgroup", "/nonexistent", "--bpffs", str(bpffs), "--netns", pod.netns_path])
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cgroup" in r.stderr
        assert attached(pod.cgroup) == {}


@pytest.mark.slow
def test_200_cycles_then_gc_leaves_nothing(build, bpffs):
    before = entry_count(build)
    for _ in range(200):
        with MiniPod() as pod:
            r = run_agent(pod.setup_args(bpffs, "-x", "10.9.0.0/16", "-o", "5432"))
            assert r.returncode == 0, r.stderr
    r = run_agent(["gc", "--json", "--bpffs", str(bpffs)])
    assert r.returncode == 0, r.stderr
    assert entry_count(build) == before
    assert pod_dirs(bpffs) == []


def test_20_concurrent_setups_on_a_fresh_node(tmp_path):
    """All race on the first compile (serialised by the bpffs lock), then configure their own pod."""
    from tests.podenv import bpffs_mount
    with bpffs_mount() as fresh:
        pods = [MiniPod().__enter__() for _ in range(20)]
        try:
            procs = [subprocess.Popen([PYTHON, "-m", "initagent.cli", *p.setup_args(fresh)], cwd=REPO,
                                      env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for p in pods]
            outs = [p.communicate(timeout=300) for p in procs]
            assert all(p.returncode == 0 for p in procs), [o[1] for o in outs if o[1]]
            assert len(loader.builds(fresh)) == 1          # compiled exactly once
            idxs = {line.split("pod_idx=")[1].split()[0] for line, _ in outs}
            assert len(idxs) == 20
            directory = loader.builds(fresh)[0]
            with loader.Build(directory, [p for p in loader.PROGRAMS if (directory / "progs" / p.name).exists()]) as b:
                for pod in pods:
                    assert set(attached(pod.cgroup)) == cgroup_types(b)
                assert entry_count(b)["pod_by_netns"] == 20
        finally:
            for pod in pods:
                pod.__exit__(None, None, None)


def test_kill_mid_setup_leaves_nothing_attached(build, bpffs):
    with MiniPod() as pod:
        proc = subprocess.Popen([PYTHON, "-m", "initagent.cli", *pod.setup_args(bpffs)], cwd=REPO,
                                env=agent_env(BPFINIT_TEST_STALL="links"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stderr.readline()
            assert "STALLED links" in line, line
            assert set(attached(pod.cgroup)) == cgroup_types(build)   # links exist while the agent holds them...
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
        assert attached(pod.cgroup) == {}           # ...and die with it
        assert run_agent(["status", "--bpffs", str(bpffs), "--netns", pod.netns_path]).returncode == 3
        r = run_agent(["gc", "--json", "--bpffs", str(bpffs)])     # the uncommitted registry entry goes
        assert r.returncode == 0 and '"pods_removed": 0' not in r.stdout, r.stdout
        r = run_agent(pod.setup_args(bpffs))                        # and a re-run works
        assert r.returncode == 0, r.stderr
        assert set(attached(pod.cgroup)) == cgroup_types(build)
        run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


def test_runs_with_only_bpf_netadmin_perfmon(build, bpffs):
    """nsenter (full caps) puts us in the pod netns, then setpriv keeps only the three capabilities."""
    with MiniPod() as pod:
        caps = "-all,+bpf,+net_admin,+perfmon"
        prefix = ["nsenter", f"--net={pod.netns_path}", "setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}",
                  "--"]
        args = ["setup", "-i", "*", "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs)]
        r = run_agent(args, prefix=prefix)
        assert r.returncode == 0, r.stderr
        check = subprocess.run(prefix + ["grep", "CapEff", "/proc/self/status"], capture_output=True, text=True)
        assert int(check.stdout.split()[1], 16) == (1 << 39) | (1 << 12) | (1 << 38)   # bpf, net_admin, perfmon
        assert set(attached(pod.cgroup)) == cgroup_types(build)
        r = run_agent(["cleanup", "--bpffs", str(bpffs)], prefix=prefix)
        assert r.returncode == 0, r.stderr
