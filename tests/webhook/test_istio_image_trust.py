"""Opt-in `--accepted-istio-images`: the mutator swaps only an istio-init whose image is accepted (its args
become the agent's); without the setting nothing changes."""
from __future__ import annotations

import copy
import os
import subprocess

import jsonpatch
import pytest

from tests.webhook.conftest import WEBHOOK_BIN, validator_options
from tests.webhook.istio_pods import INJECTED, injected_files, pod_create_review, pods_in_file
from webhook.app import WebhookSettings, create_app
from webhook.mutate import MutationSettings, mutate

AGENT = "registry.test/bpfinit/agent:2"
PROXYV2 = "registry.istio.io/testing/proxyv2:latest"
MESH = ("registry.istio.io/testing/proxyv2:*",)
ATTACKER = "docker.io/attacker/noop:1"
DIGEST = "sha256:" + "c" * 64


def golden(name: str = "hello.yaml.injected") -> dict:
    return pods_in_file(INJECTED / name)[0]


def settings(*istio_images: str) -> MutationSettings:
    return MutationSettings(agent_image=AGENT, accepted_istio_images=tuple(istio_images))


def with_istio_init_image(image, name: str = "hello.yaml.injected") -> dict:
    pod = golden(name)
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    if image is None:
        del init["image"]
    else:
        init["image"] = image
    return pod


GOLDEN_PODS = [pytest.param(path.name, i, id=f"{path.name}#{i}")
               for path in injected_files() for i, _pod in enumerate(pods_in_file(path))]


@pytest.mark.parametrize("name,index", GOLDEN_PODS)
def test_empty_list_changes_nothing_on_any_golden(name, index):
    pod = pods_in_file(INJECTED / name)[index]
    before = mutate(copy.deepcopy(pod), MutationSettings(agent_image=AGENT))
    assert mutate(copy.deepcopy(pod), settings()) == before
    assert mutate(copy.deepcopy(pod), settings(" ", "")) == before
    assert before.outcome != "untrusted-istio-image"


@pytest.mark.parametrize("accepted", [(PROXYV2,), MESH, ("other.example/x:1", PROXYV2)])
def test_accepted_istio_init_is_swapped_as_before(accepted):
    pod = golden()
    result = mutate(pod, settings(*accepted))
    assert result == mutate(pod, MutationSettings(agent_image=AGENT)) and result.outcome == "swapped"


@pytest.mark.parametrize("image", ["registry.istio.io/testing/proxyv2:1.24.0",
                                   f"registry.istio.io/testing/proxyv2@{DIGEST}",
                                   f"registry.istio.io/testing/proxyv2:1.24.0@{DIGEST}"])
def test_repository_entry_accepts_any_tag_or_digest(image):
    assert mutate(with_istio_init_image(image), settings(*MESH)).outcome == "swapped"
    assert mutate(with_istio_init_image(image), settings(PROXYV2)).outcome == "untrusted-istio-image"


def test_unaccepted_istio_init_is_refused_and_says_why():
    result = mutate(with_istio_init_image(ATTACKER), settings(*MESH, PROXYV2))
    assert (result.outcome, result.patch, result.warnings) == ("untrusted-istio-image", [], [])
    assert result.denial == (
        f'init container "istio-init" has image "{ATTACKER}", which is not an accepted Istio proxy image '
        f"[{MESH[0]}, {PROXYV2}]: bpfinit swaps only Istio's own istio-init, whose args it carries into the "
        "agent (accepted images: --accepted-istio-images)")


def test_istio_init_without_an_image_is_refused():
    assert 'has image (no image), which' in mutate(with_istio_init_image(None), settings(*MESH)).denial


def test_a_repository_sharing_the_prefix_is_refused():
    pod = with_istio_init_image("registry.istio.io/testing/proxyv2-evil:1")
    assert mutate(pod, settings(*MESH)).outcome == "untrusted-istio-image"


def test_proxy_init_image_override_needs_its_own_entry():
    pod = golden("hello.yaml.proxyInitImageName.injected")
    assert mutate(pod, settings(*MESH)).outcome == "untrusted-istio-image"
    assert mutate(pod, settings(*MESH, "registry.istio.io/testing/proxyInitTest:latest")).outcome == "swapped"


def test_pods_left_alone_are_not_refused():
    """Only an istio-init we would swap is refused: opted out, overridden or istio-cni pods keep their own
    containers, which the validator judges."""
    opted_out = with_istio_init_image(ATTACKER)
    opted_out["metadata"].setdefault("annotations", {})["bpfinit.io/inject"] = "false"
    assert mutate(opted_out, settings(*MESH)).outcome == "opted-out"
    overridden = with_istio_init_image(ATTACKER)
    overridden["spec"]["initContainers"][0]["command"] = ["sh", "-c", "true"]
    assert mutate(overridden, settings(*MESH)).outcome == "user-override"
    cni = golden("hello.yaml.cni.injected")
    next(c for c in cni["spec"]["initContainers"] if c["name"] == "istio-validation")["image"] = ATTACKER
    assert mutate(cni, settings(*MESH)).outcome == "istio-cni"


def test_our_own_swap_is_recognised_on_reinvocation():
    """After the swap istio-init carries the agent image, which the Istio list does not (need to) name."""
    pod = golden()
    first = mutate(pod, settings(*MESH))
    again = mutate(jsonpatch.apply_patch(pod, first.patch), settings(*MESH))
    assert (again.outcome, again.patch, again.denial) == ("already-swapped", [], None)


def test_the_app_refuses_with_422_and_passes_the_list_to_the_validator(monkeypatch):
    app = create_app(WebhookSettings(agent_image=AGENT, accepted_istio_images=MESH))
    client = app.test_client()
    answer = client.post("/mutate", json=pod_create_review(with_istio_init_image(ATTACKER))).get_json()["response"]
    assert answer["allowed"] is False and answer["status"]["code"] == 422 and "patch" not in answer
    assert answer["status"]["message"].startswith(f'bpfinit: init container "istio-init" has image "{ATTACKER}"')
    assert "patch" in client.post("/mutate", json=pod_create_review(golden())).get_json()["response"]
    # the validator is given the same list, cleaned
    seen = validator_options(monkeypatch, WebhookSettings(agent_image=AGENT, accepted_istio_images=(" ", *MESH)),
                             golden())
    assert seen == {"agent_images": (AGENT,), "istio_images": MESH, "mesh_privileged_proxies": False}


def test_cli_reads_accepted_istio_images(monkeypatch):
    from webhook import cli
    monkeypatch.setenv("BPFINIT_ACCEPTED_ISTIO_IMAGES", "a/proxyv2:*, b/proxyv2:1")
    args = cli.build_parser().parse_args(["serve", "--accepted-istio-images", "c/proxy:2,a/proxyv2:*"])
    assert cli.split_images(args.accepted_istio_images) == ("a/proxyv2:*", "b/proxyv2:1", "c/proxy:2")
    monkeypatch.delenv("BPFINIT_ACCEPTED_ISTIO_IMAGES")
    assert cli.split_images(cli.build_parser().parse_args(["serve"]).accepted_istio_images) == ()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_an_entry_that_cannot_match(tmp_path, how):
    extra = ["--accepted-istio-images", "docker.io/istio/*"] if how == "flag" else []
    env = {**os.environ, "BPFINIT_ACCEPTED_ISTIO_IMAGES": "docker.io/istio/*"} if how == "env" else None
    result = subprocess.run([str(WEBHOOK_BIN), "serve", "--cert-dir", str(tmp_path / "c"), "--port", "1", *extra],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("bpfinit-webhook: --accepted-istio-images entry 'docker.io/istio/*' has a '*' "
                                     "that is not a whole tag: the only wildcard is REPOSITORY:* "
                                     "(e.g. docker.io/istio/proxyv2:*)")


def test_audit_refuses_an_entry_that_cannot_match(tmp_path):
    result = subprocess.run([str(WEBHOOK_BIN), "audit", "--accepted-istio-images", "istio/*", "-f", "-"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, input="")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bpfinit-webhook audit: --accepted-istio-images entry 'istio/*' has a '*'" in result.stderr
