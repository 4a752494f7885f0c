"""`bpfinit-agent gc`: remove config entries and pins of pods whose cgroup no longer exists.

Liveness is the pod cgroup id (the inode of its cgroup v2 dir): the kubelet removes a pod's cgroup when
the pod goes. The walk covers the host's whole cgroup v2 tree, so agents with different mount views of
it agree. Also removes half-made pin dirs of killed setups and registry entries of setups that died
before committing.
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


def collect(bpffs: str, cgroup2_root: str | None = None) -> dict:
    alive = cgroup.alive_ids(Path(cgroup2_root) if cgroup2_root else None)
    report = {"pods_removed": 0, "entries_removed": 0, "dirs_removed": 0, "pods_kept": 0}
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
