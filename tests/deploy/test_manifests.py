"""Manifests: kustomize overlays build (Debian's kubectl), agree with `bpfinit-webhook manifests`, validate
against the Kubernetes schemas (kubernetes-validate), and meet R10-R12 of admission-webhook-practices §5.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from webhook import render

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
K8S_VERSIONS = ("1.29", "1.30", "1.33")   # oldest we support (native sidecars beta) .. recent

# overlay directory -> the render options it must be equal to
OVERLAYS = {
    "overlays/builtin-certs": render.RenderOptions(certs="builtin"),
    "overlays/cert-manager": render.RenderOptions(certs="cert-manager"),
    "overlays/warn-first": render.RenderOptions(certs="builtin", rollout="warn-first"),
}
BUILDS = {"base": render.RenderOptions(certs="none"), **OVERLAYS}

# Istio's configuration names (istio-capture-contract §2.4): the largest names a DNS-1123 subdomain allows.
ISTIO_CONFIG_NAMES = ["istio-sidecar-injector", "istio-sidecar-injector-canary", "istio-sidecar-injector-1-24-0",
                      "istio-revision-tag-default", "istio-revision-tag-" + "z" * 44,
                      "istio-sidecar-injector-" + "z" * 40 + ".z"]


def _crd_docs():
    return render.load_yaml_docs(render.BASE_DIR / render.POLICY_CRD_FILE)


def _example_docs():
    return render.load_example_docs()


def _key(obj):
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def _by_key(objs):
    out = {}
    for obj in objs:
        assert _key(obj) not in out, f"duplicate object {_key(obj)}"
        out[_key(obj)] = obj
    return out


_BUILT: dict[str, list[dict]] = {}


def kustomize(overlay: str) -> list[dict]:
    if overlay not in _BUILT:
        proc = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / overlay)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed: {proc.stderr}"
        _BUILT[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return copy.deepcopy(_BUILT[overlay])


def rendered(opts: render.RenderOptions, examples: bool = False) -> list[dict]:
    return render.render(opts, _crd_docs(), _example_docs() if examples else [])


def _all_sets():
    """(label, objects) for every overlay build and a few non-default renders."""
    sets = [(f"kustomize {o}", kustomize(o)) for o in BUILDS]
    sets.append(("render ns=mesh-admission", rendered(render.RenderOptions(namespace="mesh-admission",
                                                                            extra_excluded_namespaces=("istio-system",)))))
    sets.append(("render cert-manager replicas=1", rendered(render.RenderOptions(certs="cert-manager", replicas=1))))
    return sets


def _webhook_namespace(objs):
    """The webhook's Namespace object (the set also creates the node DaemonSet's)."""
    name = _only(objs, "Deployment")["metadata"]["namespace"]
    (ns,) = [o for o in objs if o["kind"] == "Namespace" and o["metadata"]["name"] == name]
    return ns


def _only(objs, kind):
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---- the generated files are what render.py says -------------------------------------------------

def test_generated_files_are_current():
    for rel, docs in render.kustomize_generated_files(_crd_docs()).items():
        on_disk = [d for d in yaml.safe_load_all((MANIFESTS / rel).read_text()) if d]
        assert on_disk == docs, (f"manifests/{rel} is stale: run "
                                 f"`.venv/bin/bpfinit-webhook manifests --write-kustomize manifests`")


@pytest.mark.parametrize("overlay", list(BUILDS))
def test_kustomize_overlay_equals_render(overlay):
    built = _by_key(kustomize(overlay))
    expected = _by_key(rendered(BUILDS[overlay]))
    assert set(built) == set(expected)
    for key in expected:
        assert built[key] == expected[key], f"{overlay}: {key} differs from render()"


# ---- schemas -----------------------------------------------------------------------------------

def _crd_schema(crds, obj):
    group, version = obj["apiVersion"].split("/")
    for crd in crds:
        spec = crd["spec"]
        if spec["group"] == group and spec["names"]["kind"] == obj["kind"]:
            for ver in spec["versions"]:
                if ver["name"] == version:
                    return ver["schema"]["openAPIV3Schema"]
    return None


def test_every_object_validates_against_its_schema():
    """Built-in kinds: the Kubernetes JSON schemas (strict: no unknown fields). Our CRD kinds: the CRD's own
    openAPIV3Schema. cert-manager kinds have no schema here: their structure is asserted in the next test."""
    checked = {"k8s": 0, "crd": 0, "structure": 0}
    with_examples = ("render with examples", rendered(render.RenderOptions(), examples=True))
    for label, objs in [*_all_sets(), with_examples]:
        crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
        for obj in objs:
            group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
            if group == "cert-manager.io":
                checked["structure"] += 1
                continue
            schema = _crd_schema(crds, obj) if group == render.POLICY_GROUP else None
            if group == render.POLICY_GROUP:
                assert schema is not None, f"{label}: no CRD in the set serves {obj['apiVersion']} {obj['kind']}"
                jsonschema.validate(obj, schema)
                checked["crd"] += 1
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{label}: {_key(obj)} invalid for Kubernetes {version}: {exc}")
            checked["k8s"] += 1
    assert checked["k8s"] > 50 and checked["crd"] >= 1 and checked["structure"] >= 4


def test_examples_build_and_validate_against_the_base_crd():
    """manifests/examples (sample policy + its namespace) is what `manifests --sample-policy` adds."""
    examples = kustomize("examples")
    assert sorted(_key(o) for o in examples) == [
        ("EgressBypassPolicy", "high-performance-app", "allow-kafka-egress"),
        ("Namespace", "", "high-performance-app")]
    assert _by_key(examples) == _by_key(_example_docs())
    full = _by_key(rendered(render.RenderOptions(), examples=True))
    assert all(full[_key(o)] == o for o in examples)
    crds = [o for o in kustomize("base") if o["kind"] == "CustomResourceDefinition"]
    for obj in examples:
        if obj["kind"] == "Namespace":
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
        else:
            jsonschema.validate(obj, _crd_schema(crds, obj))
    # and the policy engine accepts the sample as it is shipped
    from webhook import policy
    policies = policy.parse_policy_documents([o for o in examples if o["kind"] == "EgressBypassPolicy"], "examples")
    assert policies.allow_list_for("high-performance-app", {"app": "producer"}) == ["172.20.0.0/16:9092"]


_CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                   "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}


@pytest.mark.parametrize("overlay", list(BUILDS))
def test_every_namespaced_object_lives_in_a_namespace_the_build_creates(overlay):
    """`kubectl apply -k` of a build on an empty cluster must not fail with 'namespaces ... not found'
    (the sample policy in high-performance-app used to be in the base)."""
    objs = kustomize(overlay)
    created = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    for obj in objs:
        if obj["kind"] not in _CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") in created, f"{overlay}: {_key(obj)}"


def _webhook_container(objs):
    deploy = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == render.WEBHOOK_NAME][0]
    pod = deploy["spec"]["template"]["spec"]
    return [c for c in pod["containers"] if c["name"] == "webhook"][0], pod


@pytest.mark.parametrize("overlay", list(BUILDS))
def test_server_watches_policy_crds_and_reads_settings_from_its_configmap(overlay):
    from webhook import cli, policy
    objs = kustomize(overlay)
    web, pod = _webhook_container(objs)
    # The real CLI parser accepts the Deployment's command line, with the values we mean.
    args = cli.build_parser().parse_args([*web["command"][1:], *web["args"]])
    assert args.command == "serve" and args.policy_crds == "on"
    assert args.namespace == render.DEFAULT_NAMESPACE
    assert args.policy == f"{render.POLICY_DIR}/{render.POLICY_FILE_KEY}"
    (mount,) = [m for m in web["volumeMounts"] if m["mountPath"] == render.POLICY_DIR]
    assert mount.get("readOnly") is True and "subPath" not in mount   # subPath mounts never see updates
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = _by_key(objs)[("ConfigMap", render.DEFAULT_NAMESPACE, volume["configMap"]["name"])]
    settings = policy.parse_policy_text(cm["data"][render.POLICY_FILE_KEY], overlay).settings
    assert settings.cluster_policy_namespace == render.DEFAULT_NAMESPACE
    assert settings.default_mode == ("Warn" if "warn-first" in overlay else "Enforce")


def test_rendered_settings_follow_the_chosen_namespace():
    from webhook import policy
    objs = rendered(render.RenderOptions(namespace="mesh-admission"))
    cm = _by_key(objs)[("ConfigMap", "mesh-admission", render.POLICY_CONFIGMAP)]
    settings = policy.parse_policy_text(cm["data"][render.POLICY_FILE_KEY], "render").settings
    assert settings.cluster_policy_namespace == settings.exemption_namespace == "mesh-admission"
    web, _pod = _webhook_container(objs)
    assert "--namespace=mesh-admission" in web["args"]


def test_cert_manager_objects_are_wired_together():
    objs = kustomize("overlays/cert-manager")
    by = _by_key(objs)
    ns = render.DEFAULT_NAMESPACE
    issuers = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Issuer"}
    certs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Certificate"}
    assert all(o["apiVersion"] == "cert-manager.io/v1" for o in [*issuers.values(), *certs.values()])
    serving = certs[render.WEBHOOK_NAME]["spec"]
    assert f"{render.WEBHOOK_NAME}.{ns}.svc" in serving["dnsNames"]
    assert serving["secretName"] == render.TLS_SECRET
    assert serving["issuerRef"]["name"] in issuers and serving["issuerRef"]["kind"] == "Issuer"
    ca_issuer = issuers[serving["issuerRef"]["name"]]["spec"]["ca"]["secretName"]
    ca_cert = [c["spec"] for c in certs.values() if c["spec"]["secretName"] == ca_issuer][0]
    assert ca_cert["isCA"] is True and "selfSigned" in issuers[ca_cert["issuerRef"]["name"]]["spec"]
    deploy = by[("Deployment", ns, render.WEBHOOK_NAME)]["spec"]["template"]["spec"]
    tls_vol = [v for v in deploy["volumes"] if v["name"] == "tls"][0]
    assert tls_vol == {"name": "tls", "secret": {"secretName": render.TLS_SECRET, "defaultMode": 0o440}}
    assert "initContainers" not in deploy and [c["name"] for c in deploy["containers"]] == ["webhook"]
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        cfg = _only(objs, kind)
        assert cfg["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/{render.WEBHOOK_NAME}"
        for hook in cfg["webhooks"]:
            assert "caBundle" not in hook["clientConfig"]
    # least privilege: with cert-manager the webhook may not touch Secrets or webhook configurations
    rules = [r for o in objs if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
    assert all(set(r["resources"]).isdisjoint({"secrets", "mutatingwebhookconfigurations",
                                                "validatingwebhookconfigurations"}) for r in rules)


# ---- R10: webhook configuration lint -------------------------------------------------------------

def _selector_matches(selector: dict, labels: dict) -> bool:
    """metav1.LabelSelector semantics (matchLabels AND every matchExpression)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _ns(name, **labels):
    return {"kubernetes.io/metadata.name": name, **{k.replace("__", "/").replace("_", "-"): v
                                                    for k, v in labels.items()}}


@pytest.mark.parametrize("label,objs", _all_sets(), ids=[s[0] for s in _all_sets()])
def test_r10_webhook_configurations(label, objs):
    mut = _only(objs, "MutatingWebhookConfiguration")
    val = _only(objs, "ValidatingWebhookConfiguration")
    ns = _webhook_namespace(objs)["metadata"]["name"]
    # sorts after every Istio injector / revision-tag configuration; nothing istiod's patcher would touch
    assert all(mut["metadata"]["name"] > name for name in ISTIO_CONFIG_NAMES)
    assert "istio.io/rev" not in (mut["metadata"].get("labels") or {})
    for cfg in (mut, val):
        for hook in cfg["webhooks"]:
            assert not hook["name"].endswith("sidecar-injector.istio.io")
            assert hook["sideEffects"] == "None"                 # R11: dry-run requests reach us
            assert hook["admissionReviewVersions"] == ["v1"]
            assert hook["clientConfig"]["service"]["namespace"] == ns
            assert hook["clientConfig"]["service"]["port"] == 443
            excl = [e for e in hook["namespaceSelector"]["matchExpressions"]
                    if e["key"] == "kubernetes.io/metadata.name"]
            assert len(excl) == 1 and excl[0]["operator"] == "NotIn"
            assert {"kube-system", ns} <= set(excl[0]["values"])
    for hook in mut["webhooks"]:
        assert hook["failurePolicy"] == "Ignore" and hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["timeoutSeconds"] <= 5
        assert hook["clientConfig"]["service"]["path"] == render.MUTATE_PATH
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
    for hook in val["webhooks"]:
        assert hook["failurePolicy"] == ("Ignore" if "warn-first" in label else "Fail")
        assert hook["timeoutSeconds"] <= 10
        assert "objectSelector" not in hook
        assert hook["clientConfig"]["service"]["path"] == render.VALIDATE_PATH
        covered = {(g, r) for rule in hook["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
        assert {("", "pods"), ("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets"),
                ("apps", "replicasets"), ("batch", "jobs"), ("batch", "cronjobs")} <= covered
        main = [rule for rule in hook["rules"] if not any("/" in r for r in rule["resources"])]
        assert all(set(rule["operations"]) == {"CREATE", "UPDATE"} for rule in main)
        # `pods` does not match its subresources: kubectl debug (UPDATE pods/ephemeralcontainers) must be
        # sent to the validator by a rule of its own, or its ephemeral-container checks are never reached.
        sub = [rule for rule in hook["rules"] if rule not in main]
        assert sub == [{"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                        "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"}]


def test_mutator_namespace_selection_follows_istio_injection():
    """Opt-in label AND Istio injection enabled; the two webhooks are disjoint (each pod is sent once)."""
    mut = _only(kustomize("overlays/builtin-certs"), "MutatingWebhookConfiguration")
    on = {"bpfinit.io/enabled": "true"}
    cases = [
        ({"istio-injection": "enabled", **on}, 1),
        ({"istio.io/rev": "canary", **on}, 1),
        ({"istio.io/rev": "default", "istio-injection": "enabled", **on}, 1),   # istio-injection wins
        ({"istio.io/rev": "canary", "istio-injection": "disabled", **on}, 0),   # Istio does not inject
        ({"istio-injection": "enabled"}, 0),                                     # not opted in
        ({"istio-injection": "enabled", "bpfinit.io/enabled": "false"}, 0),
        (on, 0),                                                                 # no Istio injection
    ]
    for labels, expected in cases:
        for name in ("shop", "kube-system", render.DEFAULT_NAMESPACE):
            hits = [h["name"] for h in mut["webhooks"]
                    if _selector_matches(h["namespaceSelector"], {"kubernetes.io/metadata.name": name, **labels})]
            want = expected if name == "shop" else 0
            assert len(hits) == want, f"namespace {name} labels {labels}: {hits}"
    val = _only(kustomize("overlays/builtin-certs"), "ValidatingWebhookConfiguration")
    sel = val["webhooks"][0]["namespaceSelector"]
    assert _selector_matches(sel, {"kubernetes.io/metadata.name": "shop"})   # every namespace, opted in or not
    assert not _selector_matches(sel, {"kubernetes.io/metadata.name": "kube-system"})


def test_cert_manager_namespace_is_never_gated_by_our_fail_closed_validator():
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for hook in _only(kustomize("overlays/cert-manager"), kind)["webhooks"]:
            assert not _selector_matches(hook["namespaceSelector"], {"kubernetes.io/metadata.name": "cert-manager",
                                                                     "bpfinit.io/enabled": "true",
                                                                     "istio-injection": "enabled"})


# ---- R12: availability; restricted security ------------------------------------------------------

@pytest.mark.parametrize("label,objs", _all_sets(), ids=[s[0] for s in _all_sets()])
def test_r12_availability_and_probes(label, objs):
    deploy = [o for o in objs if o["kind"] == "Deployment"][0]
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert _selector_matches(spec["selector"], pod_labels)
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    if spec["replicas"] > 1:
        assert spec["replicas"] >= 3
        assert len(pdbs) == 1 and pdbs[0]["spec"]["minAvailable"] == 1
        assert _selector_matches(pdbs[0]["spec"]["selector"], pod_labels)
    else:
        assert pdbs == [], "a PDB on one replica blocks node drains"
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert anti["topologyKey"] == "kubernetes.io/hostname" and _selector_matches(anti["labelSelector"], pod_labels)
    assert _selector_matches(pod["topologySpreadConstraints"][0]["labelSelector"], pod_labels)
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    web = [c for c in pod["containers"] if c["name"] == "webhook"][0]
    ports = {p["name"]: p["containerPort"] for p in web["ports"]}
    assert web["readinessProbe"]["httpGet"] == {"scheme": "HTTPS", "port": "https", "path": "/readyz"}
    assert web["livenessProbe"]["httpGet"] == {"scheme": "HTTPS", "port": "https", "path": "/healthz"}
    assert ports["https"] == render.HTTPS_PORT
    svc = _only(objs, "Service")
    assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    assert _selector_matches({"matchLabels": svc["spec"]["selector"]}, pod_labels)
    assert web["resources"]["requests"]["cpu"] and web["resources"]["limits"]["memory"]


@pytest.mark.parametrize("label,objs", _all_sets(), ids=[s[0] for s in _all_sets()])
def test_webhook_pods_meet_pod_security_restricted(label, objs):
    deploy = [o for o in objs if o["kind"] == "Deployment"][0]["spec"]["template"]["spec"]
    assert deploy["securityContext"]["runAsNonRoot"] is True
    assert deploy["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not deploy.get("hostNetwork") and not deploy.get("hostPID")
    for c in [*deploy.get("initContainers", []), *deploy["containers"]]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
    assert all("hostPath" not in v for v in deploy["volumes"])
    ns = _webhook_namespace(objs)["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted" and ns["istio-injection"] == "disabled"


def test_exporter_daemonset_has_only_bpf_capabilities():
    objs = kustomize("overlays/builtin-certs")
    ds = _only(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c, _gc = pod["containers"]
    assert c["command"] == ["bpfinit-agent", "exporter"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and not c["securityContext"].get("privileged")
    assert pod["automountServiceAccountToken"] is False and not pod.get("hostNetwork") and not pod.get("hostPID")
    assert {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v} == {
        "bpffs": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"},
        "host-cgroup": {"path": "/sys/fs/cgroup", "type": "Directory"}}
    assert {m["name"] for m in c["volumeMounts"]} == {"bpffs", "tmp"}   # the exporter never sees the cgroup tree


def test_every_node_runs_gc_every_10_minutes_with_cap_bpf_only():
    """The exporter DaemonSet's second container collects dead pods' pins (tests/agent/test_gc_every.py
    runs the same command with CAP_BPF alone)."""
    from initagent import cgroup
    for overlay in BUILDS:
        pod = _only(kustomize(overlay), "DaemonSet")["spec"]["template"]["spec"]
        (gc,) = [c for c in pod["containers"] if c["name"] == "gc"]
        assert gc["image"] == pod["containers"][0]["image"] == render.DEFAULT_IMAGE, overlay
        assert gc["command"] == ["bpfinit-agent", "gc"]
        assert gc["args"] == ["--every=10m", "--json", "--bpffs=/sys/fs/bpf"]
        sc = gc["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF"]}
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert not sc.get("privileged") and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert gc["resources"]["requests"]["cpu"] and gc["resources"]["limits"]["memory"]
        assert "ports" not in gc
        mounts = {m["mountPath"]: m for m in gc["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        bpffs = mounts["/sys/fs/bpf"]
        assert volumes[bpffs["name"]]["hostPath"]["path"] == "/sys/fs/bpf" and not bpffs.get("readOnly")
        assert bpffs["mountPropagation"] == "HostToContainer"    # a bpffs mounted after the pod started
        cg = mounts[render.HOST_CGROUP_DIR]
        assert cg["readOnly"] is True and volumes[cg["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
        assert render.HOST_CGROUP_DIR in cgroup.CANDIDATE_ROOTS   # gc's root detection looks there


def test_cli_gc_interval_and_no_gc():
    def daemonset(*args):
        proc = subprocess.run([sys.executable, "-m", "webhook.cli", "manifests", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return _only([d for d in yaml.safe_load_all(proc.stdout) if d], "DaemonSet")["spec"]["template"]["spec"]

    (gc,) = [c for c in daemonset("--gc-every=1h")["containers"] if c["name"] == "gc"]
    assert gc["args"][0] == "--every=1h"
    pod = daemonset("--no-gc")
    assert [c["name"] for c in pod["containers"]] == ["exporter"]
    assert [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v] == ["/sys/fs/bpf"]
    for bad in ("5s", "soon"):
        proc = subprocess.run([sys.executable, "-m", "webhook.cli", "manifests", f"--gc-every={bad}"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert "--gc-every" in proc.stderr


# ---- RBAC: least privilege -----------------------------------------------------------------------

def test_rbac_is_least_privilege():
    objs = kustomize("overlays/builtin-certs")
    ns = render.DEFAULT_NAMESPACE
    rules = {(o["kind"], o["metadata"]["name"]): o["rules"] for o in objs if o["kind"] in ("Role", "ClusterRole")}
    for (_, name), rs in rules.items():
        for r in rs:
            assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"], name
            assert not set(r["verbs"]) & {"delete", "deletecollection", "escalate", "bind", "impersonate"}, name
    flat = [(k, r) for k, rs in rules.items() for r in rs]
    # caBundle: only our two configurations, by name, get + patch
    for res, name in (("mutatingwebhookconfigurations", render.MUTATOR_CONFIG),
                      ("validatingwebhookconfigurations", render.VALIDATOR_CONFIG)):
        (hit,) = [r for _, r in flat if res in r["resources"]]
        assert hit["resourceNames"] == [name] and sorted(hit["verbs"]) == ["get", "patch"]
    # Secrets: only in our namespace (a Role), get/update pinned to the one Secret; create cannot be pinned
    secret_rules = [(k, r) for k, r in flat if "secrets" in r["resources"]]
    assert all(k[0] == "Role" for k, _ in secret_rules)
    assert {tuple(sorted(r["verbs"])): r.get("resourceNames") for _, r in secret_rules} == {
        ("create",): None, ("get", "update"): [render.TLS_SECRET]}
    role = [o for o in objs if o["kind"] == "Role"][0]
    assert role["metadata"]["namespace"] == ns
    # policy CRDs: read-only
    policy = [r for _, r in flat if render.POLICY_GROUP in r["apiGroups"]]
    assert policy and all(sorted(r["verbs"]) == ["get", "list", "watch"] for r in policy)
    # every binding's subject is our ServiceAccount in our namespace
    for o in objs:
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert o["subjects"] == [{"kind": "ServiceAccount", "name": render.WEBHOOK_NAME, "namespace": ns}]


# ---- the CLI ----------------------------------------------------------------------------------------

def test_cli_renders_chosen_namespace_and_image(tmp_path):
    out = tmp_path / "all.yaml"
    proc = subprocess.run([sys.executable, "-m", "webhook.cli", "manifests", "--namespace=mesh-admission",
                           "--image=registry.example/bpfinit:1.2.3", "--certs=cert-manager", f"-o={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    for o in objs:
        if o["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                             "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration") \
                and o["apiVersion"].split("/")[0] != render.POLICY_GROUP:
            node = o["metadata"]["name"] == render.EXPORTER_NAME     # the DaemonSet and its ServiceAccount
            assert o["metadata"]["namespace"] == ("bpfinit-node" if node else "mesh-admission"), _key(o)
    images = {c["image"] for o in objs if o["kind"] in ("Deployment", "DaemonSet")
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example/bpfinit:1.2.3"}
    cert = [o for o in objs if o["kind"] == "Certificate" and o["metadata"]["name"] == render.WEBHOOK_NAME][0]
    assert "bpfinit-webhook.mesh-admission.svc" in cert["spec"]["dnsNames"]
    assert not [o for o in objs if o["apiVersion"].split("/")[0] == render.POLICY_GROUP], \
        "the sample policy is only rendered on request"


def test_cli_sample_policy_adds_the_example_with_its_namespace():
    proc = subprocess.run([sys.executable, "-m", "webhook.cli", "manifests", "--sample-policy"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    (sample,) = [o for o in objs if o["kind"] == "EgressBypassPolicy"]
    assert sample["metadata"]["namespace"] in namespaces


def webhook_env(*extra: str) -> dict:
    """The webhook container's env in `bpfinit-webhook manifests *extra`."""
    proc = subprocess.run([sys.executable, "-m", "webhook.cli", "manifests", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (deploy,) = [d for d in yaml.safe_load_all(proc.stdout)
                 if d and d["kind"] == "Deployment" and d["metadata"]["name"] == render.WEBHOOK_NAME]
    container = next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "webhook")
    return {e["name"]: e.get("value") for e in container["env"]}


def test_cli_renders_accepted_agent_images_for_the_server(tmp_path):
    """The rolling-upgrade list reaches `serve` as BPFINIT_ACCEPTED_AGENT_IMAGES; without it, no env at all
    (the server then accepts exactly BPFINIT_AGENT_IMAGE)."""
    env = webhook_env("--agent-image=reg/agent:2", "--accepted-agent-image=reg/agent:1",
                      "--accepted-agent-image=reg/agent@sha256:" + "a" * 64)
    assert env["BPFINIT_AGENT_IMAGE"] == "reg/agent:2"
    assert env["BPFINIT_ACCEPTED_AGENT_IMAGES"] == "reg/agent:1,reg/agent@sha256:" + "a" * 64
    assert "BPFINIT_ACCEPTED_AGENT_IMAGES" not in webhook_env("--agent-image=reg/agent:2")


def test_cli_renders_accepted_istio_images_for_the_server():
    """The opt-in Istio image list reaches `serve` as BPFINIT_ACCEPTED_ISTIO_IMAGES (exact and REPOSITORY:*
    entries); without it, no env at all (Istio's images are then not checked)."""
    env = webhook_env("--accepted-istio-image=docker.io/istio/proxyv2:*",
                      "--accepted-istio-image=mirror.example/istio/proxyv2@sha256:" + "b" * 64)
    assert env["BPFINIT_ACCEPTED_ISTIO_IMAGES"] == "docker.io/istio/proxyv2:*,mirror.example/istio/proxyv2@sha256:" \
        + "b" * 64
    assert "BPFINIT_ACCEPTED_ISTIO_IMAGES" not in webhook_env()


def test_cli_renders_mesh_privileged_proxies_for_the_server():
    """The opt-in switch reaches `serve` as BPFINIT_MESH_PRIVILEGED_PROXIES=true, alongside the Istio image list it
    should come with; without it, no env at all (Istio's privileged shape then stays unverifiable)."""
    env = webhook_env("--mesh-privileged-proxies", "--accepted-istio-image=docker.io/istio/proxyv2:*")
    assert env["BPFINIT_MESH_PRIVILEGED_PROXIES"] == "true"
    assert env["BPFINIT_ACCEPTED_ISTIO_IMAGES"] == "docker.io/istio/proxyv2:*"
    assert "BPFINIT_MESH_PRIVILEGED_PROXIES" not in webhook_env()
    # what serve makes of the rendered value
    from webhook.cli import mesh_privileged_proxies
    assert mesh_privileged_proxies(env["BPFINIT_MESH_PRIVILEGED_PROXIES"]) is True


@pytest.mark.parametrize("args,needle", [
    (["--namespace=Bad_NS"], "not a valid namespace name"),
    (["--replicas=0"], "between 1 and 50"),
    (["--image=bad image"], "not an image reference"),
    (["--exclude-namespace=-x"], "not a valid namespace name"),
    (["--node-namespace=Node"], "--node-namespace 'Node' is not a valid namespace name"),
    (["--node-namespace=bpfinit-system"], "--node-namespace must differ from --namespace"),
    (["--accepted-agent-image=bad image"], "--accepted-agent-image 'bad image' is not an image reference"),
    (["--accepted-istio-image=docker.io/istio/*"], "--accepted-istio-image 'docker.io/istio/*' has a '*' that is "
                                                  "not a whole tag: the only wildcard is REPOSITORY:*"),
    (["--accepted-istio-image=docker.io/istio/proxyv2:1.24:*"], "is not REPOSITORY:*"),
    (["--accepted-istio-image=-x:*"], "--accepted-istio-image '-x:*' is not an image reference"),
])
def test_cli_rejects_bad_options_without_a_traceback(args, needle):
    proc = subprocess.run([sys.executable, "-m", "webhook.cli", "manifests", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
