"""Every rendered workload's pod template against the Pod Security Standards level its namespace enforces.

The other tests check manifests one by one; Pod Security admission checks a pod against its *namespace's*
`pod-security.kubernetes.io/enforce` label. The exporter/gc DaemonSet (hostPath, uid 0, CAP_BPF) once lived
in the webhook's `restricted` namespace, where every one of its pods would have been refused. The checks
below are the relevant ones of https://kubernetes.io/docs/concepts/security/pod-security-standards/,
written out plainly (no external tool); `privileged` allows everything.
"""
from __future__ import annotations

import copy

import pytest

from tests.deploy.test_manifests import _all_sets
from webhook import render

LEVELS = ("privileged", "baseline", "restricted")
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
# A namespace without the enforce label gets the cluster's default level: we always set it, and a
# missing one is a failure here.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
WORKLOAD_KINDS = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "ReplicationController",
                  "Job", "CronJob"}


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def baseline_violations(spec: dict) -> list[str]:
    out = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"{key}: true")
    psc = spec.get("securityContext") or {}
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod windowsOptions.hostProcess")
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod seccompProfile Unconfined")
    for vol in spec.get("volumes", []):
        if "hostPath" in vol:
            out.append(f"hostPath volume {vol['name']!r}")
    for c in _containers(spec):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: windowsOptions.hostProcess")
        extra = set((sc.get("capabilities") or {}).get("add", [])) - BASELINE_CAPABILITIES
        if extra:
            out.append(f"{name}: capabilities beyond baseline {sorted(extra)}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{name}: seccompProfile Unconfined")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {sc['procMount']}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
    return out


def restricted_violations(spec: dict) -> list[str]:
    out = baseline_violations(spec)
    psc = spec.get("securityContext") or {}
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {vol['name']!r} of type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in _containers(spec):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        non_root = sc["runAsNonRoot"] if "runAsNonRoot" in sc else psc.get("runAsNonRoot")
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp or 'unset'} (RuntimeDefault or Localhost needed)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities do not drop ALL")
        extra = set(caps.get("add", [])) - RESTRICTED_CAPABILITIES
        if extra:
            out.append(f"{name}: capabilities beyond NET_BIND_SERVICE {sorted(extra)}")
    return out


def violations(spec: dict, level: str) -> list[str]:
    assert level in LEVELS, level
    if level == "privileged":
        return []
    return baseline_violations(spec) if level == "baseline" else restricted_violations(spec)


def pod_security_problems(objs: list[dict]) -> list[str]:
    """Each workload checked against the enforce level of the namespace the same set creates."""
    levels = {o["metadata"]["name"]: (o["metadata"].get("labels") or {}).get(ENFORCE_LABEL)
              for o in objs if o["kind"] == "Namespace"}
    problems = []
    for obj in objs:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        ns = obj["metadata"].get("namespace")
        where = f"{obj['kind']} {ns}/{obj['metadata']['name']}"
        if ns not in levels:
            problems.append(f"{where}: namespace not created by this set")
        elif levels[ns] not in LEVELS:
            problems.append(f"{where}: namespace has no valid {ENFORCE_LABEL} label ({levels[ns]!r})")
        else:
            problems.extend(f"{where} in {levels[ns]} namespace: {v}" for v in violations(pod_spec(obj), levels[ns]))
    return problems


_SETS = _all_sets()
_SETS.append(("render node-namespace=mesh-node",
              render.render(render.RenderOptions(node_namespace="mesh-node"),
                            render.load_yaml_docs(render.BASE_DIR / render.POLICY_CRD_FILE))))


@pytest.mark.parametrize("label,objs", _SETS, ids=[s[0] for s in _SETS])
def test_every_workload_meets_its_namespaces_pod_security_level(label, objs):
    assert any(o["kind"] == "DaemonSet" for o in objs) and any(o["kind"] == "Deployment" for o in objs)
    assert pod_security_problems(objs) == []


@pytest.mark.parametrize("label,objs", _SETS, ids=[s[0] for s in _SETS])
def test_the_webhook_namespace_is_restricted_and_the_node_one_holds_only_the_daemonset(label, objs):
    namespaces = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objs if o["kind"] == "Namespace"}
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
    web_ns, node_ns = deploy["metadata"]["namespace"], ds["metadata"]["namespace"]
    assert web_ns != node_ns
    assert namespaces[web_ns][ENFORCE_LABEL] == "restricted"
    assert namespaces[node_ns][ENFORCE_LABEL] == "privileged"
    assert namespaces[node_ns]["istio-injection"] == namespaces[web_ns]["istio-injection"] == "disabled"
    for key, value in render.COMMON_LABELS.items():
        assert namespaces[node_ns][key] == namespaces[web_ns][key] == value
    # nothing but the node components in the privileged namespace
    in_node = {(o["kind"], o["metadata"]["name"]) for o in objs if o["metadata"].get("namespace") == node_ns}
    assert in_node == {("DaemonSet", render.EXPORTER_NAME), ("ServiceAccount", render.EXPORTER_NAME)}
    # neither webhook ever sees the node namespace: its pods must start whether or not the webhook is up
    for conf in [o for o in objs if o["kind"].endswith("WebhookConfiguration")]:
        for hook in conf["webhooks"]:
            (names,) = [e["values"] for e in hook["namespaceSelector"]["matchExpressions"]
                        if e["key"] == "kubernetes.io/metadata.name"]
            assert {"kube-system", web_ns, node_ns} <= set(names), (conf["metadata"]["name"], hook["name"])
    (web,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "webhook"]
    assert f"--namespace={web_ns}" in web["args"] and f"--node-namespace={node_ns}" in web["args"]


def test_the_check_catches_the_old_layout():
    """The exporter DaemonSet in the webhook's restricted namespace (as before bpfinit-node) is refused."""
    objs = copy.deepcopy(_SETS[1][1])   # kustomize overlays/builtin-certs
    for obj in objs:
        if obj["kind"] in ("DaemonSet", "ServiceAccount") and obj["metadata"]["name"] == render.EXPORTER_NAME:
            obj["metadata"]["namespace"] = render.DEFAULT_NAMESPACE
    objs = [o for o in objs if not (o["kind"] == "Namespace" and o["metadata"]["name"] == render.DEFAULT_NODE_NAMESPACE)]
    problems = pod_security_problems(objs)
    text = "\n".join(problems)
    assert problems and all(p.startswith("DaemonSet bpfinit-system/bpfinit-exporter in restricted") for p in problems)
    for needle in ("hostPath volume 'bpffs'", "hostPath volume 'host-cgroup'", "exporter: runAsUser 0",
                   "gc: runAsNonRoot is not true", "exporter: capabilities beyond NET_BIND_SERVICE ['BPF', 'PERFMON']",
                   "gc: capabilities beyond NET_BIND_SERVICE ['BPF']"):
        assert needle in text, text
    # CAP_BPF/CAP_PERFMON and hostPath are beyond baseline too: baseline would not have been enough either
    ds = [o for o in objs if o["kind"] == "DaemonSet"][0]
    assert violations(pod_spec(ds), "baseline") and violations(pod_spec(ds), "privileged") == []


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s.update(hostNetwork=True), "hostNetwork: true"),
    (lambda s: s.update(hostPID=True), "hostPID: true"),
    (lambda s: s.update(hostIPC=True), "hostIPC: true"),
    (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    (lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation is not false"),
    (lambda s: s["containers"][0]["securityContext"].pop("seccompProfile") and s["securityContext"].pop("seccompProfile"),
     "seccompProfile unset"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "do not drop ALL"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
     "beyond NET_BIND_SERVICE"),
    (lambda s: s["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser 0"),
    (lambda s: s["volumes"].append({"name": "x", "hostPath": {"path": "/"}}), "hostPath volume 'x'"),
])
def test_each_restricted_check_fires(mutate, needle):
    (deploy,) = [o for o in _SETS[1][1] if o["kind"] == "Deployment"]
    spec = copy.deepcopy(pod_spec(deploy))
    assert violations(spec, "restricted") == []
    mutate(spec)
    assert any(needle in v for v in violations(spec, "restricted")), violations(spec, "restricted")


def test_baseline_allows_its_capabilities_but_not_more():
    spec = {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["CHOWN", "NET_BIND_SERVICE"]}}}]}
    assert violations(spec, "baseline") == []
    assert violations(spec, "restricted")   # no drop ALL, no runAsNonRoot, ...
    spec["containers"][0]["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    assert violations(spec, "baseline") == ["c: capabilities beyond baseline ['SYS_ADMIN']"]
