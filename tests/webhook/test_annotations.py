"""Istio-compatible validation of capture annotations (pure)."""
from __future__ import annotations

import pytest

from tests.webhook.istio_pods import injected_files, pods_in_file
from webhook import annotations as annotations_mod
from webhook.annotations import validate_annotations

GOOD = [
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", ""),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "127.0.0.1/24,10.96.0.1/24"),   # host bits allowed
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8,fd00::/8,::ffff:1.2.3.4/128"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", ""),
    ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "0,80,65535"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", ""),
    ("traffic.sidecar.istio.io/excludeInterfaces", "eth1,net0ps2"),
    ("istio.io/reroute-virtual-interfaces", "net1"),
    ("status.sidecar.istio.io/port", "0"),
    ("sidecar.istio.io/interceptionMode", "NONE"),
    ("proxy.istio.io/config", "discoveryAddress: foo:123\nproxyMetadata:\n  FOO: bar\n"),
    ("proxy.istio.io/config", '{"interceptionMode": "REDIRECT"}'),
    ("proxy.istio.io/config", '{"interceptionMode": 2}'),     # protojson takes enum numbers
    ("proxy.istio.io/config", "interceptionMode: 0"),
    ("bpfinit.io/inject", "false"),
    ("bpfinit.io/accelerate", "true"),
    ("bpfinit.io/accelerate-skip-splice-check", "true"),
    ("bpfinit.io/accelerate-skip-splice-check", "false"),
    ("bpfinit.io/accelerate-skip-backpressure-check", "true"),
    ("bpfinit.io/accelerate-skip-backpressure-check", "false"),
    ("bpfinit.io/accelerate-skip-waitall-check", "true"),
    ("bpfinit.io/accelerate-skip-waitall-check", "false"),
    ("bpfinit.io/accelerate-pod-to-pod", "true"),
    ("bpfinit.io/accelerate-pod-to-pod", "false"),
    ("bpfinit.io/dns-capture", "false"),
    ("bpfinit.io/status", '{"version":1}'),
    ("unrelated/annotation", "anything at all"),
]
BAD = [
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8, 172.16.0.0/12", "not a CIDR"),  # no trimming
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*", "not a CIDR"),          # * only for include
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.1", "not a CIDR"),   # bare IP
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/33", "not a CIDR"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/255.0.0.0", "prefix length"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8,,", "not a CIDR"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*,10.0.0.0/8", "not a CIDR"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "65536", "out of range"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "80, 443", "not a number"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "-1", "not a number"),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "http", "not a number"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "a-very-long-interface-name", "longer than 15"),
    ("traffic.sidecar.istio.io/kubevirtInterfaces", "net1,", "empty interface name"),
    ("istio.io/reroute-virtual-interfaces", "net/1", "not a valid interface name"),
    ("status.sidecar.istio.io/port", "", "not a number"),
    ("sidecar.istio.io/interceptionMode", "redirect", "must be one of"),
    ("proxy.istio.io/config", "interceptionMode: SIDEWAYS", "interceptionMode"),
    ("proxy.istio.io/config", "interceptionMode: 7", "interceptionMode 7 must be one of REDIRECT, TPROXY, NONE or "
                                                     "the enum numbers 0 (REDIRECT), 1 (TPROXY), 2 (NONE)"),
    ("proxy.istio.io/config", "interceptionMode: true", "interceptionMode True must be one of"),
    ("proxy.istio.io/config", "[1, 2]", "mapping"),
    ("proxy.istio.io/config", "a: [", "not valid YAML"),
    ("bpfinit.io/inject", "False", 'must be "true" or "false"'),
    ("bpfinit.io/dns-capture", "1", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-splice-check", "1", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-splice-check", "yes", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-splice-check", "", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-backpressure-check", "1", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-backpressure-check", "yes", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-backpressure-check", "", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-waitall-check", "1", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-waitall-check", "yes", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-skip-waitall-check", "", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-pod-to-pod", "1", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-pod-to-pod", "yes", 'must be "true" or "false"'),
    ("bpfinit.io/accelerate-pod-to-pod", "", 'must be "true" or "false"'),
    ("bpfinit.io/status", "not json", "JSON record"),
]


@pytest.mark.parametrize("key,value", GOOD)
def test_valid_values_pass(key, value):
    assert validate_annotations({key: value}) == []


@pytest.mark.parametrize("key,value,reason", BAD)
def test_invalid_values_name_annotation_value_and_reason(key, value, reason):
    problems = validate_annotations({key: value})
    assert len(problems) == 1
    assert key in problems[0] and repr(value) in problems[0] and reason in problems[0]


def test_non_string_value_is_reported():
    assert "must be a string" in validate_annotations({"bpfinit.io/inject": 5})[0]


def test_every_problem_is_reported_at_once():
    problems = validate_annotations({"bpfinit.io/inject": "no", "traffic.sidecar.istio.io/excludeOutboundPorts": "x"})
    assert len(problems) == 2


def test_istio_golden_annotations_are_all_valid():
    for path in injected_files():
        for pod in pods_in_file(path):
            assert validate_annotations(pod["metadata"].get("annotations")) == [], path.name


@pytest.mark.parametrize("labels,annotations,expected", [
    ({}, {}, None),
    ({}, {"sidecar.istio.io/inject": "false"}, ("sidecar.istio.io/inject", "false")),
    ({}, {"sidecar.istio.io/inject": "No"}, ("sidecar.istio.io/inject", "No")),
    ({}, {"sidecar.istio.io/inject": "0"}, ("sidecar.istio.io/inject", "0")),
    ({}, {"sidecar.istio.io/inject": "TRUE"}, None),
    ({}, {"sidecar.istio.io/inject": "on"}, None),
    ({}, {"sidecar.istio.io/inject": ""}, None),
    ({"sidecar.istio.io/inject": "off"}, {}, ("label sidecar.istio.io/inject", "off")),
    ({"sidecar.istio.io/inject": ""}, {"sidecar.istio.io/inject": "false"}, None),     # label wins, even ""
    ({"sidecar.istio.io/inject": "Y"}, {"sidecar.istio.io/inject": "false"}, None),
])
def test_sidecar_injection_disabled_reads_like_istio_inject_required(labels, annotations, expected):
    assert annotations_mod.sidecar_injection_disabled(labels, annotations) == expected


@pytest.mark.parametrize("value,names", [
    ("sidecar", ["sidecar"]), ("gateway, sidecar", ["gateway", "sidecar"]), (" a ,\tb\n", ["a", "b"]),
    ("", [""]), ("a,,b", ["a", "", "b"]),
])
def test_injection_templates_are_trimmed_like_istio_select_templates(value, names):
    assert annotations_mod.injection_templates(value) == names


@pytest.mark.parametrize("value,mode", [
    ("REDIRECT", "REDIRECT"), ("NONE", "NONE"), (0, "REDIRECT"), (1, "TPROXY"), (2, "NONE"),
    (3, None), (-1, None), (True, None), (False, None), ("none", None), ("2", None), (2.0, None), ([2], None),
])
def test_proxy_config_interception_mode_reads_names_and_enum_numbers(value, mode):
    assert annotations_mod.proxy_config_interception_mode(value) == mode
