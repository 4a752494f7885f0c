"""istio-iptables drop-in command line parsing (pure: no I/O, shared by the agent and the webhook).

`parse(argv, env)` turns istio-init's args + env into a frozen `CaptureConfig`, with the same flag names,
defaults and precedence (CLI > env > default) as `pilot-agent istio-iptables` (see
istio-capture-contract.md §1.2-1.4), plus bpfinit's own flags. Bad input raises `FlagError` whose message
is one line, so callers can print it and exit non-zero (a pod must never start unprotected).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PROXY_UID = 1337
DEFAULT_BPFFS = "/sys/fs/bpf"
MAX_OWNER_GROUPS = 64  # istio's Validate() cap on ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]


class FlagError(ValueError):
    """Invalid or unknown input; str(err) is a one-line reason."""


class HelpRequested(FlagError):
    """-h/--help was given (pflag's built-in help): the caller prints usage() and exits 0."""

    def __init__(self):
        super().__init__("help requested")


@dataclass(frozen=True)
class EgressRule:
    """One `--egress-allow` item: a CIDR and an inclusive port range (0-65535 = any port)."""

    network: IPNetwork
    port_low: int = 0
    port_high: int = 65535

    def __str__(self) -> str:
        net = f"[{self.network}]" if self.network.version == 6 else str(self.network)
        if (self.port_low, self.port_high) == (0, 65535):
            return str(self.network)
        if self.port_low == self.port_high:
            return f"{net}:{self.port_low}"
        return f"{net}:{self.port_low}-{self.port_high}"


@dataclass(frozen=True)
class CaptureConfig:
    # --- istio-iptables ---
    proxy_port: int = 15001                      # -p
    inbound_capture_port: int = 15006            # -z
    inbound_tunnel_port: int = 15008             # -e
    proxy_uids: tuple[int, ...] = (DEFAULT_PROXY_UID,)   # -u
    proxy_gids: tuple[int, ...] = (DEFAULT_PROXY_UID,)   # -g (defaults to -u)
    interception_mode: str = ""                  # -m; only exactly "TPROXY" changes behaviour
    inbound_ports: Optional[tuple[int, ...]] = None  # -b list; None when "*" or empty
    inbound_all: bool = False                    # -b '*'
    inbound_exclude_ports: tuple[int, ...] = ()  # -d (only meaningful with inbound_all)
    outbound_include_all: bool = False           # -i '*'
    outbound_include_cidrs: tuple[IPNetwork, ...] = ()  # -i list (host bits allowed, stored masked)
    outbound_exclude_cidrs: tuple[IPNetwork, ...] = ()  # -x (applies to any -i)
    outbound_include_ports: tuple[int, ...] = ()  # -q
    outbound_exclude_ports: tuple[int, ...] = ()  # -o (TCP and UDP, first rule)
    kube_virt_interfaces: tuple[str, ...] = ()    # -k
    exclude_interfaces: tuple[str, ...] = ()      # -c
    tproxy_mark: int = 1337                       # -t
    tproxy_route_table: int = 133                 # -r
    dry_run: bool = False                         # -n
    probe_port: int = 15002
    probe_timeout_s: float = 5.0
    skip_rule_apply: bool = False
    run_validation: bool = False
    redirect_dns: bool = False
    capture_all_dns: bool = False
    drop_invalid: bool = False
    dual_stack: bool = False
    network_namespace: str = ""
    cni_mode: bool = False
    reconcile: bool = False
    cleanup_only: bool = False
    force_apply: bool = False
    native_nftables: bool = False
    force_iptables_binary: str = ""
    # env-only knobs
    owner_groups_include: Optional[tuple[str, ...]] = None  # None = '*' (every group captured)
    owner_groups_exclude: tuple[str, ...] = ()              # only used when include is '*'
    loopback_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network("127.0.0.1/32")
    envoy_user: str = "istio-proxy"
    # --- bpfinit's own ---
    accelerate: bool = False
    # waives only the splice(2) part of the acceleration self-test; no effect without accelerate
    accelerate_skip_splice_check: bool = False
    # waives only the backpressure part of the acceleration self-test; no effect without accelerate
    accelerate_skip_backpressure_check: bool = False
    # waives only the MSG_WAITALL / SO_RCVLOWAT part of the acceleration self-test; no effect without accelerate
    accelerate_skip_waitall_check: bool = False
    # also accelerates connections to another pod on this node that has it too (after a sequence-number check);
    # without it only the app<->proxy loopback hops are; no effect without accelerate
    accelerate_pod_to_pod: bool = False
    egress_allow: Optional[tuple[EgressRule, ...]] = None   # None = no egress guard
    cgroup: str = ""              # pod cgroup v2 dir ("" = find it from POD_UID)
    bpffs: str = DEFAULT_BPFFS
    netns: str = ""               # netns path to enter ("" = current)
    kernel_headers: str = ""      # explicit headers dir for bcc ("" = autodetect)
    # --- derived ---
    unsupported: tuple[str, ...] = ()  # reasons the agent cannot honour this config exactly
    warnings: tuple[str, ...] = ()     # input istio-iptables silently ignores (kept for logs)

    @property
    def tproxy(self) -> bool:
        return self.interception_mode == "TPROXY"

    @property
    def include_has_loopback(self) -> bool:
        """istio's HasLoopBackIP: a loopback -i CIDR disables the `-o lo ! --uid-owner -j RETURN` rules."""
        return any(net.network_address.is_loopback for net in self.outbound_include_cidrs)

    @property
    def inbound_capture(self) -> bool:
        return self.inbound_all or bool(self.inbound_ports)

    def to_dict(self) -> dict:
        """JSON-friendly view (for status output and the webhook's records)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _jsonable(value)
        return out


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network, EgressRule)):
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------------
# Flag table: long name -> (shorthand, kind, env names in the order istio applies them, config field)
# kind: "str" (value taken verbatim, converted later), "bool", "uint16" or "duration" (typed pflag values in
# Istio: an env value they reject is ignored, since BindEnv does `_ = fs.Set(...)`; a CLI value they reject
# is an error). Later env names override earlier ones (istio's flag.AdditionalEnv calls fs.Set after BindEnv).
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Flag:
    long: str
    short: str
    kind: str
    envs: tuple[str, ...]


def _env_name(long: str) -> str:
    return long.upper().replace("-", "_")


def _flag(long, short="", kind="str", extra_env=(), env=True):
    envs = ((_env_name(long),) if env else ()) + tuple(extra_env)
    return _Flag(long, short, kind, envs)


_FLAGS = [
    _flag("envoy-port", "p", env=False),          # plain Bind in istio: no env
    _flag("inbound-capture-port", "z"),
    _flag("inbound-tunnel-port", "e"),
    _flag("proxy-uid", "u"),
    _flag("proxy-gid", "g"),
    _flag("istio-inbound-interception-mode", "m"),
    _flag("istio-inbound-ports", "b"),
    _flag("istio-local-exclude-ports", "d"),
    _flag("istio-service-cidr", "i"),
    _flag("istio-service-exclude-cidr", "x"),
    _flag("istio-outbound-ports", "q"),
    _flag("istio-local-outbound-ports-exclude", "o"),
    _flag("kube-virt-interfaces", "k"),
    _flag("istio-exclude-interfaces", "c"),
    _flag("istio-inbound-tproxy-mark", "t"),
    _flag("istio-inbound-tproxy-route-table", "r"),
    _flag("dry-run", "n", kind="bool"),
    _flag("iptables-probe-port", kind="uint16"),
    _flag("probe-timeout", kind="duration"),
    _flag("skip-rule-apply", kind="bool"),
    _flag("run-validation", kind="bool"),
    _flag("redirect-dns", kind="bool", extra_env=("ISTIO_META_DNS_CAPTURE",)),
    _flag("capture-all-dns", kind="bool"),
    _flag("drop-invalid", kind="bool", extra_env=("INVALID_DROP",)),
    _flag("dual-stack", kind="bool", extra_env=("ISTIO_DUAL_STACK",)),
    _flag("network-namespace"),
    _flag("cni-mode", kind="bool"),
    _flag("reconcile", kind="bool"),
    _flag("cleanup-only", kind="bool"),
    _flag("force-apply", kind="bool"),
    _flag("native-nftables", kind="bool"),
    _flag("force-iptables-binary"),
    # pilot-agent's global logging flags (accepted, no effect on capture)
    _flag("log_output_level", env=False),
    _flag("log_as_json", kind="bool", env=False),
    _flag("log_caller", env=False),
    _flag("log_stacktrace_level", env=False),
    _flag("log_target", env=False),
    _flag("log_rotate", env=False),
    _flag("log_rotate_max_age", env=False),
    _flag("log_rotate_max_size", env=False),
    _flag("log_rotate_max_backups", env=False),
    _flag("vklog", env=False),
    # bpfinit's own
    _Flag("egress-allow", "", "str", ("BPFINIT_EGRESS_ALLOW",)),
    _Flag("accelerate", "", "bool", ("BPFINIT_ACCELERATE",)),
    _Flag("accelerate-skip-splice-check", "", "bool", ("BPFINIT_ACCEL_SKIP_SPLICE_CHECK",)),
    _Flag("accelerate-skip-backpressure-check", "", "bool", ("BPFINIT_ACCEL_SKIP_BACKPRESSURE_CHECK",)),
    _Flag("accelerate-skip-waitall-check", "", "bool", ("BPFINIT_ACCEL_SKIP_WAITALL_CHECK",)),
    _Flag("accelerate-pod-to-pod", "", "bool", ("BPFINIT_ACCEL_POD_TO_POD",)),
    _Flag("cgroup", "", "str", ()),
    _Flag("bpffs", "", "str", ()),
    _Flag("netns", "", "str", ()),
    _Flag("kernel-headers", "", "str", ()),
]
_BY_LONG = {f.long: f for f in _FLAGS}
_BY_SHORT = {f.short: f for f in _FLAGS if f.short}
FLAG_NAMES = tuple(_BY_LONG)  # exported for help/docs


# ----------------------------------------------------------------------------------------------------
# value parsers (each raises FlagError with a one-line reason)
# ----------------------------------------------------------------------------------------------------
def split_list(value: str) -> list[str]:
    """istio's config.Split: split on ',', drop empty items, no trimming."""
    return [item for item in value.split(",") if item != ""]


_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(value: str) -> bool:
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise ValueError(f"invalid boolean {value!r}")


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(value: str) -> float:
    """Go's time.ParseDuration, in seconds ("5s", "1m30s", "250ms", "0")."""
    text = value
    sign = 1.0
    if text[:1] in "+-" and text:
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"invalid duration {value!r}")
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError(f"invalid duration {value!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


GC_MIN_INTERVAL_S = 10.0   # `gc --every`: rounds closer than this would only burn the node's CPU


def parse_gc_interval(value: str) -> float:
    """`bpfinit-agent gc --every` (and the manifests' gc container): a Go duration of at least 10s."""
    try:
        seconds = parse_go_duration(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration (e.g. 10m, 1h, 90s)") from None
    if seconds < GC_MIN_INTERVAL_S:
        raise ValueError(f"{value!r} is shorter than the minimum of {GC_MIN_INTERVAL_S:.0f}s")
    return seconds


def parse_go_uint(value: str, bits: int) -> int:
    """Go's strconv.ParseUint(value, 0, bits), what pflag's uint16 flags use: decimal, 0x/0o/0b prefixes,
    a leading 0 for octal, `_` between digits; no sign, no spaces."""
    text = value
    if not text or not text.isascii() or text[0] in "+-" or text != text.strip():
        raise ValueError(f"invalid number {value!r}")
    if len(text) > 1 and text[0] == "0" and text[1] not in "xXoObB":
        text = "0o" + text[1:]
    try:
        number = int(text, 0)
    except ValueError:
        raise ValueError(f"invalid number {value!r}") from None
    if number >= 1 << bits:
        raise ValueError(f"number {value!r} out of range for uint{bits}")
    return number


def _check_typed(kind: str, value: str) -> None:
    """Raise ValueError when a typed flag (bool, uint16, duration) would reject value, as pflag's Set does."""
    if kind == "bool":
        parse_go_bool(value)
    elif kind == "uint16":
        parse_go_uint(value, 16)
    elif kind == "duration":
        parse_go_duration(value)


def parse_port(text: str, what: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise FlagError(f"invalid port {text!r} in {what}")
    port = int(text)
    if port > 65535:
        raise FlagError(f"port {port} out of range in {what}")
    return port


def parse_port_list(value: str, what: str) -> tuple[int, ...]:
    return tuple(parse_port(item, what) for item in split_list(value))


def parse_id_list(value: str, what: str) -> tuple[int, ...]:
    ids = []
    for item in split_list(value):
        if not item.isdigit() or not item.isascii():
            raise FlagError(f"invalid numeric id {item!r} in {what} (user/group names are not supported here)")
        number = int(item)
        if number > 0xFFFFFFFE:
            raise FlagError(f"id {number} out of range in {what}")
        ids.append(number)
    return tuple(ids)


_PREFIX_LEN = re.compile(r"0|[1-9]\d{0,2}")


def parse_cidr(text: str, what: str) -> IPNetwork:
    """netip.ParsePrefix semantics: ADDR/BITS required, host bits allowed (masked off here)."""
    addr, slash, bits = text.partition("/")
    if not slash or not _PREFIX_LEN.fullmatch(bits) or "%" in addr:
        raise FlagError(f"invalid CIDR {text!r} in {what} (expected ADDRESS/PREFIXLEN)")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise FlagError(f"invalid CIDR {text!r} in {what}") from None
    if int(bits) > ip.max_prefixlen:
        raise FlagError(f"invalid CIDR {text!r} in {what}: prefix length too long")
    return ipaddress.ip_network(f"{ip}/{bits}", strict=False)


def parse_cidr_list(value: str, what: str) -> tuple[IPNetwork, ...]:
    return tuple(parse_cidr(item, what) for item in split_list(value))


def parse_egress_allow(value: str) -> tuple[EgressRule, ...]:
    """Items `CIDR`, `CIDR:PORT`, `CIDR:LOW-HIGH`, `[V6CIDR]:PORT`; a bare address means a single host."""
    rules = []
    for item in split_list(value):
        net_text, port_text = item, ""
        if item.startswith("["):
            net_text, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise FlagError(f"invalid --egress-allow item {item!r}")
            port_text = rest[1:] if rest else ""
            if rest == ":":
                raise FlagError(f"invalid --egress-allow item {item!r}: empty port")
        elif item.count(":") == 1:
            net_text, _, port_text = item.partition(":")
            if port_text == "":
                raise FlagError(f"invalid --egress-allow item {item!r}: empty port")
        if "/" not in net_text:
            try:
                ip = ipaddress.ip_address(net_text)
            except ValueError:
                raise FlagError(f"invalid address in --egress-allow item {item!r}") from None
            net_text = f"{ip}/{ip.max_prefixlen}"
        network = parse_cidr(net_text, "--egress-allow")
        low, high = 0, 65535
        if port_text:
            low_text, dash, high_text = port_text.partition("-")
            low = parse_port(low_text, "--egress-allow")
            high = parse_port(high_text, "--egress-allow") if dash else low
            if low > high:
                raise FlagError(f"invalid port range {port_text!r} in --egress-allow")
        rules.append(EgressRule(network, low, high))
    return tuple(rules)


# ----------------------------------------------------------------------------------------------------
# argv tokenizer (pflag rules: --long value, --long=value, -s value, -svalue, -s=value, bools take no value)
# ----------------------------------------------------------------------------------------------------
def _tokenize(argv: Sequence[str]) -> dict[str, str]:
    given: dict[str, str] = {}
    args = list(argv)
    if args and args[0] == "istio-iptables":
        args = args[1:]
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token in ("-h", "--help"):   # pflag's built-in help (only where a flag may stand)
            raise HelpRequested()
        if token == "--":
            if i < len(args):
                raise FlagError(f"unexpected argument {args[i]!r}")
            break
        if token.startswith("--"):
            name, eq, inline = token[2:].partition("=")
            spec = _BY_LONG.get(name)
            if spec is None:
                raise FlagError(f"unknown flag: --{name}")
        elif token.startswith("-") and len(token) > 1:
            short, rest = token[1], token[2:]
            spec = _BY_SHORT.get(short)
            if spec is None:
                raise FlagError(f"unknown shorthand flag: {short!r} in {token}")
            eq = "=" if rest.startswith("=") or (rest and spec.kind == "str") else ""
            inline = rest[1:] if rest.startswith("=") else rest
            if spec.kind == "bool" and rest and not rest.startswith("="):
                raise FlagError(f"unknown flag combination {token!r}")
        else:
            raise FlagError(f"unexpected argument {token!r}")
        if spec.kind == "bool":
            value = inline if eq else "true"
            try:
                parse_go_bool(value)
            except ValueError:
                raise FlagError(f"invalid boolean {value!r} for --{spec.long}") from None
        elif eq:
            value = inline
        else:
            if i >= len(args):
                raise FlagError(f"flag needs an argument: --{spec.long}")
            value = args[i]
            i += 1
        if spec.kind in ("uint16", "duration"):
            try:
                _check_typed(spec.kind, value)
            except ValueError as err:
                raise FlagError(f"invalid argument {value!r} for --{spec.long}: {err}") from None
        given[spec.long] = value  # pflag: the last occurrence wins
    return given


def _resolve(given: dict[str, str], env: Mapping[str, str], warnings: list[str]) -> dict[str, str]:
    """CLI > env > default. Env values that the flag rejects are ignored, as istio's BindEnv does."""
    values: dict[str, str] = {}
    for spec in _FLAGS:
        if spec.long in given:
            values[spec.long] = given[spec.long]
            continue
        for env_name in spec.envs:
            if env_name not in env:
                continue
            raw = env[env_name]
            try:
                _check_typed(spec.kind, raw)
            except ValueError:
                what = {"bool": "a boolean", "uint16": "a port number (uint16)", "duration": "a duration"}
                warnings.append(f"ignored env {env_name}={raw!r}: not {what[spec.kind]}; "
                                f"--{spec.long} keeps its default")
                continue
            values[spec.long] = raw
    return values


def _bool(values: dict[str, str], long: str, default: bool = False) -> bool:
    return parse_go_bool(values[long]) if long in values else default


def _int(values: dict[str, str], long: str, default: int, what: str) -> int:
    if long not in values:
        return default
    text = values[long]
    if not text.isdigit() or not text.isascii():
        raise FlagError(f"invalid number {text!r} for {what}")
    return int(text)


def parse(
    argv: Sequence[str],
    env: Mapping[str, str],
    lookup_uid: Optional[Callable[[str], Optional[int]]] = None,
    supported: Optional[Callable[["CaptureConfig"], tuple[str, ...]]] = None,
) -> CaptureConfig:
    """Parse istio-init's args + env into a CaptureConfig.

    lookup_uid(name) -> uid or None: resolves `$ENVOY_USER` when -u/PROXY_UID are absent (istio looks the
    user up in the init container's /etc/passwd). Without it, the default uid 1337 is used (pure callers).
    supported(cfg) -> reasons: overrides `unsupported_reasons` (the agent's feature set).
    """
    warnings: list[str] = []
    values = _resolve(_tokenize(argv), env, warnings)

    def port(long, default, what):
        if long not in values:
            return default
        return parse_port(values[long], what)

    kw: dict = {}
    kw["proxy_port"] = port("envoy-port", 15001, "-p/--envoy-port")
    kw["inbound_capture_port"] = port("inbound-capture-port", 15006, "-z/--inbound-capture-port")
    kw["inbound_tunnel_port"] = port("inbound-tunnel-port", 15008, "-e/--inbound-tunnel-port")
    kw["probe_port"] = parse_go_uint(values["iptables-probe-port"], 16) if "iptables-probe-port" in values \
        else 15002
    for key, long in (("proxy_port", "envoy-port"), ("inbound_capture_port", "inbound-capture-port")):
        if kw[key] == 0:
            raise FlagError(f"port 0 is not a valid --{long}")

    envoy_user = env.get("ENVOY_USER", "istio-proxy")
    uid_text = values.get("proxy-uid", "")
    if uid_text == "":
        # istio: empty -u resolves to $ENVOY_USER's uid if that user exists, else 1337
        uid = lookup_uid(envoy_user) if lookup_uid else None
        uid_text = str(uid if uid is not None else DEFAULT_PROXY_UID)
    gid_text = values.get("proxy-gid", "") or uid_text  # istio: empty -g = the -u value
    kw["proxy_uids"] = parse_id_list(uid_text, "-u/--proxy-uid")
    kw["proxy_gids"] = parse_id_list(gid_text, "-g/--proxy-gid")
    kw["envoy_user"] = envoy_user

    kw["interception_mode"] = values.get("istio-inbound-interception-mode", "")

    inbound = values.get("istio-inbound-ports", "")
    if inbound == "*":
        kw["inbound_all"], kw["inbound_ports"] = True, None
    else:
        ports = parse_port_list(inbound, "-b/--istio-inbound-ports")
        kw["inbound_ports"] = ports or None
    kw["inbound_exclude_ports"] = parse_port_list(values.get("istio-local-exclude-ports", ""),
                                                  "-d/--istio-local-exclude-ports")

    include = values.get("istio-service-cidr", "")
    if include == "*":
        kw["outbound_include_all"] = True
    else:
        kw["outbound_include_cidrs"] = parse_cidr_list(include, "-i/--istio-service-cidr")
    exclude = values.get("istio-service-exclude-cidr", "")
    if exclude == "*":
        raise FlagError("invalid value for OUTBOUND_IP_RANGES_EXCLUDE: '*' (-x/--istio-service-exclude-cidr)")
    kw["outbound_exclude_cidrs"] = parse_cidr_list(exclude, "-x/--istio-service-exclude-cidr")
    kw["outbound_include_ports"] = parse_port_list(values.get("istio-outbound-ports", ""),
                                                   "-q/--istio-outbound-ports")
    kw["outbound_exclude_ports"] = parse_port_list(values.get("istio-local-outbound-ports-exclude", ""),
                                                   "-o/--istio-local-outbound-ports-exclude")
    kw["kube_virt_interfaces"] = tuple(split_list(values.get("kube-virt-interfaces", "")))
    kw["exclude_interfaces"] = tuple(split_list(values.get("istio-exclude-interfaces", "")))
    kw["tproxy_mark"] = _int(values, "istio-inbound-tproxy-mark", 1337, "-t/--istio-inbound-tproxy-mark")
    kw["tproxy_route_table"] = _int(values, "istio-inbound-tproxy-route-table", 133,
                                    "-r/--istio-inbound-tproxy-route-table")

    if "probe-timeout" in values:   # checked by _tokenize (CLI) or _resolve (env)
        kw["probe_timeout_s"] = parse_go_duration(values["probe-timeout"])

    for key, long in (("dry_run", "dry-run"), ("skip_rule_apply", "skip-rule-apply"),
                      ("run_validation", "run-validation"), ("redirect_dns", "redirect-dns"),
                      ("capture_all_dns", "capture-all-dns"), ("drop_invalid", "drop-invalid"),
                      ("dual_stack", "dual-stack"), ("cni_mode", "cni-mode"), ("reconcile", "reconcile"),
                      ("cleanup_only", "cleanup-only"), ("force_apply", "force-apply"),
                      ("native_nftables", "native-nftables"), ("accelerate", "accelerate"),
                      ("accelerate_skip_splice_check", "accelerate-skip-splice-check"),
                      ("accelerate_skip_backpressure_check", "accelerate-skip-backpressure-check"),
                      ("accelerate_skip_waitall_check", "accelerate-skip-waitall-check"),
                      ("accelerate_pod_to_pod", "accelerate-pod-to-pod")):
        kw[key] = _bool(values, long)
    kw["network_namespace"] = values.get("network-namespace", "")
    binary = values.get("force-iptables-binary", "")
    if binary not in ("", "legacy", "nft"):
        raise FlagError(f"invalid --force-iptables-binary {binary!r} (expected legacy or nft)")
    kw["force_iptables_binary"] = binary

    # env-only knobs (istio's FillConfigFromEnvironment + Validate)
    groups_include = env.get("ISTIO_OUTBOUND_OWNER_GROUPS", "*")
    groups_exclude = env.get("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "")
    if groups_include == "*":
        kw["owner_groups_include"] = None
        kw["owner_groups_exclude"] = tuple(split_list(groups_exclude))
        group_count, group_env = len(kw["owner_groups_exclude"]), "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
    else:
        kw["owner_groups_include"] = tuple(split_list(groups_include))
        group_count, group_env = len(kw["owner_groups_include"]), "ISTIO_OUTBOUND_OWNER_GROUPS"
        if groups_exclude:
            warnings.append("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE is ignored because ISTIO_OUTBOUND_OWNER_GROUPS is not '*'")
    if group_count > MAX_OWNER_GROUPS:
        raise FlagError(f"{group_env}: {group_count} owner groups exceed the limit of {MAX_OWNER_GROUPS}")

    loopback_text = env.get("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/32")
    loopback = parse_cidr(loopback_text, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR")
    raw_address = ipaddress.ip_address(loopback_text.partition("/")[0])  # istio checks the unmasked address
    if loopback.version != 4 or not raw_address.is_loopback:
        raise FlagError(f"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR {loopback_text!r} is not an IPv4 loopback CIDR")
    if not 8 <= loopback.prefixlen <= 32:
        raise FlagError(f"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR {loopback_text!r}: mask must be between /8 and /32")
    kw["loopback_cidr"] = loopback

    if "egress-allow" in values:
        kw["egress_allow"] = parse_egress_allow(values["egress-allow"])
    for key in ("cgroup", "netns", "kernel-headers"):
        kw[key.replace("-", "_")] = values.get(key, "")
    kw["bpffs"] = values.get("bpffs", DEFAULT_BPFFS) or DEFAULT_BPFFS

    kw["warnings"] = tuple(warnings)
    cfg = CaptureConfig(**kw)
    reasons = (supported or unsupported_reasons)(cfg)
    return dataclasses.replace(cfg, unsupported=tuple(reasons))


def unsupported_reasons(cfg: CaptureConfig) -> tuple[str, ...]:
    """What the agent cannot (yet) reproduce exactly. The webhook leaves such pods to iptables; the agent
    refuses to run. Engineers adding a feature remove its line here."""
    reasons = []
    if cfg.tproxy:
        # (inbound engineer) sk_lookup alone would preserve src/dst, but TPROXY mode also makes the proxy
        # connect to the app from the client's address and routes the replies back by conntrack connmark
        # (mark 1337 -> table 133): that needs conntrack in the pod. See docs/datapath.md.
        # (Kept short: the webhook shows each reason as a kubectl warning line, <= 120 chars with its prefix.)
        reasons.append("-m TPROXY not supported (its return path needs conntrack connmark)")
    if cfg.drop_invalid:
        reasons.append("--drop-invalid (conntrack INVALID drop) not supported")
    if cfg.kube_virt_interfaces and (cfg.outbound_include_all or cfg.outbound_include_cidrs):
        # (inbound engineer) -k without -i is supported (no capture on those NICs; sk_lookup). With -i,
        # istio REDIRECTs VM traffic to ANY destination to <-p>; sk_lookup only sees local destinations.
        reasons.append("-k with -i not supported (VM traffic to non-local hosts needs NAT)")
    return tuple(reasons)


def usage() -> str:
    """`bpfinit-agent setup --help`: every flag, its shorthand and its env names."""
    own = [f.long for f in _FLAGS].index("egress-allow")
    lines = ["usage: bpfinit-agent setup [flags]", "",
             "istio-iptables' flags, same names, env and defaults (CLI > env > default):"]
    for n, spec in enumerate(_FLAGS):
        if n == own:
            lines += ["", "bpfinit's own:"]
        name = (f"-{spec.short}, " if spec.short else "    ") + f"--{spec.long}" + \
            ("" if spec.kind == "bool" else " VALUE")
        env = ("env " + ", ".join(spec.envs)) if spec.envs else ""
        lines.append(f"  {name:<48} {env}".rstrip())
    lines += ["", "Reference: docs/agent.md (flag reference). Bad input: one line, exit 2; runtime failure: exit 1."]
    return "\n".join(lines)
