"""webhook.patchcheck (the copy-on-write applier behind mutate()'s self-check) against jsonpatch:
same result whenever it accepts, never accepts what jsonpatch refuses, never touches its input."""
from __future__ import annotations

import copy
import json

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.webhook.istio_pods import injected_files, pods_in_file
from webhook import mutate as mutate_module
from webhook import patchcheck
from webhook.mutate import MutationSettings, mutate

SETTINGS = MutationSettings(agent_image="registry.test/bpfinit/agent:test")
GOLDEN_PODS = [(f"{path.name}#{i}", pod) for path in injected_files() for i, pod in enumerate(pods_in_file(path))]
# Only swapped pods carry a patch (the others are covered by test_mutate.py).
SWAPPED_PODS = [(name, pod) for name, pod in GOLDEN_PODS if mutate(pod, SETTINGS).patch]


def reference(document, operations):
    """jsonpatch on a deep copy: what the self-check used to do (None when it refuses)."""
    try:
        return ("ok", jsonpatch.apply_patch(copy.deepcopy(document), copy.deepcopy(operations)))
    except Exception as error:  # noqa: BLE001 - any refusal counts as "does not apply"
        return ("refused", type(error).__name__)


@pytest.mark.parametrize("name,pod", SWAPPED_PODS, ids=[name for name, _ in SWAPPED_PODS])
def test_golden_patches_apply_exactly_as_with_jsonpatch(name, pod):
    result = mutate(pod, SETTINGS)
    pod_before, patch_before = json.dumps(pod, sort_keys=True), json.dumps(result.patch, sort_keys=True)
    patched = patchcheck.apply_patch(pod, result.patch)
    assert patched == reference(pod, result.patch)[1]
    assert json.dumps(pod, sort_keys=True) == pod_before, "the pod was modified"
    assert json.dumps(result.patch, sort_keys=True) == patch_before, "the patch was modified"


def test_most_golden_pods_are_swapped():
    # Guards the parametrised test above against silently checking nothing.
    assert len(SWAPPED_PODS) >= len(GOLDEN_PODS) // 2


DOC = {"metadata": {"annotations": {"a/b": "1"}}, "spec": {"initContainers": [{"name": "i"}], "volumes": []}}


@pytest.mark.parametrize("operation,reason", [
    ({"op": "add", "path": "/spec/missing/x", "value": 1}, "member 'missing' does not exist"),
    ({"op": "replace", "path": "/spec/hostNetwork", "value": True}, "member 'hostNetwork' does not exist"),
    ({"op": "add", "path": "/spec/initContainers/2", "value": {}}, "out of range"),
    ({"op": "replace", "path": "/spec/initContainers/1", "value": {}}, "out of range"),
    ({"op": "replace", "path": "/spec/initContainers/-", "value": {}}, "not an array index"),
    ({"op": "add", "path": "/spec/initContainers/01", "value": {}}, "not an array index"),
    ({"op": "add", "path": "/spec/initContainers/-/name", "value": "x"}, "not an array index"),
    ({"op": "add", "path": "/spec/initContainers/0/name/x", "value": 1}, "inside a str"),
    ({"op": "add", "path": "/metadata/annotations/a~2b", "value": "x"}, "invalid '~' escape"),
    ({"op": "add", "path": "spec", "value": 1}, "does not start with '/'"),
    ({"op": "add", "path": "/spec/x"}, "no value"),
    ({"op": "remove", "path": "/spec"}, "unsupported op 'remove'"),
    ({"op": "test", "path": "/spec", "value": {}}, "unsupported op 'test'"),
])
def test_refusals_name_the_operation_and_the_reason(operation, reason):
    with pytest.raises(patchcheck.PatchError) as error:
        patchcheck.apply_patch(DOC, [{"op": "add", "path": "/spec/volumes/-", "value": {"name": "v"}}, operation])
    assert str(error.value).startswith(f"operation 1 ({operation['op']} ")
    assert reason in str(error.value)
    assert DOC["spec"]["volumes"] == [], "a refused patch must leave the document alone"


def test_escaped_paths_and_later_operations_inside_added_values():
    operations = [
        {"op": "add", "path": "/metadata/annotations/bpfinit.io~1status", "value": "{}"},
        {"op": "add", "path": "/metadata/annotations/x~0y", "value": "tilde"},
        {"op": "add", "path": "/spec/extra", "value": {"list": [1]}},
        {"op": "add", "path": "/spec/extra/list/0", "value": 0},   # inside a value added just before
        {"op": "add", "path": "/spec/volumes/0", "value": {"name": "first"}},
        {"op": "replace", "path": "/spec/initContainers/0/name", "value": "istio-init"},
    ]
    values_before = json.dumps(operations, sort_keys=True)
    patched = patchcheck.apply_patch(DOC, operations)
    assert patched == reference(DOC, operations)[1]
    assert patched["metadata"]["annotations"]["bpfinit.io/status"] == "{}"
    assert patched["metadata"]["annotations"]["x~y"] == "tilde"
    assert patched["spec"]["extra"] == {"list": [0, 1]}
    assert json.dumps(operations, sort_keys=True) == values_before, "values of the patch were modified"
    assert "extra" not in DOC["spec"] and DOC["spec"]["initContainers"] == [{"name": "i"}]


def test_root_replace():
    assert patchcheck.apply_patch(DOC, [{"op": "replace", "path": "", "value": [1]}]) == [1]


def test_mutate_refuses_to_send_a_patch_that_does_not_apply(monkeypatch):
    """The self-check is wired: a (simulated) bug in the patch builder yields no patch, a warning and
    the internal-error outcome, never a broken patch."""
    pod = pods_in_file(next(p for p in injected_files() if p.name == "hello.yaml.injected"))[0]
    broken = [{"op": "add", "path": "/spec/no-such-parent/x", "value": 1}]
    monkeypatch.setattr(mutate_module, "_volume_ops", lambda spec: broken)
    result = mutate(pod, SETTINGS)
    assert result.outcome == "internal-error" and not result.patch
    text = " ".join(w.strip() for w in result.warnings)   # long warnings are wrapped onto several lines
    assert "patch does not apply" in text and "no-such-parent" in text


# --- generated documents and operations --------------------------------------------------------------

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["", "a", "~", "/"]))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "b", "~", "/", "0", "-"]), inner, max_size=3)),
    max_leaves=12)
token = st.sampled_from(["a", "b", "~0", "~1", "0", "1", "2", "-", "01", "~2", "x"])
path = st.one_of(st.just(""), st.lists(token, min_size=1, max_size=4).map(lambda ts: "/" + "/".join(ts)))
operation = st.fixed_dictionaries({"op": st.sampled_from(["add", "replace"]), "path": path, "value": json_value})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=json_value, operations=st.lists(operation, min_size=1, max_size=4))
def test_generated_patches_agree_with_jsonpatch(document, operations):
    document_before, operations_before = copy.deepcopy(document), copy.deepcopy(operations)
    expected = reference(document, operations)
    try:
        outcome = ("ok", patchcheck.apply_patch(document, operations))
    except patchcheck.PatchError:
        outcome = ("refused", None)
    assert outcome[0] == expected[0], (outcome, expected)
    if outcome[0] == "ok":
        assert outcome[1] == expected[1]
    assert document == document_before and operations == operations_before
