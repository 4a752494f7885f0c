"""Validation of the pod annotations that change traffic capture (pure functions).

Istio rejects a pod whose `traffic.sidecar.istio.io/*` annotations do not parse
(pkg/kube/inject/validate.go); we apply the same rules so that a bad value is
refused with a message naming the annotation and the value, whichever webhook
runs first. Rules: lists split on `,` with no trimming (istio-iptables passes
the text through unchanged, so " 80" would not mean port 80 to the agent), an
empty value means "empty list", an empty element is an error, ports are
0..65535, CIDRs are IPv4 or IPv6 prefixes (host bits allowed).

`validate_annotations(annotations) -> list[str]` returns one message per bad
annotation, empty when everything is fine.
"""
from __future__ import annotations

import ipaddress
import json
from typing import Callable, Mapping

import yaml

# bpfinit's own annotations (docs/ARCHITECTURE.md, "Webhook annotations").
BPFINIT_INJECT = "bpfinit.io/inject"
BPFINIT_ACCELERATE = "bpfinit.io/accelerate"
# waives the splice(2) part of the acceleration self-test (agent --accelerate-skip-splice-check)
BPFINIT_ACCELERATE_SKIP_SPLICE_CHECK = "bpfinit.io/accelerate-skip-splice-check"
# waives the backpressure part of the acceleration self-test (agent --accelerate-skip-backpressure-check)
BPFINIT_ACCELERATE_SKIP_BACKPRESSURE_CHECK = "bpfinit.io/accelerate-skip-backpressure-check"
# waives the MSG_WAITALL / SO_RCVLOWAT part of the acceleration self-test (agent --accelerate-skip-waitall-check)
BPFINIT_ACCELERATE_SKIP_WAITALL_CHECK = "bpfinit.io/accelerate-skip-waitall-check"
# also accelerates connections to other pods on the node that have it too (agent --accelerate-pod-to-pod)
BPFINIT_ACCELERATE_POD_TO_POD = "bpfinit.io/accelerate-pod-to-pod"
BPFINIT_DNS_CAPTURE = "bpfinit.io/dns-capture"
BPFINIT_STATUS = "bpfinit.io/status"

# Istio annotations that change capture (istio-capture-contract.md §2.1, §2.3).
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"
REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"
STATUS_PORT = "status.sidecar.istio.io/port"
PROXY_CONFIG = "proxy.istio.io/config"

INJECT_TEMPLATES = "inject.istio.io/templates"
# Istio's `sidecar.istio.io/inject` (pod label, or the deprecated annotation; the label wins when present).
SIDECAR_INJECT = "sidecar.istio.io/inject"
# pkg/kube/inject/inject.go injectRequired: strings.ToLower(value) in {y, yes, true, on} injects, "" uses
# the default, and EVERY other value (false, no, off, 0, False, typos...) disables injection.
SIDECAR_INJECT_ENABLING = ("y", "yes", "true", "on")

INTERCEPTION_MODES = ("REDIRECT", "TPROXY", "NONE")
# ProxyConfig.InterceptionMode enum numbers: protojson (how Istio reads proxy.istio.io/config) takes a JSON
# number as well as the name. The sidecar.istio.io/interceptionMode annotation takes names only.
INTERCEPTION_MODE_NUMBERS = {0: "REDIRECT", 1: "TPROXY", 2: "NONE"}
BOOLEAN_VALUES = ("true", "false")
# Linux IFNAMSIZ is 16 including the terminating NUL.
MAX_INTERFACE_NAME_BYTES = 15


class InvalidValue(ValueError):
    """A value that does not parse; the message explains why in a few words."""


def _split_list(value: str) -> list[str]:
    # Istio: "" is the empty list; otherwise split on "," and keep every element as is.
    return [] if value == "" else value.split(",")


def _check_port(text: str) -> None:
    if not text.isascii() or not text.isdigit():
        raise InvalidValue(f"port {text!r} is not a number")
    if int(text) > 65535:
        raise InvalidValue(f"port {text!r} is out of range 0-65535")


def check_port_list(value: str) -> None:
    for item in _split_list(value):
        _check_port(item)


def check_port_list_or_wildcard(value: str) -> None:
    if value != "*":
        check_port_list(value)


def check_single_port(value: str) -> None:
    _check_port(value)


def _check_cidr(text: str) -> None:
    # Go's netip.ParsePrefix needs an explicit prefix length and rejects zones.
    if "/" not in text or "%" in text:
        raise InvalidValue(f"{text!r} is not a CIDR (address/prefix-length)")
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidValue(f"{text!r} is not a CIDR (address/prefix-length)") from None
    address, prefix = text.split("/", 1)
    if not prefix.isascii() or not prefix.isdigit() or (len(prefix) > 1 and prefix[0] == "0"):
        raise InvalidValue(f"{text!r} has an invalid prefix length")


def check_cidr_list(value: str) -> None:
    for item in _split_list(value):
        _check_cidr(item)


def check_cidr_list_or_wildcard(value: str) -> None:
    if value != "*":
        check_cidr_list(value)


def _check_interface_name(name: str) -> None:
    if name == "":
        raise InvalidValue("empty interface name")
    if len(name.encode()) > MAX_INTERFACE_NAME_BYTES:
        raise InvalidValue(f"interface name {name!r} is longer than {MAX_INTERFACE_NAME_BYTES} bytes")
    if name in (".", "..") or any(ch == "/" or ch == ":" or ch.isspace() for ch in name):
        raise InvalidValue(f"{name!r} is not a valid interface name")


def check_interface_list(value: str) -> None:
    for item in _split_list(value):
        _check_interface_name(item)


def check_interception_mode(value: str) -> None:
    if value not in INTERCEPTION_MODES:
        raise InvalidValue(f"must be one of {', '.join(INTERCEPTION_MODES)}")


# libyaml's safe loader when PyYAML was built with it: the pure-Python one cost ~0.3 ms for a
# typical proxy.istio.io/config, more than the rest of the mutation. Same YAML 1.1 safe subset.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def proxy_config_interception_mode(value: object) -> str | None:
    """The mode a parsed `proxy.istio.io/config` interceptionMode stands for (name or enum number, as
    protojson reads it), or None when it is neither (unrecognised)."""
    if isinstance(value, str):
        return value if value in INTERCEPTION_MODES else None
    if isinstance(value, int) and not isinstance(value, bool):
        return INTERCEPTION_MODE_NUMBERS.get(value)
    return None


def describe_interception_modes() -> str:
    numbers = ", ".join(f"{n} ({name})" for n, name in INTERCEPTION_MODE_NUMBERS.items())
    return f"{', '.join(INTERCEPTION_MODES)} or the enum numbers {numbers}"


def check_proxy_config(value: str) -> None:
    # Istio parses the annotation as a ProxyConfig (YAML or JSON). We only check
    # that it is a mapping and that the one field affecting capture is sane.
    try:
        parsed = yaml.load(value, Loader=_SAFE_LOADER) if value.strip() else {}  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise InvalidValue(f"not valid YAML/JSON ({first_line})") from None
    if parsed is None:
        return
    if not isinstance(parsed, dict):
        raise InvalidValue("must be a ProxyConfig mapping")
    mode = parsed.get("interceptionMode")
    if mode is not None and proxy_config_interception_mode(mode) is None:
        raise InvalidValue(f"interceptionMode {mode!r} must be one of {describe_interception_modes()}")


def sidecar_injection_disabled(labels: Mapping[str, object] | None,
                               annotations: Mapping[str, object] | None) -> tuple[str, str] | None:
    """(where, value) when `sidecar.istio.io/inject` disables Istio's injection for this pod, else None.

    Same reading as Istio's injectRequired: the label beats the annotation (even when it is ""), the value
    is lower-cased, y/yes/true/on inject, "" leaves it to the namespace default, anything else disables."""
    labels, annotations = labels or {}, annotations or {}
    if SIDECAR_INJECT in labels:
        where, value = f"label {SIDECAR_INJECT}", labels[SIDECAR_INJECT]
    elif SIDECAR_INJECT in annotations:
        where, value = SIDECAR_INJECT, annotations[SIDECAR_INJECT]
    else:
        return None
    if not isinstance(value, str) or value == "" or value.lower() in SIDECAR_INJECT_ENABLING:
        return None
    return where, value


def injection_templates(value: str) -> list[str]:
    """The template names of `inject.istio.io/templates` as Istio's selectTemplates reads them: split on
    ",", each name strings.TrimSpace'd (unlike the traffic annotations, "gateway, sidecar" is fine)."""
    return [name.strip() for name in value.split(",")]


def check_boolean(value: str) -> None:
    if value not in BOOLEAN_VALUES:
        raise InvalidValue('must be "true" or "false"')


def check_status(value: str) -> None:
    # Written by us; a hand-edited value that is not JSON would break idempotency checks.
    try:
        parsed = json.loads(value)
    except ValueError:
        raise InvalidValue("must be the JSON record written by the bpfinit webhook") from None
    if not isinstance(parsed, dict):
        raise InvalidValue("must be the JSON record written by the bpfinit webhook")


CHECKS: dict[str, Callable[[str], None]] = {
    INTERCEPTION_MODE: check_interception_mode,
    INCLUDE_OUTBOUND_IP_RANGES: check_cidr_list_or_wildcard,
    EXCLUDE_OUTBOUND_IP_RANGES: check_cidr_list,
    INCLUDE_INBOUND_PORTS: check_port_list_or_wildcard,
    EXCLUDE_INBOUND_PORTS: check_port_list,
    # Istio does not validate includeOutboundPorts, but iptables (and our agent)
    # would fail on a bad value when the pod starts: refusing early is kinder.
    INCLUDE_OUTBOUND_PORTS: check_port_list,
    EXCLUDE_OUTBOUND_PORTS: check_port_list,
    EXCLUDE_INTERFACES: check_interface_list,
    KUBEVIRT_INTERFACES: check_interface_list,
    REROUTE_VIRTUAL_INTERFACES: check_interface_list,
    STATUS_PORT: check_single_port,
    PROXY_CONFIG: check_proxy_config,
    BPFINIT_INJECT: check_boolean,
    BPFINIT_ACCELERATE: check_boolean,
    BPFINIT_ACCELERATE_SKIP_SPLICE_CHECK: check_boolean,
    BPFINIT_ACCELERATE_SKIP_BACKPRESSURE_CHECK: check_boolean,
    BPFINIT_ACCELERATE_SKIP_WAITALL_CHECK: check_boolean,
    BPFINIT_ACCELERATE_POD_TO_POD: check_boolean,
    BPFINIT_DNS_CAPTURE: check_boolean,
    BPFINIT_STATUS: check_status,
}


def _shorten(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def validate_annotations(annotations: Mapping[str, object] | None) -> list[str]:
    """One human-readable message per annotation whose value is invalid."""
    problems: list[str] = []
    for key, check in CHECKS.items():
        if not annotations or key not in annotations:
            continue
        value = annotations[key]
        if not isinstance(value, str):
            problems.append(f"invalid value for annotation {key}: must be a string")
            continue
        try:
            check(value)
        except InvalidValue as reason:
            problems.append(f"invalid value {_shorten(value)!r} for annotation {key}: {reason}")
    return problems
