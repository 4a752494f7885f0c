"""validate_review / evaluate on Istio's injected objects: every bypass vector x mode x policy scope x kind."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest

from webhook.policy import PolicySet, parse_policy_documents
from webhook.validate import evaluate, validate_review

from .corpus import (NAMESPACE, PRODUCER_LABELS, add_init_env, annotate, base_objects, init_container,
                     policy_doc, pod_template, review, set_init_arg, set_labels, swap_to_agent)

KAFKA = ["172.20.0.0/16:9092"]
KINDS = ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"]
MODES = ["Enforce", "Warn", "Audit"]
SCOPES = {  # scope -> (policy namespace, extra spec, ref)
    "namespaced": (NAMESPACE, {}, f"{NAMESPACE}/allow-kafka-egress"),
    "cluster-all": ("bpfinit-system", {"namespaces": ["*"]}, "bpfinit-system/allow-kafka-egress"),
    "cluster-named": ("bpfinit-system", {"namespaces": [NAMESPACE]}, "bpfinit-system/allow-kafka-egress"),
}


def policy_set(scope: str = "namespaced", mode: str | None = "Enforce", destinations=KAFKA, vectors=(),
               extra_docs=()) -> PolicySet:
    namespace, extra, _ref = SCOPES[scope]
    spec = {"selector": {"matchLabels": dict(PRODUCER_LABELS)}, "allowedDestinations": list(destinations),
            "allowedVectors": list(vectors), **extra}
    if mode:
        spec["mode"] = mode
    return parse_policy_documents([policy_doc("allow-kafka-egress", namespace, **spec), *extra_docs], "test")


def app_container(obj: dict) -> dict:
    return next(c for c in pod_template(obj)["spec"]["containers"] if c["name"] != "istio-proxy")


def final_state(obj: dict, egress_allow=KAFKA) -> dict:
    """Pods are judged after bpfinit's mutation: the agent replaces Istio's iptables istio-init."""
    if obj["kind"] == "Pod" and init_container(obj) is not None:
        swap_to_agent(obj, egress_allow)
    return obj


# ---- the bypass vectors ---------------------------------------------------------------------------
@dataclass
class Vector:
    id: str
    apply: Callable[[dict], None]
    reason: str
    fragment: str            # in the denial message ({spec} = the pod spec path)
    allow: dict              # policy spec change that makes it acceptable
    kinds: tuple = tuple(KINDS)


def _annotate_and_arg(annotation: str, value: str, flag: str):
    def apply(obj):
        annotate(obj, **{annotation: value})
        set_init_arg(obj, flag, value)
    return apply


def _proxy_metadata(name: str, value: str):
    def apply(obj):
        annotate(obj, **{"proxy.istio.io/config": f"proxyMetadata:\n  {name}: \"{value}\"\n"})
        add_init_env(obj, name, value)  # Istio copies proxyMetadata into istio-init's env
    return apply


def _no_init(obj):
    spec = pod_template(obj)["spec"]
    spec["initContainers"] = [c for c in spec.get("initContainers", []) if c["name"] != "istio-init"]


def _interception_none(obj):
    annotate(obj, **{"sidecar.istio.io/interceptionMode": "NONE"})
    _no_init(obj)


def _security(obj, **values):
    app_container(obj).setdefault("securityContext", {}).update(values)


def _extra_init_as_proxy(obj):
    pod_template(obj)["spec"]["initContainers"].append(
        {"name": "fetch-config", "image": "busybox", "securityContext": {"runAsUser": 1337}})


def _ephemeral_net_admin(obj):
    pod_template(obj)["spec"]["ephemeralContainers"] = [
        {"name": "debugger", "image": "busybox", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]


def _custom_init_args(obj):
    init_container(obj)["args"] = ["my", "custom", "args"]


ANN = "traffic.sidecar.istio.io/"
VECTORS = [
    Vector("exclude-cidr", _annotate_and_arg(ANN + "excludeOutboundIPRanges", "0.0.0.0/0", "-x"), "excludedCidr",
           ANN + "excludeOutboundIPRanges: 0.0.0.0/0 is not inside [172.20.0.0/16:9092]",
           {"allowedDestinations": KAFKA + ["0.0.0.0/0"]}),
    Vector("exclude-cidr-v6", _annotate_and_arg(ANN + "excludeOutboundIPRanges", "fd00::1/8", "-x"), "excludedCidr",
           ANN + "excludeOutboundIPRanges: fd00::1/8 is not inside", {"allowedDestinations": KAFKA + ["[fd00::/8]:9092"]}),
    Vector("include-narrow", _annotate_and_arg(ANN + "includeOutboundIPRanges", "10.0.0.0/8", "-i"), "narrowInclude",
           ANN + 'includeOutboundIPRanges: "10.0.0.0/8" leaves 0.0.0.0/5', {"allowedDestinations": ["0.0.0.0/0", "::/0"]}),
    Vector("include-empty", _annotate_and_arg(ANN + "includeOutboundIPRanges", "", "-i"), "narrowInclude",
           ANN + 'includeOutboundIPRanges: "" leaves 0.0.0.0/0, ::/0 uncaptured',
           {"allowedDestinations": ["0.0.0.0/0:9092", "[::/0]:9092"]}),
    Vector("exclude-port", _annotate_and_arg(ANN + "excludeOutboundPorts", "22", "-o"), "excludedPort",
           ANN + "excludeOutboundPorts: 22 is not an allowed port of [172.20.0.0/16:9092]",
           {"allowedDestinations": KAFKA + ["10.0.0.0/8:22"]}),
    Vector("exclude-interfaces", _annotate_and_arg(ANN + "excludeInterfaces", "eth1", "-c"), "excludeInterfaces",
           ANN + "excludeInterfaces: eth1 takes these interfaces out of capture", {"allowedVectors": ["excludeInterfaces"]}),
    Vector("kubevirt", _annotate_and_arg(ANN + "kubevirtInterfaces", "net1", "-k"), "kubevirtInterfaces",
           ANN + "kubevirtInterfaces: net1", {"allowedVectors": ["kubevirtInterfaces"]}),
    Vector("reroute-virtual", _annotate_and_arg("istio.io/reroute-virtual-interfaces", "net1,net2", "-k"),
           "kubevirtInterfaces", "istio.io/reroute-virtual-interfaces: net1,net2", {"allowedVectors": ["kubevirtInterfaces"]}),
    Vector("interception-none", _interception_none, "interceptionModeNone",
           "sidecar.istio.io/interceptionMode: NONE disables capture", {"allowedVectors": ["interceptionModeNone"]}),
    Vector("proxy-config-none", lambda o: (annotate(o, **{"proxy.istio.io/config": "interceptionMode: NONE"}), _no_init(o)),
           "interceptionModeNone", "proxy.istio.io/config interceptionMode: NONE", {"allowedVectors": ["interceptionModeNone"]}),
    Vector("inject-false-label", lambda o: set_labels(o, {"sidecar.istio.io/inject": "false"}), "injectDisabled",
           'label sidecar.istio.io/inject: "false" removes the sidecar', {"allowedVectors": ["injectDisabled"]}),
    Vector("inject-false-annotation", lambda o: annotate(o, **{"sidecar.istio.io/inject": "false"}), "injectDisabled",
           'sidecar.istio.io/inject: "false"', {"allowedVectors": ["injectDisabled"]}),
    Vector("inject-no-label", lambda o: set_labels(o, {"sidecar.istio.io/inject": "no"}), "injectDisabled",
           'label sidecar.istio.io/inject: "no" removes the sidecar and all capture (Istio injects only for y, yes, '
           "true, on, any case)", {"allowedVectors": ["injectDisabled"]}),
    Vector("inject-False-annotation", lambda o: annotate(o, **{"sidecar.istio.io/inject": "False"}), "injectDisabled",
           'sidecar.istio.io/inject: "False" removes the sidecar', {"allowedVectors": ["injectDisabled"]}),
    Vector("templates-gateway", lambda o: annotate(o, **{"inject.istio.io/templates": "gateway"}), "injectTemplates",
           "inject.istio.io/templates: gateway does not include the sidecar template", {"allowedVectors": ["injectTemplates"]}),
    Vector("metadata-exclude-ports", _proxy_metadata("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "22"), "excludedPort",
           "proxy.istio.io/config proxyMetadata ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE: 22 is not an allowed port",
           {"allowedDestinations": KAFKA + ["0.0.0.0/0:22"]}),
    Vector("metadata-exclude-interfaces", _proxy_metadata("ISTIO_EXCLUDE_INTERFACES", "eth9"), "excludeInterfaces",
           "proxyMetadata ISTIO_EXCLUDE_INTERFACES: eth9", {"allowedVectors": ["excludeInterfaces"]}),
    Vector("metadata-owner-groups", _proxy_metadata("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "999"), "ownerGroups",
           "proxyMetadata ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: 999 lets processes in these groups bypass capture",
           {"allowedVectors": ["ownerGroups"]}),
    Vector("metadata-proxy-gid-0", _proxy_metadata("PROXY_GID", "0"), "proxyIdentity",
           "proxyMetadata PROXY_GID: 0 lets every process in group 0 bypass", {"allowedVectors": ["proxyIdentity"]}),
    Vector("metadata-dry-run", _proxy_metadata("DRY_RUN", "true"), "captureDisabled",
           "proxyMetadata DRY_RUN: true makes the init container program nothing", {"allowedVectors": ["captureDisabled"]}),
    Vector("app-runs-as-proxy-uid", lambda o: _security(o, runAsUser=1337), "proxyIdentity",
           "runAsUser 1337 is the proxy UID", {"allowedVectors": ["proxyIdentity"]}),
    Vector("pod-runs-as-proxy-gid", lambda o: pod_template(o)["spec"].setdefault("securityContext", {}).update(runAsGroup=1337),
           "proxyIdentity", "runAsGroup 1337 is the proxy GID", {"allowedVectors": ["proxyIdentity"]}),
    Vector("init-runs-as-proxy-uid", _extra_init_as_proxy, "proxyIdentity",
           'container "fetch-config": runAsUser 1337', {"allowedVectors": ["proxyIdentity"]}),
    Vector("net-admin", lambda o: _security(o, capabilities={"add": ["NET_ADMIN"]}), "netAdmin",
           ": NET_ADMIN can rewrite the pod's network", {"allowedVectors": ["netAdmin"]}),
    Vector("privileged", lambda o: _security(o, privileged=True), "netAdmin", ": privileged can rewrite",
           {"allowedVectors": ["netAdmin"]}),
    Vector("host-network", lambda o: pod_template(o)["spec"].update(hostNetwork=True), "hostNetwork",
           "hostNetwork: true puts the pod outside any capture", {"allowedVectors": ["hostNetwork"]}),
    Vector("ephemeral-net-admin", _ephemeral_net_admin, "netAdmin", 'container "debugger": NET_ADMIN',
           {"allowedVectors": ["netAdmin"]}, ("Pod",)),
    Vector("custom-init-args", _custom_init_args, "unverifiable",
           "istio-init args cannot be verified: unexpected argument 'my'", {"allowedVectors": ["*"]}),
]
ALLOWABLE = [v for v in VECTORS if v.reason != "unverifiable"]


def cases(vectors, kinds):
    """(vector, kind) pairs where the vector exists on that kind (ephemeral containers: Pods only)."""
    return [pytest.param(v, k, id=f"{v.id}-{k}") for v in vectors for k in kinds if k in v.kinds]


def make(kind: str, vector: Vector | None = None) -> dict:
    obj = set_labels(base_objects()[kind], PRODUCER_LABELS)
    if vector is not None:
        vector.apply(obj)
    return final_state(obj)


# ---- baseline ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_untouched_istio_objects_are_compliant(kind):
    decision = validate_review(review(make(kind)), policy_set())
    assert decision.allowed and decision.code == 200 and decision.warnings == []
    assert decision.metric_labels == {"policy": f"{NAMESPACE}/allow-kafka-egress", "mode": "Enforce",
                                      "reason": "compliant"}


@pytest.mark.parametrize("kind", KINDS)
def test_the_seed_example_bypass_inside_the_policy_is_admitted(kind):
    obj = make(kind)
    _annotate_and_arg(ANN + "excludeOutboundIPRanges", "172.20.0.0/16", "-x")(obj)
    assert validate_review(review(obj), policy_set()).allowed


def test_the_seed_example_denial_message_is_exact():
    obj = make("Deployment", VECTORS[0])
    decision = validate_review(review(obj), policy_set())
    assert (decision.allowed, decision.code) == (False, 403)
    assert decision.message == ("traffic.sidecar.istio.io/excludeOutboundIPRanges: 0.0.0.0/0 is not inside "
                                "[172.20.0.0/16:9092] (policy high-performance-app/allow-kafka-egress)")


# ---- every vector x kind (Enforce, namespaced) -------------------------------------------------------
@pytest.mark.parametrize("vector,kind", cases(VECTORS, KINDS))
def test_vector_is_denied_on_every_kind(vector, kind):
    obj = make(kind, vector)
    evaluation = evaluate(obj, NAMESPACE, policy_set())
    assert vector.reason in [f.reason for f in evaluation.findings]
    decision = validate_review(review(obj), policy_set())
    assert (decision.allowed, decision.code) == (False, 403), decision
    assert vector.fragment in decision.message
    assert decision.message.endswith(f"(policy {NAMESPACE}/allow-kafka-egress)")
    assert decision.metric_labels["reason"] == evaluation.findings[0].reason
    assert decision.metric_labels["mode"] == "Enforce"


@pytest.mark.parametrize("vector,kind", cases(ALLOWABLE, ["Pod", "Deployment", "CronJob"]))
def test_vector_allowed_by_policy_is_admitted(vector, kind):
    allow = {"allowedDestinations": KAFKA, "allowedVectors": [], **vector.allow}
    policies = policy_set(destinations=allow["allowedDestinations"], vectors=allow["allowedVectors"])
    obj = set_labels(base_objects()[kind], PRODUCER_LABELS)
    vector.apply(obj)
    final_state(obj, egress_allow=allow["allowedDestinations"])
    reasons = [f.reason for f in evaluate(obj, NAMESPACE, policies).findings]
    assert vector.reason not in reasons
    assert validate_review(review(obj), policies).allowed


# ---- modes x scopes -------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vector,kind", cases(VECTORS, ["Pod", "Deployment"]))
def test_modes_and_scopes(vector, kind, mode, scope):
    ref = SCOPES[scope][2]
    decision = validate_review(review(make(kind, vector)), policy_set(scope, mode))
    assert decision.metric_labels["policy"] == ref and decision.metric_labels["mode"] == mode
    assert decision.metric_labels["reason"] not in ("compliant", "noPolicy")
    if mode == "Enforce":
        assert (decision.allowed, decision.code) == (False, 403)
        assert vector.fragment in decision.message and f"(policy {ref})" in decision.message
    elif mode == "Warn":
        assert decision.allowed and decision.code == 200 and decision.warnings
        assert all(len(w) <= 256 for w in decision.warnings)
        assert decision.warnings[0].startswith(f"egress policy {ref} (Warn): ")
        assert any(vector.fragment[:20] in w or vector.reason in w for w in decision.warnings[1:])
        assert "egress-policy-violation" in decision.audit_annotations
    else:
        assert decision.allowed and decision.warnings == []
        assert vector.fragment in decision.audit_annotations["egress-policy-violation"]


@pytest.mark.parametrize("vector,kind", cases(VECTORS, ["Pod", "Deployment", "Job"]))
def test_exemption_from_the_exemption_namespace_admits_everything(vector, kind):
    exemption = policy_doc("producer-exempt", "bpfinit-system", exemption=True, namespaces=[NAMESPACE],
                           selector={"matchLabels": dict(PRODUCER_LABELS)}, description="INC-42")
    policies = policy_set(extra_docs=[exemption])
    decision = validate_review(review(make(kind, vector)), policies)
    assert decision.allowed and decision.warnings == []
    assert decision.metric_labels == {"policy": "bpfinit-system/producer-exempt", "mode": "Exempt", "reason": "exempt"}
    assert decision.audit_annotations == {"egress-policy-exemption": "bpfinit-system/producer-exempt"}
    assert policies.allow_list_for(NAMESPACE, PRODUCER_LABELS) is None  # no kernel guard for exempt pods


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.id)
def test_pods_no_policy_selects_are_admitted(vector):
    obj = make("Deployment", vector)
    set_labels(obj, {"app": "consumer"})
    decision = validate_review(review(obj), policy_set())
    assert decision.allowed and decision.metric_labels["reason"] == "noPolicy"
    assert validate_review(review(make("Deployment", vector), namespace="elsewhere"), policy_set()).allowed


# ---- final-state specifics: the agent, leftover istio-init ------------------------------------------
def _pod_excluding_kafka():
    obj = set_labels(base_objects()["Pod"], PRODUCER_LABELS)
    _annotate_and_arg(ANN + "excludeOutboundIPRanges", "172.20.0.0/16", "-x")(obj)
    return obj


def test_leftover_istio_init_with_port_limited_bypass_is_denied():
    decision = validate_review(review(_pod_excluding_kafka()), policy_set())
    assert not decision.allowed and decision.metric_labels["reason"] == "istioInit"
    assert "istio-init (iptables): present so bypassed traffic is not confined to [172.20.0.0/16:9092]" in decision.message
    assert validate_review(review(_pod_excluding_kafka()), policy_set(vectors=["istioInit"])).allowed
    # with all ports allowed, iptables' own exclusion is already inside the policy: no guard needed
    assert validate_review(review(_pod_excluding_kafka()), policy_set(destinations=["172.20.0.0/16"])).allowed


def test_leftover_istio_init_without_bypass_is_fine():
    obj = set_labels(base_objects()["Pod"], PRODUCER_LABELS)
    assert validate_review(review(obj), policy_set()).allowed


def test_workload_opting_out_of_bpfinit_with_bypass_is_denied():
    obj = set_labels(base_objects()["Deployment"], PRODUCER_LABELS)
    annotate(obj, **{"bpfinit.io/inject": "false", ANN + "excludeOutboundIPRanges": "172.20.0.0/16"})
    decision = validate_review(review(obj), policy_set())
    assert not decision.allowed and decision.metric_labels["reason"] == "istioInit"
    assert 'bpfinit.io/inject: "false": keeps iptables' in decision.message


def test_agent_args_are_checked_like_istio_init():
    obj = swap_to_agent(set_labels(base_objects()["Pod"], PRODUCER_LABELS), KAFKA)
    set_init_arg(obj, "-x", "0.0.0.0/0")  # no annotation: e.g. a mesh-wide default or a hand-edited pod
    decision = validate_review(review(obj), policy_set())
    assert not decision.allowed
    assert decision.message.startswith("istio-init arg -x: 0.0.0.0/0 is not inside [172.20.0.0/16:9092]")


def test_agent_env_is_attributed():
    obj = swap_to_agent(set_labels(base_objects()["Pod"], PRODUCER_LABELS), KAFKA)
    add_init_env(obj, "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "25")
    decision = validate_review(review(obj), policy_set())
    assert "istio-init env ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE: 25 is not an allowed port" in decision.message


@pytest.mark.parametrize("egress_allow,ok", [
    (KAFKA, True), (["172.20.1.0/24:9092"], True), ([], True),
    (None, False), (["0.0.0.0/0"], False), (["172.20.0.0/16:9090-9099"], False), (["172.20.0.0/15:9092"], False),
])
def test_agent_egress_allow_must_be_inside_the_policy(egress_allow, ok):
    obj = swap_to_agent(set_labels(base_objects()["Pod"], PRODUCER_LABELS), egress_allow)
    decision = validate_review(review(obj), policy_set())
    assert decision.allowed is ok, decision.message
    if not ok:
        assert decision.metric_labels["reason"] == "egressGuard"
        assert "[172.20.0.0/16:9092]" in decision.message
    # Warn/Audit never install a guard (allow_list_for is None), so none is expected there
    assert validate_review(review(obj), policy_set(mode="Warn")).metric_labels["reason"] == "compliant"


def test_agent_egress_allow_via_env():
    obj = swap_to_agent(set_labels(base_objects()["Pod"], PRODUCER_LABELS), None)
    add_init_env(obj, "BPFINIT_EGRESS_ALLOW", "10.0.0.0/8")
    decision = validate_review(review(obj), policy_set())
    assert "istio-init env BPFINIT_EGRESS_ALLOW: 10.0.0.0/8 is not inside [172.20.0.0/16:9092]" in decision.message


def test_cni_pod_is_judged_by_its_annotations_and_validation_args():
    from .corpus import load
    pod = load("hello.yaml.cni.injected", "Deployment")
    set_labels(pod, PRODUCER_LABELS)
    assert validate_review(review(pod), policy_set()).allowed  # --skip-rule-apply is CNI's normal mode
    annotate(pod, **{ANN + "excludeOutboundIPRanges": "0.0.0.0/0"})
    assert not validate_review(review(pod), policy_set()).allowed


def test_user_supplied_istio_init_command_is_unverifiable():
    obj = set_labels(base_objects()["Pod"], PRODUCER_LABELS)
    init_container(obj)["command"] = ["sh", "-c", "iptables -F"]
    decision = validate_review(review(obj), policy_set())
    assert not decision.allowed and "istio-init command 'sh -c iptables -F' is not Istio's" in decision.message


# ---- Istio-compatible parsing ---------------------------------------------------------------------
@pytest.mark.parametrize("value,ok", [
    ("172.20.0.0/16", True), ("172.20.5.7/16", True),          # host bits allowed, as netip.ParsePrefix
    ("172.20.0.0/16,", True), (",172.20.1.0/24,,", True),      # empties dropped
    ("172.20.0.0/16,10.0.0.0/8", False), ("172.19.0.0/16", False), ("0.0.0.0/0", False),
    ("172.20.0.0/16, 172.20.1.0/24", False),                    # no trimming: Istio rejects " 172..."
    ("172.20.0.0", False), ("*", False),
])
def test_exclude_ranges_parse_like_istio(value, ok):
    obj = set_labels(base_objects()["Deployment"], PRODUCER_LABELS)
    annotate(obj, **{ANN + "excludeOutboundIPRanges": value})
    decision = validate_review(review(obj), policy_set())
    assert decision.allowed is ok, decision.message
    if not ok:
        assert ANN + "excludeOutboundIPRanges" in decision.message or "traffic annotations" in decision.message


def test_union_of_allowed_cidrs_covers_a_wider_exclusion():
    obj = set_labels(base_objects()["Deployment"], PRODUCER_LABELS)
    annotate(obj, **{ANN + "excludeOutboundIPRanges": "10.0.0.0/8"})
    policies = policy_set(destinations=["10.0.0.0/9:443", "10.128.0.0/9:443"])
    assert validate_review(review(obj), policies).allowed


def test_ip_families_setting_limits_the_include_complement():
    from .corpus import settings_doc
    obj = set_labels(base_objects()["Deployment"], PRODUCER_LABELS)
    annotate(obj, **{ANN + "includeOutboundIPRanges": "0.0.0.0/1,128.0.0.0/1"})
    assert not validate_review(review(obj), policy_set()).allowed  # IPv6 left uncaptured
    v4_only = policy_set(extra_docs=[settings_doc(ipFamilies=["IPv4"])])
    assert validate_review(review(obj), v4_only).allowed


# ---- sidecar.istio.io/inject as Istio's injectRequired reads it ----------------------------------------
@pytest.mark.parametrize("labels,annotations,denied", [
    ({}, {"sidecar.istio.io/inject": value}, True) for value in ("false", "False", "FALSE", "no", "off", "0", "n",
                                                                  "disabled", " true", "yes please")
] + [
    ({}, {"sidecar.istio.io/inject": value}, False) for value in ("", "true", "True", "y", "Y", "yes", "ON")
] + [
    ({"sidecar.istio.io/inject": "Off"}, {}, True),
    ({"sidecar.istio.io/inject": ""}, {"sidecar.istio.io/inject": "false"}, False),     # the label wins, "" = default
    ({"sidecar.istio.io/inject": "yes"}, {"sidecar.istio.io/inject": "no"}, False),
    ({"sidecar.istio.io/inject": "0"}, {"sidecar.istio.io/inject": "true"}, True),
])
def test_inject_values_follow_istio(labels, annotations, denied):
    obj = make("Deployment")
    set_labels(obj, labels)
    annotate(obj, **annotations)
    decision = validate_review(review(obj), policy_set())
    assert decision.allowed is not denied, decision.message
    if denied:
        assert decision.metric_labels["reason"] == "injectDisabled"
        where = "label sidecar.istio.io/inject" if labels else "sidecar.istio.io/inject"
        value = labels.get("sidecar.istio.io/inject", annotations.get("sidecar.istio.io/inject"))
        assert decision.message.startswith(f'{where}: "{value}" removes the sidecar and all capture')


# ---- inject.istio.io/templates as Istio's selectTemplates reads it ----------------------------------
@pytest.mark.parametrize("value,denied", [
    ("sidecar", False), ("gateway, sidecar", False), (" sidecar ", False), ("sidecar,\tcustom", False),
    ("spire,sidecar", False), ("gateway", True), ("gateway, sidecars", True), ("Sidecar", True), ("", True),
])
def test_inject_templates_names_are_trimmed_like_istio(value, denied):
    obj = annotate(make("Deployment"), **{"inject.istio.io/templates": value})
    decision = validate_review(review(obj), policy_set())
    assert decision.allowed is not denied, decision.message
    if denied:
        assert decision.message.startswith(f"inject.istio.io/templates: {value} does not include the sidecar template")


# ---- interceptionMode as Istio reads it (protojson for proxy.istio.io/config) --------------------------
UNREADABLE = "is not one of REDIRECT, TPROXY, NONE or the enum numbers 0 (REDIRECT), 1 (TPROXY), 2 (NONE)"


@pytest.mark.parametrize("config,outcome", [
    ("interceptionMode: NONE", "proxy.istio.io/config interceptionMode: NONE disables capture"),
    ("interceptionMode: 2", "proxy.istio.io/config interceptionMode: 2 (NONE) disables capture"),
    ('{"interceptionMode": 2}', "proxy.istio.io/config interceptionMode: 2 (NONE) disables capture"),
    ("interceptionMode: 0", None),
    ("interceptionMode: REDIRECT", None),
    ("interceptionMode: 1", None),
    ("interceptionMode: 7", f"proxy.istio.io/config interceptionMode 7 {UNREADABLE}, so the pod's capture cannot "
                            "be verified"),
    ("interceptionMode: none", f"proxy.istio.io/config interceptionMode 'none' {UNREADABLE}"),
    ("interceptionMode: true", f"proxy.istio.io/config interceptionMode True {UNREADABLE}"),
    ("interceptionMode: '2'", f"proxy.istio.io/config interceptionMode '2' {UNREADABLE}"),
    ("interceptionMode: [2]", f"proxy.istio.io/config interceptionMode [2] {UNREADABLE}"),
])
def test_proxy_config_interception_mode_names_numbers_and_unknowns(config, outcome):
    obj = annotate(make("Deployment"), **{"proxy.istio.io/config": config})
    decision = validate_review(review(obj), policy_set())
    if outcome is None:
        assert decision.allowed, decision.message
    else:
        assert not decision.allowed and decision.message.startswith(outcome), decision.message


@pytest.mark.parametrize("value,ok", [("NONE", False), ("REDIRECT", True), ("none", False), ("2", False)])
def test_interception_mode_annotation_takes_names_only(value, ok):
    obj = annotate(make("Deployment"), **{"sidecar.istio.io/interceptionMode": value,
                                         "proxy.istio.io/config": "interceptionMode: REDIRECT"})
    decision = validate_review(review(obj), policy_set())
    assert decision.allowed is ok, decision.message
    if value not in ("NONE", "REDIRECT"):
        assert decision.message.startswith(f"sidecar.istio.io/interceptionMode {value!r} is not one of REDIRECT, "
                                           "TPROXY, NONE, so the pod's capture cannot be verified")


# ---- UPDATE, other operations, malformed input -----------------------------------------------------
def test_update_tolerates_preexisting_violations_but_not_new_ones():
    old = make("Deployment", VECTORS[0])
    new = copy.deepcopy(old)
    new["spec"]["replicas"] = 5
    decision = validate_review(review(new, operation="UPDATE", old=old), policy_set())
    assert decision.allowed and decision.metric_labels["reason"] == "preexisting"
    assert decision.warnings and decision.warnings[0].startswith("pre-existing")
    worse = copy.deepcopy(new)
    pod_template(worse)["spec"]["hostNetwork"] = True
    decision = validate_review(review(worse, operation="UPDATE", old=old), policy_set())
    assert not decision.allowed and "hostNetwork" in decision.message and "0.0.0.0/0" not in decision.message


def test_each_container_with_a_violation_is_reported():
    obj = make("Pod")
    obj["spec"]["containers"] += [{"name": "sneaky", "image": "x", "securityContext": {"runAsUser": 1337}},
                                  {"name": "sneaky2", "image": "x", "securityContext": {"runAsUser": 1337}}]
    decision = validate_review(review(obj), policy_set())
    assert not decision.allowed
    assert 'container "sneaky": runAsUser 1337' in decision.message
    assert 'container "sneaky2": runAsUser 1337' in decision.message


def test_the_same_setting_in_annotations_and_init_args_is_still_reported_once():
    obj = make("Pod", VECTORS[[v.id for v in VECTORS].index("exclude-interfaces")])
    decision = validate_review(review(obj), policy_set())
    assert decision.message.count("eth1") == 1, decision.message


def _ephemeral_debugger(obj, **security):
    obj["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox", "securityContext": security}]
    return obj


def test_new_ephemeral_container_with_the_violation_of_a_tolerated_container_is_denied():
    """kubectl debug on a pod whose legacy container already runs as UID 1337 with NET_ADMIN (admitted
    before Enforce, tolerated on update): the debug container with the same settings is a new violation."""
    legacy = {"name": "legacy", "image": "x", "securityContext": {"runAsUser": 1337,
                                                                   "capabilities": {"add": ["NET_ADMIN"]}}}
    old = make("Pod")
    old["spec"]["containers"].append(legacy)
    new = _ephemeral_debugger(copy.deepcopy(old), runAsUser=1337, capabilities={"add": ["NET_ADMIN"]})
    request = {**review(new, operation="UPDATE", old=old), "subResource": "ephemeralcontainers"}
    decision = validate_review(request, policy_set())
    assert (decision.allowed, decision.code) == (False, 403)
    assert decision.message.count('container "debugger"') == 2 and 'container "legacy"' not in decision.message
    # an update that adds nothing keeps being tolerated
    same = copy.deepcopy(old)
    same["metadata"].setdefault("labels", {})["touched"] = "yes"
    decision = validate_review(review(same, operation="UPDATE", old=old), policy_set())
    assert decision.allowed and decision.metric_labels["reason"] == "preexisting"


def test_a_container_name_that_is_not_a_string_is_a_precise_400():
    obj = make("Pod")
    obj["spec"]["containers"].append({"name": ["x"], "image": "x", "securityContext": {"privileged": True}})
    decision = validate_review(review(obj), policy_set())
    assert (decision.allowed, decision.code) == (False, 400)
    index = len(obj["spec"]["containers"]) - 1
    assert decision.message == f"cannot evaluate egress policy: Pod: spec.containers[{index}].name must be a string"


def test_delete_status_and_unsupported_kinds():
    obj = make("Deployment", VECTORS[0])
    assert validate_review({**review(obj), "operation": "DELETE"}, policy_set()).allowed
    assert validate_review({**review(obj), "subResource": "status"}, policy_set()).allowed
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {}}
    decision = validate_review(review(service), policy_set())
    assert decision.allowed and decision.metric_labels["reason"] == "unsupportedKind" and decision.warnings


def test_ephemeral_containers_subresource_is_checked():
    obj = make("Pod", VECTORS[[v.id for v in VECTORS].index("ephemeral-net-admin")])
    request = {**review(obj, operation="UPDATE", old=make("Pod")), "subResource": "ephemeralcontainers"}
    assert not validate_review(request, policy_set()).allowed


def test_dry_run_gives_the_same_decision():
    obj = make("Pod", VECTORS[0])
    assert validate_review(review(obj, dry_run=True), policy_set()) == validate_review(review(obj), policy_set())


@pytest.mark.parametrize("mangle,fragment", [
    (lambda o: o.pop("spec"), "Deployment: spec is missing"),
    (lambda o: o["spec"].update(template="x"), "spec.template is not an object"),
    (lambda o: o["spec"]["template"].update(spec=None), "spec.template.spec is missing"),
    (lambda o: o["spec"]["template"]["metadata"].update(annotations={"a": 1}), "must map names to strings"),
    (lambda o: o["spec"]["template"]["spec"].update(containers={"a": 1}), "must be a list of containers"),
])
def test_malformed_objects_get_a_precise_400(mangle, fragment):
    obj = make("Deployment")
    mangle(obj)
    decision = validate_review(review(obj), policy_set())
    assert (decision.allowed, decision.code) == (False, 400) and fragment in decision.message
    assert decision.metric_labels["reason"] == "badRequest"


@pytest.mark.parametrize("request_", [None, "x", {"operation": "CREATE", "kind": {"kind": "Pod"}, "object": None},
                                      {"operation": "CREATE", "kind": {"kind": "Pod"}, "object": []}])
def test_malformed_requests_never_raise(request_):
    decision = validate_review(request_, policy_set())
    assert (decision.allowed, decision.code) == (False, 400)


def test_bad_proxy_config_is_unverifiable():
    obj = make("Deployment")
    annotate(obj, **{"proxy.istio.io/config": "proxyMetadata: [unclosed"})
    decision = validate_review(review(obj), policy_set())
    assert not decision.allowed and "proxy.istio.io/config is not valid YAML" in decision.message


def test_warnings_stay_short():
    obj = make("Deployment", VECTORS[0])
    for vector in VECTORS[4:12]:
        vector.apply(obj)
    decision = validate_review(review(obj), policy_set(mode="Warn"))
    assert len(decision.warnings) >= 6
    assert all(len(w) <= 120 for w in decision.warnings), decision.warnings


def test_warn_mode_shows_each_finding_whole_not_clipped():
    obj = make("Deployment", VECTORS[0])
    for vector in VECTORS[4:12]:
        vector.apply(obj)
    warned = validate_review(review(obj), policy_set(mode="Warn"))
    denied = validate_review(review(obj), policy_set())
    assert not any(w.endswith("...") for w in warned.warnings), warned.warnings
    # every finding the denial states ("; "-separated, then the policy) is in the warnings word for word,
    # continuation lines joined back; some are longer than one 120-char line
    joined = " ".join(w.strip() for w in warned.warnings)
    stated = denied.message.rsplit(" (policy ", 1)[0].split("; ")
    assert len(stated) == 6 and any(len(text) > 120 for text in stated), stated
    for text in stated:
        assert text in joined, (text, warned.warnings)


def test_every_injected_istio_object_is_evaluated_without_error():
    from .corpus import INJECTED
    import yaml
    policies = parse_policy_documents([policy_doc("mesh", "bpfinit-system")], "test")
    seen = 0
    for path in sorted(INJECTED.glob("*.injected")):
        for doc in yaml.safe_load_all(path.read_text()):
            for obj in (doc.get("items") if doc and doc.get("kind") == "List" else [doc]):
                if obj:
                    decision = validate_review(review(obj, namespace="any"), policies)
                    assert decision.code in (200, 403), (path.name, decision)
                    seen += 1
    assert seen >= 70
