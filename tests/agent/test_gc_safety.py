"""gc must never remove live pods by accident (a wrong --cgroup2-root used to wipe the node), and setup
reclaims dead pods itself when the registry is near full. Real cgroups, real links, a private bpffs."""
from __future__ import annotations

import json
import os
import time

import pytest

from initagent import attach, bpfsys, cgroup, gc, loader, podconfig
from tests.agent.conftest import TEST_PARTS, run_agent
from tests.agent.test_agent_lifecycle import MiniPod, pod_dirs
from tests.podenv import CGROUP2_ROOT, TEST_CGROUP_PARENT, bpffs_mount

pytestmark = pytest.mark.kernel


@pytest.fixture
def fresh():
    """A private bpffs with this session's build loaded: registry contents are this test's alone."""
    with bpffs_mount() as path:
        build = loader.load(path, parts=tuple(p for p in TEST_PARTS.split(",") if p) or None)
        try:
            yield path, build
        finally:
            build.close()


def configured(bpffs, pod) -> bool:
    r = run_agent(["status", "--bpffs", str(bpffs), "--netns", pod.netns_path])
    assert r.returncode in (0, 3), r.stderr
    return r.returncode == 0


def registry(build) -> dict[int, dict]:
    fd = build.map_fd("pod_registry")
    out = {}
    for key in bpfsys.map_keys(fd, 4):
        raw = bpfsys.map_lookup(fd, key, podconfig.POD_INFO.size)
        if raw:
            out[podconfig.U32.unpack(key)[0]] = podconfig.unpack_pod_info(raw)
    return out


def dead_pod(bpffs, build) -> int:
    """Set a pod up, then remove it as the kubelet would (netns and cgroup gone); wait until the kernel
    has released the cgroup (its links auto-detach). Returns its netns cookie."""
    with MiniPod() as pod:
        r = run_agent(pod.setup_args(bpffs))
        assert r.returncode == 0, r.stderr
        pod_idx = int(r.stdout.split("pod_idx=")[1].split()[0])
    cookie = registry(build)[pod_idx]["netns_cookie"]
    for _ in range(100):
        if attach.cgroup_released(build, bpffs, cookie):
            return cookie
        time.sleep(0.05)
    raise AssertionError("the kernel did not release the removed pod cgroup")


def test_gc_refuses_a_root_that_is_not_a_cgroup_v2_root(fresh, tmp_path):
    bpffs, build = fresh
    with MiniPod() as pod:
        assert run_agent(pod.setup_args(bpffs)).returncode == 0
        for root in ("/nonexistent-typo", str(tmp_path), str(TEST_CGROUP_PARENT)):
            r = run_agent(["gc", "--json", "--bpffs", str(bpffs), "--cgroup2-root", root])
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and root in r.stderr, (root, r.stderr)
            assert r.stdout == ""
            assert configured(bpffs, pod) and pod_dirs(bpffs) != []
        r = run_agent(["gc", "--json", "--bpffs", str(bpffs)], env_extra={"BPFINIT_CGROUP2_ROOT": str(tmp_path)})
        assert r.returncode == 1 and "not a cgroup v2 root" in r.stderr and configured(bpffs, pod)
        r = run_agent(["gc", "--json", "--bpffs", str(bpffs), "--cgroup2-root", str(CGROUP2_ROOT)])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pods_kept"] == 1 and configured(bpffs, pod)


def test_gc_trusts_a_walk_that_finds_no_registered_pod_only_with_the_kernels_word(fresh, monkeypatch):
    """A walk that sees none of the registered pods' cgroups removes only pods whose cgroup the kernel
    reports released; live pods stay, and gc says why and fails."""
    bpffs, build = fresh
    gone = dead_pod(bpffs, build)
    with MiniPod() as live:
        assert run_agent(live.setup_args(bpffs)).returncode == 0
        # a cgroup v2 root whose walk sees none of the pods (what a wrong tree looks like)
        monkeypatch.setattr(cgroup, "alive_ids", lambda root=None: {os.stat(CGROUP2_ROOT).st_ino})
        report = gc.collect(str(bpffs), str(CGROUP2_ROOT))
        assert report["pods_removed"] == 1 and report["pods_kept"] == 1
        assert "found none of the 2 registered pods" in report["refused"]
        assert configured(bpffs, live)
        assert gone not in {info["netns_cookie"] for info in registry(build).values()}
        assert attach.pod_key(gone) not in pod_dirs(bpffs)
    # every pod gone: the kernel confirms each, so this is an ordinary gc
    for _ in range(100):
        report = gc.collect(str(bpffs), str(CGROUP2_ROOT))
        if report["pods_removed"]:
            break
        time.sleep(0.05)
    assert report["pods_removed"] == 1 and "refused" not in report and registry(build) == {}


def test_gc_cli_exit_code_when_refusing(fresh, monkeypatch):
    """The CLI side of the refusal: the report, then one line on stderr and exit 1."""
    from initagent import cli
    bpffs, _build = fresh
    with MiniPod() as live:
        assert run_agent(live.setup_args(bpffs)).returncode == 0
        monkeypatch.setattr(cgroup, "alive_ids", lambda root=None: set())
        assert cli.main(["gc", "--bpffs", str(bpffs)]) == 1
        assert configured(bpffs, live)


def _fill_registry(build, upto: int) -> list[int]:
    """Committed registry entries of pods that look alive (no pins: the kernel has no word on them)."""
    fd = build.map_fd("pod_registry")
    have = set(registry(build))
    live_cg = os.stat(CGROUP2_ROOT).st_ino
    added, idx = [], 0
    while len(have) + len(added) < upto:
        idx += 1
        if idx in have:
            continue
        bpfsys.map_update(fd, podconfig.U32.pack(idx), podconfig.pod_info_value(
            0xF00D0000 + idx, live_cg, 1, 1, os.getpid(), 1, b"\0" * 16))
        added.append(idx)
    return added


def _drop(build, idxs):
    for idx in idxs:
        bpfsys.map_delete(build.map_fd("pod_registry"), podconfig.U32.pack(idx))


def test_setup_reclaims_dead_pods_only_when_the_registry_is_near_full(fresh):
    bpffs, build = fresh
    capacity = bpfsys.map_info(build.map_fd("pod_registry"))["max_entries"]
    gone = dead_pod(bpffs, build)
    cookies = lambda: {info["netns_cookie"] for info in registry(build).values()}
    with MiniPod() as a:
        assert run_agent(a.setup_args(bpffs)).returncode == 0
        assert gone in cookies()                  # far from full: dead pods wait for gc (no cost at setup)
        fakes = _fill_registry(build, int(attach.RECLAIM_AT * capacity) + 1)
        with MiniPod() as b:
            r = run_agent(b.setup_args(bpffs))
            assert r.returncode == 0, r.stderr
            assert gone not in cookies() and attach.pod_key(gone) not in pod_dirs(bpffs)
            assert configured(bpffs, a) and configured(bpffs, b)
            assert set(fakes) <= set(registry(build))   # no word from the kernel: kept
        _drop(build, fakes)


def test_setup_on_a_full_registry_reclaims_or_fails_closed(fresh):
    bpffs, build = fresh
    capacity = bpfsys.map_info(build.map_fd("pod_registry"))["max_entries"]
    gone = dead_pod(bpffs, build)
    fakes = _fill_registry(build, capacity)
    try:
        with MiniPod() as a:
            r = run_agent(a.setup_args(bpffs))         # full: the dead pod's slot is reclaimed
            assert r.returncode == 0, r.stderr
            assert configured(bpffs, a) and gone not in {i["netns_cookie"] for i in registry(build).values()}
            with MiniPod() as b:                       # full of live pods: one line, exit 1, nothing attached
                r = run_agent(b.setup_args(bpffs))
                assert r.returncode == 1 and r.stderr.count("\n") == 1 and "gc" in r.stderr, r.stderr
                assert not configured(bpffs, b)
                assert not any(attach.attached_ids(b.cgroup).values())
    finally:
        _drop(build, fakes)
