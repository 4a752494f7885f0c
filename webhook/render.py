"""Render bpfinit's Kubernetes manifests (`bpfinit-webhook manifests`).

Python is the single source of truth for the objects we own: the non-kustomization YAML under `manifests/`
is generated from it (`bpfinit-webhook manifests --write-kustomize manifests`), the kustomize
overlays patch that base, and the tests check that `kubectl kustomize <overlay>` and `render(options)`
produce the same objects. The policy CRD is a plain YAML file owned by the policy engine
(`manifests/base/egressbypasspolicy-crd.yaml`); it is read, not generated. The sample policy lives with its
namespace in `manifests/examples/` (hand-written, not part of the base: `--sample-policy` adds it).

Everything here is a pure function on plain dicts, except `main()` (files and stdout).
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

# ---- names shared by the manifests, the webhook (cabundle.py) and the docs -------------------------
DEFAULT_NAMESPACE = "bpfinit-system"
# The node components (exporter + gc DaemonSet) need hostPath volumes, uid 0 and CAP_BPF: Pod Security
# `privileged`. They get their own namespace so the webhook's stays `restricted`.
DEFAULT_NODE_NAMESPACE = "bpfinit-node"
DEFAULT_IMAGE = "ghcr.io/bpfinit/bpfinit:0.1.0"
WEBHOOK_NAME = "bpfinit-webhook"            # Deployment, Service, ServiceAccount, ClusterRole
EXPORTER_NAME = "bpfinit-exporter"          # DaemonSet + ServiceAccount
TLS_SECRET = "bpfinit-webhook-tls"          # shared CA + serving cert (built-in certs or cert-manager)
# Mutating configurations are called in metadata.name order; Istio's are `istio-sidecar-injector*` and
# `istio-revision-tag-*`, so `zz-` sorts after them today (reinvocationPolicy IfNeeded is what makes
# correctness independent of the order). No `istio.io/rev` label and no `sidecar-injector.istio.io`
# webhook-name suffix, or istiod's caBundle patcher would rewrite our caBundle.
MUTATOR_CONFIG = "zz-bpfinit-mutator"
VALIDATOR_CONFIG = "bpfinit-validator"
MUTATE_PATH = "/mutate"
VALIDATE_PATH = "/validate"
HTTPS_PORT = 8443
EXPORTER_PORT = 9965                         # initagent.exporter DEFAULT_LISTEN
GC_EVERY = "10m"                             # the exporter DaemonSet's gc container: `bpfinit-agent gc --every`
HOST_CGROUP_DIR = "/host/sys/fs/cgroup"      # the node's cgroup tree in the gc container (cgroup.CANDIDATE_ROOTS)
OPT_IN_LABEL = "bpfinit.io/enabled"
TLS_DIR = "/etc/bpfinit/tls"
# Egress-policy settings (EgressBypassSettings: namespace modes, cluster policy namespace, ...) can only come
# from a file; the policies themselves are EgressBypassPolicy objects, watched with --policy-crds=on.
POLICY_CONFIGMAP = "bpfinit-policy"
POLICY_DIR = "/etc/bpfinit/policy"
POLICY_FILE_KEY = "policy.yaml"
WEBHOOK_UID = 65532                         # the image's non-root `bpfinit` user
CERT_MANAGER_NAMESPACE = "cert-manager"
POLICY_GROUP = "bpfinit.io"                 # the policy CRDs' API group (webhook/policy.py)

COMMON_LABELS = {"app.kubernetes.io/name": "bpfinit", "app.kubernetes.io/part-of": "bpfinit"}
CERT_MODES = ("none", "builtin", "cert-manager")
ROLLOUTS = ("enforce", "warn-first")

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_DIR = REPO_ROOT / "manifests" / "base"
EXAMPLES_DIR = REPO_ROOT / "manifests" / "examples"
POLICY_CRD_FILE = "egressbypasspolicy-crd.yaml"
SAMPLE_POLICY_FILE = "sample-policy.yaml"
# `kubectl apply -k manifests/examples`: the sample policy and the namespace it lives in.
EXAMPLE_FILES = ("namespace.yaml", SAMPLE_POLICY_FILE)


class RenderError(ValueError):
    """Bad render options or input files; the message is one line meant for the operator."""


@dataclass(frozen=True)
class RenderOptions:
    image: str = DEFAULT_IMAGE
    namespace: str = DEFAULT_NAMESPACE
    node_namespace: str = DEFAULT_NODE_NAMESPACE   # the exporter/gc DaemonSet's (Pod Security privileged)
    certs: str = "builtin"                 # "none" is the bare kustomize base
    replicas: int = 3
    rollout: str = "enforce"               # "warn-first": validator fails open, policies in Warn
    extra_excluded_namespaces: tuple[str, ...] = ()
    exporter: bool = True
    gc_every: str | None = GC_EVERY        # None: no gc container (dead pods' pins stay until gc runs)
    agent_image: str | None = None         # image for the swapped init container; defaults to `image`
    accepted_agent_images: tuple[str, ...] = ()   # more agent images the webhook accepts (rolling upgrades)
    accepted_istio_images: tuple[str, ...] = ()   # opt-in: Istio's capture containers' images (REPO:* allowed)
    mesh_privileged_proxies: bool = False         # opt-in: the mesh sets Istio's values.global.proxy.privileged
    log_level: str = "info"
    extra_labels: dict = field(default_factory=dict)


_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")


def check_options(opts: RenderOptions) -> None:
    """Raise RenderError with a one-line reason for options that would render an unusable set."""
    if not _DNS1123_LABEL.match(opts.namespace):
        raise RenderError(f"--namespace {opts.namespace!r} is not a valid namespace name (RFC 1123 label)")
    if not _DNS1123_LABEL.match(opts.node_namespace):
        raise RenderError(f"--node-namespace {opts.node_namespace!r} is not a valid namespace name (RFC 1123 label)")
    if opts.node_namespace == opts.namespace:
        raise RenderError(f"--node-namespace must differ from --namespace ({opts.namespace!r}): the node "
                          f"DaemonSet needs Pod Security 'privileged', the webhook's namespace is 'restricted'")
    for ns in opts.extra_excluded_namespaces:
        if not _DNS1123_LABEL.match(ns):
            raise RenderError(f"--exclude-namespace {ns!r} is not a valid namespace name (RFC 1123 label)")
    images = [("--image", opts.image), ("--agent-image", opts.agent_image)]
    images += [("--accepted-agent-image", image) for image in opts.accepted_agent_images]
    for flag, image in images:
        if image is not None and (not _IMAGE_REF.match(image) or image.endswith((":", "@"))):
            raise RenderError(f"{flag} {image!r} is not an image reference (e.g. registry/bpfinit:0.1.0)")
    from webhook.mutate import istio_image_entry_problem
    for entry in opts.accepted_istio_images:
        # an exact reference, or REPOSITORY:* (docs/webhook.md "Istio image trust")
        repository = entry[:-2] if entry.endswith(":*") else entry
        problem = istio_image_entry_problem(entry)
        if problem is None and (not _IMAGE_REF.match(repository) or repository.endswith((":", "@"))):
            problem = "is not an image reference (e.g. docker.io/istio/proxyv2:1.24.0 or docker.io/istio/proxyv2:*)"
        if problem:
            raise RenderError(f"--accepted-istio-image {entry!r} {problem}")
    if opts.certs not in CERT_MODES:
        raise RenderError(f"--certs must be one of {', '.join(CERT_MODES)}, not {opts.certs!r}")
    if opts.rollout not in ROLLOUTS:
        raise RenderError(f"--rollout must be one of {', '.join(ROLLOUTS)}, not {opts.rollout!r}")
    if not 1 <= opts.replicas <= 50:
        raise RenderError(f"--replicas must be between 1 and 50, not {opts.replicas}")
    if opts.gc_every is not None:
        from initagent.flags import parse_gc_interval
        try:
            parse_gc_interval(opts.gc_every)
        except ValueError as err:
            raise RenderError(f"--gc-every: {err}") from None
    if opts.log_level not in ("debug", "info", "warning", "error"):
        raise RenderError(f"--log-level must be debug, info, warning or error, not {opts.log_level!r}")


# ---- small helpers -----------------------------------------------------------------------------

def _labels(component: str, opts: RenderOptions) -> dict:
    return {**COMMON_LABELS, "app.kubernetes.io/component": component, **opts.extra_labels}


def _meta(name: str, component: str, opts: RenderOptions, namespaced: bool = True) -> dict:
    meta = {"name": name, "labels": _labels(component, opts)}
    if namespaced:
        meta["namespace"] = opts.namespace
    return meta


def _node_meta(name: str, component: str, opts: RenderOptions) -> dict:
    return {"name": name, "labels": _labels(component, opts), "namespace": opts.node_namespace}


def _selector_labels(component: str) -> dict:
    # Selector labels never include user extras: a Deployment's selector is immutable.
    return {"app.kubernetes.io/name": "bpfinit", "app.kubernetes.io/component": component}


def _restricted_container_security(uid: int | None = WEBHOOK_UID) -> dict:
    sc = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if uid is not None:
        sc.update({"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid})
    return sc


def excluded_namespaces(opts: RenderOptions) -> list[str]:
    """Namespaces neither webhook may ever see: kube-system, our own two (self-deadlock: the webhook's, and the
    node DaemonSet's, whose pods must start whether or not the webhook is up), extras."""
    names = ["kube-system", opts.namespace, opts.node_namespace, *opts.extra_excluded_namespaces]
    if opts.certs == "cert-manager":
        # Our validator fails closed; cert-manager must be able to start its pods even when we are down,
        # since we need it to (re)issue our certificate: no dependency loop.
        names.append(CERT_MANAGER_NAMESPACE)
    return list(dict.fromkeys(names))


def _not_in_excluded(opts: RenderOptions) -> dict:
    return {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded_namespaces(opts)}


def policy_rbac_rules(crd_docs: list[dict]) -> list[dict]:
    """get/list/watch on every resource the policy CRD file defines (and nothing else)."""
    by_group: dict[str, list[str]] = {}
    for doc in crd_docs:
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc.get("spec") or {}
        plural = (spec.get("names") or {}).get("plural")
        if not spec.get("group") or not plural:
            raise RenderError(f"policy CRD {doc.get('metadata', {}).get('name')!r} lacks spec.group or names.plural")
        by_group.setdefault(spec["group"], []).append(plural)
    if not by_group:
        raise RenderError(f"{POLICY_CRD_FILE} defines no CustomResourceDefinition")
    return [{"apiGroups": [group], "resources": sorted(set(plurals)), "verbs": ["get", "list", "watch"]}
            for group, plurals in sorted(by_group.items())]


# ---- objects -------------------------------------------------------------------------------------

def namespace(opts: RenderOptions) -> dict:
    meta = {"name": opts.namespace, "labels": {
        **_labels("namespace", opts),
        # The webhook itself runs here: restricted Pod Security, and never Istio-injected.
        "pod-security.kubernetes.io/enforce": "restricted",
        "istio-injection": "disabled",
    }}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def node_namespace(opts: RenderOptions) -> dict:
    """The exporter/gc DaemonSet's namespace: hostPath (bpffs, cgroup tree), uid 0 and CAP_BPF/CAP_PERFMON
    are outside Pod Security `baseline`, so it is `privileged`, and it holds nothing else."""
    meta = {"name": opts.node_namespace, "labels": {
        **_labels("namespace", opts),
        "pod-security.kubernetes.io/enforce": "privileged",
        "istio-injection": "disabled",
    }}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service_account(opts: RenderOptions) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(WEBHOOK_NAME, "webhook", opts)}


def policy_cluster_role(opts: RenderOptions, crd_docs: list[dict]) -> list[dict]:
    """The base RBAC: watch the egress policies. Nothing else is needed with cert-manager."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": _meta(f"{WEBHOOK_NAME}-policy-reader", "webhook", opts, namespaced=False),
            "rules": policy_rbac_rules(crd_docs)}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": _meta(f"{WEBHOOK_NAME}-policy-reader", "webhook", opts, namespaced=False),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": f"{WEBHOOK_NAME}-policy-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": WEBHOOK_NAME, "namespace": opts.namespace}]}
    return [role, binding]


def builtin_certs_rbac(opts: RenderOptions) -> list[dict]:
    """What `bpfinit-webhook certs` needs: its one Secret, and caBundle on our two configurations only.

    `create` cannot be limited by resourceNames (the name is not known at authorization time), so the
    Role allows creating Secrets in our own namespace only; everything else is pinned by name.
    """
    name = f"{WEBHOOK_NAME}-certs"
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(name, "webhook", opts),
         "rules": [
             {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
             {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [TLS_SECRET],
              "verbs": ["get", "update"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(name, "webhook", opts),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": WEBHOOK_NAME, "namespace": opts.namespace}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta(f"{name}-cabundle", "webhook", opts, namespaced=False),
         "rules": [
             {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
              "resourceNames": [MUTATOR_CONFIG], "verbs": ["get", "patch"]},
             {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["validatingwebhookconfigurations"],
              "resourceNames": [VALIDATOR_CONFIG], "verbs": ["get", "patch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(f"{name}-cabundle", "webhook", opts, namespaced=False),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{name}-cabundle"},
         "subjects": [{"kind": "ServiceAccount", "name": WEBHOOK_NAME, "namespace": opts.namespace}]},
    ]


def _webhook_container(opts: RenderOptions) -> dict:
    probe = {"scheme": "HTTPS", "port": "https"}
    return {
        "name": "webhook",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bpfinit-webhook", "serve"],
        # --service-name/--namespace only matter when the server has to make its own certificate (base).
        # --namespace: certificate SANs (base), and the namespace whose pods the handlers leave alone;
        # --node-namespace: the exporter DaemonSet's, left alone too.
        "args": [f"--port={HTTPS_PORT}", f"--cert-dir={TLS_DIR}", f"--service-name={WEBHOOK_NAME}",
                 f"--namespace={opts.namespace}", f"--node-namespace={opts.node_namespace}",
                 f"--log-level={opts.log_level}",
                 f"--policy={POLICY_DIR}/{POLICY_FILE_KEY}", "--policy-crds=on"],
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "BPFINIT_AGENT_IMAGE", "value": opts.agent_image or opts.image},
            # only when asked for: the agent image above is always accepted (docs/webhook.md "Agent image trust")
            *([{"name": "BPFINIT_ACCEPTED_AGENT_IMAGES", "value": ",".join(opts.accepted_agent_images)}]
              if opts.accepted_agent_images else []),
            # opt-in (docs/webhook.md "Istio image trust"): without it Istio's images are not checked
            *([{"name": "BPFINIT_ACCEPTED_ISTIO_IMAGES", "value": ",".join(opts.accepted_istio_images)}]
              if opts.accepted_istio_images else []),
            # opt-in (docs/webhook.md "Privileged proxies"): without it Istio's privileged shape is unverifiable
            *([{"name": "BPFINIT_MESH_PRIVILEGED_PROXIES", "value": "true"}] if opts.mesh_privileged_proxies else []),
            # gunicorn workers share metrics through files; the root filesystem is read-only.
            {"name": "PROMETHEUS_MULTIPROC_DIR", "value": "/tmp/metrics"},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"name": "https", "containerPort": HTTPS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {**probe, "path": "/readyz"}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {**probe, "path": "/healthz"}, "periodSeconds": 10,
                          "failureThreshold": 6, "timeoutSeconds": 3},
        "startupProbe": {"httpGet": {**probe, "path": "/healthz"}, "periodSeconds": 2, "failureThreshold": 60},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "384Mi"}},
        "securityContext": _restricted_container_security(),
        "volumeMounts": [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"},
                         # A directory mount (not subPath): ConfigMap updates arrive and are hot-reloaded.
                         {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True}],
    }


def deployment(opts: RenderOptions) -> dict:
    selector = _selector_labels("webhook")
    pod_spec = {
        "serviceAccountName": WEBHOOK_NAME,
        # Admission of every Istio pod goes through us (and the validator fails closed).
        "priorityClassName": "system-cluster-critical",
        # fsGroup: the cert-manager Secret volume must be readable by the non-root user.
        "securityContext": {"runAsNonRoot": True, "runAsUser": WEBHOOK_UID, "runAsGroup": WEBHOOK_UID,
                            "fsGroup": WEBHOOK_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": selector},
                                                "topologyKey": "kubernetes.io/hostname"}}]}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": selector}}],
        "containers": [_webhook_container(opts)],
        "volumes": [
            # Base: filled by the cert overlay (emptyDir written by `certs`, or cert-manager's Secret).
            {"name": "tls", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "policy", "configMap": {"name": POLICY_CONFIGMAP}},
        ],
    }
    spec = {
        "replicas": opts.replicas,
        "revisionHistoryLimit": 3,
        "selector": {"matchLabels": selector},
        # Never drop below the current number of ready webhook pods during a rollout.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": _labels("webhook", opts),
                                  "annotations": {"kubectl.kubernetes.io/default-container": "webhook"}},
                     "spec": pod_spec},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(WEBHOOK_NAME, "webhook", opts),
            "spec": spec}


def policy_settings_text(opts: RenderOptions) -> str:
    """The settings file the server reads with --policy (docs/policy.md). Cluster-wide policies and
    exemptions live in our own namespace; warn-first makes Warn the default for policies without a mode."""
    settings = {"apiVersion": f"{POLICY_GROUP}/v1alpha1", "kind": "EgressBypassSettings",
                "spec": {"clusterPolicyNamespace": opts.namespace, "exemptionNamespace": opts.namespace,
                         "defaultMode": "Warn" if opts.rollout == "warn-first" else "Enforce",
                         "namespaceModes": {}, "ipFamilies": ["IPv4", "IPv6"]}}
    return ("# bpfinit egress-policy settings (docs/policy.md); the policies are EgressBypassPolicy objects.\n"
            "# The server re-reads this file when the ConfigMap changes.\n"
            + yaml.safe_dump(settings, sort_keys=False, default_flow_style=False))


def policy_configmap(opts: RenderOptions) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(POLICY_CONFIGMAP, "webhook", opts),
            "data": {POLICY_FILE_KEY: policy_settings_text(opts)}}


def pod_disruption_budget(opts: RenderOptions) -> list[dict]:
    # A PDB on a single replica blocks node drains forever (kubernetes#93476): only with replicas > 1.
    if opts.replicas <= 1:
        return []
    return [{"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(WEBHOOK_NAME, "webhook", opts),
             "spec": {"minAvailable": 1, "selector": {"matchLabels": _selector_labels("webhook")}}}]


def service(opts: RenderOptions) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(WEBHOOK_NAME, "webhook", opts),
            "spec": {"type": "ClusterIP", "selector": _selector_labels("webhook"),
                     "ports": [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]}}


def _client_config(opts: RenderOptions, path: str) -> dict:
    return {"service": {"name": WEBHOOK_NAME, "namespace": opts.namespace, "path": path, "port": 443}}


def mutating_webhook_configuration(opts: RenderOptions) -> dict:
    """Two webhooks, because a label selector is an AND of requirements and Istio injects a namespace when
    `istio-injection=enabled` OR (`istio.io/rev` is set AND `istio-injection` is absent). Each of ours is
    `bpfinit.io/enabled=true` AND one of those two branches, so they are disjoint: a pod is sent to at most
    one of them, exactly as Istio's own `namespace.` / `rev.namespace.` webhooks split it.
    """
    rules = [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
              "scope": "Namespaced"}]
    common = {
        "admissionReviewVersions": ["v1"],
        "clientConfig": _client_config(opts, MUTATE_PATH),
        "failurePolicy": "Ignore",            # we are down => pods keep istio-init, which is safe
        "matchPolicy": "Equivalent",
        "reinvocationPolicy": "IfNeeded",     # called again after Istio injects, whatever the order
        "rules": rules,
        "sideEffects": "None",
        "timeoutSeconds": 5,
    }
    opt_in = {"key": OPT_IN_LABEL, "operator": "In", "values": ["true"]}
    injection_ns = {**copy.deepcopy(common), "name": "injection-namespace.mutator.bpfinit.io",
                    "namespaceSelector": {"matchExpressions": [
                        opt_in, {"key": "istio-injection", "operator": "In", "values": ["enabled"]},
                        _not_in_excluded(opts)]}}
    revision_ns = {**copy.deepcopy(common), "name": "revision-namespace.mutator.bpfinit.io",
                   "namespaceSelector": {"matchExpressions": [
                       opt_in, {"key": "istio.io/rev", "operator": "Exists"},
                       {"key": "istio-injection", "operator": "DoesNotExist"},
                       _not_in_excluded(opts)]}}
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": _meta(MUTATOR_CONFIG, "webhook", opts, namespaced=False),
            "webhooks": [injection_ns, revision_ns]}


VALIDATED_KINDS = [
    ("", ["pods", "replicationcontrollers"]),
    ("apps", ["deployments", "statefulsets", "daemonsets", "replicasets"]),
    ("batch", ["jobs", "cronjobs"]),
]
# Subresources that change what runs in a pod. `pods` alone does not match them: without this rule
# `kubectl debug` (an UPDATE of pods/ephemeralcontainers) never reaches the validator. Only UPDATE exists.
VALIDATED_SUBRESOURCES = [
    ("", ["pods/ephemeralcontainers"]),
]


def validating_webhook_configuration(opts: RenderOptions) -> dict:
    """Fail closed on the final state of pods and of every workload template that makes pods.

    No objectSelector: object labels are set by the very users the policy constrains. The namespace
    exclusion uses `kubernetes.io/metadata.name`, which the apiserver sets and users cannot forge.
    """
    rules = [{"operations": ["CREATE", "UPDATE"], "apiGroups": [group], "apiVersions": ["v1"],
              "resources": resources, "scope": "Namespaced"} for group, resources in VALIDATED_KINDS]
    rules += [{"operations": ["UPDATE"], "apiGroups": [group], "apiVersions": ["v1"],
               "resources": resources, "scope": "Namespaced"} for group, resources in VALIDATED_SUBRESOURCES]
    hook = {
        "name": "egress-bypass.validator.bpfinit.io",
        "admissionReviewVersions": ["v1"],
        "clientConfig": _client_config(opts, VALIDATE_PATH),
        # warn-first: while policies are in Warn, an outage must not block every pod in the cluster.
        "failurePolicy": "Ignore" if opts.rollout == "warn-first" else "Fail",
        "matchPolicy": "Equivalent",
        "namespaceSelector": {"matchExpressions": [_not_in_excluded(opts)]},
        "rules": rules,
        "sideEffects": "None",
        "timeoutSeconds": 10,
    }
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": _meta(VALIDATOR_CONFIG, "webhook", opts, namespaced=False), "webhooks": [hook]}


def _gc_container(opts: RenderOptions) -> dict:
    """`bpfinit-agent gc --every`: dead pods' pins and entries go without an operator scheduling gc.

    Capabilities: only CAP_BPF. gc opens pinned maps and links (BPF_OBJ_GET), reads and deletes map
    entries, reads link info (has the kernel released the cgroup?) and unlinks pins. The pins are root's
    own 0600 files, so uid 0 without CAP_DAC_OVERRIDE may open and unlink them; kernels before 6.5 refuse
    every bpf() command without CAP_BPF when kernel.unprivileged_bpf_disabled is set (the usual default),
    so CAP_BPF is needed on the supported 5.15+ kernels. No CAP_SYS_ADMIN (no mounts, no bpffs
    privileges beyond file permissions), no CAP_NET_ADMIN (nothing is attached or detached: unpinning a
    link lets the kernel drop it), no CAP_PERFMON (no ring buffer). The node's cgroup v2 tree (liveness:
    the pod cgroup ids) is mounted read-only at /host/sys/fs/cgroup, where gc's root detection finds it
    (cgroup.CANDIDATE_ROOTS; on hybrid nodes /host/sys/fs/cgroup/unified): the container's own
    /sys/fs/cgroup is a cgroup namespace's view, a sub-cgroup, which gc never takes for the root.
    tests/agent/test_gc_every.py runs gc with CAP_BPF alone.
    """
    return {
        "name": "gc",
        "image": opts.agent_image or opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bpfinit-agent", "gc"],
        "args": [f"--every={opts.gc_every}", "--json", "--bpffs=/sys/fs/bpf"],
        "resources": {"requests": {"cpu": "5m", "memory": "32Mi"}, "limits": {"memory": "96Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"drop": ["ALL"], "add": ["BPF"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
                         {"name": "host-cgroup", "mountPath": HOST_CGROUP_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def exporter(opts: RenderOptions) -> list[dict]:
    """Per-node observer: reads the pinned counters/ring buffer and serves Prometheus metrics.

    It runs as root (bpffs pins are root-owned 0600) with only CAP_BPF + CAP_PERFMON, read-only root FS,
    no API token (pod identity comes from the pins, written by each pod's agent from the downward API).
    Its second container, `gc`, removes the pins and entries of dead pods every `opts.gc_every`.
    hostPath volumes and uid 0 are Pod Security `privileged`: the DaemonSet, its ServiceAccount and their
    namespace (`opts.node_namespace`, never the webhook's restricted one) are this file's objects.
    """
    selector = _selector_labels("exporter")
    container = {
        "name": "exporter",
        "image": opts.agent_image or opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bpfinit-agent", "exporter"],
        "args": ["--bpffs=/sys/fs/bpf", f"--listen=0.0.0.0:{EXPORTER_PORT}"],
        "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 30,
                          "timeoutSeconds": 5},
        "resources": {"requests": {"cpu": "20m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"drop": ["ALL"], "add": ["BPF", "PERFMON"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    ds = {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _node_meta(EXPORTER_NAME, "exporter", opts),
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
            "template": {
                "metadata": {"labels": _labels("exporter", opts),
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(EXPORTER_PORT)}},
                "spec": {
                    "serviceAccountName": EXPORTER_NAME,
                    "automountServiceAccountToken": False,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],   # every node that can run Istio pods
                    "containers": [container, *([_gc_container(opts)] if opts.gc_every else [])],
                    "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
                                {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                                *([{"name": "host-cgroup", "hostPath": {"path": "/sys/fs/cgroup",
                                                                        "type": "Directory"}}]
                                  if opts.gc_every else [])],
                },
            },
        },
    }
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _node_meta(EXPORTER_NAME, "exporter", opts),
          "automountServiceAccountToken": False}
    return [node_namespace(opts), sa, ds]


# ---- cert modes and rollout ------------------------------------------------------------------------

def apply_builtin_certs(objs: list[dict], opts: RenderOptions) -> list[dict]:
    """`bpfinit-webhook certs` makes/rotates the shared Secret and patches caBundle.

    An init container runs it once, so the server starts with its certificate in the shared in-memory
    volume; a sidecar keeps running it to re-patch caBundle (e.g. after `kubectl apply` blanked it) and to
    rotate before expiry. The server reloads the files without a restart.
    """
    objs = copy.deepcopy(objs)
    certs_args = [f"--namespace={opts.namespace}", f"--secret={TLS_SECRET}",
                  f"--service={WEBHOOK_NAME}", f"--mutating-webhook-configuration={MUTATOR_CONFIG}",
                  f"--validating-webhook-configuration={VALIDATOR_CONFIG}", f"--out-dir={TLS_DIR}"]
    base = {"image": opts.image, "imagePullPolicy": "IfNotPresent", "command": ["bpfinit-webhook", "certs"],
            "securityContext": _restricted_container_security(),
            "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}},
            "volumeMounts": [{"name": "tls", "mountPath": TLS_DIR}]}
    for obj in objs:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == WEBHOOK_NAME:
            spec = obj["spec"]["template"]["spec"]
            spec["initContainers"] = [{"name": "certs-init", **copy.deepcopy(base), "args": ["--once", *certs_args]}]
            # kustomize's strategic merge puts added list items first; keep the same order here.
            spec["containers"].insert(0, {"name": "certs", **copy.deepcopy(base), "args": certs_args})
    return objs + builtin_certs_rbac(opts)


def apply_cert_manager(objs: list[dict], opts: RenderOptions) -> list[dict]:
    """cert-manager issues the serving cert into the Secret; cainjector fills caBundle on both configs."""
    objs = copy.deepcopy(objs)
    inject = {"cert-manager.io/inject-ca-from": f"{opts.namespace}/{WEBHOOK_NAME}"}
    for obj in objs:
        if obj["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            obj["metadata"].setdefault("annotations", {}).update(inject)
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == WEBHOOK_NAME:
            for vol in obj["spec"]["template"]["spec"]["volumes"]:
                if vol["name"] == "tls":
                    vol.clear()
                    vol.update({"name": "tls", "secret": {"secretName": TLS_SECRET, "defaultMode": 0o440}})
    return objs + cert_manager_objects(opts)


def cert_manager_objects(opts: RenderOptions) -> list[dict]:
    svc_dns = [f"{WEBHOOK_NAME}.{opts.namespace}.svc", f"{WEBHOOK_NAME}.{opts.namespace}.svc.cluster.local"]
    selfsigned = f"{WEBHOOK_NAME}-selfsigned"
    ca = f"{WEBHOOK_NAME}-ca"
    return [
        # A self-signed issuer bootstraps a namespace-local CA; the CA issues the short-lived serving cert.
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": _meta(selfsigned, "webhook", opts),
         "spec": {"selfSigned": {}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": _meta(ca, "webhook", opts),
         "spec": {"isCA": True, "commonName": ca, "secretName": ca, "duration": "87600h",
                  "privateKey": {"algorithm": "ECDSA", "size": 256},
                  "issuerRef": {"kind": "Issuer", "name": selfsigned, "group": "cert-manager.io"}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": _meta(ca, "webhook", opts),
         "spec": {"ca": {"secretName": ca}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": _meta(WEBHOOK_NAME, "webhook", opts),
         "spec": {"secretName": TLS_SECRET, "dnsNames": svc_dns, "duration": "2160h", "renewBefore": "720h",
                  "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                  "usages": ["server auth", "digital signature", "key encipherment"],
                  "issuerRef": {"kind": "Issuer", "name": ca, "group": "cert-manager.io"}}},
    ]


def apply_warn_first(objs: list[dict], opts: RenderOptions) -> list[dict]:
    """First rollout step: the validator fails open, every policy in the set runs in Warn mode, and so
    does every policy without its own mode (settings defaultMode)."""
    objs = copy.deepcopy(objs)
    for obj in objs:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == POLICY_CONFIGMAP:
            obj["data"][POLICY_FILE_KEY] = policy_settings_text(replace(opts, rollout="warn-first"))
        if obj["kind"] == "ValidatingWebhookConfiguration":
            for hook in obj["webhooks"]:
                hook["failurePolicy"] = "Ignore"
        if obj.get("apiVersion", "").startswith(POLICY_GROUP + "/") and isinstance(obj.get("spec"), dict) \
                and "mode" in obj["spec"]:
            obj["spec"]["mode"] = "Warn"
    return objs


# ---- whole sets ------------------------------------------------------------------------------------

def render_base(opts: RenderOptions, crd_docs: list[dict]) -> dict[str, list[dict]]:
    """The objects of `manifests/base`, by file name (the CRD file is not ours)."""
    base_opts = replace(opts, certs="none", rollout="enforce")
    files = {
        "namespace.yaml": [namespace(base_opts)],
        "rbac.yaml": [service_account(base_opts), *policy_cluster_role(base_opts, crd_docs)],
        "deployment.yaml": [deployment(base_opts), *pod_disruption_budget(base_opts)],
        "policy-configmap.yaml": [policy_configmap(base_opts)],
        "service.yaml": [service(base_opts)],
        "webhook-configurations.yaml": [mutating_webhook_configuration(base_opts),
                                        validating_webhook_configuration(base_opts)],
    }
    if opts.exporter:
        files["exporter.yaml"] = exporter(base_opts)
    return files


def render(opts: RenderOptions, crd_docs: list[dict], example_docs: list[dict] = ()) -> list[dict]:
    """The whole deployable set for `opts` (same objects as the matching kustomize overlay), plus
    `example_docs` (manifests/examples: the sample policy and its namespace) when given."""
    check_options(opts)
    webhook_objs = []
    for docs in render_base(opts, crd_docs).values():
        webhook_objs.extend(docs)
    # The webhook configurations read excluded_namespaces(opts), which depends on the cert mode.
    webhook_objs = [mutating_webhook_configuration(opts) if o["kind"] == "MutatingWebhookConfiguration"
                    else validating_webhook_configuration(opts) if o["kind"] == "ValidatingWebhookConfiguration"
                    else o for o in webhook_objs]
    objs = [*copy.deepcopy(crd_docs), *webhook_objs, *copy.deepcopy(list(example_docs))]
    if opts.certs == "builtin":
        objs = apply_builtin_certs(objs, opts)
    elif opts.certs == "cert-manager":
        objs = apply_cert_manager(objs, opts)
    if opts.rollout == "warn-first":
        objs = apply_warn_first(objs, opts)
    return objs


# ---- files and CLI -------------------------------------------------------------------------------

def load_yaml_docs(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except FileNotFoundError:
        raise RenderError(f"missing {path} (written by the policy engine; is this a full bpfinit checkout?)")
    except yaml.YAMLError as exc:
        raise RenderError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}")
    if not all(isinstance(d, dict) and d.get("kind") for d in docs):
        raise RenderError(f"{path} holds a YAML document that is not a Kubernetes object")
    return docs


def load_example_docs() -> list[dict]:
    docs = []
    for name in EXAMPLE_FILES:
        docs.extend(load_yaml_docs(EXAMPLES_DIR / name))
    return docs


class _BlockStringDumper(yaml.SafeDumper):
    """Multi-line strings (the policy settings file in its ConfigMap) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStringDumper.add_representer(str, _represent_str)


def dump_yaml(objs: list[dict]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_BlockStringDumper, sort_keys=False, default_flow_style=False)
                         for o in objs)


GENERATED_HEADER = ("# Generated from webhook/render.py by `bpfinit-webhook manifests --write-kustomize manifests`.\n"
                    "# Do not edit: change render.py and regenerate (tests/deploy checks they agree).\n")


def kustomize_generated_files(crd_docs: list[dict]) -> dict[str, list[dict]]:
    """Files under manifests/ that are generated (relative path -> objects); the rest is hand-written."""
    opts = RenderOptions()
    files = {f"base/{name}": docs for name, docs in render_base(opts, crd_docs).items()}
    files["overlays/builtin-certs/certs-rbac.yaml"] = builtin_certs_rbac(opts)
    files["overlays/cert-manager/certificates.yaml"] = cert_manager_objects(opts)
    # A strategic-merge patch: the warn-first settings (defaultMode Warn) in the policy ConfigMap.
    warn = policy_configmap(replace(opts, rollout="warn-first"))
    files["components/warn-first/policy-settings.yaml"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": POLICY_CONFIGMAP, "namespace": opts.namespace},
         "data": warn["data"]}]
    return files


def write_kustomize(manifests_dir: Path, crd_docs: list[dict]) -> list[Path]:
    written = []
    for rel, docs in kustomize_generated_files(crd_docs).items():
        path = manifests_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(GENERATED_HEADER + dump_yaml(docs))
        written.append(path)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpfinit-webhook manifests",
                                description="Render bpfinit's Kubernetes manifests as one YAML stream.")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="bpfinit image (webhook, certs, exporter)")
    p.add_argument("--agent-image", default=None, help="image for the swapped init container (default: --image)")
    p.add_argument("--accepted-agent-image", action="append", default=[], dest="accepted_agent_images",
                   help="another agent image the webhook accepts as its own, e.g. the previous --agent-image "
                        "during an upgrade (repeatable; env BPFINIT_ACCEPTED_AGENT_IMAGES)")
    p.add_argument("--accepted-istio-image", action="append", default=[], dest="accepted_istio_images",
                   help="opt-in: an image Istio's istio-init / istio-validation / istio-proxy may carry, exact or "
                        "REPOSITORY:* for any tag or digest (repeatable; env BPFINIT_ACCEPTED_ISTIO_IMAGES; "
                        "default: Istio's images are not checked)")
    p.add_argument("--mesh-privileged-proxies", action="store_true",
                   help="opt-in: the mesh sets Istio's values.global.proxy.privileged, so Istio's privileged "
                        "istio-init / istio-proxy shape is exempt; combine with --accepted-istio-image "
                        "(env BPFINIT_MESH_PRIVILEGED_PROXIES; default: off)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--node-namespace", default=DEFAULT_NODE_NAMESPACE,
                   help="namespace of the exporter/gc DaemonSet (Pod Security privileged; default %(default)s)")
    p.add_argument("--certs", choices=CERT_MODES, default="builtin",
                   help="builtin: the webhook makes its own CA; cert-manager: Certificate + cainjector")
    p.add_argument("--rollout", choices=ROLLOUTS, default="enforce",
                   help="warn-first: validator fails open and policies run in Warn mode")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--exclude-namespace", action="append", default=[], dest="exclude",
                   help="another namespace neither webhook may see (repeatable)")
    p.add_argument("--no-exporter", action="store_true",
                   help="leave out the observer/exporter DaemonSet (and with it the per-node gc)")
    p.add_argument("--gc-every", default=GC_EVERY, metavar="DURATION",
                   help=f"how often the exporter DaemonSet's gc container collects dead pods' pins on each node "
                        f"(Go duration, at least 10s; default {GC_EVERY})")
    p.add_argument("--no-gc", action="store_true",
                   help="leave out the gc container (then schedule `bpfinit-agent gc` on each node yourself)")
    p.add_argument("--sample-policy", action="store_true",
                   help="also render manifests/examples: the sample egress policy and its namespace")
    # Accepted for old scripts: the sample is no longer rendered unless asked for.
    p.add_argument("--no-sample-policy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info")
    p.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    p.add_argument("--write-kustomize", metavar="DIR", default=None,
                   help="(maintainers) regenerate the generated files of the kustomize tree DIR and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        crd_docs = load_yaml_docs(BASE_DIR / POLICY_CRD_FILE)
        if args.write_kustomize:
            for path in write_kustomize(Path(args.write_kustomize), crd_docs):
                print(f"wrote {path}", file=sys.stderr)
            return 0
        example_docs = load_example_docs() if args.sample_policy and not args.no_sample_policy else []
        opts = RenderOptions(image=args.image, agent_image=args.agent_image,
                             accepted_agent_images=tuple(args.accepted_agent_images),
                             accepted_istio_images=tuple(args.accepted_istio_images),
                             mesh_privileged_proxies=args.mesh_privileged_proxies, namespace=args.namespace,
                             node_namespace=args.node_namespace,
                             certs=args.certs, rollout=args.rollout, replicas=args.replicas,
                             extra_excluded_namespaces=tuple(args.exclude), exporter=not args.no_exporter,
                             gc_every=None if args.no_gc else args.gc_every, log_level=args.log_level)
        text = dump_yaml(render(opts, crd_docs, example_docs))
    except RenderError as exc:
        print(f"bpfinit-webhook manifests: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
