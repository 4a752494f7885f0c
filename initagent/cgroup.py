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


def tree_root(root: Path | str | None = None) -> Path:
    """The root of the host's cgroup v2 hierarchy, for walks that decide liveness (gc).

    A given root (--cgroup2-root, BPFINIT_CGROUP2_ROOT) must be exactly that: a missing or non-cgroup
    directory, or a sub-cgroup (a cgroup namespace's view is one), would hide live pods from the walk and
    make them look dead. Candidates are only tried when nothing was given."""
    given = str(root) if root else os.environ.get("BPFINIT_CGROUP2_ROOT", "")
    if given:
        path = Path(given)
        if not (path / "cgroup.controllers").exists():
            raise CgroupError(f"{given} is not a cgroup v2 root (no cgroup.controllers)")
        if (path / "cgroup.type").exists():
            raise CgroupError(f"{given} is a cgroup v2 sub-cgroup (it has cgroup.type), not the root of the "
                              "hierarchy: a walk from it would not see every pod")
        return path
    for candidate in CANDIDATE_ROOTS:
        path = Path(candidate)
        if (path / "cgroup.controllers").exists() and not (path / "cgroup.type").exists():
            return path
    raise CgroupError("no cgroup v2 hierarchy root found (looked at /sys/fs/cgroup[/unified], "
                      "/host/sys/fs/cgroup[/unified]); pass --cgroup2-root")


def alive_ids(root: Path | str | None = None) -> set[int]:
    """Inodes (= cgroup ids) of every cgroup v2 directory: gc's liveness test. Raises CgroupError rather
    than return a partial set (a cgroup missed here is a pod gc would remove)."""
    root = tree_root(root)
    ids = set()

    def failed(err: OSError) -> None:
        if not isinstance(err, FileNotFoundError):   # removed during the walk: it is dead anyway
            raise CgroupError(f"cannot walk the cgroup tree under {root}: {err}")

    for dirpath, _dirs, _files in os.walk(root, onerror=failed):
        try:
            ids.add(os.stat(dirpath).st_ino)
        except FileNotFoundError:
            pass
        if len(ids) > MAX_WALK_DIRS:
            raise CgroupError(f"more than {MAX_WALK_DIRS} cgroups under {root}: not walking a partial tree")
    return ids
