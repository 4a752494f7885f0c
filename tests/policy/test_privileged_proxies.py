"""Opt-in `--mesh-privileged-proxies`: the mesh sets Istio's values.global.proxy.privileged, which renders
`privileged: true` + `allowPrivilegeEscalation: true` on istio-init and istio-proxy. With the setting on,
exactly that shape is exempt like the non-privileged template; anything beyond it is still reported; off,
the shape stays unverifiable. The privileged pods are Istio's goldens with those two fields added."""
from __future__ import annotations

import jsonpatch
import pytest

from webhook.audit import audit
from webhook.mutate import MutationSettings, mutate
from webhook.validate import evaluate, validate_review

from .corpus import AGENT_IMAGE, NAMESPACE, review
from .test_capture_trust import EVERYWHERE, container, golden, policies
from .test_istio_image_trust import ATTACKER, MESH

PRIVILEGED = {"privileged": True, "allowPrivilegeEscalation": True}
# native sidecar (initContainers), regular sidecar (containers), TPROXY (istio-proxy keeps NET_ADMIN)
GOLDENS = [pytest.param("hello.yaml.injected", "initContainers", id="native-sidecar"),
           pytest.param("hello-old-version.yaml.injected", "containers", id="regular-sidecar"),
           pytest.param("hello-tproxy.yaml.injected", "initContainers", id="tproxy")]


def privileged(name: str = "hello.yaml.injected", which=("istio-init", "istio-proxy")) -> dict:
    """A golden as Istio renders it under values.global.proxy.privileged=true."""
    pod = golden(name)
    for container_name in which:
        container(pod, container_name)["securityContext"].update(PRIVILEGED)
    return pod


def findings(pod: dict, on: bool = True, istio_images=(), vectors=()):
    return evaluate(pod, NAMESPACE, policies(vectors), None, (AGENT_IMAGE,), istio_images, on).findings


def reasons(pod: dict, on: bool = True, istio_images=(), vectors=()) -> list[str]:
    return [f.reason for f in findings(pod, on, istio_images, vectors)]


def decide(pod: dict, on: bool = True, istio_images=(), vectors=()):
    return validate_review(review(pod), policies(vectors), agent_images=(AGENT_IMAGE,), istio_images=istio_images,
                           mesh_privileged_proxies=on)


# ---- on: Istio's privileged shape is exempt --------------------------------------------------------------
@pytest.mark.parametrize("name,where", GOLDENS)
@pytest.mark.parametrize("istio_images", [(), MESH], ids=["images-unchecked", "images-accepted"])
def test_on_the_privileged_template_shape_is_admitted(name, where, istio_images):
    pod = privileged(name)
    assert container(pod, "istio-proxy", (where,))["securityContext"]["privileged"] is True
    assert reasons(pod, istio_images=istio_images) == []
    decision = decide(pod, istio_images=istio_images)
    assert decision.allowed and decision.metric_labels["reason"] == "compliant", decision.message


@pytest.mark.parametrize("which", [("istio-init",), ("istio-proxy",)])
def test_on_either_capture_container_alone_is_admitted(which):
    assert reasons(privileged(which=which)) == []


def test_on_the_swapped_pod_is_admitted():
    """The mutator swaps a privileged istio-init for the (never privileged) agent; istio-proxy stays privileged."""
    pod = privileged()
    result = mutate(pod, MutationSettings(agent_image=AGENT_IMAGE), EVERYWHERE)
    assert result.outcome == "swapped", result
    final = jsonpatch.apply_patch(pod, result.patch)
    assert container(final, "istio-init")["securityContext"]["privileged"] is False
    assert container(final, "istio-proxy")["securityContext"]["privileged"] is True
    assert reasons(final) == []


# ---- on: anything beyond the shape is still reported -------------------------------------------------------
@pytest.mark.parametrize("name,where", GOLDENS)
def test_on_privileged_proxy_with_an_extra_capability_is_still_flagged(name, where):
    pod = privileged(name)
    container(pod, "istio-proxy")["securityContext"]["capabilities"]["add"] = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]
    extra = "SYS_ADMIN" if name == "hello-tproxy.yaml.injected" else "NET_ADMIN+SYS_ADMIN"
    grant = ("in TPROXY mode: NET_ADMIN, NET_RAW" if name == "hello-tproxy.yaml.injected"
             else "(NET_ADMIN only in TPROXY mode): no capabilities")
    decision = decide(pod, vectors=["*"])   # netAdmin is allowed by "*": check the finding itself first
    assert decision.allowed
    decision = decide(pod)
    assert not decision.allowed and decision.metric_labels["reason"] == "netAdmin"
    index = next(i for i, c in enumerate(pod["spec"][where]) if c["name"] == "istio-proxy")
    assert decision.message.startswith(
        f'container "istio-proxy": {extra}+privileged is more than Istio\'s template grants istio-proxy {grant}; '
        "privileged: true with allowPrivilegeEscalation: true, nothing more (--mesh-privileged-proxies), and can "
        f"rewrite the pod's network and capture (spec.{where}[{index}].securityContext)")


def test_on_privileged_istio_init_with_an_extra_capability_is_still_flagged():
    pod = privileged()
    container(pod, "istio-init")["securityContext"]["capabilities"]["add"].append("BPF")
    decision = decide(pod)
    assert not decision.allowed and decision.metric_labels["reason"] == "netAdmin"
    assert decision.message.startswith('container "istio-init": BPF+privileged is more than Istio\'s template '
                                       "grants istio-init: NET_ADMIN, NET_RAW; privileged: true with")


def test_on_privileged_istio_init_as_the_proxy_uid_is_not_the_shape():
    pod = privileged()
    container(pod, "istio-init")["securityContext"]["runAsUser"] = 1337
    assert reasons(pod) == ["proxyIdentity", "netAdmin"]
    assert 'container "istio-init": privileged is more than' in decide(pod).message


def test_on_privileged_without_privilege_escalation_is_not_istios_shape():
    pod = golden()
    container(pod, "istio-proxy")["securityContext"]["privileged"] = True   # allowPrivilegeEscalation: false
    assert reasons(pod) == ["netAdmin"]
    assert 'container "istio-proxy": privileged is more than' in decide(pod).message


@pytest.mark.parametrize("name", ["hello", "istio-validation"])
def test_on_other_containers_get_no_privileged_exemption(name):
    pod = golden("hello.yaml.cni.injected")
    target = container(pod, name)
    target["securityContext"] = {**(target.get("securityContext") or {}), **PRIVILEGED}
    assert reasons(pod) == ["netAdmin"]
    assert reasons(pod, on=False) == ["netAdmin"]


# ---- on + accepted Istio images: the image still decides whose container it is ---------------------------
@pytest.mark.parametrize("name,where", GOLDENS)
def test_on_with_accepted_images_a_foreign_privileged_proxy_is_untrusted(name, where):
    pod = privileged(name)
    container(pod, "istio-proxy", (where,))["image"] = ATTACKER
    found = reasons(pod, istio_images=MESH)
    assert found[0] == "untrustedCaptureImage" and "netAdmin" in found
    decision = decide(pod, istio_images=MESH, vectors=["*"])   # "*" does not include untrustedCaptureImage
    assert not decision.allowed and decision.metric_labels["reason"] == "untrustedCaptureImage"
    assert decision.message.startswith(f'container "istio-proxy": image "{ATTACKER}" is not one of the webhook\'s '
                                       f"--accepted-istio-images [{MESH[0]}]")
    # its privileged is not Istio's either: reported with the rest of what it is not granted
    assert any(f.reason == "netAdmin" and "privileged" in f.key[1].split("+") for f in findings(pod, istio_images=MESH))
    # without the list the same image is trusted by name: exempt (why the docs recommend the list)
    assert reasons(pod) == []


# ---- off: unchanged --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,where", GOLDENS)
def test_off_the_privileged_shape_is_unverifiable_as_before(name, where):
    pod = privileged(name)
    assert set(reasons(pod, on=False)) == {"unverifiable"}
    decision = decide(pod, on=False, vectors=["*"])
    assert not decision.allowed and decision.metric_labels["reason"] == "unverifiable"
    assert ("has the shape of Istio's values.global.proxy.privileged rendering, but the pod cannot prove the mesh "
            "sets it") in decision.message
    # the default is off
    default = validate_review(review(pod), policies(["*"]), agent_images=(AGENT_IMAGE,))
    assert (default.allowed, default.message) == (decision.allowed, decision.message)


def test_off_messages_do_not_mention_the_setting():
    pod = golden()
    container(pod, "istio-proxy")["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    assert "--mesh-privileged-proxies" not in decide(pod, on=False).message
    assert "--mesh-privileged-proxies" in decide(pod, on=True).message


# ---- audit -----------------------------------------------------------------------------------------------
def test_audit_takes_the_setting():
    pod = dict(privileged(), kind="Pod")
    pod["metadata"] = dict(pod["metadata"], namespace=NAMESPACE)
    assert [v.reason for v in audit([pod], policies(), (AGENT_IMAGE,)).violations] == ["unverifiable"] * 2
    assert audit([pod], policies(), (AGENT_IMAGE,), (), True).violations == []
    assert audit([pod], policies(), (AGENT_IMAGE,), (), mesh_privileged_proxies=True).violations == []
