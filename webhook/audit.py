"""`bpfinit-webhook audit`: report every egress-bypass violation of existing pods and workloads.

For rolling out Enforce safely: run it against `kubectl get pods,deploy,sts,ds,rs,job,cronjob -A -o json`
(or straight against the cluster) with the policy you are about to enforce, fix or exempt what it lists,
then switch the mode. Every violation is reported whatever the policy's mode; the mode column says what
admission would do with it. Exit code: 0 clean, 1 violations found, 2 unusable input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import yaml

from webhook.policy import PolicyError, PolicySet, PolicyStore, load_policy_file
from webhook.mutate import DEFAULT_AGENT_IMAGE, trusted_agent_images
from webhook.validate import DEFAULT_AGENT_IMAGES, TEMPLATE_PATHS, ObjectError, evaluate

# (kind, kubernetes client API class, method for all namespaces, method for one namespace)
CLUSTER_LISTS = [
    ("Pod", "CoreV1Api", "list_pod_for_all_namespaces", "list_namespaced_pod"),
    ("Deployment", "AppsV1Api", "list_deployment_for_all_namespaces", "list_namespaced_deployment"),
    ("StatefulSet", "AppsV1Api", "list_stateful_set_for_all_namespaces", "list_namespaced_stateful_set"),
    ("DaemonSet", "AppsV1Api", "list_daemon_set_for_all_namespaces", "list_namespaced_daemon_set"),
    ("ReplicaSet", "AppsV1Api", "list_replica_set_for_all_namespaces", "list_namespaced_replica_set"),
    ("Job", "BatchV1Api", "list_job_for_all_namespaces", "list_namespaced_job"),
    ("CronJob", "BatchV1Api", "list_cron_job_for_all_namespaces", "list_namespaced_cron_job"),
]


class AuditError(Exception):
    """Unusable input (file, cluster); str() is one line."""


@dataclass(frozen=True)
class Violation:
    namespace: str
    kind: str
    name: str
    policy: str
    mode: str
    reason: str
    message: str


@dataclass
class Report:
    checked: int
    violations: list[Violation]
    errors: list[str]

    @property
    def objects_with_violations(self) -> int:
        return len({(v.namespace, v.kind, v.name) for v in self.violations})


def objects_from_text(text: str, source: str) -> list[dict]:
    """Objects from `kubectl get -o json|yaml` output: a List, a single object, or a YAML stream."""
    try:
        documents = [json.loads(text)]
    except ValueError:
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as err:
            raise AuditError(f"{source}: neither JSON nor YAML ({str(err).splitlines()[0]})") from None
    objects: list[dict] = []
    for doc in documents:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise AuditError(f"{source}: expected Kubernetes objects, got {type(doc).__name__}")
        if isinstance(doc.get("items"), list):  # List, PodList, DeploymentList ...
            item_kind = doc.get("kind", "")[:-4] if doc.get("kind", "").endswith("List") else None
            for item in doc["items"]:
                if isinstance(item, dict):
                    if item_kind and not item.get("kind"):
                        item = dict(item, kind=item_kind)
                    objects.append(item)
        else:
            objects.append(doc)
    return objects


def objects_from_cluster(api_client, namespace: Optional[str] = None) -> list[dict]:
    from kubernetes import client as k8s_client
    from kubernetes.client.exceptions import ApiException

    objects = []
    for kind, api_name, all_ns, one_ns in CLUSTER_LISTS:
        api = getattr(k8s_client, api_name)(api_client)
        try:
            listing = getattr(api, one_ns)(namespace) if namespace else getattr(api, all_ns)()
        except ApiException as err:
            raise AuditError(f"cannot list {kind}s: {err.status} {err.reason}") from None
        except Exception as err:  # connection errors and the like: one line, no trace
            raise AuditError(f"cannot list {kind}s: {err}") from None
        for item in api_client.sanitize_for_serialization(listing).get("items") or []:
            objects.append(dict(item, kind=kind))
    return objects


def audit(objects: Iterable[dict], policy_set: PolicySet, agent_images: Iterable[str] = DEFAULT_AGENT_IMAGES,
          istio_images: Iterable[str] = (), mesh_privileged_proxies: bool = False) -> Report:
    agent_images, istio_images = tuple(agent_images), tuple(istio_images)
    checked, violations, errors = 0, [], []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("kind") not in TEMPLATE_PATHS:
            continue
        meta = obj.get("metadata") or {}
        where = f"{meta.get('namespace', 'default')}/{obj.get('kind')}/{meta.get('name', '?')}"
        try:
            evaluation = evaluate(obj, meta.get("namespace") or "default", policy_set, None, agent_images,
                                  istio_images, mesh_privileged_proxies)
        except ObjectError as err:
            errors.append(f"{where}: {err}")
            continue
        checked += 1
        target = evaluation.target
        for finding in evaluation.findings:
            violations.append(Violation(target.namespace, target.kind, target.name, evaluation.policy_ref,
                                        evaluation.resolution.mode, finding.reason, finding.text))
    return Report(checked, violations, errors)


def render_text(report: Report) -> str:
    lines = []
    for v in report.violations:
        lines.append(f"{v.mode:<8} {v.namespace}/{v.kind}/{v.name}: {v.message} (policy {v.policy})")
    lines.extend(f"error    {e}" for e in report.errors)
    would_deny = len({(v.namespace, v.kind, v.name) for v in report.violations if v.mode == "Enforce"})
    lines.append(f"{report.checked} objects checked, {report.objects_with_violations} with violations "
                 f"({len(report.violations)} in all; {would_deny} objects would be denied under Enforce)")
    return "\n".join(lines)


def render_json(report: Report) -> str:
    return json.dumps({"checked": report.checked, "violations": [asdict(v) for v in report.violations],
                       "errors": report.errors}, indent=2)


def _policy_set(args) -> PolicySet:
    if args.policy:
        policy_set = load_policy_file(args.policy)
    else:
        policy_set = PolicySet()
    if args.cluster_policies:
        store = PolicyStore(policy_set)
        from kubernetes import client as k8s_client

        api = k8s_client.CustomObjectsApi(_api_client(args))
        try:
            listing = api.list_cluster_custom_object("bpfinit.io", "v1alpha1", "egressbypasspolicies")
        except Exception as err:
            raise AuditError(f"cannot list egressbypasspolicies: {getattr(err, 'reason', None) or err}") from None
        errors = store.replace_crd_objects(listing.get("items") or [])
        for error in errors:
            print(f"bpfinit-webhook audit: ignoring invalid policy: {error}", file=sys.stderr)
        policy_set = store.current()
    if not policy_set.policies:
        raise AuditError("no policy to audit against (give --policy FILE and/or --cluster-policies)")
    return policy_set


def _api_client(args):
    from kubernetes import client as k8s_client, config as k8s_config

    try:
        if args.kubeconfig or not _in_cluster():
            k8s_config.load_kube_config(config_file=args.kubeconfig, context=args.context)
        else:
            k8s_config.load_incluster_config()
    except Exception as err:
        raise AuditError(f"cannot load cluster credentials: {err}") from None
    return k8s_client.ApiClient()


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def run(args: argparse.Namespace) -> int:
    from webhook.cli import capture_trust_settings, split_images
    try:
        istio_images, privileged = capture_trust_settings(args)
    except ValueError as err:
        print(f"bpfinit-webhook audit: {err}", file=sys.stderr)
        return 2
    try:
        policy_set = _policy_set(args)
        if args.input:
            if args.input == "-":
                text, source = sys.stdin.read(), "stdin"
            else:
                try:
                    with open(args.input, encoding="utf-8") as handle:
                        text, source = handle.read(), args.input
                except (OSError, UnicodeDecodeError) as err:
                    raise AuditError(f"{args.input}: cannot read: {getattr(err, 'strerror', None) or err}") from None
            objects = objects_from_text(text, source)
        else:
            objects = objects_from_cluster(_api_client(args), args.namespace)
    except (AuditError, PolicyError) as err:
        print(f"bpfinit-webhook audit: {err}", file=sys.stderr)
        return 2
    if args.input and args.namespace:
        objects = [o for o in objects if ((o.get("metadata") or {}).get("namespace") or "default") == args.namespace]
    agent_images = trusted_agent_images(args.agent_image, split_images(args.accepted_agent_images))
    report = audit(objects, policy_set, agent_images, istio_images, privileged)
    print(render_json(report) if args.output == "json" else render_text(report))
    if report.errors:
        return 2
    return 1 if report.violations else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit", help="report egress-bypass violations of existing pods and workloads",
        description="Evaluate pods and workloads (a `kubectl get -o json` file, or the cluster) against the "
                    "egress-bypass policy and list every violation, whatever the mode. Exit code 0: none, "
                    "1: violations, 2: unusable input.")
    parser.add_argument("--policy", help="policy YAML file (as given to `serve --policy`)")
    parser.add_argument("-f", "--input", help="objects to check: `kubectl get ... -o json` output ('-' = stdin); "
                                              "default: read them from the cluster")
    parser.add_argument("--cluster-policies", action="store_true",
                        help="also use the EgressBypassPolicy objects of the cluster")
    parser.add_argument("-n", "--namespace", help="only this namespace")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    # the same trust as the server's: a container running bpfinit-agent with another image is reported
    parser.add_argument("--agent-image", default=os.environ.get("BPFINIT_AGENT_IMAGE", DEFAULT_AGENT_IMAGE),
                        help="the webhook's --agent-image (env BPFINIT_AGENT_IMAGE; default %(default)s)")
    parser.add_argument("--accepted-agent-images", metavar="IMG[,IMG...]", action="append",
                        default=[os.environ.get("BPFINIT_ACCEPTED_AGENT_IMAGES", "")],
                        help="the webhook's --accepted-agent-images (env BPFINIT_ACCEPTED_AGENT_IMAGES)")
    parser.add_argument("--accepted-istio-images", metavar="IMG[,IMG...]", action="append",
                        default=[os.environ.get("BPFINIT_ACCEPTED_ISTIO_IMAGES", "")],
                        help="the webhook's --accepted-istio-images (env BPFINIT_ACCEPTED_ISTIO_IMAGES; "
                             "default: none, Istio's images are not checked)")
    from webhook.cli import MESH_PRIVILEGED_PROXIES_ENV, add_mesh_privileged_proxies
    add_mesh_privileged_proxies(parser, f"the webhook's --mesh-privileged-proxies (env {MESH_PRIVILEGED_PROXIES_ENV}"
                                        "=true; default: off, Istio's privileged shape is unverifiable)")
    parser.set_defaults(func=run)
