"""bpfinit-agent: setup | status | gc | cleanup | doctor (+ observe, exporter from their modules).

`setup` takes istio-iptables' flags verbatim (initagent/flags.py) plus bpfinit's own. Every failure is
one line on stderr and a non-zero exit, so the pod never starts unprotected.
"""
from __future__ import annotations

import importlib
import json
import os
import pwd
import sys
import time

EXIT_USAGE = 2
EXIT_FAILED = 1

# Subcommands implemented in other modules: name -> "module" with main(argv) -> int
EXTERNAL = {"observe": "initagent.observe", "exporter": "initagent.exporter"}


def _err(message: str, code: int = EXIT_FAILED) -> int:
    print(f"bpfinit-agent: {message}", file=sys.stderr)
    return code


def _lookup_uid(name: str):
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _resolve_cgroup(cfg) -> str:
    from initagent import cgroup
    if cfg.cgroup:
        if not os.path.isdir(cfg.cgroup):
            raise cgroup.CgroupError(f"--cgroup {cfg.cgroup} is not a directory")
        return cfg.cgroup
    pod_uid = os.environ.get("POD_UID", "")
    if not pod_uid:
        raise cgroup.CgroupError("no --cgroup and no POD_UID (downward API) to find the pod cgroup with")
    return str(cgroup.find_pod_cgroup(pod_uid))


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _target_netns(cfg) -> str:
    """The netns to work in: bpfinit's --netns or istio's --network-namespace / NETWORK_NAMESPACE (the
    CNI path's "netns to apply rules in"); "" = the current one. Both given must name the same netns."""
    from initagent import flags
    if cfg.netns and cfg.network_namespace and not _same_file(cfg.netns, cfg.network_namespace):
        raise flags.FlagError(f"--netns {cfg.netns} and --network-namespace {cfg.network_namespace} "
                              "name different network namespaces")
    return cfg.netns or cfg.network_namespace


def cmd_setup(argv: list[str]) -> int:
    from initagent import flags
    t0 = time.monotonic()
    try:
        cfg = flags.parse(argv, os.environ, lookup_uid=_lookup_uid)
        netns_path = _target_netns(cfg)
    except flags.HelpRequested:
        print(flags.usage())
        return 0
    except flags.FlagError as err:
        return _err(str(err), EXIT_USAGE)
    for warning in cfg.warnings:
        print(f"bpfinit-agent: warning: {warning}", file=sys.stderr)
    if cfg.unsupported:
        return _err("unsupported: " + "; ".join(cfg.unsupported), EXIT_USAGE)
    if cfg.dry_run:
        print(json.dumps(cfg.to_dict(), sort_keys=True))
        return 0
    if cfg.cleanup_only:
        return _cleanup(cfg.bpffs, netns_path)
    if cfg.skip_rule_apply:
        # istio-validation (CNI mode) = --skip-rule-apply --run-validation: only probe what is there,
        # in the netns named (else the validator would probe the wrong namespace's capture)
        if cfg.run_validation:
            if netns_path and not _same_file(netns_path, "/proc/self/ns/net"):
                # capture follows the pod's cgroup as well as its netns: a probe from outside the pod
                # would test nothing, so this mode runs where istio-validation runs, inside the pod
                return _err(f"--skip-rule-apply --run-validation probes from inside the pod (its cgroup and "
                            f"netns), as istio-validation does; {netns_path} is not this process's netns",
                            EXIT_USAGE)
            from initagent import validation
            return validation.run(cfg, ipv6=False)
        return 0
    from initagent import attach, cgroup, loader, netns
    try:
        if netns_path:
            netns.enter(netns_path)
        cgroup_path = _resolve_cgroup(cfg)
        build = loader.load(cfg.bpffs, cfg.kernel_headers, _parts_from_env())
        facts = netns.gather(cfg)
        from initagent import inbound  # inbound/DNS entries (inbound+DNS engineer)
        inbound.register()
        result = attach.setup_pod(build, cfg.bpffs, cfg, facts, netns.cookie(), cgroup_path)
        if cfg.accelerate:  # imported only when asked for: it pulls in threading/select/socket
            from initagent import accel
            cfg = accel.enable_or_fall_back(build, cfg, facts, cgroup_path, result)
        from initagent import identity  # observability: name the pod, restart its counters
        identity.register_from_env(build.dir, netns.cookie(), result.pod_idx, os.environ)
    except (OSError, RuntimeError, ValueError) as err:
        if os.environ.get("BPFINIT_DEBUG"):
            raise
        return _err(f"setup failed: {err}")
    if cfg.run_validation:   # istio's redirect validator (initagent/validation.py); 126 on failure
        from initagent import validation
        code = validation.run(cfg, ipv6=facts.ipv6_enabled and not any(
            n.version == 4 and not n.network_address.is_loopback for n in facts.local_networks))
        if code:
            return code
    state = "configured" if result.changed else "already configured (no change)"
    print(f"bpfinit-agent: pod {state}: pod_idx={result.pod_idx} build={build.hash} cgroup={cgroup_path} "
          f"entries={result.entries} in {1000 * (time.monotonic() - t0):.0f} ms")
    return 0


def _parts_from_env():
    from initagent import loader
    return loader.parts_from_env()


def _gc_interval(text: str) -> float:
    """--every (argparse turns the error into one line, exit 2)."""
    import argparse
    from initagent import flags
    try:
        return flags.parse_gc_interval(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# Options of the other subcommands; each subcommand's parser has only its own (SUBCOMMAND_OPTIONS).
_OPTIONS = {
    "--bpffs": dict(default="/sys/fs/bpf", metavar="DIR", help="bpffs where bpfinit's pins live "
                    "(default /sys/fs/bpf; must exist)"),
    "--netns": dict(default="", metavar="PATH", help="enter this netns first (default: the current one)"),
    "--json": dict(action="store_true", help="print JSON"),
    "--cgroup2-root": dict(default="", metavar="DIR", help="root of the host's cgroup v2 hierarchy to walk "
                           "(default: BPFINIT_CGROUP2_ROOT, else /sys/fs/cgroup[/unified]); a directory that "
                           "is not a cgroup v2 root is refused"),
    "--all": dict(action="store_true", help="counters of every pod on the node"),
    "--every": dict(default=None, metavar="DURATION", type=_gc_interval,
                    help="run gc every DURATION (Go syntax: 10m, 1h30m; at least 10s) until SIGTERM/SIGINT "
                    "(then exit 0); a failed round is reported on stderr and the next round runs"),
}
SUBCOMMAND_OPTIONS = {
    "status": ("--json", "--bpffs", "--netns", "--all"),
    "cleanup": ("--bpffs", "--netns"),
    "gc": ("--json", "--bpffs", "--cgroup2-root", "--every"),
    "doctor": ("--json", "--bpffs"),
}
_DESCRIPTIONS = {
    "status": "What is attached to this pod (its netns) and its effective config; exit 3 = not configured.",
    "cleanup": "Detach this pod (its netns) and remove its entries.",
    "gc": "Remove config entries and pins of pods whose cgroup is gone (run on the node).",
    "doctor": "Check that this host's kernel has what bpfinit needs.",
}


def _own_args(argv: list[str], prog: str):
    """(args, None), or (None, exit code) after --help (0) or a bad argument (one line, 2)."""
    from initagent.cliparse import OneLineParser
    parser = OneLineParser(prog=f"bpfinit-agent {prog}", description=_DESCRIPTIONS[prog])
    for name in SUBCOMMAND_OPTIONS[prog]:
        parser.add_argument(name, **_OPTIONS[name])
    try:
        return parser.parse_args(argv), None
    except SystemExit as stop:
        return None, stop.code if isinstance(stop.code, int) else EXIT_USAGE


def cmd_cleanup(argv: list[str]) -> int:
    args, code = _own_args(argv, "cleanup")
    if args is None:
        return code
    return _cleanup(args.bpffs, args.netns)


def _cleanup(bpffs: str, netns_path: str) -> int:
    from initagent import attach, loader, netns
    try:
        directories = loader.builds(bpffs, must_exist=True)
        if netns_path:
            netns.enter(netns_path)
        cookie = netns.cookie()
        removed = 0
        for directory in directories:
            with _open_build(directory) as build:
                removed += attach.remove_pod(build, bpffs, cookie)
    except (OSError, RuntimeError) as err:
        return _err(f"cleanup failed: {err}")
    print(f"bpfinit-agent: detached this pod (netns cookie {cookie}), {removed} entries removed")
    return 0


def _open_build(directory):
    from initagent import loader
    return loader.Build(directory, [p for p in loader.PROGRAMS if (directory / "progs" / p.name).exists()])


def cmd_status(argv: list[str]) -> int:
    from initagent import status
    args, code = _own_args(argv, "status")
    if args is None:
        return code
    if args.all:
        from initagent import counters
        return counters.cmd_all(args.bpffs, args.json)
    try:
        report = status.pod_status(args.bpffs, args.netns)
    except (OSError, RuntimeError) as err:
        return _err(f"status failed: {err}")
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print(status.render(report))
    return 0 if report.get("configured") else 3


def cmd_gc(argv: list[str]) -> int:
    args, code = _own_args(argv, "gc")
    if args is None:
        return code
    if args.every is None:
        return _gc_round(args)
    return _gc_every(args)


def _gc_round(args) -> int:
    """One gc: the report on stdout; a failure or refusal one line on stderr and exit 1."""
    from initagent import gc
    try:
        report = gc.collect(args.bpffs, args.cgroup2_root or None)
    except (OSError, RuntimeError, ValueError) as err:   # ValueError: a corrupt pin or map value
        return _err(f"gc failed: {err}")
    print(json.dumps(report, sort_keys=True) if args.json else
          f"bpfinit-agent: gc removed {report['pods_removed']} dead pods, {report['entries_removed']} entries, "
          f"{report['dirs_removed']} stale pin dirs", flush=True)
    if report.get("refused"):
        return _err(f"gc refused: {report['refused']}")
    return 0


def _gc_every(args) -> int:
    """gc --every: a round, then sleep, until SIGTERM/SIGINT (exit 0, also mid-sleep). A failed round
    (gc failed/refused) is reported on stderr like a single gc and the loop goes on: the node keeps
    being collected once the cause (a bpffs not mounted yet, a refused walk) goes away."""
    import select
    import signal
    stopping = []
    wake_r, wake_w = os.pipe()     # the signal's wakeup byte ends the sleep at once (no polling)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    while not stopping:
        _gc_round(args)
        deadline = time.monotonic() + args.every
        while not stopping and (left := deadline - time.monotonic()) > 0:
            if select.select([wake_r], [], [], left)[0]:
                os.read(wake_r, 64)
    return 0


def cmd_doctor(argv: list[str]) -> int:
    from initagent import doctor
    args, code = _own_args(argv, "doctor")
    if args is None:
        return code
    checks = doctor.run_checks(args.bpffs)
    if args.json:
        print(json.dumps(checks, indent=2))
    else:
        print(doctor.render(checks))
    return 0 if all(c["ok"] for c in checks) else EXIT_FAILED


COMMANDS = {"setup": cmd_setup, "status": cmd_status, "gc": cmd_gc, "cleanup": cmd_cleanup, "doctor": cmd_doctor}


def _exit_now(code: int) -> None:
    """End the process without interpreter teardown. Freeing every module costs ~8 ms, a sixth of a warm
    setup (which the kubelet waits for), and setup leaves nothing to finalize: what it made lives in the
    kernel (pins, map entries). Skipped while another thread runs or if our output cannot be flushed."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return   # the normal exit path reports it
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    as_process = argv is None   # called as the bpfinit-agent program (not from Python code/tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        names = ", ".join(list(COMMANDS) + list(EXTERNAL))
        print(f"usage: bpfinit-agent {{{names}}} [flags]\n  setup takes istio-iptables flags "
              "(-p -z -e -u -g -m -i -x -b -d -q -o -k -c ...) plus --cgroup, --bpffs, --netns, "
              "--kernel-headers, --egress-allow, --accelerate, --accelerate-skip-splice-check, "
              "--accelerate-skip-backpressure-check, --accelerate-skip-waitall-check, --accelerate-pod-to-pod")
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        code = COMMANDS[command](rest)
        if as_process and command == "setup":
            _exit_now(code)
        return code
    if command in EXTERNAL:
        return importlib.import_module(EXTERNAL[command]).main(rest)
    return _err(f"unknown command {command!r} (expected one of: {', '.join(list(COMMANDS) + list(EXTERNAL))})",
                EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
