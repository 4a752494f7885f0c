"""`bpfinit-agent gc`: remove config entries and pins of pods whose cgroup no longer exists.

Liveness is the pod cgroup id (the inode of its cgroup v2 dir): the kubelet removes a pod's cgroup when
the pod goes. The walk covers the host's whole cgroup v2 tree, so agents with different mount views of
it agree. Also removes half-made pin dirs of killed setups and registry entries of setups that died
before committing.

A wrong walk would make every pod look dead and remove its capture, so: the root must be the root of a
cgroup v2 hierarchy (cgroup.tree_root; a walk error or a truncated walk is an error), and when the walk
finds none of the registered pods' cgroups, gc trusts it only for pods the kernel itself reports
released (attach.cgroup_released), keeps the others and says so (report["refused"]).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from initagent import attach, bpfsys, cgroup, loader, podconfig

BUILD_GRACE_S = 600
_STALE = re.compile(r"^ns-[0-9a-f]+_(new|old)_(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _registered_cgroups(bpffs: str) -> set[int]:
    ids = set()
    for directory in loader.builds(bpffs):
        with loader.Build(directory, []) as build:
            reg = build.map_fd("pod_registry")
            for key in bpfsys.map_keys(reg, 4):
                raw = bpfsys.map_lookup(reg, key, podconfig.POD_INFO.size)
                if raw:
                    ids.add(podconfig.unpack_pod_info(raw)["cgroup_id"])
    return ids


def collect(bpffs: str, cgroup2_root: str | None = None) -> dict:
    loader.builds(bpffs, must_exist=True)
    root = cgroup.tree_root(cgroup2_root)
    alive = cgroup.alive_ids(root)
    report = {"pods_removed": 0, "entries_removed": 0, "dirs_removed": 0, "pods_kept": 0}
    registered = _registered_cgroups(bpffs)
    # the walk saw none of them: a wrong tree (or every pod gone); only the kernel's word removes a pod
    distrust_walk = bool(registered) and not (registered & alive)
    unconfirmed = 0
    live_cookies: set[int] = set()
    for directory in loader.builds(bpffs):
        build = loader.Build(directory, [p for p in loader.PROGRAMS if (directory / "progs" / p.name).exists()])
        with build:
            reg = build.map_fd("pod_registry")
            committed_idx = {}
            for key in bpfsys.map_keys(build.map_fd("pod_by_netns"), 8):
                raw = bpfsys.map_lookup(build.map_fd("pod_by_netns"), key, podconfig.POD_CFG.size)
                if raw:
                    committed_idx[podconfig.unpack_pod_cfg(raw)["pod_idx"]] = podconfig.U64.unpack(key)[0]
            for key in bpfsys.map_keys(reg, 4):
                idx = podconfig.U32.unpack(key)[0]
                raw = bpfsys.map_lookup(reg, key, podconfig.POD_INFO.size)
                if not raw:
                    continue
                info = podconfig.unpack_pod_info(raw)
                dead = info["cgroup_id"] not in alive
                if dead and distrust_walk and not attach.cgroup_released(build, bpffs, info["netns_cookie"]):
                    dead = False
                    unconfirmed += 1
                orphan = idx not in committed_idx and not _pid_alive(info["setup_pid"])
                if dead or orphan:
                    report["entries_removed"] += attach.remove_pod(build, bpffs, info["netns_cookie"], idx)
                    report["pods_removed"] += 1
                else:
                    report["pods_kept"] += 1
                    live_cookies.add(info["netns_cookie"])
            # config entries without a registry entry (should not happen; be thorough)
            for idx, cookie in committed_idx.items():
                if bpfsys.map_lookup(reg, podconfig.U32.pack(idx), podconfig.POD_INFO.size) is None:
                    bpfsys.map_delete(build.map_fd("pod_by_netns"), podconfig.U64.pack(cookie))
                    report["entries_removed"] += attach.delete_pod_entries(build, idx)
    if unconfirmed:
        report["refused"] = (f"the walk of {root} found none of the {len(registered)} registered pods' cgroups "
                             f"(wrong --cgroup2-root?): kept {unconfirmed} pods the kernel still shows "
                             f"attached, removed only the {report['pods_removed']} it reports released or "
                             "never committed")
    # program generations of older agent versions, once no pod uses them any more
    try:
        current = loader.build_hash(loader.expand_source(parts=loader.parts_from_env()))
    except (OSError, loader.LoadError):
        current = None
    report["builds_removed"] = 0
    for directory in loader.builds(bpffs):
        if current is None or directory.name == current:
            continue
        # a newer agent may have just built it and not registered its first pod yet
        if time.time() - (directory / "complete").stat().st_mtime < BUILD_GRACE_S:
            continue
        with loader.Build(directory, []) as build:
            in_use = bpfsys.map_keys(build.map_fd("pod_registry"), 4, limit=1)
        if not in_use:
            shutil.rmtree(directory, ignore_errors=True)
            report["builds_removed"] += 1
    root = attach.pods_root(bpffs)
    if root.is_dir():
        for d in root.iterdir():
            m = _STALE.match(d.name)
            stale = m and not _pid_alive(int(m.group(2)))
            unowned = d.name.startswith("ns-") and "_" not in d.name and int(d.name[3:], 16) not in live_cookies
            if stale or unowned:
                shutil.rmtree(d, ignore_errors=True)
                report["dirs_removed"] += 1
    return report
