"""The capture containers are exempt only for what Istio's template / bpfinit's mutation grant them, and a
container running bpfinit-agent is ours only with an accepted image (audit m3/h: cases a, b, c)."""
from __future__ import annotations

import jsonpatch
import pytest

from tests.webhook.istio_pods import INJECTED, injected_files, pods_in_file
from webhook.mutate import AGENT_COMMAND, MutationSettings, mutate
from webhook.policy import parse_policy_documents
from webhook.validate import evaluate, validate_review

from .corpus import AGENT_IMAGE, NAMESPACE, policy_doc, review

ATTACKER = "docker.io/attacker/noop:1"
EVERYWHERE = ["0.0.0.0/0", "::/0"]


def policies(vectors=(), destinations=EVERYWHERE, mode="Enforce"):
    return parse_policy_documents([policy_doc("mesh", "bpfinit-system", namespaces=["*"], mode=mode,
                                              allowedDestinations=list(destinations),
                                              allowedVectors=list(vectors))], "test")


def golden(name: str = "hello.yaml.injected") -> dict:
    return pods_in_file(INJECTED / name)[0]


def swapped(name: str = "hello.yaml.injected", image: str = AGENT_IMAGE) -> dict:
    """A golden pod as bpfinit's real mutation leaves it (policy allows everything, so any guard fits)."""
    pod = golden(name)
    result = mutate(pod, MutationSettings(agent_image=image), EVERYWHERE)
    assert result.outcome == "swapped", result
    return jsonpatch.apply_patch(pod, result.patch)


def container(pod: dict, name: str, lists=("initContainers", "containers")) -> dict:
    return next(c for key in lists for c in pod["spec"].get(key) or [] if c["name"] == name)


def decide(pod: dict, vectors=(), agent_images=(AGENT_IMAGE,)):
    return validate_review(review(pod), policies(vectors), agent_images=agent_images)


def reasons(pod: dict, vectors=(), agent_images=(AGENT_IMAGE,)) -> list[str]:
    return [f.reason for f in evaluate(pod, NAMESPACE, policies(vectors), None, agent_images).findings]


# ---- the goldens stay admitted ------------------------------------------------------------------------
GOLDEN_PODS = [pytest.param(path.name, i, id=f"{path.name}#{i}")
               for path in injected_files() for i, _pod in enumerate(pods_in_file(path))]


@pytest.mark.parametrize("name,index", GOLDEN_PODS)
def test_golden_capture_containers_need_no_vector(name, index):
    """Every Istio golden (TPROXY's NET_ADMIN istio-proxy, CNI's istio-validation as UID 1337, OpenShift and
    runAs overrides), as injected and after bpfinit's mutation, raises no netAdmin / proxyIdentity /
    untrustedCaptureImage; only proxy-override's custom args are (rightly) unverifiable."""
    pod = pods_in_file(INJECTED / name)[index]
    result = mutate(pod, MutationSettings(agent_image=AGENT_IMAGE), EVERYWHERE)
    final = jsonpatch.apply_patch(pod, result.patch) if result.patch else pod
    for obj in (pod, final):
        found = [r for r in reasons(obj) if r in ("netAdmin", "proxyIdentity", "untrustedCaptureImage", "unverifiable")]
        expected = ["unverifiable"] if name == "proxy-override.yaml.injected" else []
        assert found == expected, evaluate(obj, NAMESPACE, policies(), None, (AGENT_IMAGE,)).findings


def test_swapped_golden_is_admitted_with_the_webhooks_images():
    assert decide(swapped()).allowed
    decision = decide(swapped(), agent_images=("registry.test/other:9",))
    assert not decision.allowed and decision.metric_labels["reason"] == "untrustedCaptureImage"


# ---- (a) a hand-written "already swapped" istio-init ----------------------------------------------------
def forged(image: str = ATTACKER) -> dict:
    pod = golden()
    init = container(pod, "istio-init")
    init.update(image=image, command=list(AGENT_COMMAND), args=init["args"][1:] + ["--egress-allow", "0.0.0.0/0"])
    init["securityContext"] = {"privileged": True, "capabilities": {"add": ["NET_ADMIN", "SYS_ADMIN"]}}
    return pod


def test_a_forged_agent_image_is_denied_and_says_why():
    decision = decide(forged())
    assert not decision.allowed and decision.code == 403
    assert decision.metric_labels["reason"] == "untrustedCaptureImage"
    assert decision.message.startswith(
        f'init container "istio-init": image "{ATTACKER}" runs bpfinit-agent but is not an accepted bpfinit agent '
        f"image [{AGENT_IMAGE}]: only the bpfinit webhook puts the agent in place, so this container is not "
        "ours and gets none of the agent's exemptions (spec.initContainers[0].image) "
        "(vector untrustedCaptureImage is not in allowedVectors [])")
    # not ours, so none of the agent's capabilities are exempt either
    assert 'container "istio-init": NET_ADMIN+SYS_ADMIN+privileged can rewrite' in decision.message


def test_a_forged_agent_is_not_allowed_by_the_wildcard():
    assert reasons(forged(), vectors=["*"]) == ["untrustedCaptureImage"]
    assert not decide(forged(), vectors=["*"]).allowed
    assert reasons(forged(), vectors=["untrustedCaptureImage", "netAdmin"]) == []  # only when named


def test_any_init_container_running_the_agent_with_another_image_is_untrusted():
    pod = swapped()
    pod["spec"]["initContainers"].append({"name": "helper", "image": ATTACKER,
                                          "command": ["/usr/bin/bpfinit-agent", "setup"]})
    assert reasons(pod) == ["untrustedCaptureImage"]


def test_agent_with_an_accepted_image_but_more_privileges_is_net_admin():
    pod = swapped()
    security = container(pod, "istio-init")["securityContext"]
    security["privileged"] = True
    security["capabilities"]["add"].append("SYS_ADMIN")
    decision = decide(pod)
    assert decision.metric_labels["reason"] == "netAdmin"
    assert decision.message.startswith(
        'container "istio-init": SYS_ADMIN+privileged is more than bpfinit\'s mutation grants the agent: BPF, '
        "NET_ADMIN, PERFMON, and can rewrite the pod's network and capture (spec.initContainers[0].securityContext)")


def test_agent_runs_as_root_not_as_the_proxy():
    pod = swapped()
    container(pod, "istio-init")["securityContext"]["runAsUser"] = 1337
    assert reasons(pod) == ["proxyIdentity"]


def test_rolling_upgrade_accepts_both_images():
    old = swapped(image="registry.test/bpfinit/agent:old")
    # not ours: untrusted, and the agent's BPF+NET_ADMIN are no longer exempt
    assert reasons(old, agent_images=(AGENT_IMAGE,)) == ["untrustedCaptureImage", "netAdmin"]
    assert reasons(old, agent_images=(AGENT_IMAGE, "registry.test/bpfinit/agent:old")) == []


# ---- (b) an opted-out istio-init that is not Istio's ----------------------------------------------------
def opted_out(command=None, **security) -> dict:
    pod = golden()
    pod["metadata"]["annotations"]["bpfinit.io/inject"] = "false"
    init = container(pod, "istio-init")
    init["image"] = ATTACKER
    if command is not None:
        init["command"] = command
    init["securityContext"].update(security)
    return pod


def test_command_merely_ending_in_pilot_agent_is_not_istios():
    decision = decide(opted_out(["/bin/not-pilot-agent"], privileged=True))
    assert not decision.allowed
    assert "istio-init command '/bin/not-pilot-agent' is not Istio's" in decision.message
    # not Istio's, so not even Istio's NET_ADMIN grant applies
    assert 'container "istio-init": NET_ADMIN+privileged can rewrite the pod\'s network' in decision.message


@pytest.mark.parametrize("command", [None, ["pilot-agent"], ["/usr/local/bin/pilot-agent"]])
def test_istios_own_istio_init_commands_keep_their_grant(command):
    assert reasons(opted_out(command)) == []   # NET_ADMIN + NET_RAW as root: what the template grants


def test_opted_out_istio_init_with_extra_capabilities_is_net_admin():
    pod = opted_out(capabilities={"add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF"]})
    decision = decide(pod)
    assert decision.metric_labels["reason"] == "netAdmin"
    assert decision.message.startswith('container "istio-init": BPF+SYS_ADMIN is more than Istio\'s template grants '
                                       "istio-init: NET_ADMIN, NET_RAW")
    assert decide(pod, vectors=["netAdmin"]).allowed


def test_istio_init_as_the_proxy_uid_is_proxy_identity():
    assert reasons(opted_out(runAsUser=1337)) == ["proxyIdentity"]


# ---- (c) istio-proxy beyond the template ----------------------------------------------------------------
@pytest.mark.parametrize("name,where", [("pod.yaml.injected", "initContainers"),            # native sidecar
                                        ("hello-old-version.yaml.injected", "containers")])  # regular sidecar
def test_istio_proxy_with_net_admin_and_privileged_is_denied(name, where):
    pod = golden(name)
    proxy = container(pod, "istio-proxy", (where,))
    proxy["image"] = ATTACKER
    proxy["securityContext"].update(privileged=True, capabilities={"add": ["NET_ADMIN"], "drop": ["ALL"]})
    decision = decide(pod)
    assert not decision.allowed and decision.metric_labels["reason"] == "netAdmin"
    assert 'container "istio-proxy": NET_ADMIN+privileged is more than Istio\'s template grants istio-proxy ' \
           "(NET_ADMIN only in TPROXY mode): no capabilities" in decision.message
    assert f"spec.{where}[" in decision.message


def test_tproxy_istio_proxy_keeps_net_admin_but_not_more():
    pod = golden("hello-tproxy.yaml.injected")
    assert reasons(pod) == []
    container(pod, "istio-proxy")["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    decision = decide(pod)
    assert decision.message.startswith('container "istio-proxy": SYS_ADMIN is more than Istio\'s template grants '
                                       "istio-proxy in TPROXY mode: NET_ADMIN, NET_RAW")


def test_net_admin_proxy_without_tproxy_is_denied():
    pod = golden("hello-tproxy.yaml.injected")
    init = container(pod, "istio-init")
    init["args"][init["args"].index("TPROXY")] = "REDIRECT"
    assert reasons(pod) == ["netAdmin"]
    pod["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = "TPROXY"  # the annotation says so too
    assert reasons(pod) == []


def test_proxy_privileged_shape_is_unverifiable_not_trusted():
    """values.global.proxy.privileged renders privileged AND allowPrivilegeEscalation true; no golden has it, and
    a pod cannot prove the mesh sets it, so it is unverifiable (never allowable) rather than silently trusted."""
    pod = golden()
    container(pod, "istio-proxy")["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    decision = decide(pod, vectors=["*"])
    assert not decision.allowed and decision.metric_labels["reason"] == "unverifiable"
    assert decision.message.startswith(
        'container "istio-proxy" privileged: true has the shape of Istio\'s values.global.proxy.privileged '
        "rendering, but the pod cannot prove the mesh sets it (a hand-written istio-proxy looks the same; "
        "spec.initContainers[1].securityContext), so the pod's capture cannot be verified")


def test_istio_validation_gets_no_capabilities():
    pod = golden("hello.yaml.cni.injected")
    assert reasons(pod) == []
    container(pod, "istio-validation")["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    assert reasons(pod) == ["netAdmin"]
