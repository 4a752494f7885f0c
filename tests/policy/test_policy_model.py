"""Policy parsing (file and CRD share it), precise load errors, resolution: most specific wins, modes."""
from __future__ import annotations

import pytest
import yaml

from webhook.policy import (VECTORS, PolicyError, parse_destination, parse_policy_documents, parse_policy_object,
                            parse_policy_text, Settings, load_policy_file)

from .corpus import policy_doc, settings_doc

REPO_SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[2] / "manifests" / "examples" / "sample-policy.yaml"
CRD = REPO_SAMPLE.parents[1] / "base" / "egressbypasspolicy-crd.yaml"


def parse(*docs):
    return parse_policy_documents(list(docs), "policy.yaml")


# ---- destinations --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("172.20.0.0/16:9092", "172.20.0.0/16:9092"), ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.0.0.0/8:8000-8999", "10.0.0.0/8:8000-8999"), ("[fd00::/8]:443", "[fd00::/8]:443"),
    ("fd00::/8", "fd00::/8"), ("10.1.2.3", "10.1.2.3/32"), ("10.1.2.3:53", "10.1.2.3/32:53"),
])
def test_destinations_use_the_agent_syntax(text, expected):
    assert str(parse_destination(text)) == expected


@pytest.mark.parametrize("text,fragment", [
    ("172.20.0.1/16:9092", "has host bits set (did you mean 172.20.0.0/16?)"),
    ("[fd00::1/8]:443", "has host bits set"),
    ("10.0.0.0/33", "prefix length too long"), ("10.0.0.0/8:70000", "out of range"),
    ("10.0.0.0/8:9-1", "invalid port range"), ("10.0.0.0/8:0", "port 0"), ("10.0.0.0/8,1.0.0.0/8", "one CIDR"),
    ("", "one CIDR"), ("example.com:443", "invalid address"),
])
def test_bad_destinations_are_explained(text, fragment):
    with pytest.raises(PolicyError, match=None) as err:
        parse_destination(text)
    assert fragment in str(err.value)


# ---- load errors name the source, document, object and field --------------------------------------
@pytest.mark.parametrize("doc,fragment", [
    (policy_doc("p", "ns", allowedDestinations=["0.0.0.0/0:99999"]),
     "policy.yaml, document 0, EgressBypassPolicy ns/p: spec.allowedDestinations[0]: '0.0.0.0/0:99999'"),
    (policy_doc("p", "ns", allowedDestination=["10.0.0.0/8"]), "spec.allowedDestination: unknown field"),
    (policy_doc("p", "ns", mode="Deny"), "spec.mode: 'Deny' is not one of Enforce, Warn, Audit"),
    (policy_doc("p", "ns", allowedVectors=["hostnetwork"]), "spec.allowedVectors[0]: unknown vector 'hostnetwork'"),
    (policy_doc("p", "ns", namespaces=["a"]), "spec.namespaces: only cluster-wide policies (namespace bpfinit-system)"),
    (policy_doc("p", "ns", exemption=True, namespaces=["*"]), "exemptions can only be granted from namespace bpfinit-system"),
    (policy_doc("p", "bpfinit-system", exemption=True), "spec.namespaces: required for an exemption"),
    (policy_doc("p", "bpfinit-system", exemption=True, namespaces=["a"], allowedVectors=["*"]),
     "spec.allowedVectors: unknown field"),
    (policy_doc("p", "ns", selector={"matchExpressions": [{"key": "a", "operator": "Is"}]}),
     "spec.selector.matchExpressions[0].operator: 'Is' is not one of"),
    (policy_doc("p", "ns", selector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
     "spec.selector.matchExpressions[0].values: must not be empty for operator In"),
    (policy_doc("p", "ns", selector={"matchLabels": {"a": 1}}), "spec.selector.matchLabels: must map label names"),
    ({"apiVersion": "bpfinit.io/v1", "kind": "EgressBypassPolicy"}, "apiVersion: 'bpfinit.io/v1' is not bpfinit.io/v1alpha1"),
    ({"apiVersion": "bpfinit.io/v1alpha1", "kind": "EgressBypassPolicy", "metadata": {"name": "p"}, "spec": {}},
     "metadata.namespace: required (cluster-wide policies live in bpfinit-system)"),
    ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, "kind: 'ConfigMap' is not EgressBypassPolicy"),
    (settings_doc(defaultMode="enforce"), "spec.defaultMode: 'enforce' is not one of"),
    (settings_doc(namespaceModes={"legacy": "Off"}), "spec.namespaceModes.legacy: 'Off'"),
    (settings_doc(ipFamilies=["IPv5"]), "spec.ipFamilies[0]: 'IPv5'"),
])
def test_invalid_policies_are_rejected_precisely(doc, fragment):
    with pytest.raises(PolicyError) as err:
        parse(doc)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_duplicate_and_yaml_errors():
    with pytest.raises(PolicyError, match="duplicate policy ns/p"):
        parse(policy_doc("p", "ns"), policy_doc("p", "ns"))
    with pytest.raises(PolicyError, match=r"f.yaml: invalid YAML at line 2, column"):
        parse_policy_text("a: b\n  c: [\n", "f.yaml")
    with pytest.raises(PolicyError, match="only one EgressBypassSettings"):
        parse(settings_doc(), settings_doc())


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file: No such file"):
        load_policy_file(str(tmp_path / "nope.yaml"))


def test_sample_policy_is_the_seed_example():
    policies = load_policy_file(str(REPO_SAMPLE))
    (policy,) = policies.policies
    assert policy.ref == "high-performance-app/allow-kafka-egress"
    assert policies.allow_list_for("high-performance-app", {"app": "producer"}) == ["172.20.0.0/16:9092"]
    assert policies.allow_list_for("high-performance-app", {"app": "consumer"}) is None


def test_crd_schema_matches_the_model():
    (crd,) = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    assert crd["spec"]["names"]["kind"] == "EgressBypassPolicy" and crd["spec"]["group"] == "bpfinit.io"
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(spec["properties"]["allowedVectors"]["items"]["enum"]) == {"*", *VECTORS}
    assert spec["properties"]["mode"]["enum"] == ["Enforce", "Warn", "Audit"]
    # the CRD and the file parse to the same model: the sample is a valid CRD object too
    (sample,) = [d for d in yaml.safe_load_all(REPO_SAMPLE.read_text()) if d]
    assert set(sample["spec"]) <= set(spec["properties"])
    assert parse_policy_object(sample, Settings(), "crd").allow_list() == ["172.20.0.0/16:9092"]


# ---- resolution ------------------------------------------------------------------------------------
def test_most_specific_wins():
    policies = parse(
        policy_doc("mesh-default", "bpfinit-system", allowedDestinations=["10.0.0.0/8"]),
        policy_doc("named", "bpfinit-system", namespaces=["team-a"], allowedDestinations=["10.1.0.0/16"]),
        policy_doc("team", "team-a", allowedDestinations=["10.2.0.0/16"]),
        policy_doc("team-web", "team-a", selector={"matchLabels": {"app": "web"}}, allowedDestinations=["10.3.0.0/16"]),
        policy_doc("team-web-v2", "team-a", selector={"matchLabels": {"app": "web"},
                   "matchExpressions": [{"key": "version", "operator": "In", "values": ["v2"]}]},
                   allowedDestinations=["10.4.0.0/16"]),
    )

    def chosen(ns, labels):
        return policies.resolve(ns, labels).ref
    assert chosen("other", {}) == "bpfinit-system/mesh-default"
    assert chosen("team-a", {"app": "db"}) == "team-a/team"
    assert chosen("team-a", {"app": "web"}) == "team-a/team-web"
    assert chosen("team-a", {"app": "web", "version": "v2"}) == "team-a/team-web-v2"
    assert chosen("team-a", {"app": "web", "version": "v1"}) == "team-a/team-web"
    without_namespaced = parse(policy_doc("mesh-default", "bpfinit-system"),
                               policy_doc("named", "bpfinit-system", namespaces=["team-a"]))
    assert without_namespaced.resolve("team-a", {}).ref == "bpfinit-system/named"


def test_ties_break_by_name_not_by_load_order():
    a = policy_doc("a", "ns", selector={"matchLabels": {"x": "1"}})
    b = policy_doc("b", "ns", selector={"matchLabels": {"y": "1"}})
    assert parse(a, b).resolve("ns", {"x": "1", "y": "1"}).ref == "ns/a"
    assert parse(b, a).resolve("ns", {"x": "1", "y": "1"}).ref == "ns/a"


@pytest.mark.parametrize("operator,values,labels,match", [
    ("In", ["a", "b"], {"k": "a"}, True), ("In", ["a"], {"k": "c"}, False), ("In", ["a"], {}, False),
    ("NotIn", ["a"], {"k": "b"}, True), ("NotIn", ["a"], {}, True), ("NotIn", ["a"], {"k": "a"}, False),
    ("Exists", [], {"k": ""}, True), ("Exists", [], {}, False),
    ("DoesNotExist", [], {}, True), ("DoesNotExist", [], {"k": "x"}, False),
])
def test_selector_expressions(operator, values, labels, match):
    expr = {"key": "k", "operator": operator, **({"values": values} if values else {})}
    policies = parse(policy_doc("p", "ns", selector={"matchExpressions": [expr]}))
    assert (policies.resolve("ns", labels).policy is not None) is match


@pytest.mark.parametrize("policy_ns,policy_mode,ns_modes,expected", [
    ("ns", None, {}, "Enforce"),                 # default
    ("ns", "Warn", {}, "Warn"),                  # namespaced policy's own mode
    ("ns", None, {"ns": "Audit"}, "Audit"),      # namespace mode
    ("ns", "Enforce", {"ns": "Audit"}, "Enforce"),  # namespaced policy beats namespace mode
    ("bpfinit-system", "Warn", {}, "Warn"),      # cluster-wide policy's own mode
    ("bpfinit-system", "Enforce", {"ns": "Audit"}, "Audit"),  # namespace mode beats cluster-wide policy
])
def test_mode_precedence(policy_ns, policy_mode, ns_modes, expected):
    spec = {"mode": policy_mode} if policy_mode else {}
    policies = parse(settings_doc(namespaceModes=ns_modes), policy_doc("p", policy_ns, **spec))
    assert policies.resolve("ns", {}).mode == expected


def test_default_mode_and_no_policy():
    policies = parse(settings_doc(defaultMode="Audit"), policy_doc("p", "ns"))
    assert policies.resolve("ns", {}).mode == "Audit"
    resolution = policies.resolve("other", {})
    assert resolution.policy is None and resolution.ref == "none"


def test_exemptions_beat_every_policy_and_only_come_from_the_exemption_namespace():
    policies = parse(
        settings_doc(exemptionNamespace="security"),
        policy_doc("p", "ns", selector={"matchLabels": {"app": "x"}}),
        policy_doc("legacy", "security", exemption=True, namespaces=["ns"], selector={"matchLabels": {"app": "x"}}),
    )
    resolution = policies.resolve("ns", {"app": "x"})
    assert resolution.exemption.ref == "security/legacy" and resolution.policy is None and resolution.mode == "Exempt"
    assert policies.resolve("other", {"app": "x"}).exemption is None
    with pytest.raises(PolicyError, match="exemptions can only be granted from namespace security"):
        parse(settings_doc(exemptionNamespace="security"),
              policy_doc("legacy", "bpfinit-system", exemption=True, namespaces=["*"]))


@pytest.mark.parametrize("mode,expected", [("Enforce", ["10.0.0.0/8:443", "[fd00::/8]:443"]), ("Warn", None),
                                           ("Audit", None)])
def test_allow_list_only_when_enforced(mode, expected):
    policies = parse(policy_doc("p", "ns", mode=mode, allowedDestinations=["10.0.0.0/8:443", "[fd00::/8]:443"]))
    assert policies.allow_list_for("ns", {}) == expected


def test_empty_allow_list_is_a_guard_that_allows_nothing():
    assert parse(policy_doc("p", "ns")).allow_list_for("ns", {}) == []


def test_wildcard_vectors():
    (policy,) = parse(policy_doc("p", "ns", allowedVectors=["*"])).policies
    assert policy.allowed_vectors == frozenset(VECTORS) - {"untrustedCaptureImage"}


def test_untrusted_capture_image_is_allowed_only_by_name():
    (policy,) = parse(policy_doc("p", "ns", allowedVectors=["*", "untrustedCaptureImage"])).policies
    assert policy.allowed_vectors == frozenset(VECTORS)


def test_crd_manifest_is_a_valid_kubernetes_object_and_its_schema_accepts_the_sample():
    import jsonschema
    import kubernetes_validate

    (crd,) = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    kubernetes_validate.validate(crd, "1.30", strict=True)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (sample,) = [d for d in yaml.safe_load_all(REPO_SAMPLE.read_text()) if d]
    jsonschema.validate(sample, schema)
    typo = {**sample, "spec": {**sample["spec"], "allowedDestination": ["0.0.0.0/0"]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    bad_vector = {**sample, "spec": {**sample["spec"], "allowedVectors": ["everything"]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_vector, schema)
