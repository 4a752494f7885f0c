"""The egress policy over real HTTPS: `bpfinit-webhook serve --policy FILE` (gunicorn, TLS, 2 workers)."""
from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import time

import jsonpatch
import pytest
import yaml

from tests.webhook.conftest import WEBHOOK_BIN, start_server

from .corpus import (AGENT_IMAGE, NAMESPACE, PRODUCER_LABELS, annotate, base_objects, policy_doc, review, set_labels,
                     settings_doc)
from .test_validate import VECTORS, cases, make

WAIT_S = 15
ISTIO_IMAGES = "registry.istio.io/testing/proxyv2:*"
POLICY_DOCS = [
    settings_doc(namespaceModes={"rollout-warn": "Warn", "rollout-audit": "Audit"}),
    policy_doc("allow-kafka-egress", NAMESPACE, mode="Enforce", selector={"matchLabels": dict(PRODUCER_LABELS)},
               allowedDestinations=["172.20.0.0/16:9092"]),
    policy_doc("mesh-default", "bpfinit-system"),  # cluster-wide: no bypass at all, default mode
    policy_doc("legacy-exempt", "bpfinit-system", exemption=True, namespaces=["legacy"]),
]


def envelope(request: dict) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy-https")
    policy_file = tmp / "policy.yaml"
    policy_file.write_text(yaml.safe_dump_all(POLICY_DOCS))
    # the corpus's swapped pods carry the default agent image; this server's --agent-image is the test one.
    # Istio's images are checked (opt-in) against the corpus's repository: every other test here must pass
    # as without the list, since Istio's own containers carry it
    srv = start_server(tmp, "--policy", str(policy_file), "--policy-crds", "off",
                       "--accepted-agent-images", AGENT_IMAGE, "--accepted-istio-images", ISTIO_IMAGES)
    srv.policy_file = policy_file
    yield srv
    srv.stop()


def validate(server, obj, namespace=NAMESPACE, **kw) -> dict:
    answer = server.review(envelope(review(obj, namespace=namespace, **kw)), path="/validate")
    assert "patch" not in answer["response"] and "patchType" not in answer["response"]
    return answer["response"]


@pytest.mark.parametrize("vector,kind", cases(VECTORS, ["Pod", "Deployment", "CronJob"]))
def test_every_vector_is_denied_over_https(server, vector, kind):
    response = validate(server, make(kind, vector))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403 and response["status"]["reason"] == "Forbidden"
    assert vector.fragment in response["status"]["message"]
    assert response["status"]["message"].endswith(f"(policy {NAMESPACE}/allow-kafka-egress)")


def test_the_seed_example_over_https(server):
    obj = make("Deployment")
    annotate(obj, **{"traffic.sidecar.istio.io/excludeOutboundIPRanges": "0.0.0.0/0"})
    response = validate(server, obj)
    assert response["status"]["message"] == (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges: 0.0.0.0/0 is not inside [172.20.0.0/16:9092] "
        "(policy high-performance-app/allow-kafka-egress)")
    annotate(obj, **{"traffic.sidecar.istio.io/excludeOutboundIPRanges": "172.20.0.0/16"})
    assert validate(server, obj)["allowed"] is True


@pytest.mark.parametrize("namespace,mode,check", [
    ("rollout-warn", "Warn", lambda r: r["allowed"] and r["warnings"][0].startswith(
        "egress policy bpfinit-system/mesh-default (Warn): 1 violation") and "auditAnnotations" in r),
    ("rollout-audit", "Audit", lambda r: r["allowed"] and "warnings" not in r
        and "0.0.0.0/0" in r["auditAnnotations"]["egress-policy-violation"]),
    ("team-x", "Enforce", lambda r: not r["allowed"] and "(policy bpfinit-system/mesh-default)" in r["status"]["message"]),
    ("legacy", "Exempt", lambda r: r["allowed"] and r["auditAnnotations"] == {
        "egress-policy-exemption": "bpfinit-system/legacy-exempt"}),
])
def test_namespace_modes_cluster_policy_and_exemption_over_https(server, namespace, mode, check):
    obj = make("Deployment", VECTORS[0])
    response = validate(server, obj, namespace=namespace)
    assert check(response), response


def test_mutate_then_validate_the_final_pod(server):
    """The real pipeline: /mutate swaps istio-init for the agent with the policy's allow-list; the pod the
    apiserver would store is then validated."""
    pod = set_labels(base_objects()["Pod"], PRODUCER_LABELS)
    annotate(pod, **{"traffic.sidecar.istio.io/excludeOutboundIPRanges": "172.20.0.0/16"})
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    init["args"][init["args"].index("-x") + 1] = "172.20.0.0/16"
    answer = server.review(envelope(review(pod)), path="/mutate")
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    final = jsonpatch.apply_patch(pod, patch)
    agent = next(c for c in final["spec"]["initContainers"] if c["name"] == "istio-init")
    assert agent["command"] == ["bpfinit-agent", "setup"]
    assert agent["args"][agent["args"].index("--egress-allow") + 1] == "172.20.0.0/16:9092"
    assert validate(server, final)["allowed"] is True
    # the same pod without bpfinit's swap keeps iptables: the port restriction would not be enforced
    response = validate(server, pod)
    assert not response["allowed"] and "istio-init (iptables): present" in response["status"]["message"]


def test_kubectl_debug_ephemeral_container_is_denied_over_https(server):
    """`kubectl debug` is an UPDATE of pods/ephemeralcontainers (the configuration routes it to /validate)."""
    old = make("Pod")
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox", "securityContext": {
        "runAsUser": 1337, "capabilities": {"add": ["NET_ADMIN"]}}}]
    request = review(new, operation="UPDATE", old=old)
    request.update(subResource="ephemeralcontainers", requestSubResource="ephemeralcontainers")
    response = server.review(envelope(request), path="/validate")["response"]
    assert response["allowed"] is False and response["status"]["code"] == 403
    assert response["status"]["message"] == (
        'container "debugger": runAsUser 1337 is the proxy UID, so its traffic bypasses capture '
        "(spec.ephemeralContainers[0].securityContext.runAsUser) (vector proxyIdentity is not in allowedVectors []); "
        'container "debugger": NET_ADMIN can rewrite the pod\'s network and capture '
        "(spec.ephemeralContainers[0].securityContext) (vector netAdmin is not in allowedVectors []) "
        f"(policy {NAMESPACE}/allow-kafka-egress)")


def test_policy_file_reload_and_invalid_file_kept_out(server):
    obj = make("Deployment")
    annotate(obj, **{"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.1.0.0/16"})
    assert validate(server, obj)["allowed"] is False
    original = server.policy_file.read_text()
    docs = [dict(d) for d in POLICY_DOCS]
    docs[1] = policy_doc("allow-kafka-egress", NAMESPACE, selector={"matchLabels": dict(PRODUCER_LABELS)},
                         allowedDestinations=["172.20.0.0/16:9092", "10.1.0.0/16"])
    try:
        _replace(server.policy_file, yaml.safe_dump_all(docs))
        # every worker must pick it up: ask until several answers in a row agree (bounded)
        assert _eventually(lambda: all(validate(server, obj)["allowed"] for _ in range(6)))
        _replace(server.policy_file, original.replace("172.20.0.0/16:9092", "172.20.0.1/16:9092"))  # invalid
        time.sleep(1.5)  # > poll interval: the bad file has been seen and refused
        assert all(validate(server, obj)["allowed"] for _ in range(6))  # last good policy still in force
        log = server.log_path.read_text()
        assert "has host bits set (did you mean 172.20.0.0/16?)" in log
    finally:
        _replace(server.policy_file, original)
    assert _eventually(lambda: not any(validate(server, obj)["allowed"] for _ in range(6)))


def test_decisions_metric_by_policy_mode_reason(server):
    validate(server, make("Deployment", VECTORS[0]))
    text = server.get("/metrics").text
    assert ('bpfinit_webhook_policy_decisions_total{mode="Enforce",policy="high-performance-app/allow-kafka-egress",'
            'reason="excludedCidr"}') in text


def test_serve_refuses_an_invalid_policy_file(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text(yaml.safe_dump(policy_doc("p", "ns", allowedVectors=["everything"])))
    result = subprocess.run([str(WEBHOOK_BIN), "serve", "--policy", str(bad), "--cert-dir", str(tmp_path / "c"),
                             "--port", "1"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert "spec.allowedVectors[0]: unknown vector 'everything'" in result.stderr
    assert "Traceback" not in result.stderr


def _replace(path, text):
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _eventually(predicate, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_forged_agent_istio_init_is_refused_by_both_webhooks_over_https(server):
    """Audit case (a): an istio-init with someone else's image, the agent's command and more privileges is
    neither taken as already swapped by /mutate nor admitted by /validate."""
    from tests.webhook.conftest import AGENT_IMAGE as SERVER_AGENT_IMAGE
    from webhook.mutate import AGENT_COMMAND

    attacker = "docker.io/attacker/noop:1"
    pod = set_labels(base_objects()["Pod"], PRODUCER_LABELS)
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    init.update(image=attacker, command=list(AGENT_COMMAND),
                args=init["args"][1:] + ["--egress-allow", "172.20.0.0/16:9092"])
    init["securityContext"] = {"privileged": True, "capabilities": {"add": ["NET_ADMIN", "SYS_ADMIN"]}}

    mutated = server.review(envelope(review(pod)))["response"]
    assert mutated["allowed"] is False and "patch" not in mutated
    assert mutated["status"]["code"] == 422
    assert mutated["status"]["message"].startswith(
        f'bpfinit: init container "istio-init" runs bpfinit-agent with image "{attacker}", which is not an '
        f"accepted bpfinit agent image [{SERVER_AGENT_IMAGE}, {AGENT_IMAGE}]")

    validated = validate(server, pod)
    assert validated["allowed"] is False and validated["status"]["code"] == 403
    message = validated["status"]["message"]
    assert message.startswith(f'init container "istio-init": image "{attacker}" runs bpfinit-agent but is not an '
                              f"accepted bpfinit agent image [{SERVER_AGENT_IMAGE}, {AGENT_IMAGE}]")
    assert "NET_ADMIN+SYS_ADMIN+privileged" in message
    assert 'untrustedCaptureImage' in validated["auditAnnotations"]["egress-policy-violation"]


def test_unaccepted_istio_images_are_refused_by_both_webhooks_over_https(server):
    """Opt-in --accepted-istio-images: an istio-init from another image is not swapped (/mutate 422, its args
    would become the agent's) and loses Istio's NET_ADMIN grant (/validate); an istio-proxy from another image
    may not run as the proxy UID."""
    attacker = "docker.io/attacker/noop:1"
    pod = set_labels(base_objects()["Pod"], PRODUCER_LABELS)
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    init["image"] = attacker

    mutated = server.review(envelope(review(pod)))["response"]
    assert mutated["allowed"] is False and "patch" not in mutated and mutated["status"]["code"] == 422
    assert mutated["status"]["message"] == (
        f'bpfinit: init container "istio-init" has image "{attacker}", which is not an accepted Istio proxy image '
        f"[{ISTIO_IMAGES}]: bpfinit swaps only Istio's own istio-init, whose args it carries into the agent "
        "(accepted images: --accepted-istio-images)")
    validated = validate(server, pod)
    assert validated["allowed"] is False and validated["status"]["code"] == 403
    assert validated["status"]["message"].startswith(
        f'container "istio-init": image "{attacker}" is not one of the webhook\'s --accepted-istio-images '
        f"[{ISTIO_IMAGES}]: only Istio's own capture containers get their exemptions")
    assert 'container "istio-init": NET_ADMIN can rewrite' in validated["status"]["message"]

    pod = set_labels(base_objects()["Pod"], PRODUCER_LABELS)
    proxy = next(c for key in ("initContainers", "containers") for c in pod["spec"].get(key) or []
                 if c["name"] == "istio-proxy")
    proxy["image"] = "registry.istio.io/testing/proxyv2-evil:latest"     # shares the repository's prefix only
    validated = validate(server, pod)
    assert validated["allowed"] is False
    assert 'container "istio-proxy": image "registry.istio.io/testing/proxyv2-evil:latest" is not one of' \
        in validated["status"]["message"]
    assert 'container "istio-proxy": runAsUser 1337 is the proxy UID' in validated["status"]["message"]
    assert "untrustedCaptureImage" in validated["auditAnnotations"]["egress-policy-violation"]
