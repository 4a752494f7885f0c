"""Compile bpf/bpfinit.c once per node and pin it; later pods open the pins without compiling.

Layout: <bpffs>/bpfinit/<hash>/{progs/<fn>, maps/<map>, complete/}; <hash> = sha256(expanded source +
kernel release + bcc version)[:16]. `complete/` is made last: a build without it is partial (a compile
that was killed) and is redone. The first compile on a node is serialised with flock on
<bpffs>/bpfinit (bpffs holds no regular files; a directory fd is enough and the kernel drops the lock
if the agent dies).

Other parts add their programs to PROGRAMS (one line each); `target` says how attach.py attaches them.
"""
from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from initagent import bpfsys
from initagent.digest import sha256

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
MAIN_SOURCE = "bpfinit.c"


@dataclass(frozen=True)
class ProgSpec:
    name: str            # C function in bpf/
    prog_type: str       # bpfsys.PROG_TYPE key
    attach_type: str     # bpfsys.ATTACH key (also the expected attach type at load)
    target: str          # "cgroup" (pod cgroup, per pod) | "netns" (per pod link) | "none" (loaded only)
    part: str            # source file defining it; the program exists only if that part is present


PROGRAMS: list[ProgSpec] = [
    ProgSpec("bpfinit_connect4", "cgroup_sock_addr", "inet4_connect", "cgroup", "connect.c"),
    ProgSpec("bpfinit_connect6", "cgroup_sock_addr", "inet6_connect", "cgroup", "connect.c"),
    ProgSpec("bpfinit_sockops", "sock_ops", "sock_ops", "cgroup", "sockops.c"),
    ProgSpec("bpfinit_getsockopt", "cgroup_sockopt", "getsockopt", "cgroup", "getsockopt.c"),
    # DNS / inbound / accel (owner: inbound+DNS engineer)
    ProgSpec("bpfinit_sendmsg4", "cgroup_sock_addr", "udp4_sendmsg", "cgroup", "dns.c"),
    ProgSpec("bpfinit_sendmsg6", "cgroup_sock_addr", "udp6_sendmsg", "cgroup", "dns.c"),
    ProgSpec("bpfinit_recvmsg4", "cgroup_sock_addr", "udp4_recvmsg", "cgroup", "dns.c"),
    ProgSpec("bpfinit_recvmsg6", "cgroup_sock_addr", "udp6_recvmsg", "cgroup", "dns.c"),
    ProgSpec("bpfinit_sk_lookup", "sk_lookup", "sk_lookup", "netns", "sk_lookup.c"),
    ProgSpec("bpfinit_sk_msg", "sk_msg", "sk_msg_verdict", "none", "accel.c"),
    # egress guard: socket kinds the connect/sendmsg hooks do not see (raw, UDP-Lite, SCTP...)
    ProgSpec("bpfinit_sock_create", "cgroup_sock", "inet_sock_create", "cgroup", "sock_create.c"),
    # getpeername() of a redirected socket shows its original destination (as with iptables NAT)
    ProgSpec("bpfinit_getpeername4", "cgroup_sock_addr", "inet4_getpeername", "cgroup", "getpeername.c"),
    ProgSpec("bpfinit_getpeername6", "cgroup_sock_addr", "inet6_getpeername", "cgroup", "getpeername.c"),
]

CORE_PARTS = ("connect.c", "sockops.c", "getsockopt.c")


class LoadError(RuntimeError):
    """Compile/load/pin failed; str() is one line."""


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[^\n]*$', re.M)
_HAS_INCLUDE = re.compile(r'__has_include\(\s*"([^"]+)"\s*\)')


def expand_source(bpf_dir: Path = BPF_DIR, parts: tuple[str, ...] | None = None) -> str:
    """bcc 0.26 rewrites map methods only in the main text, so local includes are inlined here.
    `__has_include("x")` is decided here too (x present and, when `parts` is given, allowed)."""

    def allowed(name: str) -> bool:
        if not (bpf_dir / name).exists():
            return False
        return parts is None or not name.endswith(".c") or name in parts or name == MAIN_SOURCE

    def expand(path: Path, depth: int) -> str:
        if depth > 8:
            raise LoadError(f"#include nesting deeper than 8 at {path.name}")
        text = path.read_text()
        text = _HAS_INCLUDE.sub(lambda m: "1" if allowed(m.group(1)) else "0", text)

        def repl(m: re.Match) -> str:
            target = bpf_dir / m.group(1)
            if not target.exists():
                raise LoadError(f"{path.name}: #include \"{m.group(1)}\" not found in {bpf_dir}")
            return f"/* ---- {m.group(1)} ---- */\n" + expand(target, depth + 1)
        return _INCLUDE.sub(repl, text)

    return expand(bpf_dir / MAIN_SOURCE, 0)


_INT_FUNCTION = re.compile(r"int\s+(\w+)\s*\(")


def defined_int_functions(text: str) -> set[str]:
    """Names in `int NAME(` where `int` stands as a word of its own. One regex pass, with the word check
    done in Python: a leading word-boundary assertion makes re scan the ~100 KB source ~10x slower, and
    warm setup runs this."""
    return {m.group(1) for m in _INT_FUNCTION.finditer(text)
            if m.start() == 0 or not (text[m.start() - 1].isalnum() or text[m.start() - 1] == "_")}


def programs_in(text: str, parts: tuple[str, ...] | None = None, bpf_dir: Path = BPF_DIR) -> list[ProgSpec]:
    defined = defined_int_functions(text)
    return [p for p in PROGRAMS
            if (parts is None or p.part in parts) and p.name in defined and (bpf_dir / p.part).exists()]


def bcc_version() -> str:
    """Read bcc's version without importing it (import costs time on the warm path)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.origin:
        return "none"
    version_file = Path(spec.origin).parent / "version.py"
    try:
        m = re.search(r"['\"]([^'\"]+)['\"]", version_file.read_text())
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def build_hash(text: str, release: str | None = None, bcc: str | None = None) -> str:
    digest = sha256()
    for part in (text, release or os.uname().release, bcc or bcc_version()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class Build:
    """One pinned program generation: fds of its programs, maps opened by name on demand."""

    def __init__(self, directory: Path, programs: list[ProgSpec]):
        self.dir = directory
        self.hash = directory.name
        self.programs = programs
        self._prog_fds: dict[str, int] = {}
        self._map_fds: dict[str, int] = {}

    def prog_fd(self, name: str) -> int:
        if name not in self._prog_fds:
            self._prog_fds[name] = bpfsys.obj_get(str(self.dir / "progs" / name))
        return self._prog_fds[name]

    def map_fd(self, name: str) -> int:
        if name not in self._map_fds:
            self._map_fds[name] = bpfsys.obj_get(str(self.dir / "maps" / name))
        return self._map_fds[name]

    def has_map(self, name: str) -> bool:
        return (self.dir / "maps" / name).exists()

    def close(self) -> None:
        for fd in list(self._prog_fds.values()) + list(self._map_fds.values()):
            os.close(fd)
        self._prog_fds.clear()
        self._map_fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _complete(directory: Path, programs: list[ProgSpec]) -> bool:
    return (directory / "complete").is_dir() and all((directory / "progs" / p.name).exists() for p in programs)


def _remove_tree(path: Path) -> None:
    """rm -r for bpffs (unlink pins, rmdir dirs)."""
    if not path.exists():
        return
    import shutil  # cold path only
    shutil.rmtree(path, ignore_errors=True)


class _Lock:
    def __init__(self, path: Path, timeout_s: float = 120.0):
        self.path, self.timeout_s, self.fd = path, timeout_s, -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise LoadError(f"timed out after {self.timeout_s:.0f}s waiting for the compile lock on {self.path}")
                time.sleep(0.05)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _compile_and_pin(text: str, directory: Path, programs: list[ProgSpec], headers_dir: str) -> None:
    from initagent import headers as headers_mod
    try:
        found = headers_mod.find(headers_dir)
    except headers_mod.HeadersError as err:
        raise LoadError(str(err)) from None
    os.environ.update(found.environ())
    try:
        from bcc import BPF, lib  # Debian python3-bpfcc
    except ImportError:
        raise LoadError("bcc is not importable (install Debian's python3-bpfcc; never `pip install bcc`)") from None
    _remove_tree(directory)
    (directory / "progs").mkdir(parents=True)
    (directory / "maps").mkdir()
    from initagent.accel import accel_cflags    # sk_rmem_alloc's offset, from the kernel's BTF
    from initagent.observe import event_cflags  # ring buffer, or perf buffer on kernels < 5.8
    from initagent.owner import owner_cflags    # socket owner as iptables sees it, from the kernel's BTF
    cflags = (list(found.cflags) + [f"-I{BPF_DIR}", "-Wno-macro-redefined"] + event_cflags() + accel_cflags()
              + owner_cflags()[0])
    try:
        bpf = BPF(text=text.encode(), cflags=cflags)
    except Exception as err:  # bcc raises bare Exception on compile errors (details on stderr)
        raise LoadError(f"compiling bpf/{MAIN_SOURCE} failed: {err} (headers: {found.origin})") from None
    try:
        for spec in programs:
            attach_type = bpfsys.ATTACH[spec.attach_type] if spec.prog_type != "sock_ops" else -1
            if spec.prog_type == "sk_msg":
                attach_type = -1
            try:
                fn = bpf.load_func(spec.name.encode(), bpfsys.PROG_TYPE[spec.prog_type], attach_type=attach_type)
            except Exception as err:
                raise LoadError(f"loading {spec.name} failed: {err}") from None
            bpfsys.obj_pin(fn.fd, str(directory / "progs" / spec.name))
        lib.bpf_num_tables.restype = ctypes.c_size_t
        lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
        lib.bpf_table_name.restype = ctypes.c_char_p
        lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        for i in range(lib.bpf_num_tables(bpf.module)):
            name = lib.bpf_table_name(bpf.module, i)
            fd = lib.bpf_table_fd(bpf.module, name)
            if fd < 0:
                raise LoadError(f"map {name.decode()} has no fd after load")
            bpfsys.obj_pin(fd, str(directory / "maps" / name.decode()))
        (directory / "complete").mkdir()
    finally:
        bpf.cleanup()


def parts_from_env() -> tuple[str, ...] | None:
    """BPFINIT_PARTS=connect.c,sockops.c,... restricts the compiled parts (development aid)."""
    value = os.environ.get("BPFINIT_PARTS", "")
    return tuple(p for p in value.split(",") if p) or None


def load(bpffs: str | Path, headers_dir: str = "", parts: tuple[str, ...] | None = None) -> Build:
    """Open the pinned build for the current sources, compiling it first if this node has none."""
    bpffs = Path(bpffs)
    if not bpffs.is_dir():
        raise LoadError(f"bpffs {bpffs} does not exist (mount it: mount -t bpf bpf {bpffs})")
    text = expand_source(parts=parts)
    programs = programs_in(text, parts)
    root = bpffs / "bpfinit"
    directory = root / build_hash(text)
    if not _complete(directory, programs):
        try:
            root.mkdir(exist_ok=True)
        except OSError as err:
            raise LoadError(f"cannot create {root}: {err.strerror} (is {bpffs} a bpffs mount?)") from None
        with _Lock(root):
            if not _complete(directory, programs):
                _compile_and_pin(text, directory, programs, headers_dir)
    return Build(directory, programs)


def builds(bpffs: str | Path, must_exist: bool = False) -> list[Path]:
    """Complete builds pinned under bpffs. must_exist: a missing bpffs directory is an error (LoadError),
    not "no builds" (a typo in --bpffs must not read as "this pod is not configured")."""
    if must_exist and not Path(bpffs).is_dir():
        raise LoadError(f"bpffs {bpffs} does not exist (mount it: mount -t bpf bpf {bpffs})")
    root = Path(bpffs) / "bpfinit"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / "complete").is_dir())
