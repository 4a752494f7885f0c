"""The mutator trusts a container running bpfinit-agent only with an accepted agent image (audit m3/h, case a)."""
from __future__ import annotations

import copy

import jsonpatch
import pytest

from tests.webhook.istio_pods import INJECTED, pods_in_file
from webhook.app import WebhookSettings
from webhook.mutate import AGENT_COMMAND, MutationSettings, mutate

AGENT = "registry.test/bpfinit/agent:2"
OLD_AGENT = "registry.test/bpfinit/agent:1"
ATTACKER = "docker.io/attacker/noop:1"
SETTINGS = MutationSettings(agent_image=AGENT)


def golden(name: str = "hello.yaml.injected") -> dict:
    return pods_in_file(INJECTED / name)[0]


def forged_istio_init(image: str = ATTACKER) -> dict:
    """Case (a): a hand-written "already swapped" istio-init: any image, the agent's command, more power."""
    pod = golden()
    init = pod["spec"]["initContainers"][0]
    init.update(image=image, command=list(AGENT_COMMAND), args=init["args"][1:] + ["--egress-allow", "0.0.0.0/0"])
    init["securityContext"] = {"privileged": True, "capabilities": {"add": ["NET_ADMIN", "SYS_ADMIN"]}}
    return pod


def test_forged_agent_is_refused_not_taken_as_already_swapped():
    result = mutate(forged_istio_init(), SETTINGS)
    assert result.outcome == "untrusted-agent-image" and result.patch == []
    assert result.denial == (
        f'init container "istio-init" runs bpfinit-agent with image "{ATTACKER}", which is not an accepted '
        f"bpfinit agent image [{AGENT}]: only the bpfinit webhook puts the agent in place, so this container is "
        "not ours and its privileges are not granted (accepted images: --agent-image and --accepted-agent-images)")


@pytest.mark.parametrize("command", [["bpfinit-agent", "setup"], ["/usr/local/bin/bpfinit-agent", "run"],
                                     ["bpfinit-agent"]])
def test_any_init_container_running_the_agent_with_another_image_is_refused(command):
    pod = golden()
    pod["spec"]["initContainers"].append({"name": "helper", "image": ATTACKER, "command": command})
    result = mutate(pod, SETTINGS)
    assert result.outcome == "untrusted-agent-image"
    assert 'init container "helper" runs bpfinit-agent with image' in result.denial and ATTACKER in result.denial


def test_agent_without_an_image_is_refused():
    pod = forged_istio_init()
    del pod["spec"]["initContainers"][0]["image"]
    assert 'with image (no image)' in mutate(pod, SETTINGS).denial


def test_our_own_swap_is_still_recognised_on_reinvocation():
    pod = golden()
    first = mutate(pod, SETTINGS)
    assert first.outcome == "swapped"
    again = mutate(jsonpatch.apply_patch(pod, first.patch), SETTINGS)
    assert (again.outcome, again.patch, again.denial) == ("already-swapped", [], None)


def test_rolling_upgrade_accepts_the_previous_agent_image():
    pod = golden()
    old = MutationSettings(agent_image=OLD_AGENT)
    swapped_by_old = jsonpatch.apply_patch(pod, mutate(pod, old).patch)
    assert mutate(swapped_by_old, SETTINGS).outcome == "untrusted-agent-image"
    upgrade = MutationSettings(agent_image=AGENT, accepted_agent_images=(OLD_AGENT,))
    assert upgrade.trusted_agent_images == (AGENT, OLD_AGENT)
    assert mutate(swapped_by_old, upgrade).outcome == "already-swapped"
    assert OLD_AGENT in mutate(forged_istio_init(), upgrade).denial  # the message lists every accepted image


def test_webhook_settings_always_accept_the_configured_image():
    assert WebhookSettings(agent_image=AGENT).trusted_agent_images == (AGENT,)
    assert WebhookSettings(agent_image=AGENT, accepted_agent_images=(OLD_AGENT, AGENT, " ")).trusted_agent_images \
        == (AGENT, OLD_AGENT)


def test_forged_agent_is_refused_even_when_the_pod_opted_out():
    pod = forged_istio_init()
    pod["metadata"].setdefault("annotations", {})["bpfinit.io/inject"] = "false"
    assert mutate(pod, SETTINGS).outcome == "untrusted-agent-image"


def test_a_container_merely_named_like_the_agent_is_not_the_agent():
    pod = golden()
    pod["spec"]["initContainers"].append({"name": "x", "image": ATTACKER, "command": ["not-bpfinit-agent"]})
    assert mutate(copy.deepcopy(pod), SETTINGS).outcome == "swapped"


def test_cli_reads_accepted_agent_images(monkeypatch):
    from webhook import cli
    monkeypatch.setenv("BPFINIT_ACCEPTED_AGENT_IMAGES", "a:1, b:2")
    args = cli.build_parser().parse_args(["serve", "--accepted-agent-images", "c:3,a:1"])
    assert cli.split_images(args.accepted_agent_images) == ("a:1", "b:2", "c:3")
