"""The pure mutation on plain dicts, on Istio's real pods (no server needed)."""
from __future__ import annotations

import copy
import json

import jsonpatch
import jsonpointer
import pytest

from tests.webhook.istio_pods import (INJECTED, INPUTS, injected_files, injected_outputs_of, input_files,
                                      pods_in_file)
from webhook.mutate import AGENT_COMMAND, MutationSettings, mutate, pointer

SETTINGS = MutationSettings(agent_image="registry.test/agent:1")


def hello() -> dict:
    return pods_in_file(INJECTED / "hello.yaml.injected")[0]


def apply(pod: dict, result) -> dict:
    return jsonpatch.apply_patch(pod, result.patch)


def agent_of(pod: dict) -> dict:
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")


def test_pointer_escapes_rfc6901():
    assert pointer("metadata", "annotations", "a~b/c") == "/metadata/annotations/a~0b~1c"
    doc = {"metadata": {"annotations": {"a~b/c": "x", "a": {"b": "wrong"}}}}
    assert jsonpointer.resolve_pointer(doc, pointer("metadata", "annotations", "a~b/c")) == "x"
    # `~1` must not be mistaken for an escaped slash: `~` is escaped first.
    assert jsonpointer.resolve_pointer({"~1": 5}, pointer("~1")) == 5


@pytest.mark.parametrize("path", input_files(), ids=lambda p: p.name)
def test_we_run_before_istio_then_after(path):
    """Order 1: we see the un-injected input (no-op, silent); Istio then injects; on reinvocation we swap."""
    for pod in pods_in_file(path):
        first = mutate(pod, SETTINGS)
        if pod["spec"].get("initContainers") and any(c["name"] == "istio-init" for c in pod["spec"]["initContainers"]):
            assert first.outcome == "user-override"   # the user wrote their own istio-init (proxy-override.yaml)
        else:
            assert (first.outcome, first.patch, first.warnings) == ("no-istio-init", [], [])
    outputs = injected_outputs_of(path.name)
    assert outputs, f"no golden output made from {path.name}"
    for injected in outputs:
        for pod in pods_in_file(injected):
            result = mutate(pod, SETTINGS)
            if result.outcome == "swapped":
                second = mutate(apply(pod, result), SETTINGS)
                assert (second.outcome, second.patch, second.warnings) == ("already-swapped", [], [])


def test_istio_after_us_again_is_swapped_again():
    """Order 2: Istio re-injects (reinvocation IfNeeded on Istio): stripPod removes our container by name and
    re-renders istio-init; the next pass swaps it again instead of trusting the stale status annotation."""
    pod = hello()
    swapped = apply(pod, mutate(pod, SETTINGS))
    reinjected = copy.deepcopy(swapped)
    index = next(i for i, c in enumerate(reinjected["spec"]["initContainers"]) if c["name"] == "istio-init")
    reinjected["spec"]["initContainers"][index] = copy.deepcopy(agent_of(pod))
    result = mutate(reinjected, SETTINGS)
    assert result.outcome == "swapped"
    final = apply(reinjected, result)
    assert agent_of(final)["command"] == AGENT_COMMAND
    names = [v["name"] for v in final["spec"]["volumes"]]
    assert len(names) == len(set(names)), "our volumes must not be added twice"


def test_unknown_fields_are_preserved():
    pod = hello()
    pod["spec"]["madeUpPodField"] = {"keep": [1, 2]}
    pod["metadata"]["annotations"]["weird~key/with/slashes"] = "v"
    init = agent_of(pod)
    init["restartPolicy"] = "Never"
    init["resizePolicy"] = [{"resourceName": "cpu", "restartPolicy": "NotRequired"}]
    init["madeUpContainerField"] = "x"
    init["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    init["securityContext"]["madeUpSecurityField"] = True
    result = mutate(pod, SETTINGS)
    assert all(op["op"] in ("add", "replace") for op in result.patch)
    after = apply(pod, result)
    agent = agent_of(after)
    assert agent["restartPolicy"] == "Never" and agent["madeUpContainerField"] == "x"
    assert agent["resizePolicy"] == init["resizePolicy"]
    assert agent["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # Widening fields of the old securityContext are not carried; the agent's own context is explicit.
    assert "madeUpSecurityField" not in agent["securityContext"]
    assert after["spec"]["madeUpPodField"] == {"keep": [1, 2]}
    assert after["metadata"]["annotations"]["weird~key/with/slashes"] == "v"
    # Native sidecar istio-proxy (restartPolicy Always) untouched.
    proxy = next(c for c in after["spec"]["initContainers"] if c["name"] == "istio-proxy")
    assert proxy["restartPolicy"] == "Always"


def test_missing_parents_are_created():
    pod = {"apiVersion": "v1", "kind": "Pod",
           "spec": {"containers": [{"name": "app", "image": "app"}],
                    "initContainers": [{"name": "istio-init", "image": "proxyv2",
                                        "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337",
                                                 "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]}]}}
    result = mutate(pod, SETTINGS)
    assert result.outcome == "swapped"
    after = apply(pod, result)   # no metadata, no annotations, no volumes, no env, no securityContext before
    assert json.loads(after["metadata"]["annotations"]["bpfinit.io/status"])["container"] == "istio-init"
    assert {v["name"] for v in after["spec"]["volumes"]} >= {"bpfinit-bpffs", "bpfinit-cgroup"}
    assert agent_of(after)["env"][0]["name"] == "POD_UID"
    # metadata present but no annotations
    pod["metadata"] = {"generateName": "web-"}
    after = apply(pod, mutate(pod, SETTINGS))
    assert set(after["metadata"]["annotations"]) == {"bpfinit.io/status"}
    assert after["metadata"]["generateName"] == "web-"


def test_no_init_containers_at_all_is_a_silent_noop():
    for pod in ({"spec": {"containers": [{"name": "a"}]}}, {"metadata": None, "spec": None}, {}):
        assert mutate(pod, SETTINGS).outcome == "no-istio-init"


def test_host_network_and_mirror_pods_are_left_alone_silently():
    pod = hello()
    pod["spec"]["hostNetwork"] = True
    assert (mutate(pod, SETTINGS).outcome, mutate(pod, SETTINGS).warnings) == ("host-network", [])
    pod = hello()
    pod["metadata"]["annotations"]["kubernetes.io/config.mirror"] = "abc"
    assert mutate(pod, SETTINGS).outcome == "mirror-pod"


def test_opt_out_keeps_istio_init_with_warning():
    pod = hello()
    pod["metadata"]["annotations"]["bpfinit.io/inject"] = "false"
    result = mutate(pod, SETTINGS)
    assert result.outcome == "opted-out" and result.patch == []
    assert "bpfinit.io/inject" in result.warnings[0]


def test_bpfinit_annotations_become_agent_flags():
    pod = hello()
    pod["metadata"]["annotations"].update({"bpfinit.io/accelerate": "true", "bpfinit.io/dns-capture": "false"})
    agent = agent_of(apply(pod, mutate(pod, SETTINGS)))
    assert agent["args"][-2:] == ["--accelerate", "--redirect-dns=false"]
    pod["metadata"]["annotations"]["bpfinit.io/accelerate"] = "false"
    # proxyMetadata may set BPFINIT_ACCELERATE=true in the env: an explicit false flag wins.
    agent_of(pod).setdefault("env", []).append({"name": "BPFINIT_ACCELERATE", "value": "true"})
    after = apply(pod, mutate(pod, SETTINGS))
    assert "--accelerate=false" in agent_of(after)["args"]
    assert json.loads(after["metadata"]["annotations"]["bpfinit.io/status"])["accelerate"] is False


# The acceleration self-test waivers, and pod-to-pod (same plumbing): (pod annotation, agent flag, env alias the
# flag beats)
WAIVERS = [
    ("bpfinit.io/accelerate-skip-splice-check", "--accelerate-skip-splice-check", "BPFINIT_ACCEL_SKIP_SPLICE_CHECK"),
    ("bpfinit.io/accelerate-skip-backpressure-check", "--accelerate-skip-backpressure-check",
     "BPFINIT_ACCEL_SKIP_BACKPRESSURE_CHECK"),
    ("bpfinit.io/accelerate-skip-waitall-check", "--accelerate-skip-waitall-check", "BPFINIT_ACCEL_SKIP_WAITALL_CHECK"),
    ("bpfinit.io/accelerate-pod-to-pod", "--accelerate-pod-to-pod", "BPFINIT_ACCEL_POD_TO_POD"),
]
waivers = pytest.mark.parametrize("annotation, flag, env", WAIVERS,
                                  ids=["splice", "backpressure", "waitall", "pod-to-pod"])


@waivers
def test_waiver_annotation_becomes_agent_flag_once_even_on_remutation(annotation, flag, env):
    pod = hello()
    pod["metadata"]["annotations"].update({"bpfinit.io/accelerate": "true", annotation: "true"})
    result = mutate(pod, SETTINGS)
    assert result.outcome == "swapped"
    after = apply(pod, result)
    assert agent_of(after)["args"][-2:] == ["--accelerate", flag]
    # reinvocation: already swapped, nothing added
    again = mutate(after, SETTINGS)
    assert (again.outcome, again.patch) == ("already-swapped", [])
    # Istio re-renders istio-init after us: the fresh swap carries the flag exactly once
    reinjected = copy.deepcopy(after)
    index = next(i for i, c in enumerate(reinjected["spec"]["initContainers"]) if c["name"] == "istio-init")
    reinjected["spec"]["initContainers"][index] = copy.deepcopy(agent_of(pod))
    final = apply(reinjected, mutate(reinjected, SETTINGS))
    assert agent_of(final)["args"] == agent_of(after)["args"]
    assert agent_of(final)["args"].count(flag) == 1


@waivers
def test_waiver_is_passed_even_without_accelerate_annotation(annotation, flag, env):
    """Acceleration may come from BPFINIT_ACCELERATE in proxyMetadata, which the webhook does not judge:
    the waiver is passed as asked, and the agent ignores it when acceleration is off."""
    pod = hello()
    pod["metadata"]["annotations"][annotation] = "true"
    result = mutate(pod, SETTINGS)
    assert result.outcome == "swapped"
    after = apply(pod, result)
    assert agent_of(after)["args"][-1] == flag
    assert "--accelerate" not in agent_of(after)["args"]
    assert json.loads(after["metadata"]["annotations"]["bpfinit.io/status"])["accelerate"] is False


@waivers
def test_waiver_false_beats_the_env(annotation, flag, env):
    pod = hello()
    pod["metadata"]["annotations"][annotation] = "false"
    agent_of(pod).setdefault("env", []).append({"name": env, "value": "1"})
    after = apply(pod, mutate(pod, SETTINGS))
    assert agent_of(after)["args"][-1] == f"{flag}=false"
    no_annotation = apply(hello(), mutate(hello(), SETTINGS))
    assert not any(a.startswith(flag) for a in agent_of(no_annotation)["args"])


def test_all_waivers_in_a_fixed_order_splice_first_pod_to_pod_last():
    pod = hello()
    (skip_splice, _, _), (skip_backpressure, _, _), (skip_waitall, _, _), (pod_to_pod, _, _) = WAIVERS
    # annotation insertion order must not matter: pod-to-pod, waitall and backpressure given first, splice still
    # comes first and pod-to-pod last
    pod["metadata"]["annotations"].update({pod_to_pod: "true", skip_waitall: "true", skip_backpressure: "false",
                                           "bpfinit.io/accelerate": "true", skip_splice: "true",
                                           "bpfinit.io/dns-capture": "true"})
    after = apply(pod, mutate(pod, SETTINGS))
    assert agent_of(after)["args"][-6:] == ["--accelerate", "--accelerate-skip-splice-check",
                                            "--accelerate-skip-backpressure-check=false",
                                            "--accelerate-skip-waitall-check", "--accelerate-pod-to-pod",
                                            "--redirect-dns=true"]


def test_egress_allow_list_becomes_agent_flag():
    pod = hello()
    after = apply(pod, mutate(pod, SETTINGS, egress_allow=["10.0.0.0/8", "[fd00::/8]:443"]))
    assert agent_of(after)["args"][-2:] == ["--egress-allow", "10.0.0.0/8,[fd00::/8]:443"]
    empty = apply(pod, mutate(pod, SETTINGS, egress_allow=[]))
    assert agent_of(empty)["args"][-2:] == ["--egress-allow", ""]  # present and empty: guard on, nothing allowed
    assert json.loads(empty["metadata"]["annotations"]["bpfinit.io/status"])["egressGuard"] is True
    none = apply(pod, mutate(pod, SETTINGS))
    assert "--egress-allow" not in agent_of(none)["args"]


def test_bad_egress_allow_value_leaves_pod_with_warning_not_broken_agent():
    pod = hello()
    result = mutate(pod, SETTINGS, egress_allow=["not-a-cidr"])
    assert result.outcome == "unsupported-flags" and result.patch == []
    assert "egress-allow" in result.warnings[0]


@pytest.mark.parametrize("key,value", [
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8, 172.16.0.0/12"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "80,99999"),
    ("sidecar.istio.io/interceptionMode", "REDIRECTX"),
    ("bpfinit.io/accelerate", "yes"),
    ("bpfinit.io/accelerate-skip-splice-check", "True"),
    ("bpfinit.io/accelerate-skip-backpressure-check", "True"),
    ("bpfinit.io/accelerate-skip-waitall-check", "True"),
    ("bpfinit.io/accelerate-pod-to-pod", "True"),
])
def test_bad_annotation_values_deny_naming_annotation_and_value(key, value):
    pod = hello()
    pod["metadata"]["annotations"][key] = value
    result = mutate(pod, SETTINGS)
    assert result.outcome == "invalid-annotations" and result.patch == []
    assert key in result.denial and repr(value) in result.denial


BAD_ANNOTATIONS = {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8, 1.2.3.0/24",
                   "traffic.sidecar.istio.io/excludeOutboundPorts": "80, 443",
                   "bpfinit.io/accelerate": "yes"}


def _left_alone(make):
    def build():
        pod = make()
        pod.setdefault("metadata", {}).setdefault("annotations", {}).update(BAD_ANNOTATIONS)
        return pod
    return build


def _mirror():
    pod = hello()
    pod["metadata"]["annotations"]["kubernetes.io/config.mirror"] = "abc"
    return pod


def _host_network():
    pod = hello()
    pod["spec"]["hostNetwork"] = True
    return pod


def _no_mesh():
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": {"containers": [{"name": "a", "image": "x"}]}}


def _cni():
    pod = hello()
    pod["spec"]["initContainers"][0]["name"] = "istio-validation"
    return pod


def _swapped():
    pod = hello()
    return apply(pod, mutate(pod, SETTINGS))


def _opted_out():
    pod = hello()
    pod["metadata"]["annotations"]["bpfinit.io/inject"] = "false"
    return pod


def _user_override():
    pod = hello()
    pod["spec"]["initContainers"][0]["args"] = ["my", "custom", "args"]
    return pod


@pytest.mark.parametrize("make,outcome", [
    (_mirror, "mirror-pod"), (_host_network, "host-network"), (_no_mesh, "no-istio-init"), (_cni, "istio-cni"),
    (_swapped, "already-swapped"), (_opted_out, "opted-out"), (_user_override, "user-override"),
], ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_pods_left_alone_are_never_refused_for_their_annotations(make, outcome):
    """docs/webhook.md "What the mutation does": only pods we would swap get their annotations validated."""
    result = mutate(_left_alone(make)(), SETTINGS)
    assert (result.outcome, result.denial, result.patch) == (outcome, None, [])


def test_annotations_that_are_not_a_map_deny_only_a_pod_we_would_swap():
    assert mutate({"spec": {"containers": [{"name": "a"}]}, "metadata": {"annotations": "x"}},
                  SETTINGS).denial is None
    pod = hello()
    pod["metadata"]["annotations"] = "x"
    result = mutate(pod, SETTINGS)
    assert (result.outcome, result.denial) == ("invalid-annotations", "metadata.annotations must be a map of strings")


@pytest.mark.parametrize("volume,expected", [
    ({"name": "bpfinit-bpffs", "emptyDir": {}},
     'pod volume "bpfinit-bpffs" is reserved for the bpfinit agent and must be hostPath /sys/fs/bpf '
     "(type Directory), not emptyDir; rename the pod's volume"),
    ({"name": "bpfinit-cgroup", "hostPath": {"path": "/tmp/fake-cgroup", "type": "Directory"}},
     'pod volume "bpfinit-cgroup" is reserved for the bpfinit agent and must be hostPath /sys/fs/cgroup '
     "(type Directory), not hostPath /tmp/fake-cgroup (type Directory); rename the pod's volume"),
    ({"name": "bpfinit-lib-modules", "hostPath": {"path": "/lib/modules", "type": "File"}},
     'pod volume "bpfinit-lib-modules" is reserved for the bpfinit agent and must be hostPath /lib/modules, '
     "not hostPath /lib/modules (type File); rename the pod's volume"),
    ({"name": "bpfinit-podinfo", "configMap": {"name": "fake-labels"}},
     'pod volume "bpfinit-podinfo" is reserved for the bpfinit agent and must be downwardAPI metadata.labels '
     "as file labels, not configMap; rename the pod's volume"),
])
def test_a_pod_volume_with_our_name_but_another_source_is_refused(volume, expected):
    pod = hello()
    pod["spec"]["volumes"].append(volume)
    result = mutate(pod, SETTINGS)
    assert (result.outcome, result.patch, result.denial) == ("reserved-volume", [], expected)


def test_an_istio_init_mount_colliding_with_ours_is_refused():
    pod = hello()
    agent_of(pod)["volumeMounts"] = [{"name": "user-bpf", "mountPath": "/sys/fs/bpf"}]
    result = mutate(pod, SETTINGS)
    assert result.outcome == "reserved-volume" and result.denial == (
        'istio-init volumeMount "user-bpf" at /sys/fs/bpf collides with the agent\'s "bpfinit-bpffs" at /sys/fs/bpf')


def test_our_own_volumes_as_the_apiserver_defaults_them_are_reused():
    """Istio re-injects after our swap (reinvocation): istio-init is fresh, our volumes stay, defaulted."""
    pod = hello()
    swapped = apply(pod, mutate(pod, SETTINGS))
    for volume in swapped["spec"]["volumes"]:
        if "hostPath" in volume:
            volume["hostPath"].setdefault("type", "")
        if "downwardAPI" in volume:
            volume["downwardAPI"]["defaultMode"] = 420
            volume["downwardAPI"]["items"][0]["fieldRef"]["apiVersion"] = "v1"
    swapped["spec"]["initContainers"][0] = copy.deepcopy(pod["spec"]["initContainers"][0])
    result = mutate(swapped, SETTINGS)
    assert result.outcome == "swapped" and result.denial is None
    assert not [op for op in result.patch if op["path"].startswith("/spec/volumes")]


def _with_args(*extra: str, replace: tuple = ()):
    def build():
        pod = hello()
        args = agent_of(pod)["args"]
        for flag, value in replace:
            args[args.index(flag) + 1] = value
        args += list(extra)
        return pod
    return build


def _cni_pod():
    pod = hello()
    agent_of(pod)["name"] = "istio-validation"
    return pod


def _opted_out_pod():
    pod = hello()
    pod["metadata"]["annotations"]["bpfinit.io/inject"] = "false"
    return pod


def _overridden_pod():
    pod = hello()
    agent_of(pod)["command"] = ["/bin/sh", "-c", "iptables -t nat -F; " * 20]
    return pod


WARNING_PATHS = {   # every way mutate() says something, with the longest variable parts we could think of
    "istio-cni": (_cni_pod, "istio-cni"),
    "opted-out": (_opted_out_pod, "opted-out"),
    "user-override": (_overridden_pod, "user-override"),
    "tproxy": (_with_args(replace=(("-m", "TPROXY"),)), "unsupported-flags"),
    "drop-invalid": (_with_args("--drop-invalid"), "unsupported-flags"),
    "kubevirt-with-include": (_with_args("-k", "net1"), "unsupported-flags"),
    "all-unsupported": (_with_args("--drop-invalid", "-k", "net1", replace=(("-m", "TPROXY"),)), "unsupported-flags"),
    "parse-error": (_with_args(replace=(("-x", "10.0.0.0/8," + ",".join(f"bogus-cidr-{i}" for i in range(40))),)),
                    "unsupported-flags"),
    "parse-error-one-long-word": (_with_args(replace=(("-x", "x" * 400),)), "unsupported-flags"),
}


@pytest.mark.parametrize("name", list(WARNING_PATHS))
def test_every_mutator_warning_is_a_short_kubectl_line(name):
    """admission-webhook-practices.md §3.3: each warning <= 120 chars; long variable parts are wrapped onto
    further lines at word boundaries, so nothing is lost."""
    make, outcome = WARNING_PATHS[name]
    result = mutate(make(), SETTINGS)
    assert result.outcome == outcome and result.warnings
    assert all(len(line) <= 120 for line in result.warnings), result.warnings
    assert all(line.startswith("bpfinit: ") or line.startswith("  ") for line in result.warnings)
    if name == "parse-error":
        text = " ".join(line.strip() for line in result.warnings)
        assert "bogus-cidr-0" in text and "agent cannot parse its flags: invalid CIDR" in text


def test_each_unsupported_reason_is_its_own_warning_line():
    result = mutate(WARNING_PATHS["all-unsupported"][0](), SETTINGS)
    assert result.warnings == [
        "bpfinit: pod keeps iptables istio-init: -m TPROXY not supported (its return path needs conntrack connmark)",
        "bpfinit: pod keeps iptables istio-init: --drop-invalid (conntrack INVALID drop) not supported",
        "bpfinit: pod keeps iptables istio-init: -k with -i not supported (VM traffic to non-local hosts needs NAT)",
    ]


def test_a_long_internal_error_warning_is_wrapped_not_clipped(monkeypatch):
    import webhook.mutate as mutate_module
    monkeypatch.setattr(mutate_module, "_self_check", lambda *a: "patched container is not the agent " * 8)
    result = mutate(hello(), SETTINGS)
    assert result.outcome == "internal-error" and len(result.warnings) > 1
    assert all(len(line) <= 120 for line in result.warnings)
    assert " ".join(w.strip() for w in result.warnings).count("patched container is not the agent") == 8


def test_every_golden_pod_gets_short_warnings_only():
    for path in injected_files():
        for pod in pods_in_file(path):
            assert all(len(w) <= 120 for w in mutate(pod, SETTINGS).warnings), path.name


def test_env_from_proxy_metadata_is_carried_over():
    pod = pods_in_file(INJECTED / "traffic-annotations.yaml.injected")[0]
    istio_env = copy.deepcopy(agent_of(pod)["env"])
    assert {"name": "FOO", "value": "bar"} in istio_env
    agent = agent_of(apply(pod, mutate(pod, SETTINGS)))
    assert agent["env"][: len(istio_env)] == istio_env
    assert agent["args"] == agent_of(pod)["args"][1:]


def test_mutate_does_not_modify_its_input():
    for path in injected_files()[:10]:
        for pod in pods_in_file(path):
            before = copy.deepcopy(pod)
            mutate(pod, SETTINGS, egress_allow=["10.0.0.0/8"])
            assert pod == before


def test_non_native_sidecar_slot_is_kept():
    pod = pods_in_file(INJECTED / "hello-old-version.yaml.injected")[0]
    names_before = [c["name"] for c in pod["spec"]["initContainers"]]
    after = apply(pod, mutate(pod, SETTINGS))
    assert [c["name"] for c in after["spec"]["initContainers"]] == names_before
    assert INPUTS.exists()
