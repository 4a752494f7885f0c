"""Kernel-test environment: "pods" made of a network namespace and a cgroup v2 directory.

A `Cluster` is one netns with a bridge that plays "the rest of the cluster": every pod added to it gets
a veth into the bridge (pod 10.250.0.<k>/24 and fd00:250::<k>/64, gateway .1/::1 in the cluster netns).
Addresses given to `Cluster.add_address` live on a dummy interface inside the cluster netns, so test
traffic to "outside" CIDRs never leaves namespaces the tests made. `Pod(name)` is the one-pod shorthand.

Processes started with `popen`/`run` are placed in the pod's cgroup before they exec (so every socket
they open belongs to the pod) and can drop to a uid/gid with setpriv.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CGROUP2_ROOT = Path(os.environ.get("BPFINIT_TEST_CGROUP2", "/sys/fs/cgroup/unified"))
TEST_CGROUP_PARENT = CGROUP2_ROOT / "bpfinit-tests"
REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
_counter = itertools.count(1)


def require_kernel() -> None:
    """Raise (not skip) when the kernel test preconditions are missing: these tests must not pass silently."""
    if os.geteuid() != 0:
        raise RuntimeError("kernel tests need root (deselect them with -m 'not kernel')")
    if not (CGROUP2_ROOT / "cgroup.controllers").exists():
        raise RuntimeError(f"no cgroup v2 hierarchy at {CGROUP2_ROOT}")
    if shutil.which("ip") is None:
        raise RuntimeError("iproute2 (`ip`) is missing; run scripts/install-system-deps.sh")


def _sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 10000}{next(_counter)}{secrets.token_hex(2)}"


@contextlib.contextmanager
def bpffs_mount():
    """A private bpffs instance: pins made under it vanish when it is unmounted."""
    path = Path(tempfile.mkdtemp(prefix="bpfinit-bpffs-"))
    _sh("mount", "-t", "bpf", "bpf", str(path))
    try:
        yield path
    finally:
        _sh("umount", "-l", str(path), check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


class _Netns:
    """Helpers shared by pods and the cluster netns."""

    name: str
    cgroup: Path | None = None

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh("ip", "-n", self.name, *args, check=check)

    def command(self, cmd: list[str], uid: int | None = None, gid: int | None = None,
                groups: list[int] | None = None) -> list[str]:
        full = self.exec_prefix()
        if uid is not None or gid is not None or groups is not None:
            full += ["setpriv"]
            if uid is not None:
                full += [f"--reuid={uid}"]
            if gid is not None:
                full += [f"--regid={gid}"]
            full += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
            full += ["--"]
        return full + [str(c) for c in cmd]

    def _preexec(self):
        cgroup = self.cgroup

        def enter_cgroup():
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        return enter_cgroup

    def popen(self, cmd: list[str], uid: int | None = None, gid: int | None = None,
              groups: list[int] | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        proc = subprocess.Popen(self.command(cmd, uid, gid, groups), preexec_fn=self._preexec(), **kw)
        self._procs.append(proc)
        return proc

    def tx_bytes(self, dev: str) -> int:
        return int(self.run(["cat", f"/sys/class/net/{dev}/statistics/tx_bytes"], check=True).stdout)

    def lo_tx_bytes(self) -> int:
        """Bytes sent over this pod's loopback (the app<->sidecar hops travel there unless accelerated)."""
        return self.tx_bytes("lo")

    def run(self, cmd: list[str], uid: int | None = None, gid: int | None = None,
            groups: list[int] | None = None, timeout: float = 30, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(cmd, uid, gid, groups), preexec_fn=self._preexec(),
                              timeout=timeout, check=check, **kw)

    def python(self, code_or_args: list[str], **kw) -> subprocess.CompletedProcess:
        return self.run([PYTHON, *code_or_args], **kw)

    def _stop_procs(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()


class Cluster(_Netns):
    """The "rest of the cluster": a netns with a bridge that pods plug into."""

    SUBNET4 = "10.250.0"
    SUBNET6 = "fd00:250::"

    def __init__(self) -> None:
        self.name = _unique("bpfc")
        self.bridge = "br0"
        self.pods: list[Pod] = []
        self._procs: list[subprocess.Popen] = []
        self._next_host = itertools.count(2)
        self.gateway4 = f"{self.SUBNET4}.1"
        self.gateway6 = f"{self.SUBNET6}1"

    def __enter__(self) -> "Cluster":
        require_kernel()
        _sh("ip", "netns", "add", self.name)
        try:
            self.ip("link", "set", "lo", "up")
            self.ip("link", "add", self.bridge, "type", "bridge")
            self.ip("addr", "add", f"{self.gateway4}/24", "dev", self.bridge)
            self.ip("addr", "add", f"{self.gateway6}/64", "dev", self.bridge, "nodad")
            self.ip("link", "set", self.bridge, "up")
            _sh("ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _sh("ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def add_address(self, addr: str) -> None:
        """Make the cluster netns own `addr` (servers there can bind it; pods reach it via their gateway).

        The address sits on the cluster netns's `lo` (this kernel has no dummy driver), so traffic to it
        ends inside that netns and never leaves the namespaces the test made.
        """
        plen = "128" if ":" in addr else "32"
        extra = ["nodad"] if ":" in addr else []
        self.ip("addr", "add", f"{addr}/{plen}", "dev", "lo", *extra)

    def add_pod(self, name: str) -> "Pod":
        pod = Pod(name, cluster=self, host=next(self._next_host))
        pod._create()
        self.pods.append(pod)
        return pod

    def __exit__(self, *exc) -> None:
        for pod in reversed(self.pods):
            pod._destroy()
        self.pods.clear()
        self._stop_procs()
        _sh("ip", "netns", "del", self.name, check=False)


class Pod(_Netns):
    """A pod: netns (lo + eth0 into the cluster bridge) and a cgroup v2 directory.

    Used standalone (`with Pod("x") as pod`) it brings its own Cluster, reachable as `pod.cluster`,
    with `pod.peer_popen/peer_run` running there.
    """

    def __init__(self, name: str, cluster: Cluster | None = None, host: int = 2) -> None:
        self.label = name
        self.name = _unique(f"bpp{name[:4]}")
        self.cluster = cluster
        self._own_cluster = cluster is None
        self.host = host
        self._procs: list[subprocess.Popen] = []
        self.cgroup = TEST_CGROUP_PARENT / self.name
        self.addr4 = f"{Cluster.SUBNET4}.{host}"
        self.addr6 = f"{Cluster.SUBNET6}{host:x}"
        self.veth_host = _unique("bvh")[:15]

    # standalone use
    def __enter__(self) -> "Pod":
        if self._own_cluster:
            self.cluster = Cluster().__enter__()
            self.cluster.pods.append(self)
        try:
            self._create()
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._own_cluster and self.cluster is not None:
            self.cluster.__exit__(*exc)   # destroys this pod too
        else:
            self._destroy()

    @property
    def peer_addr4(self) -> str:
        return self.cluster.gateway4

    @property
    def peer_addr6(self) -> str:
        return self.cluster.gateway6

    def peer_popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        return self.cluster.popen(cmd, **kw)

    def peer_run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return self.cluster.run(cmd, **kw)

    def _create(self) -> None:
        require_kernel()
        if (Path("/run/netns") / self.name).exists():
            return
        _sh("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")
        _sh("ip", "link", "add", self.veth_host, "netns", self.cluster.name, "type", "veth",
            "peer", "name", "eth0", "netns", self.name)
        self.cluster.ip("link", "set", self.veth_host, "master", self.cluster.bridge)
        self.cluster.ip("link", "set", self.veth_host, "up")
        self.ip("addr", "add", f"{self.addr4}/24", "dev", "eth0")
        self.ip("addr", "add", f"{self.addr6}/64", "dev", "eth0", "nodad")
        self.ip("link", "set", "eth0", "up")
        self.ip("route", "add", "default", "via", self.cluster.gateway4)
        self.ip("-6", "route", "add", "default", "via", self.cluster.gateway6)
        TEST_CGROUP_PARENT.mkdir(exist_ok=True)
        self.cgroup.mkdir(exist_ok=True)

    def kill_cgroup(self) -> None:
        """Kill every process in the pod cgroup (what the kubelet does when a pod goes)."""
        kill = self.cgroup / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            procs = (self.cgroup / "cgroup.procs")
            if not procs.exists() or not procs.read_text().strip():
                break
            time.sleep(0.05)

    def _destroy(self) -> None:
        self._stop_procs()
        if self.cgroup.exists():
            self.kill_cgroup()
            for _ in range(50):
                try:
                    self.cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        _sh("ip", "netns", "del", self.name, check=False)

    def add_interface(self, name: str, addr4: str | None = None, peer_addr4: str | None = None,
                      routes: list[str] = ()) -> None:
        """A second NIC in the pod (for -c / -k tests): a veth whose other end sits in the cluster netns.

        `addr4` goes on the pod side, `peer_addr4` on the cluster side (unbridged), and `routes`
        (CIDRs) are routed through the new NIC. (This kernel has no dummy driver.)
        """
        peer = _unique("bvx")[:15]
        _sh("ip", "link", "add", peer, "netns", self.cluster.name, "type", "veth",
            "peer", "name", name, "netns", self.name)
        if addr4:
            self.ip("addr", "add", addr4, "dev", name)
        if peer_addr4:
            self.cluster.ip("addr", "add", peer_addr4, "dev", peer)
        self.ip("link", "set", name, "up")
        self.cluster.ip("link", "set", peer, "up")
        for cidr in routes:
            self.ip("route", "add", cidr, "dev", name)
