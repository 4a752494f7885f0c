"""Find kernel headers for bcc by ourselves, so the agent works on nodes without /lib/modules/$(uname -r).

Order: an explicit directory (--kernel-headers); then an exact match for the running kernel anywhere:
/lib/modules/<release>/{build,source} in the image and on the node (mounted at /host/lib/modules by the
webhook), /usr/src/linux-headers-<release> likewise (image, then /host/usr/src), and
/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS; extracted once to a cache); then the image's Debian-style
split packages /usr/src/linux-headers-<ver>-{<flavour>,common} with the nearest version; then the node's
nearest under /host/usr/src. Returns the environment (BCC_KERNEL_SOURCE) and cflags bcc needs.
"""
from __future__ import annotations

import os
import platform
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

KHEADERS = Path("/sys/kernel/kheaders.tar.xz")
# The node's /lib/modules and /usr/src as the webhook mounts them into the agent (webhook/mutate.py).
HOST_ROOT = Path(os.environ.get("BPFINIT_HOST_ROOT", "/host"))
DEFAULT_CACHE = Path(os.environ.get("BPFINIT_CACHE_DIR", "/var/cache/bpfinit"))


class HeadersError(RuntimeError):
    """No usable kernel headers; str() says where we looked."""


@dataclass(frozen=True)
class KernelHeaders:
    source: str                 # BCC_KERNEL_SOURCE
    cflags: tuple[str, ...]     # extra -I for the generated/arch dirs
    origin: str                 # how they were found (for doctor/status)
    version: str = ""
    env: dict = field(default_factory=dict, compare=False)

    def environ(self) -> dict[str, str]:
        return {"BCC_KERNEL_SOURCE": self.source}


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "x86", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "powerpc",
            "s390x": "s390", "riscv64": "riscv"}.get(machine, machine)


def _generated_cflags(build: Path) -> tuple[str, ...]:
    arch = _arch()
    dirs = [build / "arch" / arch / "include" / "generated", build / "include",
            build / "arch" / arch / "include" / "generated" / "uapi", build / "include" / "generated" / "uapi"]
    return tuple(f"-I{d}" for d in dirs if d.is_dir())


def _is_full_tree(path: Path) -> bool:
    arch = _arch()
    return (path / "include" / "linux").is_dir() and (path / "arch" / arch / "include").is_dir() and \
        (path / "include" / "generated").is_dir()


def _is_common(path: Path) -> bool:
    return (path / "include" / "linux").is_dir() and (path / "arch" / _arch() / "include").is_dir()


def _is_build(path: Path) -> bool:
    return (path / "include" / "generated").is_dir() or (path / "arch" / _arch() / "include" / "generated").is_dir()


def _pair(build: Path, source: Path, origin: str, version: str = "") -> KernelHeaders | None:
    build, source = build.resolve(), source.resolve()
    if _is_full_tree(build):
        return KernelHeaders(str(build), _generated_cflags(build), origin, version)
    if _is_build(build) and _is_common(source):
        return KernelHeaders(str(source), _generated_cflags(build), origin, version)
    return None


def from_dir(path: str | Path) -> KernelHeaders:
    """An explicit directory: a full tree, a Debian flavour dir (its -common sibling is used), or a
    -common dir (its flavour sibling is used)."""
    p = Path(path)
    if not p.is_dir():
        raise HeadersError(f"--kernel-headers {path}: not a directory")
    if _is_full_tree(p):
        return KernelHeaders(str(p.resolve()), _generated_cflags(p), f"--kernel-headers {p}")
    m = re.match(r"^(linux-headers-.+?)-([a-z0-9]+)$", p.name)
    if m:
        prefix, flavour = m.groups()
        siblings = list(p.parent.glob(f"{prefix}-*"))
        if flavour == "common":
            builds = [s for s in siblings if s != p and _is_build(s)]
            if builds:
                found = _pair(builds[0], p, f"--kernel-headers {p}")
                if found:
                    return found
        else:
            common = p.parent / f"{prefix}-common"
            found = _pair(p, common, f"--kernel-headers {p}")
            if found:
                return found
    raise HeadersError(f"--kernel-headers {path}: no usable kernel headers there (need include/generated and "
                       f"arch/{_arch()}/include)")


def _in_root(path: Path, root: Path) -> Path:
    """Follow `path`'s own symlinks as if `root` were `/`: the node's absolute link
    /lib/modules/<r>/build -> /usr/src/... must land in <root>/usr/src, not in the image's /usr/src."""
    for _hop in range(8):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    return path


def _from_modules(release: str, root: Path = Path("/")) -> KernelHeaders | None:
    base = root / "lib" / "modules" / release
    build, source = _in_root(base / "build", root), _in_root(base / "source", root)
    if not build.exists():
        return None
    return _pair(build, source if source.exists() else build, str(base), release)


def _from_kheaders(release: str, cache: Path) -> KernelHeaders | None:
    if not KHEADERS.exists():
        return None
    target = cache / f"kheaders-{release}"
    if not _is_full_tree(target):
        tmp = cache / f"kheaders-{release}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(KHEADERS) as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(target)
        except OSError:
            pass  # another agent won the race; its copy is identical
    if _is_full_tree(target):
        return KernelHeaders(str(target), _generated_cflags(target), f"{KHEADERS} (cached in {target})", release)
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _from_usr_src(release: str, root: Path = Path("/usr/src"), exact: bool = False) -> KernelHeaders | None:
    """Debian split packages: linux-headers-<ver>-<flavour> (build) + linux-headers-<ver>-common.
    `exact`: only linux-headers-<release> itself (e.g. linux-headers-6.1.0-56-amd64)."""
    want = _version_tuple(release)
    candidates = []
    for build in root.glob("linux-headers-*"):
        m = re.match(r"^linux-headers-(.+)-([a-z0-9]+)$", build.name)
        if not m or m.group(2) == "common" or not _is_build(build):
            continue
        if exact and build.name != f"linux-headers-{release}":
            continue
        version = m.group(1)
        common = root / f"linux-headers-{version}-common"
        if not _is_common(common) and not _is_full_tree(build):
            continue
        have = _version_tuple(version)
        # nearest: same major.minor first, then the closest version, preferring older over newer
        distance = (abs((have[:1] or (0,))[0] - (want[:1] or (0,))[0]),
                    abs(((have + (0, 0))[1]) - ((want + (0, 0))[1])), have > want)
        candidates.append((distance, build, common, version))
    for _dist, build, common, version in sorted(candidates, key=lambda c: c[0]):
        found = _pair(build, common if common.exists() else build, f"{build} (+ -common)", version)
        if found:
            return found
    return None


def find(explicit: str = "", release: str | None = None, cache: Path = DEFAULT_CACHE,
         host_root: Path | None = None, image_root: Path = Path("/")) -> KernelHeaders:
    release = release or platform.release()
    if explicit:
        return from_dir(explicit)
    host = HOST_ROOT if host_root is None else host_root
    image_src, host_src = image_root / "usr" / "src", host / "usr" / "src"
    finders = (
        # an exact match for the running kernel, wherever it is
        lambda: _from_modules(release, image_root), lambda: _from_modules(release, host),
        lambda: _from_usr_src(release, image_src, exact=True), lambda: _from_usr_src(release, host_src, exact=True),
        lambda: _from_kheaders(release, cache),
        # then the image's Debian headers (stable UAPI structures: fine for newer kernels), then the node's
        lambda: _from_usr_src(release, image_src), lambda: _from_usr_src(release, host_src),
    )
    for finder in finders:
        found = finder()
        if found:
            return found
    raise HeadersError(f"no kernel headers for {release}: looked in {image_root / 'lib/modules' / release}/build, "
                       f"{host / 'lib/modules' / release}/build, {KHEADERS}, {image_src}/linux-headers-*, "
                       f"{host_src}/linux-headers-*; install the headers package on the node or pass "
                       f"--kernel-headers DIR")
