"""`bpfinit-agent doctor`: can this node run bpfinit? Each check says precisely what is missing."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from initagent import cgroup, headers

MIN_KERNEL = (5, 15)  # SO_NETNS_COOKIE / netns cookie in sockops; sk_lookup 5.9, getsockopt 5.3


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


def _kconfig() -> dict[str, str]:
    for path in (f"/boot/config-{platform.release()}", "/proc/config.gz"):
        try:
            if path.endswith(".gz"):
                import gzip
                text = gzip.open(path, "rt").read()
            else:
                text = Path(path).read_text()
        except OSError:
            continue
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {}


def run_checks(bpffs: str = "/sys/fs/bpf") -> list[dict]:
    checks = []
    version = _kernel_version()
    checks.append(_check("kernel", version >= MIN_KERNEL,
                         f"{platform.release()} (need >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]})"))
    checks.append(_check("root or CAP_BPF", os.geteuid() == 0 or _has_caps({39, 12}),
                         "needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"))
    try:
        root = cgroup.v2_root()
        checks.append(_check("cgroup v2", True, str(root)))
    except cgroup.CgroupError as err:
        checks.append(_check("cgroup v2", False, str(err)))
    is_bpffs = False
    try:
        with open("/proc/self/mounts") as f:
            is_bpffs = any(line.split()[1] == bpffs and line.split()[2] == "bpf" for line in f)
    except OSError:
        pass
    checks.append(_check("bpffs", is_bpffs, f"{bpffs} {'is' if is_bpffs else 'is not'} a bpf mount"
                         + ("" if is_bpffs else f" (mount -t bpf bpf {bpffs})")))
    checks.append(_check("BTF", Path("/sys/kernel/btf/vmlinux").exists(), "/sys/kernel/btf/vmlinux"))
    try:
        found = headers.find()
        checks.append(_check("kernel headers", True, f"{found.origin} -> {found.source}"))
    except headers.HeadersError as err:
        checks.append(_check("kernel headers", False, str(err)))
    try:
        import importlib.util
        ok = importlib.util.find_spec("bcc") is not None
    except ImportError:
        ok = False
    checks.append(_check("bcc", ok, "python3-bpfcc importable" if ok else "install Debian's python3-bpfcc"))
    kconfig = _kconfig()
    for option in ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF", "CONFIG_BPF_JIT", "CONFIG_NET_SOCK_MSG"):
        if kconfig:
            checks.append(_check(option, kconfig.get(option) == "y", kconfig.get(option, "not set")))
    if not kconfig:
        checks.append(_check("kernel config", True, "not readable (/boot/config-*, /proc/config.gz); "
                             "program-type support is proven at load time instead"))
    try:
        from initagent import netns
        netns.cookie()
        checks.append(_check("SO_NETNS_COOKIE", True, "supported"))
    except Exception as err:  # noqa: BLE001 - reported, not raised
        checks.append(_check("SO_NETNS_COOKIE", False, str(err)))
    from initagent import observe  # observability: ring buffer or perf-buffer fallback
    checks.append(_check(*observe.doctor_check()))
    return checks


def _has_caps(needed: set[int]) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff & (1 << c) for c in needed)
    except OSError:
        pass
    return False


def render(checks: list[dict]) -> str:
    return "\n".join(f"[{'ok' if c['ok'] else 'MISSING'}] {c['check']}: {c['detail']}" for c in checks)
