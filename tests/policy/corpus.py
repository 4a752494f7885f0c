"""Istio's injected golden objects as base objects for policy tests, and ways to put a bypass into them."""
from __future__ import annotations

import copy
import functools
import uuid
from pathlib import Path

import yaml

from webhook.mutate import AGENT_CAPABILITIES, DEFAULT_AGENT_IMAGE
from webhook.validate import AGENT_COMMAND, TEMPLATE_PATHS

INJECTED = Path(__file__).resolve().parents[1] / "data" / "istio" / "injected"
NAMESPACE = "high-performance-app"
PRODUCER_LABELS = {"app": "producer"}


def load(name: str, kind: str | None = None) -> dict:
    """The first object (of `kind`, if given) in an injected golden file."""
    with open(INJECTED / name) as handle:
        for doc in yaml.safe_load_all(handle):
            items = doc.get("items", []) if doc and doc.get("kind") == "List" else [doc]
            for item in items:
                if item and (kind is None or item.get("kind") == kind):
                    return item
    raise LookupError(f"no {kind or 'object'} in {name}")


def base_objects() -> dict[str, dict]:
    """One object per checked kind, each from Istio's corpus (CronJob wraps the corpus Job's template).
    Fresh copies every call: tests mutate them."""
    return copy.deepcopy(_base_objects())


@functools.lru_cache(maxsize=1)
def _base_objects() -> dict[str, dict]:
    objects = {
        "Pod": load("pod.yaml.injected", "Pod"),
        "Deployment": load("hello.yaml.injected", "Deployment"),
        "StatefulSet": load("statefulset.yaml.injected", "StatefulSet"),
        "DaemonSet": load("daemonset.yaml.injected", "DaemonSet"),
        "ReplicaSet": load("replicaset.yaml.injected", "ReplicaSet"),
        "Job": load("job.yaml.injected", "Job"),
    }
    job = objects["Job"]
    objects["CronJob"] = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cron"},
                          "spec": {"schedule": "* * * * *",
                                   "jobTemplate": {"spec": copy.deepcopy(job["spec"])}}}
    return objects


def pod_template(obj: dict) -> dict:
    """The pod (template) dict inside `obj` (metadata + spec), mutable in place."""
    current = obj
    for key in TEMPLATE_PATHS[obj["kind"]]:
        current = current[key]
    return current


def set_labels(obj: dict, labels: dict) -> dict:
    pod_template(obj).setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    return obj


def annotate(obj: dict, **annotations: str) -> dict:
    pod_template(obj).setdefault("metadata", {}).setdefault("annotations", {}).update(annotations)
    return obj


def init_container(obj: dict, name: str = "istio-init") -> dict | None:
    for container in pod_template(obj)["spec"].get("initContainers") or []:
        if container["name"] == name:
            return container
    return None


def set_init_arg(obj: dict, flag: str, value: str) -> dict:
    """Set an istio-iptables flag in the rendered init container, as Istio's template would."""
    container = init_container(obj)
    if container is None:
        return obj
    args = container["args"]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args[1:1] = [flag, value]  # after the leading "istio-iptables"
    return obj


def add_init_env(obj: dict, name: str, value: str) -> dict:
    container = init_container(obj)
    if container is not None:
        container.setdefault("env", []).append({"name": name, "value": value})
    return obj


AGENT_IMAGE = DEFAULT_AGENT_IMAGE   # the image validate_review accepts when not told otherwise


def swap_to_agent(obj: dict, egress_allow: list[str] | None, image: str = AGENT_IMAGE) -> dict:
    """The final state after bpfinit's mutating webhook (ARCHITECTURE.md): istio-init keeps its name and
    args, runs `bpfinit-agent setup` from the agent image with the agent's capabilities, and carries the
    policy's `--egress-allow`."""
    container = init_container(obj)
    container["command"] = list(AGENT_COMMAND)
    container["image"] = image
    container.setdefault("securityContext", {}).update(
        privileged=False, allowPrivilegeEscalation=False, runAsUser=0, runAsGroup=0,
        capabilities={"add": list(AGENT_CAPABILITIES), "drop": ["ALL"]})
    if egress_allow is not None:
        container["args"] = container["args"] + ["--egress-allow", ",".join(egress_allow)]
    return obj


def review(obj: dict, namespace: str = NAMESPACE, operation: str = "CREATE", old: dict | None = None,
           dry_run: bool = False) -> dict:
    """The AdmissionReview.request the apiserver sends for this object."""
    kind = obj["kind"]
    group, _, version = obj.get("apiVersion", "v1").rpartition("/")
    request = {"uid": str(uuid.uuid4()), "kind": {"group": group, "version": version, "kind": kind},
               "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
               "namespace": namespace, "operation": operation, "object": obj, "dryRun": dry_run,
               "userInfo": {"username": "tester"}}
    if old is not None:
        request["oldObject"] = old
    return request


def policy_doc(name: str, namespace: str, **spec) -> dict:
    return {"apiVersion": "bpfinit.io/v1alpha1", "kind": "EgressBypassPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def settings_doc(**spec) -> dict:
    return {"apiVersion": "bpfinit.io/v1alpha1", "kind": "EgressBypassSettings", "spec": spec}
