"""Defence in depth behind the webhook configurations' namespaceSelector: pods in kube-system and in the
webhook's own namespace (`serve --namespace`) are never mutated nor policed, whatever the selectors say.
The namespace is `request.namespace` (Istio-injected pods created from templates carry no metadata.namespace)."""
from __future__ import annotations

import pytest
import yaml

from tests.webhook.conftest import decode_patch, start_server
from tests.webhook.istio_pods import INJECTED, pod_create_review, pods_in_file
from tests.webhook.test_metrics import samples, value

OWN_NAMESPACE = "mesh-admission"
NODE_NAMESPACE = "mesh-node"          # the exporter/gc DaemonSet's (`serve --node-namespace`)
# A cluster-wide Enforce policy that allows no bypass at all, for every namespace ("*").
POLICY_DOCS = [
    {"apiVersion": "bpfinit.io/v1alpha1", "kind": "EgressBypassSettings",
     "spec": {"clusterPolicyNamespace": OWN_NAMESPACE}},
    {"apiVersion": "bpfinit.io/v1alpha1", "kind": "EgressBypassPolicy",
     "metadata": {"name": "no-bypass", "namespace": OWN_NAMESPACE},
     "spec": {"mode": "Enforce", "selector": {}, "allowedDestinations": []}},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protected")
    policy_file = tmp / "policy.yaml"
    policy_file.write_text(yaml.safe_dump_all(POLICY_DOCS))
    srv = start_server(tmp, "--namespace", OWN_NAMESPACE, "--node-namespace", NODE_NAMESPACE, "--policy", str(policy_file), "--policy-crds", "off",
                       workers=1)
    yield srv
    srv.stop()


def _bypassing_pod() -> dict:
    pod = pods_in_file(INJECTED / "hello.yaml.injected")[0]
    pod["metadata"].pop("namespace", None)
    pod["metadata"].setdefault("annotations", {})["traffic.sidecar.istio.io/excludeOutboundIPRanges"] = "0.0.0.0/0"
    return pod


@pytest.mark.parametrize("namespace", ["kube-system", OWN_NAMESPACE, NODE_NAMESPACE])
def test_protected_namespaces_are_left_alone(server, namespace):
    mutated = server.review(pod_create_review(_bypassing_pod(), namespace=namespace))["response"]
    assert mutated["allowed"] is True and decode_patch({"response": mutated}) is None
    assert "warnings" not in mutated
    validated = server.review(pod_create_review(_bypassing_pod(), namespace=namespace), path="/validate")["response"]
    assert validated["allowed"] is True and "status" not in validated


def test_the_same_pod_elsewhere_is_swapped_and_denied(server):
    """The control: without the protection this policy and this pod give a swap and a denial."""
    mutated = server.review(pod_create_review(_bypassing_pod(), namespace="shop"))
    patch = decode_patch(mutated)
    assert patch and any(op["path"].endswith("/command") for op in patch)
    validated = server.review(pod_create_review(_bypassing_pod(), namespace="shop"), path="/validate")["response"]
    assert validated["allowed"] is False and validated["status"]["code"] == 403
    assert f"(policy {OWN_NAMESPACE}/no-bypass)" in validated["status"]["message"]


def test_request_namespace_beats_a_forged_object_namespace(server):
    """The apiserver's request.namespace decides; a pod claiming kube-system in its metadata is not protected."""
    pod = _bypassing_pod()
    pod["metadata"]["namespace"] = "kube-system"
    validated = server.review(pod_create_review(pod, namespace="shop"), path="/validate")["response"]
    assert validated["allowed"] is False


@pytest.mark.parametrize("namespace", ["bpfinit-system", "bpfinit-node"])
def test_default_namespaces_are_not_special_when_we_run_elsewhere(server, namespace):
    """Only *our* namespaces are protected: with --namespace mesh-admission --node-namespace mesh-node,
    bpfinit-system and bpfinit-node are normal ones."""
    validated = server.review(pod_create_review(_bypassing_pod(), namespace=namespace),
                              path="/validate")["response"]
    assert validated["allowed"] is False


def test_protected_requests_are_counted_as_such(server):
    before = samples(server)
    server.review(pod_create_review(_bypassing_pod(), namespace="kube-system"))
    server.review(pod_create_review(_bypassing_pod(), namespace="kube-system"), path="/validate")
    after = samples(server)
    for webhook, outcome in (("mutate", "protected-namespace"), ("validate", "protectedNamespace")):
        key = dict(webhook=webhook, outcome=outcome)
        assert value(after, "bpfinit_webhook_outcomes_total", **key) == \
            value(before, "bpfinit_webhook_outcomes_total", **key) + 1
