"""Validating webhook: does a pod (or a workload's pod template) bypass the mesh beyond its egress policy?

Pure functions on plain dicts. `validate_review(request, policy_store)` takes an AdmissionReview
`request` and returns a `Decision`; `evaluate(...)` is the same check without modes, used by `audit`.

What counts as bypass (istio-capture-contract.md §4.8) and how each vector is judged:
- destinations: `excludeOutboundIPRanges` / `-x` CIDRs must lie inside the allowed CIDRs; a narrow
  `includeOutboundIPRanges` / `-i` (""= nothing captured) must leave uncaptured only allowed CIDRs;
  `excludeOutboundPorts` / `-o` ports must be allowed ports. The kernel guard (`--egress-allow`, given
  to the agent by the mutating webhook) then confines bypassed traffic to the exact CIDR:port pairs.
- everything else is a named vector (policy.VECTORS) that the policy must allow explicitly.
Settings are read from the annotations (Istio-compatible parsing via initagent.flags) AND from the
rendered init container's args + env (the final state), so values coming from mesh-wide defaults,
`proxy.istio.io/config` proxyMetadata or a user-supplied `istio-init` are caught as well.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import yaml

from initagent.flags import CaptureConfig, FlagError, parse, split_list
from webhook.annotations import (INTERCEPTION_MODES, describe_interception_modes, injection_templates,
                                 proxy_config_interception_mode, sidecar_injection_disabled)
from webhook.mutate import (AGENT_CAPABILITIES, DEFAULT_AGENT_IMAGE, clean_images, istio_image_accepted,
                            runs_agent)
from webhook.admission import warning_lines
from webhook.policy import Policy, PolicySet, Resolution, Settings

ANN_EXCLUDE_CIDRS = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ANN_INCLUDE_CIDRS = "traffic.sidecar.istio.io/includeOutboundIPRanges"
ANN_EXCLUDE_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
ANN_INCLUDE_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
ANN_EXCLUDE_IFACES = "traffic.sidecar.istio.io/excludeInterfaces"
ANN_KUBEVIRT = "traffic.sidecar.istio.io/kubevirtInterfaces"
ANN_REROUTE = "istio.io/reroute-virtual-interfaces"
ANN_INTERCEPTION = "sidecar.istio.io/interceptionMode"
ANN_INJECT = "sidecar.istio.io/inject"
ANN_TEMPLATES = "inject.istio.io/templates"
ANN_PROXY_CONFIG = "proxy.istio.io/config"
ANN_BPFINIT_INJECT = "bpfinit.io/inject"
AGENT_COMMAND = ["bpfinit-agent", "setup"]
AUDIT_KEY_VIOLATION = "egress-policy-violation"
AUDIT_KEY_EXEMPTION = "egress-policy-exemption"
WARNING_LIMIT = 120
WARNING_MAX_LINES = 3     # per finding, before the brief form is used instead

# where a workload keeps its pod template
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "DeploymentConfig": ("spec", "template"),  # OpenShift
}

# attribution only (parsing is initagent.flags'): which flag/env carries a setting
_FLAG_SOURCES = {
    "exclude_cidrs": ("x", "istio-service-exclude-cidr", ("ISTIO_SERVICE_EXCLUDE_CIDR",)),
    "include_cidrs": ("i", "istio-service-cidr", ("ISTIO_SERVICE_CIDR",)),
    "exclude_ports": ("o", "istio-local-outbound-ports-exclude", ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",)),
    "exclude_interfaces": ("c", "istio-exclude-interfaces", ("ISTIO_EXCLUDE_INTERFACES",)),
    "kube_virt": ("k", "kube-virt-interfaces", ("KUBE_VIRT_INTERFACES",)),
    "proxy_uid": ("u", "proxy-uid", ("PROXY_UID",)),
    "proxy_gid": ("g", "proxy-gid", ("PROXY_GID",)),
    "skip_rule_apply": ("", "skip-rule-apply", ("SKIP_RULE_APPLY",)),
    "dry_run": ("n", "dry-run", ("DRY_RUN",)),
    "cleanup_only": ("", "cleanup-only", ("CLEANUP_ONLY",)),
    "egress_allow": ("", "egress-allow", ("BPFINIT_EGRESS_ALLOW",)),
    "owner_groups_include": ("", "", ("ISTIO_OUTBOUND_OWNER_GROUPS",)),
    "owner_groups_exclude": ("", "", ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",)),
}
_ADMIN_CAPS = {"NET_ADMIN", "SYS_ADMIN", "BPF", "ALL"}
# without `agent_images`, only the default agent image is ours (the server passes its configured list)
DEFAULT_AGENT_IMAGES = (DEFAULT_AGENT_IMAGE,)


@dataclass(frozen=True)
class _Grant:
    """What Istio's template (istio-capture-contract.md §1.10) or bpfinit's mutation gives a capture
    container; the container is exempt from the netAdmin / proxyIdentity checks for exactly this, no more."""

    role: str                          # who grants it, for messages
    caps: frozenset = frozenset()      # added capabilities that are expected
    proxy_identity: bool = False       # may run as the proxy UID/GID (istio-proxy, istio-validation)
    proxy_privileged: bool = False     # Istio renders `privileged` here under values.global.proxy.privileged


_ISTIO_INIT_GRANT = _Grant("Istio's template grants istio-init", frozenset({"NET_ADMIN", "NET_RAW"}),
                           proxy_privileged=True)
_AGENT_GRANT = _Grant("bpfinit's mutation grants the agent", frozenset(AGENT_CAPABILITIES))
_VALIDATION_GRANT = _Grant("Istio's template grants istio-validation", proxy_identity=True)
_PROXY_GRANT = _Grant("Istio's template grants istio-proxy (NET_ADMIN only in TPROXY mode)",
                      proxy_identity=True, proxy_privileged=True)
_TPROXY_PROXY_GRANT = _Grant("Istio's template grants istio-proxy in TPROXY mode",
                             frozenset({"NET_ADMIN", "NET_RAW"}), proxy_identity=True, proxy_privileged=True)


class ObjectError(ValueError):
    """The object under review is malformed; str(err) names the field."""


@dataclass(frozen=True)
class Finding:
    reason: str            # metric label: a vector name, or a destination reason
    text: str              # full sentence, without the policy name
    brief: str             # short form for warnings, when the text would take more than WARNING_MAX_LINES
    key: tuple = ()        # de-duplication key (same setting seen in annotations and in init args)


@dataclass
class Decision:
    allowed: bool
    code: int
    message: str
    warnings: list[str] = field(default_factory=list)
    metric_labels: dict = field(default_factory=dict)     # policy, mode, reason
    audit_annotations: dict = field(default_factory=dict)  # AdmissionResponse.auditAnnotations


@dataclass(frozen=True)
class Target:
    kind: str
    namespace: str
    name: str
    meta: dict             # pod (template) metadata
    spec: dict             # pod (template) spec
    spec_path: str         # "spec" or "spec.template.spec" ...
    is_pod: bool


@dataclass
class Evaluation:
    target: Target
    resolution: Resolution
    findings: list[Finding]

    @property
    def policy_ref(self) -> str:
        return self.resolution.ref


# ----------------------------------------------------------------------------------------------------
# CIDR arithmetic (exact, on integer intervals)
# ----------------------------------------------------------------------------------------------------
def _merged_intervals(networks, version: int) -> list[tuple[int, int]]:
    spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in networks if n.version == version)
    merged: list[list[int]] = []
    for low, high in spans:
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return [(a, b) for a, b in merged]


def cidr_difference(networks, minus) -> list:
    """The parts of `networks` not covered by `minus`, as CIDRs (both families)."""
    out = []
    for version, address in ((4, ipaddress.IPv4Address), (6, ipaddress.IPv6Address)):
        remove = _merged_intervals(minus, version)
        for low, high in _merged_intervals(networks, version):
            cursor = low
            for r_low, r_high in remove:
                if r_high < cursor or r_low > high:
                    continue
                if r_low > cursor:
                    out.extend(ipaddress.summarize_address_range(address(cursor), address(r_low - 1)))
                cursor = max(cursor, r_high + 1)
                if cursor > high:
                    break
            if cursor <= high:
                out.extend(ipaddress.summarize_address_range(address(cursor), address(high)))
    return out


_FAMILY_ALL = {"IPv4": ipaddress.ip_network("0.0.0.0/0"), "IPv6": ipaddress.ip_network("::/0")}


def _uncaptured_by_include(cfg: CaptureConfig, families) -> list:
    """What a non-'*' -i list leaves uncaptured (per IP family in use)."""
    if cfg.outbound_include_all:
        return []
    return cidr_difference([_FAMILY_ALL[f] for f in families], cfg.outbound_include_cidrs)


def _show_rules(rules) -> str:
    return "[" + ", ".join(str(r) for r in rules) + "]"


def _show_nets(nets, limit: int = 3) -> str:
    shown = ", ".join(str(n) for n in nets[:limit])
    return shown + (f" (+{len(nets) - limit} more)" if len(nets) > limit else "")


def _port_allowed(port: int, rules) -> bool:
    return any(r.port_low <= port <= r.port_high for r in rules)


def _full_port_networks(rules) -> list:
    return [r.network for r in rules if (r.port_low, r.port_high) == (0, 65535)]


# ----------------------------------------------------------------------------------------------------
# reading the object
# ----------------------------------------------------------------------------------------------------
def _dict_at(obj: dict, path: tuple[str, ...], what: str) -> dict:
    current: Any = obj
    walked = []
    for key in path:
        walked.append(key)
        current = current.get(key) if isinstance(current, dict) else None
        if current is None:
            raise ObjectError(f"{what}: {'.'.join(walked)} is missing")
        if not isinstance(current, dict):
            raise ObjectError(f"{what}: {'.'.join(walked)} is not an object")
    return current


def extract_target(obj: Any, namespace: str = "", kind: Optional[str] = None) -> Optional[Target]:
    """The pod (template) inside a Pod or workload; None for kinds without a pod template."""
    if not isinstance(obj, dict):
        raise ObjectError("object is missing or not an object")
    kind = kind or obj.get("kind") or ""
    if kind not in TEMPLATE_PATHS:
        return None
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ObjectError(f"{kind}: metadata is not an object")
    name = meta.get("name") or meta.get("generateName") or "?"
    namespace = namespace or meta.get("namespace") or "default"
    path = TEMPLATE_PATHS[kind]
    template = _dict_at(obj, path, kind) if path else obj
    pod_meta = template.get("metadata") or {}
    pod_spec = template.get("spec")
    if not isinstance(pod_meta, dict):
        raise ObjectError(f"{kind}: {'.'.join(path + ('metadata',))} is not an object")
    if not isinstance(pod_spec, dict):
        raise ObjectError(f"{kind}: {'.'.join(path + ('spec',))} is missing or not an object")
    for field_name in ("annotations", "labels"):
        value = pod_meta.get(field_name) or {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ObjectError(f"{kind}: {'.'.join(path + ('metadata', field_name))} must map names to strings")
    for field_name in ("containers", "initContainers", "ephemeralContainers"):
        value = pod_spec.get(field_name) or []
        if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
            raise ObjectError(f"{kind}: {'.'.join(path + ('spec', field_name))} must be a list of containers")
        for index, container in enumerate(value):
            if not isinstance(container.get("name", ""), str):
                raise ObjectError(f"{kind}: {'.'.join(path + ('spec', field_name))}[{index}].name must be a string")
    return Target(kind, namespace, name, pod_meta, pod_spec, ".".join(path + ("spec",)), kind == "Pod")


def _arg_value(argv: list[str], short: str, long: str) -> Optional[str]:
    """The raw value a flag got on the command line (last wins), for messages."""
    value = None
    args = list(argv[1:] if argv and argv[0] == "istio-iptables" else argv)
    for i, token in enumerate(args):
        if long and (token == f"--{long}" or token.startswith(f"--{long}=")):
            value = token.partition("=")[2] if "=" in token else (args[i + 1] if i + 1 < len(args) else "true")
        elif short and token.startswith(f"-{short}") and not token.startswith("--"):
            rest = token[2:]
            value = rest[1:] if rest.startswith("=") else (rest or (args[i + 1] if i + 1 < len(args) else ""))
    return value


@dataclass
class _Capture:
    """One view of the pod's capture settings: the annotations, or one init container's args + env."""

    label: str
    cfg: CaptureConfig
    origin: Callable[[str], tuple[str, Optional[str]]]   # setting -> (where, raw value)
    is_validation: bool = False
    is_agent: bool = False
    untrusted: bool = False   # an Istio capture container whose image is not accepted: it vouches for nothing


def _env_of(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env") or []:
        if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("value"), str):
            env[item["name"]] = item["value"]
    return env


def _container_capture(container: dict, label: str, findings: list[Finding], **kind) -> Optional[_Capture]:
    args = container.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        findings.append(_unverifiable(f"{label} args", "are not a list of strings"))
        return None
    env = _env_of(container)
    argv = args[1:] if kind.get("is_agent") and args[:1] == ["setup"] else args
    try:
        cfg = parse(argv, env)
    except FlagError as err:
        findings.append(_unverifiable(f"{label} args", f"cannot be verified: {err}"))
        return None

    def origin(setting: str) -> tuple[str, Optional[str]]:
        short, long, envs = _FLAG_SOURCES[setting]
        raw = _arg_value(argv, short, long) if (short or long) else None
        if raw is not None:
            return f"{label} arg {'-' + short if short else '--' + long}", raw
        for env_name in envs:
            if env_name in env:
                return f"{label} env {env_name}", env[env_name]
        return f"{label} default", None

    return _Capture(label, cfg, origin, **kind)


def _proxy_config(annotations: dict, findings: list[Finding]) -> dict:
    raw = annotations.get(ANN_PROXY_CONFIG)
    if raw is None:
        return {}
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        findings.append(_unverifiable(ANN_PROXY_CONFIG, "is not valid YAML"))
        return {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        findings.append(_unverifiable(ANN_PROXY_CONFIG, "is not a ProxyConfig object"))
        return {}
    metadata = value.get("proxyMetadata") or {}
    if not isinstance(metadata, dict):
        findings.append(_unverifiable(f"{ANN_PROXY_CONFIG} proxyMetadata", "is not a map"))
        value = dict(value, proxyMetadata={})
    return value


def _annotation_capture(annotations: dict, proxy_config: dict, proxy_uid: int,
                        findings: list[Finding]) -> Optional[_Capture]:
    """Render the args Istio's injection template would pass (istio-capture-contract.md §2.1), with
    proxyMetadata as the init container's env, and parse them like istio-iptables."""
    metadata = {str(k): str(v) for k, v in (proxy_config.get("proxyMetadata") or {}).items()}
    argv = ["-u", str(proxy_uid), "-m", "REDIRECT",
            "-i", annotations.get(ANN_INCLUDE_CIDRS, "*"), "-x", annotations.get(ANN_EXCLUDE_CIDRS, "")]
    if ANN_INCLUDE_PORTS in annotations:
        argv += ["-q", annotations[ANN_INCLUDE_PORTS]]
    if ANN_EXCLUDE_PORTS in annotations:
        argv += ["-o", annotations[ANN_EXCLUDE_PORTS]]
    kubevirt_ann = ANN_REROUTE if ANN_REROUTE in annotations else (ANN_KUBEVIRT if ANN_KUBEVIRT in annotations else None)
    if kubevirt_ann:
        argv += ["-k", annotations[kubevirt_ann]]
    if ANN_EXCLUDE_IFACES in annotations:
        argv += ["-c", annotations[ANN_EXCLUDE_IFACES]]
    try:
        cfg = parse(argv, metadata)
    except FlagError as err:
        findings.append(_unverifiable("traffic annotations", f"cannot be parsed as Istio would: {err}"))
        return None
    by_annotation = {"exclude_cidrs": ANN_EXCLUDE_CIDRS, "include_cidrs": ANN_INCLUDE_CIDRS,
                     "exclude_ports": ANN_EXCLUDE_PORTS, "exclude_interfaces": ANN_EXCLUDE_IFACES,
                     "kube_virt": kubevirt_ann}

    def origin(setting: str) -> tuple[str, Optional[str]]:
        ann = by_annotation.get(setting)
        if ann and ann in annotations:
            return ann, annotations[ann]
        for env_name in _FLAG_SOURCES[setting][2]:
            if env_name in metadata:
                return f"{ANN_PROXY_CONFIG} proxyMetadata {env_name}", metadata[env_name]
        return "default", None

    return _Capture("annotations", cfg, origin)


# ----------------------------------------------------------------------------------------------------
# findings
# ----------------------------------------------------------------------------------------------------
def _unverifiable(subject: str, problem: str) -> Finding:
    text = f"{subject} {problem}, so the pod's capture cannot be verified"
    return Finding("unverifiable", text, f"{subject} {problem}"[:100], ("unverifiable", subject))


def _vector(policy: Policy, vector: str, subject: str, value: str, effect: str,
            identity: tuple = ()) -> Optional[Finding]:
    """`identity` names what carries the setting when that matters (a container): the same setting read
    from the annotations and from the rendered init args is one finding, two containers are two."""
    if vector in policy.allowed_vectors:
        return None
    allowed = "[" + ", ".join(sorted(policy.allowed_vectors)) + "]"
    text = f"{subject}: {value} {effect} (vector {vector} is not in allowedVectors {allowed})"
    brief = f"{subject}: {value} ({vector} not allowed)"
    return Finding(vector, text, brief, (vector, value) + identity)


def _capture_findings(cap: _Capture, policy: Policy, settings: Settings) -> list[Finding]:
    cfg, allowed, out = cap.cfg, policy.allowed, []
    shown = _show_rules(allowed)
    allowed_nets = [r.network for r in allowed]

    disabled = [(s, getattr(cfg, s)) for s in ("skip_rule_apply", "dry_run", "cleanup_only")]
    for setting, on in disabled:
        if on and not (setting == "skip_rule_apply" and cap.is_validation):
            where, _raw = cap.origin(setting)
            out.append(_vector(policy, "captureDisabled", where, "true", "makes the init container program nothing"))

    if cfg.outbound_exclude_cidrs:
        where, raw = cap.origin("exclude_cidrs")
        raw_items = split_list(raw) if raw is not None else []
        if len(raw_items) != len(cfg.outbound_exclude_cidrs):
            raw_items = [str(n) for n in cfg.outbound_exclude_cidrs]
        outside = [item for item, net in zip(raw_items, cfg.outbound_exclude_cidrs)
                   if cidr_difference([net], allowed_nets)]
        if outside:
            value, verb = ",".join(outside), "is" if len(outside) == 1 else "are"
            out.append(Finding("excludedCidr", f"{where}: {value} {verb} not inside {shown}",
                               f"{where}: {value} not inside {shown}", ("excludedCidr", tuple(outside))))

    # show the uncaptured blocks as the include list leaves them (not cut further by the allowed CIDRs)
    uncaptured = [net for net in _uncaptured_by_include(cfg, settings.ip_families)
                  if cidr_difference([net], allowed_nets)]
    if uncaptured:
        where, raw = cap.origin("include_cidrs")
        value = f'"{raw}"' if raw is not None else '""'
        out.append(Finding("narrowInclude",
                           f"{where}: {value} leaves {_show_nets(uncaptured)} uncaptured, not inside {shown}",
                           f"{where}: {value} leaves {_show_nets(uncaptured, 1)} uncaptured",
                           ("narrowInclude", tuple(str(n) for n in uncaptured))))

    bad_ports = [port for port in cfg.outbound_exclude_ports if not _port_allowed(port, allowed)]
    if bad_ports:
        where, _raw = cap.origin("exclude_ports")
        value = ",".join(map(str, bad_ports))
        verb = "is not an allowed port" if len(bad_ports) == 1 else "are not allowed ports"
        out.append(Finding("excludedPort", f"{where}: {value} {verb} of {shown}",
                           f"{where}: {value} not allowed by {shown}", ("excludedPort", tuple(bad_ports))))

    if cfg.exclude_interfaces:
        where, _raw = cap.origin("exclude_interfaces")
        out.append(_vector(policy, "excludeInterfaces", where, ",".join(cfg.exclude_interfaces),
                           "takes these interfaces out of capture"))
    if cfg.kube_virt_interfaces:
        where, _raw = cap.origin("kube_virt")
        out.append(_vector(policy, "kubevirtInterfaces", where, ",".join(cfg.kube_virt_interfaces),
                           "treats traffic from these interfaces as outbound"))
    if cfg.owner_groups_exclude:
        where, _raw = cap.origin("owner_groups_exclude")
        out.append(_vector(policy, "ownerGroups", where, ",".join(cfg.owner_groups_exclude),
                           "lets processes in these groups bypass capture"))
    if cfg.owner_groups_include is not None:
        where, _raw = cap.origin("owner_groups_include")
        out.append(_vector(policy, "ownerGroups", where, ",".join(cfg.owner_groups_include),
                           "lets processes outside these groups bypass capture"))
    if 0 in cfg.proxy_uids:
        where, _raw = cap.origin("proxy_uid")
        out.append(_vector(policy, "proxyIdentity", where, "0", "lets every root process bypass capture"))
    if 0 in cfg.proxy_gids and 0 not in cfg.proxy_uids:
        where, _raw = cap.origin("proxy_gid")
        out.append(_vector(policy, "proxyIdentity", where, "0", "lets every process in group 0 bypass capture"))
    return [f for f in out if f is not None]


def _needs_kernel_guard(caps: list[_Capture], policy: Policy, settings: Settings) -> bool:
    """True when the bypass allowed by these settings reaches further than the allowed CIDR:port pairs
    unless the kernel guard confines it (i.e. some allowed entry restricts ports, or -o is used)."""
    full_port = _full_port_networks(policy.allowed)
    for cap in caps:
        cfg = cap.cfg
        if cidr_difference(list(cfg.outbound_exclude_cidrs), full_port):
            return True
        if cidr_difference(_uncaptured_by_include(cfg, settings.ip_families), full_port):
            return True
        for port in cfg.outbound_exclude_ports:
            nets = [r.network for r in policy.allowed if r.port_low <= port <= r.port_high]
            if cidr_difference([_FAMILY_ALL[f] for f in settings.ip_families], nets):
                return True
    return False


def _egress_guard_findings(cap: _Capture, resolution: Resolution) -> list[Finding]:
    policy = resolution.policy
    expected = policy.allowed if resolution.mode == "Enforce" else None
    if expected is None:
        return []
    shown = _show_rules(expected)
    actual = cap.cfg.egress_allow
    if actual is None:
        return [Finding("egressGuard", f"{cap.label} (bpfinit-agent) has no --egress-allow, but the policy requires {shown}",
                        f"{cap.label}: no --egress-allow (policy requires {shown})", ("egressGuard", "missing"))]
    out = []
    where, _raw = cap.origin("egress_allow")
    for rule in actual:
        inside = any(not cidr_difference([rule.network], [a.network]) and a.port_low <= rule.port_low
                     and rule.port_high <= a.port_high for a in expected)
        if not inside:
            out.append(Finding("egressGuard", f"{where}: {rule} is not inside {shown}",
                               f"{where}: {rule} not inside {shown}", ("egressGuard", str(rule))))
    return out


def _security(container: dict) -> dict:
    value = container.get("securityContext") or {}
    return value if isinstance(value, dict) else {}


def _show_grant(grant: _Grant, mesh_privileged_proxies: bool = False) -> str:
    caps = ", ".join(sorted(grant.caps)) if grant.caps else "no capabilities"
    if mesh_privileged_proxies and grant.proxy_privileged:
        caps += "; privileged: true with allowPrivilegeEscalation: true, nothing more (--mesh-privileged-proxies)"
    return f"{grant.role}: {caps}"


def _container_findings(target: Target, policy: Policy, proxy_uids: set[int], proxy_gids: set[int],
                        grants: dict[tuple[str, str], _Grant],
                        mesh_privileged_proxies: bool = False) -> list[Finding]:
    """Who runs as the proxy, who may rewrite the network. Capture containers are exempt only for what
    their `grants` entry says; everything beyond is reported like any other container's.
    `mesh_privileged_proxies` (the webhook's opt-in --mesh-privileged-proxies): the mesh renders
    values.global.proxy.privileged, so istio-init / istio-proxy with exactly that shape are exempt too."""
    spec, out = target.spec, []
    pod_security = spec.get("securityContext") or {}
    if not isinstance(pod_security, dict):
        pod_security = {}
    for list_name in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(spec.get(list_name) or []):
            name = container.get("name", f"#{index}")
            grant = grants.get((list_name, name))
            path = f"{target.spec_path}.{list_name}[{index}].securityContext"
            security = _security(container)
            off_template = False    # anything beyond the grant (even if the policy allows it)
            for key, ids, what in (("runAsUser", proxy_uids, "UID"), ("runAsGroup", proxy_gids, "GID")):
                if grant is not None and grant.proxy_identity:
                    break
                value, where = security.get(key), f"{path}.{key}"
                if value is None:
                    value, where = pod_security.get(key), f"{target.spec_path}.securityContext.{key}"
                if isinstance(value, int) and value in ids:
                    off_template = True
                    out.append(_vector(policy, "proxyIdentity", f'container "{name}"', f"{key} {value}",
                                       f"is the proxy {what}, so its traffic bypasses capture ({where})",
                                       (list_name, str(name))))
            capabilities = security.get("capabilities")
            caps = capabilities.get("add") if isinstance(capabilities, dict) else None
            caps = caps if isinstance(caps, list) else []
            added = {c.upper().removeprefix("CAP_") for c in caps if isinstance(c, str)}
            granted = sorted((added & _ADMIN_CAPS) - (grant.caps if grant else set()))
            if security.get("privileged") is True:
                istio_shape = (grant is not None and grant.proxy_privileged
                               and security.get("allowPrivilegeEscalation") is True)
                if istio_shape and mesh_privileged_proxies:
                    # the webhook is told the mesh renders values.global.proxy.privileged: exactly that shape
                    # (nothing else beyond the grant) is Istio's; with anything more, privileged is reported too
                    if granted or off_template:
                        granted.append("privileged")
                elif istio_shape:
                    # Istio's shape for values.global.proxy.privileged=true, but the mesh setting is not in
                    # the pod: a hand-written container of this name looks exactly the same
                    out.append(_unverifiable(
                        f'container "{name}" privileged: true',
                        "has the shape of Istio's values.global.proxy.privileged rendering, but the pod cannot "
                        f"prove the mesh sets it (a hand-written {name} looks the same; {path})"))
                else:
                    granted.append("privileged")
            if granted:
                effect = f"can rewrite the pod's network and capture ({path})"
                if grant is not None:
                    effect = f"is more than {_show_grant(grant, mesh_privileged_proxies)}, and {effect}"
                out.append(_vector(policy, "netAdmin", f'container "{name}"', "+".join(granted), effect,
                                   (list_name, str(name))))
    return [f for f in out if f is not None]


def _untrusted_image_finding(policy: Policy, subject: str, list_name: str, index: int, container: dict,
                             spec_path: str, why: str) -> Optional[Finding]:
    """untrustedCaptureImage for container `index` of `list_name`; `subject` is how the message names it."""
    name, image = container.get("name", f"#{index}"), container.get("image")
    shown = f'"{image}"' if isinstance(image, str) and image else "(no image)"
    return _vector(policy, "untrustedCaptureImage", f'{subject} "{name}"', f"image {shown}",
                   f"{why} ({spec_path}.{list_name}[{index}].image)", (list_name, str(name)))


def _untrusted_agent_finding(policy: Policy, index: int, container: dict, spec_path: str,
                             agent_images: tuple[str, ...]) -> Optional[Finding]:
    return _untrusted_image_finding(
        policy, "init container", "initContainers", index, container, spec_path,
        f"runs bpfinit-agent but is not an accepted bpfinit agent image [{', '.join(agent_images)}]: only the "
        "bpfinit webhook puts the agent in place, so this container is not ours and gets none of the agent's "
        "exemptions")


def _untrusted_istio_finding(policy: Policy, list_name: str, index: int, container: dict, spec_path: str,
                             istio_images: tuple[str, ...]) -> Optional[Finding]:
    return _untrusted_image_finding(
        policy, "container", list_name, index, container, spec_path,
        f"is not one of the webhook's --accepted-istio-images [{', '.join(istio_images)}]: only Istio's own "
        "capture containers get their exemptions, so this container gets none of them")


def pod_findings(target: Target, resolution: Resolution, settings: Settings,
                 agent_images: tuple[str, ...] = DEFAULT_AGENT_IMAGES,
                 istio_images: tuple[str, ...] = (), mesh_privileged_proxies: bool = False) -> list[Finding]:
    """Every bypass in the pod (template) that `resolution.policy` does not allow. `agent_images`: the
    images a container running bpfinit-agent must carry to be the webhook's own. `istio_images` (opt-in,
    empty: not checked): the images Istio's capture containers must carry to get their exemptions.
    `mesh_privileged_proxies` (opt-in): the mesh sets values.global.proxy.privileged, so istio-init /
    istio-proxy with exactly Istio's privileged shape are exempt (off: that shape is unverifiable)."""
    policy = resolution.policy
    meta, spec = target.meta, target.spec
    annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    findings: list[Finding] = []
    istio_images = clean_images(istio_images)

    def untrusted_istio(list_name: str, index: int, container: dict) -> bool:
        """Is this Istio capture container's image not accepted? If so, it is reported."""
        if istio_image_accepted(container.get("image"), istio_images):
            return False
        findings.append(_untrusted_istio_finding(policy, list_name, index, container, target.spec_path,
                                                 istio_images))
        return True

    # --- vectors from metadata and spec
    injection_off = sidecar_injection_disabled(labels, annotations)
    if injection_off:
        where, value = injection_off
        effect = "removes the sidecar and all capture"
        if value != "false":  # say why a value that does not read as "false" still disables it
            effect += " (Istio injects only for y, yes, true, on, any case)"
        findings.append(_vector(policy, "injectDisabled", where, f'"{value}"', effect))
    if ANN_TEMPLATES in annotations and "sidecar" not in injection_templates(annotations[ANN_TEMPLATES]):
        findings.append(_vector(policy, "injectTemplates", ANN_TEMPLATES, annotations[ANN_TEMPLATES],
                                "does not include the sidecar template, so nothing is captured"))
    proxy_config = _proxy_config(annotations, findings)
    # the annotation wins over proxy.istio.io/config (Istio's template); a mode we cannot read is unverifiable
    if ANN_INTERCEPTION in annotations:
        mode_where, raw_mode = ANN_INTERCEPTION, annotations[ANN_INTERCEPTION]
        mode = raw_mode if raw_mode in INTERCEPTION_MODES else None
        known = ", ".join(INTERCEPTION_MODES)
    else:
        mode_where, raw_mode = f"{ANN_PROXY_CONFIG} interceptionMode", proxy_config.get("interceptionMode")
        mode = proxy_config_interception_mode(raw_mode)
        known = describe_interception_modes()
    if raw_mode is not None and mode is None:
        findings.append(_unverifiable(mode_where, f"{raw_mode!r} is not one of {known}"))
    if mode == "NONE":
        shown = "NONE" if raw_mode == "NONE" else f"{raw_mode!r} (NONE)"
        findings.append(_vector(policy, "interceptionModeNone", mode_where, shown, "disables capture"))
    if spec.get("hostNetwork") is True:
        findings.append(_vector(policy, "hostNetwork", f"{target.spec_path}.hostNetwork", "true",
                                "puts the pod outside any capture"))

    # --- capture settings: annotations, then each rendered init container
    containers = {c.get("name"): c for c in spec.get("containers") or []}
    init_containers = spec.get("initContainers") or []
    proxy = next((c for c in init_containers if c.get("name") == "istio-proxy"), containers.get("istio-proxy"))
    proxy_security = _security(proxy) if proxy else {}
    proxy_uid = proxy_security.get("runAsUser") if isinstance(proxy_security.get("runAsUser"), int) else 0
    caps: list[_Capture] = []
    annotation_cap = _annotation_capture(annotations, proxy_config, proxy_uid or 1337, findings)
    if annotation_cap:
        caps.append(annotation_cap)
    grants: dict[tuple[str, str], _Grant] = {}
    iptables_init = False
    agent_cap = None
    for index, container in enumerate(init_containers):
        name = container.get("name")
        command = container.get("command") or []
        if runs_agent(container) and container.get("image") not in agent_images:
            # not ours, whatever its name: no agent role, no exemption, its args are not our capture
            findings.append(_untrusted_agent_finding(policy, index, container, target.spec_path, agent_images))
            continue
        # Istio's istio-init / istio-validation from an image the webhook does not accept: no grant, and its
        # args are still checked (they can only add findings) but vouch for nothing (TPROXY)
        untrusted = (name in ("istio-init", "istio-validation") and not runs_agent(container)
                     and untrusted_istio("initContainers", index, container))
        if name in ("istio-init", "istio-validation") and not (
                isinstance(command, list) and all(isinstance(c, str) for c in command)):
            findings.append(_unverifiable(f"{name} command", "is not a list of strings"))
            continue
        if name == "istio-validation":
            cap = _container_capture(container, name, findings, is_validation=True, untrusted=untrusted)
            if not untrusted:
                grants[("initContainers", name)] = _VALIDATION_GRANT
        elif name == "istio-init" and command == AGENT_COMMAND:
            cap = agent_cap = _container_capture(container, name, findings, is_agent=True)
            grants[("initContainers", name)] = _AGENT_GRANT
        elif name == "istio-init":
            # Istio's istio-init runs the image's entrypoint or pilot-agent itself, nothing else
            if command and command[0].rsplit("/", 1)[-1] != "pilot-agent":
                findings.append(_unverifiable("istio-init command", f"{' '.join(map(str, command))!r} is not Istio's"))
                continue
            cap = _container_capture(container, name, findings, untrusted=untrusted)
            if not untrusted:
                grants[("initContainers", name)] = _ISTIO_INIT_GRANT
            iptables_init = True
        else:
            continue
        if cap:
            caps.append(cap)
    # istio-proxy gets NET_ADMIN from Istio's template only when the inbound interception mode is TPROXY
    tproxy = mode == "TPROXY" or any(c.cfg.interception_mode == "TPROXY" for c in caps
                                     if c is not annotation_cap and not c.untrusted)
    proxy_grant = _TPROXY_PROXY_GRANT if tproxy else _PROXY_GRANT
    for list_name in ("containers", "initContainers"):
        proxies = [(i, c) for i, c in enumerate(spec.get(list_name) or []) if c.get("name") == "istio-proxy"]
        # (a list holds a name once; were it twice, every copy would have to be accepted)
        untrusted_proxies = [untrusted_istio(list_name, i, c) for i, c in proxies]
        if not any(untrusted_proxies):
            grants[(list_name, "istio-proxy")] = proxy_grant
    for cap in caps:
        findings.extend(_capture_findings(cap, policy, settings))

    # --- who runs as the proxy, who may rewrite the network
    proxy_uids = {1337} | {u for cap in caps for u in cap.cfg.proxy_uids}
    proxy_gids = {1337} | {g for cap in caps for g in cap.cfg.proxy_gids}
    for key, ids in (("runAsUser", proxy_uids), ("runAsGroup", proxy_gids)):
        if isinstance(proxy_security.get(key), int) and proxy_security[key] != 0:
            ids.add(proxy_security[key])
    findings.extend(_container_findings(target, policy, proxy_uids, proxy_gids, grants, mesh_privileged_proxies))

    # --- the kernel guard: present and no wider than the policy, or the bypass must not need it
    if agent_cap is not None:
        findings.extend(_egress_guard_findings(agent_cap, resolution))
    keeps_iptables = (target.is_pod and (iptables_init or any(c.is_validation for c in caps))) or \
        (not target.is_pod and annotations.get(ANN_BPFINIT_INJECT) == "false")
    if keeps_iptables and agent_cap is None and _needs_kernel_guard(caps, policy, settings):
        where = "istio-init (iptables)" if target.is_pod else f'{ANN_BPFINIT_INJECT}: "false"'
        finding = _vector(policy, "istioInit", where, "present" if target.is_pod else "keeps iptables",
                          f"so bypassed traffic is not confined to {_show_rules(policy.allowed)} by the kernel guard")
        if finding:
            findings.append(finding)

    # the same setting often shows up in the annotations and in the rendered args: report it once
    unique, seen = [], set()
    for finding in findings:
        if finding is None or finding.key in seen:
            continue
        seen.add(finding.key)
        unique.append(finding)
    return unique


# ----------------------------------------------------------------------------------------------------
# decisions
# ----------------------------------------------------------------------------------------------------
def evaluate(obj: Any, namespace: str, policy_set: PolicySet, kind: Optional[str] = None,
             agent_images: Iterable[str] = DEFAULT_AGENT_IMAGES,
             istio_images: Iterable[str] = (), mesh_privileged_proxies: bool = False) -> Optional[Evaluation]:
    """Findings for one object under the current policy (None: not a pod or workload)."""
    target = extract_target(obj, namespace, kind)
    if target is None:
        return None
    labels = target.meta.get("labels") or {}
    resolution = policy_set.resolve(target.namespace, labels)
    if resolution.policy is None:
        return Evaluation(target, resolution, [])
    return Evaluation(target, resolution, pod_findings(target, resolution, policy_set.settings,
                                                       tuple(agent_images), tuple(istio_images),
                                                       bool(mesh_privileged_proxies)))


def _warnings(findings: list[Finding], ref: str, mode: str, prefix: str = "") -> list[str]:
    """kubectl prints each warning on its own line: a header naming the policy, then each finding in
    lines of <= 120 chars (a long one continues on indented lines; the apiserver may cut entries over 256)."""
    count = f"{len(findings)} violation{'s' if len(findings) != 1 else ''}"
    lines = [f"{prefix}egress policy {ref} ({mode}): {count}"]
    for finding in findings:
        # the whole text, wrapped at words (in Warn mode it is all the user sees), unless it runs past a
        # few lines (long CIDR lists): then the brief form, so the warnings stay bounded
        wrapped = warning_lines(finding.text, WARNING_LIMIT)
        lines.extend(wrapped if len(wrapped) <= WARNING_MAX_LINES else warning_lines(finding.brief, WARNING_LIMIT))
    return lines


def _labels(ref: str, mode: str, reason: str) -> dict:
    return {"policy": ref, "mode": mode, "reason": reason}


def validate_review(request: Any, policy_store, agent_images: Iterable[str] = DEFAULT_AGENT_IMAGES,
                    istio_images: Iterable[str] = (), mesh_privileged_proxies: bool = False) -> Decision:
    """AdmissionReview.request -> Decision. Denials are allowed=False, code 403; a malformed request
    is allowed=False, code 400 with the field named; nothing here raises. `agent_images`: the images
    the webhook's own agent may carry (its --agent-image and --accepted-agent-images); `istio_images`:
    its --accepted-istio-images (empty: Istio's images are not checked); `mesh_privileged_proxies`: its
    --mesh-privileged-proxies (Istio's privileged istio-init / istio-proxy shape is exempt)."""
    agent_images, istio_images = tuple(agent_images), clean_images(tuple(istio_images))
    policy_set = policy_store.current() if hasattr(policy_store, "current") else (policy_store or PolicySet())
    if not isinstance(request, dict):
        return Decision(False, 400, "request is missing or not an object", [], _labels("none", "none", "badRequest"))
    operation = request.get("operation")
    kind = (request.get("kind") or {}).get("kind") if isinstance(request.get("kind"), dict) else None
    if operation not in ("CREATE", "UPDATE") or request.get("subResource") not in (None, "", "ephemeralcontainers"):
        return Decision(True, 200, "", [], _labels("none", "none", "notEvaluated"))
    namespace = request.get("namespace") or ""
    try:
        evaluation = evaluate(request.get("object"), namespace, policy_set, kind, agent_images, istio_images,
                              mesh_privileged_proxies)
        old = None
        if operation == "UPDATE" and evaluation is not None and evaluation.findings \
                and isinstance(request.get("oldObject"), dict):
            old = evaluate(request["oldObject"], namespace, policy_set, kind, agent_images, istio_images,
                           mesh_privileged_proxies)
    except ObjectError as err:
        return Decision(False, 400, f"cannot evaluate egress policy: {err}", [],
                        _labels("none", "none", "badRequest"))
    if evaluation is None:
        return Decision(True, 200, "", [f"bpfinit egress policy: kind {kind!r} is not checked"],
                        _labels("none", "none", "unsupportedKind"))
    resolution, ref = evaluation.resolution, evaluation.policy_ref
    if resolution.exemption is not None:
        return Decision(True, 200, "", [], _labels(ref, "Exempt", "exempt"), {AUDIT_KEY_EXEMPTION: ref})
    if resolution.policy is None:
        return Decision(True, 200, "", [], _labels("none", resolution.mode, "noPolicy"))
    findings = evaluation.findings
    if not findings:
        return Decision(True, 200, "", [], _labels(ref, resolution.mode, "compliant"))

    # on UPDATE only new violations count, so old objects stay updatable (finalizers, labels, scale).
    # Container findings carry the container in their key: a container added with the same violation as
    # a tolerated one (e.g. an ephemeral debug container as UID 1337) is new.
    previous = {(f.key, f.text) for f in old.findings} if old else set()
    new = [f for f in findings if (f.key, f.text) not in previous]
    reason = (new or findings)[0].reason
    message = "; ".join(f.text for f in (new or findings)) + f" (policy {ref})"
    mode = resolution.mode
    if mode == "Enforce" and new:
        return Decision(False, 403, message, [], _labels(ref, mode, reason), {AUDIT_KEY_VIOLATION: message[:4000]})
    if mode == "Audit":
        return Decision(True, 200, "", [], _labels(ref, mode, reason), {AUDIT_KEY_VIOLATION: message[:4000]})
    if mode == "Enforce":  # only pre-existing violations
        warnings, reason = _warnings(findings, ref, mode, "pre-existing, tolerated on update: "), "preexisting"
    else:
        warnings = _warnings(findings, ref, mode)
    return Decision(True, 200, "", warnings, _labels(ref, mode, reason), {AUDIT_KEY_VIOLATION: message[:4000]})
