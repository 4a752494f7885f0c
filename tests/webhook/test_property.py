"""Property-based: generated pods and annotations over real HTTPS never get a 500, every patch applies,
and a second pass over a patched pod yields nothing."""
from __future__ import annotations

import copy
import json

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.webhook.conftest import decode_patch
from tests.webhook.istio_pods import INJECTED, pod_create_review, pods_in_file
from webhook.admission import verify_response

BASE_PODS = [pods_in_file(INJECTED / name)[0] for name in
             ("hello.yaml.injected", "hello-old-version.yaml.injected", "traffic-annotations.yaml.injected",
              "hello.yaml.cni.injected", "hello-tproxy.yaml.injected", "pod.yaml.injected")]

ANNOTATION_KEYS = [
    "traffic.sidecar.istio.io/includeOutboundIPRanges", "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "traffic.sidecar.istio.io/includeInboundPorts", "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.sidecar.istio.io/includeOutboundPorts", "traffic.sidecar.istio.io/excludeOutboundPorts",
    "traffic.sidecar.istio.io/excludeInterfaces", "traffic.sidecar.istio.io/kubevirtInterfaces",
    "istio.io/reroute-virtual-interfaces", "status.sidecar.istio.io/port", "sidecar.istio.io/interceptionMode",
    "proxy.istio.io/config", "bpfinit.io/inject", "bpfinit.io/accelerate", "bpfinit.io/dns-capture",
    "bpfinit.io/accelerate-skip-splice-check", "bpfinit.io/accelerate-skip-backpressure-check",
    "bpfinit.io/accelerate-skip-waitall-check", "bpfinit.io/accelerate-pod-to-pod",
    "bpfinit.io/status", "odd~key/with/slash", "~1", "kubernetes.io/config.mirror",
]
port = st.integers(0, 70000).map(str)
cidr = st.one_of(st.ip_addresses(v=4).map(lambda a: f"{a}/{a.max_prefixlen - 8}"),
                 st.ip_addresses(v=6).map(lambda a: f"{a}/64"), st.sampled_from(["*", "10.0.0.0/8", "1.2.3.4"]))
list_text = lambda item: st.lists(item, max_size=4).map(",".join)  # noqa: E731
annotation_value = st.one_of(
    list_text(port), list_text(cidr), st.sampled_from(["true", "false", "REDIRECT", "TPROXY", "NONE", "", "*",
                                                       "interceptionMode: NONE", "{", "eth0,net1"]),
    st.text(max_size=30))
istio_args = st.lists(st.sampled_from([
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "TPROXY", "-i", "*", "-x", "", "-b", "-d",
    "15090,15021", "-o", "80", "-q", "--redirect-dns", "--log_output_level=default:info", "-k", "net1",
    "--bogus", "--capture-all-dns", "-e", "15008"]), max_size=14)


@st.composite
def pods(draw):
    pod = copy.deepcopy(draw(st.sampled_from(BASE_PODS)))
    metadata = pod["metadata"]
    annotations = metadata.setdefault("annotations", {})
    for key, value in draw(st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_value, max_size=4)).items():
        annotations[key] = value
    shape = draw(st.sampled_from(["keep", "no-annotations", "null-annotations", "no-metadata"]))
    if shape == "no-annotations":
        metadata.pop("annotations")
    elif shape == "null-annotations":
        metadata["annotations"] = None
    elif shape == "no-metadata":
        pod.pop("metadata")
    inits = pod["spec"].get("initContainers") or []
    for container in inits:
        if container["name"] == "istio-init" and draw(st.booleans()):
            container["args"] = ["istio-iptables", *draw(istio_args)]
        if draw(st.booleans()):
            container["madeUp"] = {"x": draw(st.integers())}
    if draw(st.booleans()):
        pod["spec"]["volumes"] = None if draw(st.booleans()) else []
    if draw(st.integers(0, 9)) == 0:
        pod["spec"]["hostNetwork"] = True
    return pod


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods(), dry_run=st.booleans())
def test_generated_pods_never_500_and_patches_apply(webhook_server, pod, dry_run):
    review = pod_create_review(pod, dry_run=dry_run)
    response = webhook_server.post("/mutate", review)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert verify_response(review, answer, mutating=True) == []
    patch = decode_patch(answer)
    if not answer["response"]["allowed"]:
        assert patch is None and answer["response"]["status"]["message"]
        return
    if patch is None:
        return
    assert all(op["op"] in ("add", "replace") for op in patch)
    after = jsonpatch.apply_patch(pod, patch)
    again = webhook_server.review(pod_create_review(after))
    assert decode_patch(again) is None


@settings(max_examples=60, deadline=None)
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                                   lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                                   max_leaves=10).map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/mutate", "/validate"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"]))
def test_arbitrary_bodies_never_500(webhook_server, body, path, content_type):
    response = webhook_server.post(path, body, content_type=content_type)
    assert response.status_code in (200, 400, 415), response.text
    assert "Traceback" not in response.text
