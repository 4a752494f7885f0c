"""Per-pod attach/detach: config entries + programs on the pod cgroup (and netns), all or nothing.

Order (so a failure or a kill leaves nothing half-attached):
 1. register a fresh pod_idx (BPF_NOEXIST: safe with concurrent setups) and write its list entries;
 2. create bpf links (cgroup programs: multi-attach, coexisting with Cilium/systemd programs; the
    netns program: per-netns link). Links live only as long as our fds until pinned, so a kill here
    detaches everything by itself;
 3. pin the links under <bpffs>/bpfinit/pods/<key>_new_<pid> (bpffs rejects names with a dot)/ and rename that into place;
 4. commit: pod_by_netns[cookie] = pod_cfg (programs return at once for netns without it);
 5. retire the previous generation of this pod (re-run with a changed config).
Any error before 4 undoes 1-3. A re-run with the same config and intact links is a no-op.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from initagent import bpfsys, podconfig
from initagent.flags import CaptureConfig
from initagent.loader import Build
from initagent.podconfig import PodFacts


class AttachError(RuntimeError):
    pass


@dataclass
class SetupResult:
    pod_idx: int
    changed: bool
    pod_dir: Path
    entries: int


def pods_root(bpffs: str | Path) -> Path:
    return Path(bpffs) / "bpfinit" / "pods"


def pod_key(cookie: int) -> str:
    return f"ns-{cookie:x}"


def _read_cfg(build: Build, cookie: int) -> dict | None:
    raw = bpfsys.map_lookup(build.map_fd("pod_by_netns"), podconfig.U64.pack(cookie), podconfig.POD_CFG.size)
    return podconfig.unpack_pod_cfg(raw) if raw else None


def _read_info(build: Build, pod_idx: int) -> dict | None:
    raw = bpfsys.map_lookup(build.map_fd("pod_registry"), podconfig.U32.pack(pod_idx), podconfig.POD_INFO.size)
    return podconfig.unpack_pod_info(raw) if raw else None


def _links_intact(pod_dir: Path, build: Build, cgroup_id: int) -> bool:
    """Every program of the build has a pinned link here that is still attached to this cgroup."""
    for spec in build.programs:
        if spec.target not in ("cgroup", "netns"):
            continue
        path = pod_dir / spec.name
        if not path.exists():
            return False
        try:
            with bpfsys.Fd(bpfsys.obj_get(str(path))) as link:
                info = bpfsys.link_info(link.fd)
        except OSError:
            return False
        if spec.target == "cgroup" and info.get("cgroup_id") != cgroup_id:
            return False
        if info.get("prog_id") != bpfsys.prog_id(build.prog_fd(spec.name)):
            return False
    return True


def _random_pod_idx() -> int:
    """Uniform enough in [1, 2**31 - 2] (bias < 2**-32), from the kernel's CSPRNG; the `secrets` module
    would cost ~2 ms of imports on the warm path."""
    return 1 + int.from_bytes(os.urandom(8), "little") % (2**31 - 2)


def _allocate_idx(build: Build, info: bytes, bpffs, cookie: int) -> int:
    fd = build.map_fd("pod_registry")
    reclaimed = None
    for _ in range(64):
        idx = _random_pod_idx()
        try:
            bpfsys.map_update(fd, podconfig.U32.pack(idx), info, bpfsys.BPF_NOEXIST)
            return idx
        except bpfsys.BpfError as err:
            if err.errno == 7 and reclaimed is None:   # E2BIG: the registry is full; reclaim dead pods once
                reclaimed = reclaim_dead(build, bpffs, keep_cookie=cookie)
                continue
            if err.errno == 7:
                raise AttachError(f"pod registry full ({bpfsys.map_info(fd)['max_entries']} pods) and no pod "
                                  "is known dead: run `bpfinit-agent gc` on the node") from None
            if err.errno != 17:  # EEXIST: someone else holds it, try another
                raise
    raise AttachError("could not allocate a pod index (registry full?)")


def delete_pod_entries(build: Build, pod_idx: int, entries: dict[str, list[tuple[bytes, bytes]]] | None = None) -> int:
    """Remove a pod's list entries (from the known rows, or by scanning every list map)."""
    removed = 0
    for name, key_size in podconfig.LIST_MAPS.items():
        if not build.has_map(name):
            continue
        fd = build.map_fd(name)
        keys = [k for k, _v in entries.get(name, [])] if entries is not None else \
            [k for k in bpfsys.map_keys(fd, key_size) if podconfig.key_pod_idx(name, k) == pod_idx]
        for key in keys:
            removed += bpfsys.map_delete(fd, key)
    bpfsys.map_delete(build.map_fd("pod_registry"), podconfig.U32.pack(pod_idx))
    if build.has_map("obs_identity"):   # observability: identity, counters and bucket go with the pod
        from initagent import identity
        identity.forget(build.dir, pod_idx)
    return removed


def _write_entries(build: Build, entries: dict[str, list[tuple[bytes, bytes]]]) -> int:
    count = 0
    for name, rows in entries.items():
        fd = build.map_fd(name)
        for key, value in rows:
            bpfsys.map_update(fd, key, value)
            count += 1
    return count


def _fault_point(name: str) -> None:
    """Test hook: BPFINIT_TEST_STALL=<name> stalls setup here (bounded) so a test can kill it mid-way."""
    if os.environ.get("BPFINIT_TEST_STALL") == name:
        import sys
        print(f"STALLED {name}", file=sys.stderr, flush=True)
        time.sleep(30)


def _unpin_dir(path: Path) -> None:
    """Unpinning a link dir detaches its programs (we hold no other fds)."""
    if not path.exists():   # the usual case on a first setup: spare the shutil import
        return
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def setup_pod(build: Build, bpffs: str | Path, cfg: CaptureConfig, facts: PodFacts, cookie: int,
              cgroup_path: str | Path, netns_path: str = "/proc/self/ns/net") -> SetupResult:
    cgroup_path = Path(cgroup_path)
    cgroup_id = os.stat(cgroup_path).st_ino
    netns_ino = os.stat(netns_path).st_ino
    digest = podconfig.config_digest(cfg, facts)
    root = pods_root(bpffs)
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / pod_key(cookie)

    current = _read_cfg(build, cookie)
    old_idx = current["pod_idx"] if current else None
    if current:
        info = _read_info(build, old_idx)
        if info and info["config_hash"] == digest.hex() and info["cgroup_id"] == cgroup_id and \
                _links_intact(final_dir, build, cgroup_id):
            return SetupResult(old_idx, False, final_dir, 0)

    pending = podconfig.pod_info_value(cookie, cgroup_id, netns_ino, time.time_ns(), os.getpid(), 0, digest)
    pod_idx = _allocate_idx(build, pending, bpffs, cookie)
    entries: dict = {}
    link_fds: list[int] = []
    new_dir = root / f"{pod_key(cookie)}_new_{os.getpid()}"
    old_dir = root / f"{pod_key(cookie)}_old_{os.getpid()}"
    committed = False
    try:
        entries = podconfig.build_entries(cfg, pod_idx, facts)
        count = _write_entries(build, entries)
        cfg_value = podconfig.pod_cfg_value(cfg, facts, pod_idx)
        cg_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        ns_fd = os.open(netns_path, os.O_RDONLY)
        try:
            names = []
            for spec in build.programs:
                if spec.target == "cgroup":
                    target = cg_fd
                elif spec.target == "netns":
                    target = ns_fd
                else:
                    continue
                try:
                    link_fds.append(bpfsys.link_create(build.prog_fd(spec.name), target,
                                                       bpfsys.ATTACH[spec.attach_type]))
                except OSError as err:
                    raise AttachError(f"attaching {spec.name} to {'cgroup ' + str(cgroup_path) if target == cg_fd else 'netns'}"
                                      f" failed: {err.strerror}") from None
                names.append(spec.name)
        finally:
            os.close(cg_fd)
            os.close(ns_fd)
        _fault_point("links")
        new_dir.mkdir()
        for name, fd in zip(names, link_fds):
            bpfsys.obj_pin(fd, str(new_dir / name))
        if final_dir.exists():
            final_dir.rename(old_dir)
        new_dir.rename(final_dir)
        # commit: from here the pod is captured with the new config
        bpfsys.map_update(build.map_fd("pod_by_netns"), podconfig.U64.pack(cookie), cfg_value)
        committed = True
        bpfsys.map_update(build.map_fd("pod_registry"), podconfig.U32.pack(pod_idx),
                          podconfig.pod_info_value(cookie, cgroup_id, netns_ino, time.time_ns(), os.getpid(), 1,
                                                   digest))
    except BaseException:
        if not committed:
            for fd in link_fds:
                os.close(fd)
            link_fds = []
            _unpin_dir(new_dir)
            if final_dir.exists() and old_dir.exists():
                _unpin_dir(final_dir)
            if old_dir.exists():
                old_dir.rename(final_dir)
            delete_pod_entries(build, pod_idx, entries)
        raise
    finally:
        for fd in link_fds:
            os.close(fd)
    # retire the previous generation of this pod
    _unpin_dir(old_dir)
    if old_idx is not None and old_idx != pod_idx:
        delete_pod_entries(build, old_idx)
    registered = remove_same_cgroup_leftovers(build, bpffs, cgroup_id, keep_cookie=cookie)
    if registered >= RECLAIM_AT * bpfsys.map_info(build.map_fd("pod_registry"))["max_entries"]:
        reclaim_dead(build, bpffs, keep_cookie=cookie)
    return SetupResult(pod_idx, True, final_dir, count)


def remove_same_cgroup_leftovers(build: Build, bpffs, cgroup_id: int, keep_cookie: int) -> int:
    """A pod sandbox restart gives the pod a new netns under the same cgroup: drop the old one's state.
    Returns how many registry entries there were (the walk is needed anyway; setup uses the count)."""
    fd = build.map_fd("pod_registry")
    keys = bpfsys.map_keys(fd, 4)
    for key in keys:
        raw = bpfsys.map_lookup(fd, key, podconfig.POD_INFO.size)
        if not raw:
            continue
        info = podconfig.unpack_pod_info(raw)
        if info["cgroup_id"] == cgroup_id and info["netns_cookie"] != keep_cookie and info["committed"]:
            remove_pod(build, bpffs, info["netns_cookie"], podconfig.U32.unpack(key)[0])
    return len(keys)


# Setup reclaims dead pods itself once the registry is this full (and when it is full); below that, dead
# pods wait for `bpfinit-agent gc`, so the warm path pays nothing for them.
RECLAIM_AT = 0.9


def cgroup_released(build: Build, bpffs, cookie: int) -> bool:
    """True when the kernel has released the pod's cgroup: the kernel auto-detaches a cgroup's bpf links
    when the cgroup is removed and its last socket is gone, and the pinned link then reports cgroup id 0.
    This is evidence from the kernel itself, with no cgroupfs walk (the init container may not see the
    host's tree) and no pid check (it runs in the pod's pid namespace). No pinned link proves nothing (a
    concurrent re-setup renames the pin dir), so such a pod is kept."""
    pod_dir = pods_root(bpffs) / pod_key(cookie)
    if not pod_dir.is_dir():
        return False
    for spec in build.programs:
        if spec.target != "cgroup":
            continue
        try:
            with bpfsys.Fd(bpfsys.obj_get(str(pod_dir / spec.name))) as link:
                return bpfsys.link_info(link.fd).get("cgroup_id", -1) == 0
        except OSError:
            continue
    return False


def reclaim_dead(build: Build, bpffs, keep_cookie: int | None = None) -> int:
    """Remove every committed pod whose cgroup the kernel has released (cgroup_released). One pass over
    the list maps for all of them. Returns the number of pods removed."""
    fd = build.map_fd("pod_registry")
    dead: dict[int, int] = {}
    for key in bpfsys.map_keys(fd, 4):
        raw = bpfsys.map_lookup(fd, key, podconfig.POD_INFO.size)
        if not raw:
            continue
        info = podconfig.unpack_pod_info(raw)
        if info["committed"] and info["netns_cookie"] != keep_cookie and \
                cgroup_released(build, bpffs, info["netns_cookie"]):
            dead[podconfig.U32.unpack(key)[0]] = info["netns_cookie"]
    if dead:
        remove_pods(build, bpffs, dead)
    return len(dead)


def remove_pods(build: Build, bpffs, pods: dict[int, int]) -> int:
    """remove_pod for many pods ({pod_idx: netns cookie}) with one scan of each list map."""
    for pod_idx, cookie in pods.items():
        current = _read_cfg(build, cookie)
        if current and current["pod_idx"] != pod_idx:
            continue   # the netns has a newer generation: leave its config and pins alone
        if current:
            bpfsys.map_delete(build.map_fd("pod_by_netns"), podconfig.U64.pack(cookie))
        _unpin_dir(pods_root(bpffs) / pod_key(cookie))
    removed = 0
    for name, key_size in podconfig.LIST_MAPS.items():
        if not build.has_map(name):
            continue
        map_fd = build.map_fd(name)
        for key in bpfsys.map_keys(map_fd, key_size):
            if podconfig.key_pod_idx(name, key) in pods:
                removed += bpfsys.map_delete(map_fd, key)
    for pod_idx in pods:
        bpfsys.map_delete(build.map_fd("pod_registry"), podconfig.U32.pack(pod_idx))
        if build.has_map("obs_identity"):
            from initagent import identity
            identity.forget(build.dir, pod_idx)
    return removed


def remove_pod(build: Build, bpffs, cookie: int, pod_idx: int | None = None) -> int:
    """Detach and forget one pod: config first (capture stops deciding), then links, then entries."""
    current = _read_cfg(build, cookie)
    if current and (pod_idx is None or current["pod_idx"] == pod_idx):
        bpfsys.map_delete(build.map_fd("pod_by_netns"), podconfig.U64.pack(cookie))
        pod_idx = current["pod_idx"]
    _unpin_dir(pods_root(bpffs) / pod_key(cookie))
    if pod_idx is None:
        return 0
    return delete_pod_entries(build, pod_idx)


def attached_ids(cgroup_path: str | Path) -> dict[str, list[int]]:
    """Program ids attached to a cgroup, per attach type we use (for status and tests)."""
    out = {}
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("inet4_connect", "inet6_connect", "sock_ops", "getsockopt", "udp4_sendmsg",
                     "udp6_sendmsg", "udp4_recvmsg", "udp6_recvmsg", "inet_sock_create", "inet4_getpeername",
                     "inet6_getpeername"):
            out[name] = bpfsys.prog_query(fd, bpfsys.ATTACH[name])
    finally:
        os.close(fd)
    return out
