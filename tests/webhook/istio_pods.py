"""Istio's golden injected documents as Pods and AdmissionReviews (test helpers, no I/O beyond reading files)."""
from __future__ import annotations

import copy
import uuid
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1] / "data" / "istio"
INJECTED = DATA / "injected"
INPUTS = DATA / "inputs"

TEMPLATE_KINDS = {"Deployment", "DaemonSet", "ReplicaSet", "StatefulSet", "Job", "DeploymentConfig",
                  "ReplicationController"}


def pod_templates(document: dict) -> list[dict]:
    """Every pod (template) inside one Kubernetes document, turned into a Pod."""
    if not isinstance(document, dict):
        return []
    kind = document.get("kind")
    if kind == "List":
        return [pod for item in document.get("items") or [] for pod in pod_templates(item)]
    if kind == "Pod":
        return [copy.deepcopy(document)]
    template = None
    if kind in TEMPLATE_KINDS:
        template = (document.get("spec") or {}).get("template")
    elif kind == "CronJob":
        template = (((document.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template")
    if not isinstance(template, dict):
        return []
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": copy.deepcopy(template.get("metadata") or {}),
             "spec": copy.deepcopy(template.get("spec") or {})}]


def pods_in_file(path: Path) -> list[dict]:
    with open(path) as handle:
        return [pod for doc in yaml.safe_load_all(handle) for pod in pod_templates(doc)]


def injected_files() -> list[Path]:
    return sorted(p for p in INJECTED.iterdir() if p.name.endswith("injected"))


def input_files() -> list[Path]:
    return sorted(p for p in INPUTS.iterdir() if p.suffix == ".yaml" and not p.name.endswith(".iop.yaml"))


def pod_create_review(pod: dict, namespace: str = "demo", dry_run: bool = False,
                      api_version: str = "admission.k8s.io/v1") -> dict:
    """An AdmissionReview as kube-apiserver sends it for `kubectl create` of this Pod."""
    name = (pod.get("metadata") or {}).get("name") or ""
    request = {
        "uid": str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": name,
        "namespace": namespace,
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "uid": str(uuid.uuid4()), "groups": ["system:serviceaccounts", "system:authenticated"]},
        "object": pod,
        "oldObject": None,
        "dryRun": dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    return {"apiVersion": api_version, "kind": "AdmissionReview", "request": request}


def injected_outputs_of(input_name: str) -> list[Path]:
    """Istio's golden outputs made from one input file (INDEX.tsv column `input_file`)."""
    rows = (INJECTED / "INDEX.tsv").read_text().strip().splitlines()
    header = rows[0].split("\t")
    name_col, input_col = header.index("filename"), header.index("input_file")
    return [INJECTED / cols[name_col] for cols in (row.split("\t") for row in rows[1:])
            if cols[input_col] == input_name]
