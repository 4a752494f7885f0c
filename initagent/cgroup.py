"""Find the pod's cgroup v2 directory on the host cgroup mount."""
from __future__ import annotations

import os
from pathlib import Path

CANDIDATE_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup", "/host/sys/fs/cgroup/unified", "/host/sys/fs/cgroup")
MAX_WALK_DIRS = 200_000


class CgroupError(RuntimeError):
    pass


def v2_root() -> Path:
    env = os.environ.get("BPFINIT_CGROUP2_ROOT")
    for root in ([env] if env else []) + list(CANDIDATE_ROOTS):
        if root and (Path(root) / "cgroup.controllers").exists():
            return Path(root)
    raise CgroupError("no cgroup v2 hierarchy found (looked at /sys/fs/cgroup[/unified]); cgroup v2 is required")


def pod_dir_names(pod_uid: str) -> set[str]:
    """systemd driver: kubepods-<qos>-pod<uid with _>.slice; cgroupfs driver: pod<uid>."""
    return {f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}"}


def find_pod_cgroup(pod_uid: str, root: Path | None = None) -> Path:
    root = root or v2_root()
    wanted = pod_dir_names(pod_uid)
    matches = []
    walked = 0
    for dirpath, dirnames, _ in os.walk(root):
        walked += 1
        if walked > MAX_WALK_DIRS:
            break
        for name in dirnames:
            stem = name[:-len(".slice")] if name.endswith(".slice") else name
            if stem in wanted or any(stem.endswith("-" + w) for w in wanted):
                matches.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if "kubepods" in d or "kubepods" in dirpath or dirpath == str(root)
                       or d.endswith(".slice")]
    if not matches:
        raise CgroupError(f"no cgroup for pod {pod_uid} under {root} (mount the host cgroupfs or pass --cgroup)")
    if len(matches) > 1:
        raise CgroupError(f"several cgroups match pod {pod_uid}: {', '.join(map(str, matches[:3]))}")
    return matches[0]


def cgroup_id(path: Path | str) -> int:
    return os.stat(path).st_ino


def alive_ids(root: Path | None = None) -> set[int]:
    """Inodes (= cgroup ids) of every cgroup v2 directory: gc's liveness test."""
    root = root or v2_root()
    ids = set()
    for dirpath, _dirs, _files in os.walk(root):
        try:
            ids.add(os.stat(dirpath).st_ino)
        except OSError:
            pass
        if len(ids) > MAX_WALK_DIRS:
            break
    return ids
