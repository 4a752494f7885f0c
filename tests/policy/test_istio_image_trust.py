"""Opt-in `--accepted-istio-images`: Istio's capture containers (istio-init, istio-validation, istio-proxy) keep
their exemptions only with an accepted image; without the setting nothing changes."""
from __future__ import annotations

import copy

import jsonpatch
import pytest

from tests.webhook.istio_pods import INJECTED, injected_files, pods_in_file
from webhook.audit import audit
from webhook.mutate import MutationSettings, istio_image_accepted, istio_image_entry_problem, mutate
from webhook.validate import evaluate

from .corpus import AGENT_IMAGE, NAMESPACE, review
from .test_capture_trust import EVERYWHERE, container, golden, policies, swapped

ATTACKER = "docker.io/attacker/noop:1"
PROXYV2 = "registry.istio.io/testing/proxyv2:latest"           # what the goldens carry
MESH = ("registry.istio.io/testing/proxyv2:*",)                  # the mesh's repository, any tag
# every Istio image of the goldens: proxyv2, plus the proxyImageName / proxyInitImageName overrides
GOLDEN_IMAGES = MESH + ("registry.istio.io/testing/proxyTest:latest", "registry.istio.io/testing/proxyInitTest:latest")
DIGEST = "sha256:" + "a" * 64


def findings(pod: dict, istio_images=MESH, vectors=()):
    return evaluate(pod, NAMESPACE, policies(vectors), None, (AGENT_IMAGE,), istio_images).findings


def reasons(pod: dict, istio_images=MESH, vectors=()) -> list[str]:
    return [f.reason for f in findings(pod, istio_images, vectors)]


def decide(pod: dict, istio_images=MESH, vectors=()):
    from webhook.validate import validate_review
    return validate_review(review(pod), policies(vectors), agent_images=(AGENT_IMAGE,), istio_images=istio_images)


# ---- the matching rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("image", [
    "docker.io/istio/proxyv2",                                   # no tag: the repository's :latest
    "docker.io/istio/proxyv2:1.24.0",
    "docker.io/istio/proxyv2:1.24.0-distroless",
    f"docker.io/istio/proxyv2@{DIGEST}",
    f"docker.io/istio/proxyv2:1.24.0@{DIGEST}",
])
def test_a_repository_entry_accepts_any_tag_or_digest_of_that_repository(image):
    assert istio_image_accepted(image, ["docker.io/istio/proxyv2:*"])


@pytest.mark.parametrize("image", [
    "docker.io/istio/proxyv2-evil:1.24.0",       # a longer repository name
    "docker.io/istio/proxyv2/evil:1.24.0",       # a repository below it
    "istio/proxyv2:1.24.0",                      # no normalisation: not the same string
    "docker.io/attacker/proxyv2:1.24.0",
    "docker.io/istio/proxyv2:1.24.0/x",
    "", None, 7,
])
def test_a_repository_entry_accepts_no_other_repository(image):
    assert not istio_image_accepted(image, ["docker.io/istio/proxyv2:*"])


def test_a_registry_with_a_port_is_not_a_repository_wildcard():
    assert istio_image_accepted("localhost:5000/istio/proxyv2:1.24.0", ["localhost:5000/istio/proxyv2:*"])
    assert not istio_image_accepted("localhost:5000/anything:1", ["localhost:*"])


def test_an_exact_entry_accepts_exactly_that_image():
    accepted = ["docker.io/istio/proxyv2:1.24.0", f"mirror.example/istio/proxyv2@{DIGEST}"]
    assert istio_image_accepted("docker.io/istio/proxyv2:1.24.0", accepted)
    assert istio_image_accepted(f"mirror.example/istio/proxyv2@{DIGEST}", accepted)
    assert not istio_image_accepted("docker.io/istio/proxyv2:1.24.1", accepted)
    assert not istio_image_accepted("docker.io/istio/proxyv2", accepted)
    assert not istio_image_accepted(f"docker.io/istio/proxyv2:1.24.0@{DIGEST}", accepted)


def test_an_empty_list_accepts_everything():
    for accepted in ([], (), [" ", ""]):
        assert istio_image_accepted(ATTACKER, accepted) and istio_image_accepted(None, accepted)


@pytest.mark.parametrize("entry,problem", [
    ("docker.io/istio/*", "the only wildcard is REPOSITORY:*"),
    ("docker.io/istio/proxyv2@*", "the only wildcard is REPOSITORY:*"),
    ("*", "the only wildcard is REPOSITORY:*"),
    (":*", "is not REPOSITORY:*"),
    ("docker.io/istio/proxyv2:1.24:*", "is not REPOSITORY:*"),
    ("docker.io/istio/proxyv2 :*", "whitespace"),
])
def test_entries_that_cannot_mean_what_they_look_like_are_named(entry, problem):
    assert problem in istio_image_entry_problem(entry)


@pytest.mark.parametrize("entry", ["docker.io/istio/proxyv2:*", "docker.io/istio/proxyv2:1.24.0",
                                   "localhost:5000/istio/proxyv2:*", f"docker.io/istio/proxyv2@{DIGEST}"])
def test_good_entries_have_no_problem(entry):
    assert istio_image_entry_problem(entry) is None


# ---- the goldens ---------------------------------------------------------------------------------------
GOLDEN_PODS = [pytest.param(path.name, i, id=f"{path.name}#{i}")
               for path in injected_files() for i, _pod in enumerate(pods_in_file(path))]


def capture_containers(pod: dict) -> list[tuple[str, str, object]]:
    """(list, name, image) of Istio's capture containers, the swapped agent left out."""
    return [(key, c["name"], c.get("image")) for key in ("initContainers", "containers")
            for c in pod["spec"].get(key) or []
            if c["name"] in ("istio-init", "istio-validation", "istio-proxy")
            and c.get("command") != ["bpfinit-agent", "setup"]]


def as_injected_and_swapped(name: str, index: int) -> tuple[dict, dict]:
    pod = pods_in_file(INJECTED / name)[index]
    result = mutate(pod, MutationSettings(agent_image=AGENT_IMAGE), EVERYWHERE)
    return pod, (jsonpatch.apply_patch(pod, result.patch) if result.patch else pod)


@pytest.mark.parametrize("name,index", GOLDEN_PODS)
def test_golden_findings_are_unchanged_without_the_list(name, index):
    """Opt-in: the empty list (the default) changes nothing on any golden, as injected and after bpfinit's swap."""
    for obj in as_injected_and_swapped(name, index):
        before = evaluate(obj, NAMESPACE, policies(), None, (AGENT_IMAGE,)).findings
        assert findings(obj, ()) == before
        assert findings(obj, [" ", ""]) == before


@pytest.mark.parametrize("name,index", GOLDEN_PODS)
def test_golden_findings_with_the_mesh_images_listed(name, index):
    """With the mesh's images listed, a golden whose capture containers all carry one is judged exactly as
    without the list; the others report exactly their unaccepted containers."""
    for obj in as_injected_and_swapped(name, index):
        before = evaluate(obj, NAMESPACE, policies(), None, (AGENT_IMAGE,)).findings
        unaccepted = sorted((key, cname) for key, cname, image in capture_containers(obj)
                            if not istio_image_accepted(image, GOLDEN_IMAGES))
        after = findings(obj, GOLDEN_IMAGES)
        if not unaccepted:
            assert after == before
        else:
            assert sorted(f.key[-2:] for f in after if f.reason == "untrustedCaptureImage") == unaccepted


def test_only_two_goldens_carry_an_image_that_is_not_the_meshs():
    """proxy-override: a user-supplied istio-init (fake/custom-image, already unverifiable for its args);
    sidecar-spire: the spire template's image-less istio-proxy overlay in `containers` (the apiserver requires
    an image, so such a pod is never created)."""
    odd = {(path.name, key, name, image) for path in injected_files() for pod in pods_in_file(path)
           for key, name, image in capture_containers(pod) if not istio_image_accepted(image, GOLDEN_IMAGES)}
    assert odd == {("proxy-override.yaml.injected", "initContainers", "istio-init", "fake/custom-image"),
                   ("sidecar-spire.yaml.injected", "containers", "istio-proxy", None)}


@pytest.mark.parametrize("name,index", GOLDEN_PODS)
def test_golden_capture_containers_with_an_unaccepted_image_lose_their_exemptions(name, index):
    """With a list that does not name the goldens' images, each Istio capture container (but never the swapped
    agent) is reported, by name, in its own list."""
    for obj in as_injected_and_swapped(name, index):
        expected = sorted((key, cname) for key, cname, _image in capture_containers(obj))
        found = sorted(f.key[-2:] for f in findings(obj, ("mirror.example/istio/proxyv2:*",))
                       if f.reason == "untrustedCaptureImage")
        assert found == expected


def test_proxy_init_image_override_needs_its_own_entry():
    """Istio's proxy_init image may differ from the proxy's (golden proxyInitImageName): one list covers both."""
    pod = golden("hello.yaml.proxyInitImageName.injected")
    assert reasons(pod) == ["untrustedCaptureImage", "netAdmin"]
    assert reasons(pod, MESH + ("registry.istio.io/testing/proxyInitTest:latest",)) == []


# ---- istio-init ----------------------------------------------------------------------------------------
def test_istio_init_with_an_unaccepted_image_loses_net_admin_and_says_why():
    pod = golden()
    container(pod, "istio-init")["image"] = ATTACKER
    decision = decide(pod)
    assert not decision.allowed and decision.code == 403
    assert decision.metric_labels["reason"] == "untrustedCaptureImage"
    assert decision.message == (
        f'container "istio-init": image "{ATTACKER}" is not one of the webhook\'s --accepted-istio-images '
        f"[{MESH[0]}]: only Istio's own capture containers get their exemptions, so this container gets none of "
        "them (spec.initContainers[0].image) (vector untrustedCaptureImage is not in allowedVectors []); "
        'container "istio-init": NET_ADMIN can rewrite the pod\'s network and capture '
        "(spec.initContainers[0].securityContext) (vector netAdmin is not in allowedVectors []) "
        "(policy bpfinit-system/mesh)")


def test_istio_init_accepted_exactly_or_by_repository():
    pod = golden()
    assert container(pod, "istio-init")["image"] == PROXYV2
    assert reasons(pod, (PROXYV2,)) == [] and reasons(pod, MESH) == []
    other_tag = [(f.reason, f.key[-1]) for f in findings(pod, ("registry.istio.io/testing/proxyv2:1.24.0",))]
    assert ("untrustedCaptureImage", "istio-init") in other_tag and ("netAdmin", "istio-init") in other_tag


def test_istio_init_without_an_image_is_not_accepted():
    pod = golden()
    del container(pod, "istio-init")["image"]
    assert 'container "istio-init": image (no image) is not one of' in findings(pod)[0].text


def test_the_wildcard_vector_does_not_allow_an_unaccepted_istio_image():
    pod = golden()
    container(pod, "istio-init")["image"] = ATTACKER
    assert reasons(pod, vectors=["*"]) == ["untrustedCaptureImage"]
    assert reasons(pod, vectors=["untrustedCaptureImage", "netAdmin"]) == []


def test_an_unaccepted_istio_init_is_still_checked_but_vouches_for_no_tproxy():
    """Its args still count (they can only add findings), but its `-m TPROXY` no longer grants istio-proxy
    NET_ADMIN."""
    pod = golden("hello-tproxy.yaml.injected")
    assert reasons(pod) == []
    init = container(pod, "istio-init")
    init["image"] = ATTACKER
    init["args"] += ["-c", "eth9"]
    found = {(f.reason, f.key[-1]) for f in findings(pod)}
    assert found == {("untrustedCaptureImage", "istio-init"), ("netAdmin", "istio-init"),
                     ("excludeInterfaces", "eth9"), ("netAdmin", "istio-proxy")}
    proxy_finding = next(f for f in findings(pod) if f.reason == "netAdmin" and f.key[-1] == "istio-proxy")
    assert "(NET_ADMIN only in TPROXY mode)" in proxy_finding.text
    # the annotation still says TPROXY on its own (as without the list)
    pod["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = "TPROXY"
    assert not [f for f in findings(pod) if f.key[-1:] == ("istio-proxy",)]


def test_the_swapped_agent_is_judged_by_the_agent_images_not_the_istio_list():
    found = {(f.reason, f.key[-1]) for f in findings(swapped(), ("mirror.example/istio/proxyv2:*",))}
    assert found == {("untrustedCaptureImage", "istio-proxy"), ("proxyIdentity", "istio-proxy")}  # not istio-init
    assert reasons(swapped()) == []


# ---- istio-proxy and istio-validation --------------------------------------------------------------------
@pytest.mark.parametrize("name,where", [("pod.yaml.injected", "initContainers"),            # native sidecar
                                        ("hello-old-version.yaml.injected", "containers")])  # regular sidecar
def test_istio_proxy_with_an_unaccepted_image_may_not_run_as_the_proxy(name, where):
    pod = golden(name)
    proxy = container(pod, "istio-proxy", (where,))
    proxy["image"] = ATTACKER
    decision = decide(pod)
    assert not decision.allowed and decision.metric_labels["reason"] == "untrustedCaptureImage"
    assert decision.message.startswith(f'container "istio-proxy": image "{ATTACKER}" is not one of the webhook\'s '
                                       f"--accepted-istio-images [{MESH[0]}]")
    assert f".{where}[" in decision.message
    assert 'container "istio-proxy": runAsUser 1337 is the proxy UID, so its traffic bypasses capture' \
        in decision.message
    assert reasons(pod, ()) == []          # without the list, as before


def test_istio_validation_with_an_unaccepted_image_may_not_run_as_the_proxy():
    pod = golden("hello.yaml.cni.injected")
    container(pod, "istio-validation")["image"] = ATTACKER
    assert reasons(pod) == ["untrustedCaptureImage", "proxyIdentity", "proxyIdentity"]   # runAsUser, runAsGroup
    assert reasons(pod, (ATTACKER,) + MESH) == []


def test_update_tolerates_a_pre_existing_unaccepted_image():
    from webhook.validate import validate_review
    pod = golden()
    container(pod, "istio-proxy")["image"] = ATTACKER
    old = copy.deepcopy(pod)
    pod["metadata"].setdefault("labels", {})["touched"] = "yes"
    decision = validate_review(review(pod, operation="UPDATE", old=old), policies(), agent_images=(AGENT_IMAGE,),
                               istio_images=MESH)
    assert decision.allowed and decision.metric_labels["reason"] == "preexisting"


# ---- audit -----------------------------------------------------------------------------------------------
def test_audit_judges_istio_images_like_the_server():
    pod = golden()
    pod["metadata"]["namespace"] = NAMESPACE
    container(pod, "istio-proxy")["image"] = ATTACKER
    policy_set = policies()
    assert audit([pod], policy_set, (AGENT_IMAGE,)).violations == []
    reasons_found = [v.reason for v in audit([pod], policy_set, (AGENT_IMAGE,), MESH).violations]
    assert reasons_found == ["untrustedCaptureImage", "proxyIdentity", "proxyIdentity"]   # runAsUser, runAsGroup
