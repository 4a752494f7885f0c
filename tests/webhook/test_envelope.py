"""AdmissionReview envelope rules, body limits, content types and malformed documents, over real HTTPS."""
from __future__ import annotations

import copy
import json

import jsonpatch
import pytest

from tests.webhook.conftest import decode_patch
from tests.webhook.istio_pods import INJECTED, pod_create_review, pods_in_file
from webhook.admission import MAX_BODY_BYTES, verify_response


def hello() -> dict:
    return pods_in_file(INJECTED / "hello.yaml.injected")[0]


def assert_clean_error(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] and "Traceback" not in response.text


def test_empty_body_is_400(webhook_server):
    assert_clean_error(webhook_server.post("/mutate", b""), 400)
    assert_clean_error(webhook_server.post("/validate", b""), 400)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/yaml", None])
def test_wrong_content_type_is_415(webhook_server, content_type):
    body = json.dumps(pod_create_review(hello()))
    assert_clean_error(webhook_server.post("/mutate", body, content_type=content_type), 415)


def test_json_with_charset_is_accepted(webhook_server):
    review = pod_create_review(hello())
    response = webhook_server.post("/mutate", review, content_type="application/json; charset=utf-8")
    assert response.status_code == 200
    assert verify_response(review, response.json(), mutating=True) == []


def test_body_over_limit_is_413(webhook_server):
    review = pod_create_review(hello())
    review["request"]["object"]["metadata"]["annotations"]["padding"] = "x" * MAX_BODY_BYTES
    assert_clean_error(webhook_server.post("/mutate", review), 413)


def test_body_over_limit_without_content_length_is_413(webhook_server):
    # Chunked upload: no Content-Length to check up front; the stream limit must still hold.
    chunk = b" " * (1024 * 1024)

    def chunks():
        yield b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u"'
        for _ in range(8):
            yield chunk
        yield b"}}"

    response = webhook_server.session.post(webhook_server.url + "/mutate", data=chunks(),
                                           headers={"Content-Type": "application/json"},
                                           verify=webhook_server.ca, timeout=30)
    assert_clean_error(response, 413)


def test_body_just_under_limit_is_answered(webhook_server):
    review = pod_create_review(hello())
    size = len(json.dumps(review))
    review["request"]["object"]["metadata"]["annotations"]["padding"] = "x" * (MAX_BODY_BYTES - size - 100)
    response = webhook_server.post("/mutate", review)
    assert response.status_code == 200
    assert verify_response(review, response.json(), mutating=True) == []


@pytest.mark.parametrize("body", [
    b"{not json", b"[1,2,3]", b'"a string"', b"null", b"\xff\xfe\x00",
    b'{"apiVersion":"admission.k8s.io/v1","kind":"Pod","request":{"uid":"u"}}',
    b'{"apiVersion":"admission.k8s.io/v2","kind":"AdmissionReview","request":{"uid":"u"}}',
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}',
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":null}',
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"operation":"CREATE"}}',
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","object":[1]}}',
])
@pytest.mark.parametrize("path", ["/mutate", "/validate"])
def test_malformed_documents_are_400(webhook_server, body, path):
    assert_clean_error(webhook_server.post(path, body), 400)


@pytest.mark.parametrize("path", ["/mutate", "/validate"])
def test_deeply_nested_json_is_a_clean_400_without_a_logged_traceback(webhook_server, path):
    depth = 100_000
    body = (b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","object":'
            + b"[" * depth + b"]" * depth + b"}}")
    response = webhook_server.post(path, body)
    assert_clean_error(response, 400)
    assert "nests JSON deeper" in response.json()["error"]
    assert "Traceback" not in webhook_server.log_path.read_text()


def with_request(**changes) -> dict:
    review = pod_create_review(hello())
    review["request"].update(changes)
    return review


@pytest.mark.parametrize("review", [
    pytest.param(with_request(object=None), id="object-null"),
    pytest.param(with_request(operation="DELETE", object=None, oldObject=hello()), id="delete"),
    pytest.param(with_request(operation="UPDATE", oldObject=hello()), id="update"),
    pytest.param(with_request(operation="CONNECT"), id="connect"),
    pytest.param(with_request(subResource="status"), id="subresource"),
    pytest.param(with_request(kind={"group": "", "version": "v1", "kind": "ConfigMap"},
                              resource={"group": "", "version": "v1", "resource": "configmaps"},
                              object={"apiVersion": "v1", "kind": "ConfigMap", "data": {}}), id="configmap"),
    pytest.param(with_request(object={"apiVersion": "v1", "kind": "Pod"}), id="pod-without-anything"),
    pytest.param(with_request(object={"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "x-"},
                                      "spec": {"containers": [{"name": "a", "image": "a"}]}}), id="no-name-no-init"),
    pytest.param(with_request(object={"kind": "Pod", "metadata": {"annotations": None},
                                      "spec": {"initContainers": None}}), id="null-fields"),
])
@pytest.mark.parametrize("path", ["/mutate", "/validate"])
def test_requests_without_a_swap_are_allowed_without_patch(webhook_server, review, path):
    answer = webhook_server.review(review, path)
    assert verify_response(review, answer, mutating=path == "/mutate") == []
    assert decode_patch(answer) is None
    if path == "/mutate":   # /validate's verdict belongs to the policy (tests/webhook_policy)
        assert answer["response"]["allowed"] is True
        assert "warnings" not in answer["response"]


def test_generate_name_pod_without_namespace_is_swapped(webhook_server):
    pod = hello()
    pod["metadata"].pop("name", None)
    pod["metadata"]["generateName"] = "hello-7d9c-"
    review = pod_create_review(pod, namespace="")
    review["request"]["name"] = ""
    answer = webhook_server.review(review)
    assert verify_response(review, answer, mutating=True) == []
    after = jsonpatch.apply_patch(pod, decode_patch(answer))
    assert after["metadata"]["generateName"] == "hello-7d9c-" and "bpfinit.io/status" in after["metadata"]["annotations"]


def test_every_decision_kind_passes_the_apiserver_checks(webhook_server):
    swapped = pod_create_review(hello())
    bad = pod_create_review(hello())
    bad["request"]["object"]["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "80,abc"
    warned = pod_create_review(pods_in_file(INJECTED / "hello-tproxy.yaml.injected")[0])
    answers = {name: webhook_server.review(review) for name, review in
               (("swapped", swapped), ("denied", bad), ("warned", warned))}
    for name, review in (("swapped", swapped), ("denied", bad), ("warned", warned)):
        assert verify_response(review, answers[name], mutating=True) == [], name
    assert answers["swapped"]["response"]["patchType"] == "JSONPatch"
    denied = answers["denied"]["response"]
    assert denied["allowed"] is False and "patch" not in denied and "patchType" not in denied
    assert denied["status"]["code"] == 422
    assert "traffic.sidecar.istio.io/excludeOutboundPorts" in denied["status"]["message"]
    assert "'80,abc'" in denied["status"]["message"]
    assert answers["warned"]["response"]["allowed"] is True and answers["warned"]["response"]["warnings"]


def test_pods_the_mutator_leaves_alone_are_allowed_whatever_their_annotations(webhook_server):
    """A mirror pod or a hostNetwork pod with an annotation we would refuse on a swapped pod: allowed, no
    patch, no 422 (they are never swapped, and mirror pods cannot be changed at all)."""
    bad = {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8, 1.2.3.0/24"}
    mirror, host = hello(), hello()
    mirror["metadata"]["annotations"].update(bad, **{"kubernetes.io/config.mirror": "abc"})
    host["metadata"]["annotations"].update(bad)
    host["spec"]["hostNetwork"] = True
    for pod in (mirror, host):
        review = pod_create_review(pod)
        answer = webhook_server.review(review)
        assert verify_response(review, answer, mutating=True) == []
        assert answer["response"]["allowed"] is True and "patch" not in answer["response"]
        assert "status" not in answer["response"] and "warnings" not in answer["response"]
    swapped = hello()
    swapped["metadata"]["annotations"].update(bad)
    denied = webhook_server.review(pod_create_review(swapped))["response"]
    assert denied["allowed"] is False and denied["status"]["code"] == 422


def test_warnings_over_https_are_short_lines_with_nothing_lost(webhook_server):
    pod = hello()
    args = pod["spec"]["initContainers"][0]["args"]
    args[args.index("-x") + 1] = "10.0.0.0/8," + ",".join(f"bogus-cidr-{i}" for i in range(40))
    answer = webhook_server.review(pod_create_review(pod))
    warnings = answer["response"]["warnings"]
    assert len(warnings) > 1 and all(len(w) <= 120 for w in warnings), warnings
    text = " ".join(w.strip() for w in warnings)
    assert text.startswith("bpfinit: pod keeps iptables istio-init: agent cannot parse its flags: invalid CIDR")
    assert "bogus-cidr-0" in text and not text.endswith("...")


def test_validate_never_returns_a_patch(webhook_server):
    review = pod_create_review(hello())
    answer = webhook_server.review(review, "/validate")
    assert verify_response(review, answer, mutating=False) == []
    assert "patch" not in answer["response"] and "patchType" not in answer["response"]


def test_uid_is_echoed_per_request(webhook_server):
    for _ in range(3):
        review = pod_create_review(hello())
        assert webhook_server.review(review)["response"]["uid"] == review["request"]["uid"]


@pytest.mark.parametrize("method,path,status", [("GET", "/mutate", 405), ("GET", "/nope", 404),
                                                ("PUT", "/validate", 405)])
def test_other_routes_answer_json_errors(webhook_server, method, path, status):
    response = webhook_server.session.request(method, webhook_server.url + path, verify=webhook_server.ca, timeout=10)
    assert_clean_error(response, status)


def test_health_and_readiness(webhook_server):
    assert webhook_server.get("/healthz").json() == {"status": "ok"}
    ready = webhook_server.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_logs_are_json_with_the_request_uid(webhook_server):
    review = pod_create_review(hello())
    webhook_server.review(review)
    matching = [line for line in webhook_server.log_lines() if line.get("uid") == review["request"]["uid"]]
    assert matching and matching[-1]["decision"] == "patched" and matching[-1]["outcome"] == "swapped"
    assert matching[-1]["webhook"] == "mutate" and matching[-1]["duration_ms"] >= 0


# ---- the test oracle itself: our port of VerifyAdmissionResponse must catch what the apiserver rejects ----

def test_verify_response_catches_bad_envelopes():
    review = pod_create_review(hello())
    good = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": review["request"]["uid"], "allowed": True}}
    assert verify_response(review, good, mutating=True) == []
    cases = []
    for change in ({"apiVersion": "admission.k8s.io/v1beta1"}, {"kind": "Other"}):
        cases.append({**good, **change})
    for change in ({"uid": "other"}, {"patch": "W10="}, {"patchType": "JSONPatch"}, {"allowed": "yes"}):
        cases.append({**good, "response": {**good["response"], **change}})
    for bad in cases:
        assert verify_response(review, bad, mutating=True), bad
    with_patch = copy.deepcopy(good)
    with_patch["response"].update(patch="W10=", patchType="JSONPatch")
    assert verify_response(review, with_patch, mutating=True) == []
    assert verify_response(review, with_patch, mutating=False)
