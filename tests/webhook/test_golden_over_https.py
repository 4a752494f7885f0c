"""Every pod template in Istio's injected golden files, as a Pod CREATE AdmissionReview over real HTTPS.

For each one: the response passes the apiserver's envelope checks, the patch applies with jsonpatch,
the result is what we promise (agent in istio-init's slot with the same args/env, or unchanged with a
warning saying why), it validates against the Kubernetes Pod schema, and a second pass gives no patch.
"""
from __future__ import annotations

import copy
import json

import jsonpatch
import kubernetes_validate
import pytest

from initagent import flags
from tests.webhook.conftest import AGENT_IMAGE, decode_patch
from tests.webhook.istio_pods import INJECTED, injected_files, pod_create_review, pods_in_file
from webhook.admission import verify_response

KUBERNETES_VERSION = "1.33"
GOLDEN_PODS = [pytest.param(pod, id=f"{path.name}#{i}")
               for path in injected_files() for i, pod in enumerate(pods_in_file(path))]
AGENT_ENV_NAMES = ["POD_UID", "POD_NAME", "POD_NAMESPACE", "BPFINIT_POD_LABELS_FILE"]


def test_every_golden_file_contributes_a_pod():
    # INDEX.tsv (one row per golden file, after its header) is the inventory of the copied data.
    index_rows = (INJECTED / "INDEX.tsv").read_text().strip().splitlines()[1:]
    assert sorted(row.split("\t")[0] for row in index_rows) == [p.name for p in injected_files()]
    assert all(pods_in_file(path) for path in injected_files())


def expected_outcome(istio_init: dict | None, has_validation: bool) -> str:
    if istio_init is None:
        return "istio-cni" if has_validation else "no-istio-init"
    args = istio_init.get("args") or []
    if not args or args[0] != "istio-iptables":
        return "user-override"
    env = {e["name"]: e["value"] for e in istio_init.get("env") or [] if "value" in e}
    if flags.parse(args[1:], env).unsupported:
        return "unsupported-flags"
    return "swapped"


def find(containers, name):
    for index, container in enumerate(containers or []):
        if container.get("name") == name:
            return index, container
    return None, None


def check_swapped(before: dict, after: dict) -> None:
    index, istio_init = find(before["spec"]["initContainers"], "istio-init")
    agent = after["spec"]["initContainers"][index]
    # Same slot, same name; the other init containers and containers are untouched.
    assert agent["name"] == "istio-init"
    assert [c["name"] for c in after["spec"]["initContainers"]] == [c["name"] for c in before["spec"]["initContainers"]]
    for i, container in enumerate(before["spec"]["initContainers"]):
        if i != index:
            assert after["spec"]["initContainers"][i] == container
    assert after["spec"]["containers"] == before["spec"]["containers"]
    # The agent: image, command, istio-init's args without the subcommand word, env carried over.
    assert agent["image"] == AGENT_IMAGE
    assert agent["command"] == ["bpfinit-agent", "setup"]
    assert agent["args"] == istio_init["args"][1:]
    carried = [e for e in istio_init.get("env") or []]
    assert agent["env"][: len(carried)] == carried
    assert [e["name"] for e in agent["env"][len(carried):]] == AGENT_ENV_NAMES
    assert agent["env"][len(carried)]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    # Least privilege: exactly BPF, NET_ADMIN, PERFMON; no NET_RAW, no privileged, no escalation.
    security = agent["securityContext"]
    assert security["capabilities"] == {"add": ["BPF", "NET_ADMIN", "PERFMON"], "drop": ["ALL"]}
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["runAsUser"] == 0
    # Resources exactly as istio-init had them; unrelated fields kept.
    assert agent.get("resources") == istio_init.get("resources")
    for key in set(istio_init) - {"image", "command", "args", "env", "securityContext", "volumeMounts"}:
        assert agent[key] == istio_init[key], key
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/sys/fs/bpf"].get("readOnly") is not True
    for path in ("/sys/fs/cgroup", "/host/lib/modules", "/host/usr/src", "/etc/bpfinit/podinfo"):
        assert mounts[path]["readOnly"] is True
    # The node's headers never hide the image's own /usr/src and /lib/modules.
    assert "/usr/src" not in mounts and "/lib/modules" not in mounts
    volumes = {v["name"]: v for v in after["spec"]["volumes"]}
    assert volumes["bpfinit-bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert volumes["bpfinit-cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert volumes[mounts["/host/lib/modules"]["name"]]["hostPath"]["path"] == "/lib/modules"
    assert volumes[mounts["/host/usr/src"]["name"]]["hostPath"]["path"] == "/usr/src"
    assert all(m["name"] in volumes for m in agent["volumeMounts"])
    # Pod volumes of Istio and the user are all still there, in order, before ours.
    before_volumes = before["spec"].get("volumes") or []
    assert after["spec"]["volumes"][: len(before_volumes)] == before_volumes
    # The swap is recorded; Istio's own status stays true (it lists istio-init, which still exists).
    annotations = after["metadata"]["annotations"]
    status = json.loads(annotations["bpfinit.io/status"])
    assert status["container"] == "istio-init" and status["agentImage"] == AGENT_IMAGE
    assert status["replacedImage"] == istio_init["image"]
    istio_status = json.loads(annotations["sidecar.istio.io/status"])
    names = {c["name"] for c in after["spec"]["initContainers"]} | {c["name"] for c in after["spec"]["containers"]}
    assert set(istio_status["initContainers"] or []) <= names
    # Nothing else in the pod changed.
    rest_before = copy.deepcopy(before)
    rest_after = copy.deepcopy(after)
    for doc in (rest_before, rest_after):
        doc["spec"].pop("initContainers")
        doc["spec"].pop("volumes", None)
        doc["metadata"].get("annotations", {}).pop("bpfinit.io/status", None)
    assert rest_after == rest_before


@pytest.mark.parametrize("pod", GOLDEN_PODS)
def test_golden_pod_over_https(webhook_server, pod):
    before = copy.deepcopy(pod)
    review = pod_create_review(pod)
    answer = webhook_server.review(review)
    assert verify_response(review, answer, mutating=True) == []
    response = answer["response"]
    assert response["allowed"] is True
    assert pod == before, "the request document must not be altered"

    _, istio_init = find(pod["spec"].get("initContainers"), "istio-init")
    has_validation = find(pod["spec"].get("initContainers"), "istio-validation")[0] is not None
    outcome = expected_outcome(istio_init, has_validation)
    patch = decode_patch(answer)
    if outcome == "swapped":
        assert patch and all(op["op"] in ("add", "replace") for op in patch)
        assert "warnings" not in response
        after = jsonpatch.apply_patch(pod, patch)
        check_swapped(before, after)
        kubernetes_validate.validate(after, KUBERNETES_VERSION, strict=True)
        # Second pass (reinvocation) over our own output: nothing to do, nothing to say.
        again = webhook_server.review(pod_create_review(after))
        assert decode_patch(again) is None and "warnings" not in again["response"]
    else:
        assert patch is None
        warning = " ".join(response.get("warnings", []))
        expected_words = {"istio-cni": "istio-cni", "user-override": "overridden",
                          "unsupported-flags": "not supported"}[outcome]
        assert expected_words in warning
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("pod", GOLDEN_PODS[:12])
def test_dry_run_gets_the_same_decision_and_patch(webhook_server, pod):
    live = webhook_server.review(pod_create_review(pod))["response"]
    dry = webhook_server.review(pod_create_review(pod, dry_run=True))["response"]
    for response in (live, dry):
        response.pop("uid")
    assert dry == live


def test_v1beta1_review_is_answered_in_v1beta1(webhook_server):
    pod = pods_in_file(injected_files()[0])[0]
    review = pod_create_review(pod, api_version="admission.k8s.io/v1beta1")
    answer = webhook_server.review(review)
    assert answer["apiVersion"] == "admission.k8s.io/v1beta1"
    assert verify_response(review, answer, mutating=True) == []
    assert answer["response"]["patchType"] == "JSONPatch"
    jsonpatch.apply_patch(pod, decode_patch(answer))


def test_policy_allow_list_reaches_the_agent_flags(tmp_path):
    """The real policy store (--policy FILE) gives the swapped agent its --egress-allow list."""
    from tests.webhook.conftest import start_server

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: bpfinit.io/v1alpha1\nkind: EgressBypassPolicy\n"
        "metadata: {name: allow-kafka, namespace: demo}\n"
        "spec:\n  selector: {matchLabels: {app: hello}}\n  allowedDestinations: [172.20.0.0/16:9092]\n")
    server = start_server(tmp_path, "--policy", str(policy), "--policy-crds", "off", workers=1)
    try:
        pod = pods_in_file(INJECTED / "hello.yaml.injected")[0]
        after = jsonpatch.apply_patch(pod, decode_patch(server.review(pod_create_review(pod, namespace="demo"))))
        _, agent = find(after["spec"]["initContainers"], "istio-init")
        assert agent["args"][-2:] == ["--egress-allow", "172.20.0.0/16:9092"]
        assert json.loads(after["metadata"]["annotations"]["bpfinit.io/status"])["egressGuard"] is True
        other = jsonpatch.apply_patch(pod, decode_patch(server.review(pod_create_review(pod, namespace="elsewhere"))))
        assert "--egress-allow" not in find(other["spec"]["initContainers"], "istio-init")[1]["args"]
    finally:
        server.stop()
