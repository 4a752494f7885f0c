"""The mutation: swap Istio's iptables `istio-init` for the bpfinit agent (pure, plain dicts).

`mutate(pod, settings, egress_allow=None) -> MutationResult` never changes `pod`.
It returns explicit RFC 6902 add/replace operations (RFC 6901-escaped paths,
missing parents created), warnings for the apiserver, an optional denial and an
`outcome` word for metrics. Everything the pod carries that we do not own is left
exactly as it was, including fields this code has never heard of.

Decisions (docs/webhook.md explains them to users):
- the agent takes istio-init's slot and KEEPS the name `istio-init`: istio-cni
  skips pods with a container of that name, and `sidecar.istio.io/status`
  (which lists `istio-init`) stays true;
- the swapped container is recognised by its command `[bpfinit-agent, setup]`
  AND an accepted agent image (`--agent-image` + `--accepted-agent-images`), so a
  second pass (reinvocation) yields no patch; an init container running
  bpfinit-agent with any other image is not ours and the pod is refused;
- istio-init's args (without the leading `istio-iptables` word) and env are
  carried over, so the agent sees exactly the capture settings Istio rendered;
  with `--accepted-istio-images` set (opt-in), only an istio-init whose image is
  on that list is swapped, any other is refused (its args would become ours).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from initagent import flags as agent_flags
from webhook import annotations as ann
from webhook import patchcheck
from webhook.admission import warning_lines

ISTIO_INIT = "istio-init"
ISTIO_VALIDATION = "istio-validation"
ISTIO_IPTABLES = "istio-iptables"
AGENT_COMMAND = ["bpfinit-agent", "setup"]
AGENT_BINARY = "bpfinit-agent"
DEFAULT_AGENT_IMAGE = "ghcr.io/bpfinit/bpfinit:0.1.0"
# Exactly what the swapped container is granted (docs/webhook.md); the validator exempts no more than this.
AGENT_CAPABILITIES = ("BPF", "NET_ADMIN", "PERFMON")
MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"
STATUS_VERSION = 1

PODINFO_DIR = "/etc/bpfinit/podinfo"
LABELS_FILE = PODINFO_DIR + "/labels"

# Host paths the agent needs: bpffs for pins, cgroup v2 to attach programs to the
# pod cgroup, kernel headers so bcc can compile on a node's first pod.
# The node's header directories go under /host (initagent/headers.py looks there): mounted over
# /usr/src and /lib/modules they would hide the Debian headers shipped in the agent image.
HOST_LIB_MODULES_MOUNT = "/host/lib/modules"
HOST_USR_SRC_MOUNT = "/host/usr/src"
# (Functions, not constants: every patch gets fresh objects, no deepcopy needed.)
def agent_volumes() -> list[dict[str, Any]]:
    return [
        {"name": "bpfinit-bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}},
        {"name": "bpfinit-cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
        # No `type`: a node without headers still starts the agent, which then reports
        # the precise reason (headers are only needed when nothing is compiled yet).
        {"name": "bpfinit-lib-modules", "hostPath": {"path": "/lib/modules"}},
        {"name": "bpfinit-usr-src", "hostPath": {"path": "/usr/src"}},
        {"name": "bpfinit-podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
    ]


def agent_volume_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "bpfinit-bpffs", "mountPath": "/sys/fs/bpf"},
        {"name": "bpfinit-cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": True},
        {"name": "bpfinit-lib-modules", "mountPath": HOST_LIB_MODULES_MOUNT, "readOnly": True},
        {"name": "bpfinit-usr-src", "mountPath": HOST_USR_SRC_MOUNT, "readOnly": True},
        {"name": "bpfinit-podinfo", "mountPath": PODINFO_DIR, "readOnly": True},
    ]


def agent_env() -> list[dict[str, Any]]:
    return [
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "BPFINIT_POD_LABELS_FILE", "value": LABELS_FILE},
    ]


AGENT_ENV_NAMES = frozenset(e["name"] for e in agent_env())
# Security-context fields kept from istio-init: they restrict, never widen.
KEPT_SECURITY_FIELDS = ("seccompProfile", "seLinuxOptions", "appArmorProfile", "procMount")


@dataclass(frozen=True)
class MutationSettings:
    agent_image: str
    # Other images a container running bpfinit-agent may carry and still be ours (e.g. the previous
    # webhook version's during a rolling upgrade). `agent_image` is always accepted.
    accepted_agent_images: tuple[str, ...] = ()
    # Opt-in: the images Istio's capture containers (istio-init, istio-validation, istio-proxy) may carry,
    # entries as in `istio_image_accepted`. Empty (the default): Istio's images are not checked.
    accepted_istio_images: tuple[str, ...] = ()

    @property
    def trusted_agent_images(self) -> tuple[str, ...]:
        return trusted_agent_images(self.agent_image, self.accepted_agent_images)


def trusted_agent_images(agent_image: str, accepted: Sequence[str] = ()) -> tuple[str, ...]:
    """The configured agent image first, then the accepted ones, without duplicates or blanks."""
    out: list[str] = []
    for image in (agent_image, *accepted):
        image = (image or "").strip()
        if image and image not in out:
            out.append(image)
    return tuple(out)


# Istio's capture containers: they run Istio's proxy image (proxyv2 by default; istio-init may have its own,
# values.global.proxy_init.image), so one accepted list covers all three.
ISTIO_CAPTURE_CONTAINERS = (ISTIO_INIT, ISTIO_VALIDATION, "istio-proxy")
ISTIO_IMAGE_WILDCARD = ":*"
# what may follow a repository in an image reference: an optional tag, then an optional digest
_TAG_AND_DIGEST = re.compile(r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                             r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?")


def clean_images(entries: Sequence[str] | None) -> tuple[str, ...]:
    """Entries stripped, without blanks or repeats, in order."""
    return trusted_agent_images("", entries or ())


def istio_image_entry_problem(entry: str) -> str | None:
    """Why an `--accepted-istio-images` entry can never mean what it looks like (None: it is fine)."""
    if not entry or any(c.isspace() for c in entry):
        return "is blank or contains whitespace"
    repository = entry[:-len(ISTIO_IMAGE_WILDCARD)] if entry.endswith(ISTIO_IMAGE_WILDCARD) else entry
    if "*" in repository:
        return "has a '*' that is not a whole tag: the only wildcard is REPOSITORY:* (e.g. docker.io/istio/proxyv2:*)"
    if repository is not entry and (not repository or "@" in repository
                                    or ":" in repository.rsplit("/", 1)[-1]):
        return "is not REPOSITORY:* (the repository must come without a tag or digest)"
    return None


def istio_image_accepted(image: Any, accepted: Sequence[str]) -> bool:
    """Is `image` one of the accepted Istio images? An entry matches an image exactly (as written, no
    normalisation: `istio/proxyv2` is not `docker.io/istio/proxyv2`), or is `REPOSITORY:*`, which matches
    that repository with any tag and/or digest, or none (`REPOSITORY`, `REPOSITORY:1.24.0`,
    `REPOSITORY@sha256:...`, `REPOSITORY:1.24.0@sha256:...`) and no other repository. An empty list
    accepts everything: the check is opt-in."""
    accepted = clean_images(accepted)
    if not accepted:
        return True
    if not isinstance(image, str) or not image:
        return False
    for entry in accepted:
        if image == entry:
            return True
        if entry.endswith(ISTIO_IMAGE_WILDCARD):
            repository = entry[:-len(ISTIO_IMAGE_WILDCARD)]
            if (repository and image.startswith(repository)
                    and _TAG_AND_DIGEST.fullmatch(image, len(repository)) is not None):
                return True
    return False


def describe_untrusted_istio_init(image: Any, accepted: Sequence[str]) -> str:
    shown = f'"{image}"' if isinstance(image, str) and image else "(no image)"
    return (f'init container "{ISTIO_INIT}" has image {shown}, which is not an accepted Istio proxy image '
            f"[{', '.join(clean_images(accepted))}]: bpfinit swaps only Istio's own istio-init, whose args it "
            "carries into the agent (accepted images: --accepted-istio-images)")


def runs_agent(container: Any) -> bool:
    """Does this container run bpfinit-agent (by its command, any path)?"""
    command = container.get("command") if isinstance(container, dict) else None
    return (isinstance(command, list) and bool(command) and isinstance(command[0], str)
            and command[0].rsplit("/", 1)[-1] == AGENT_BINARY)


def untrusted_agent_containers(pod_spec: dict, trusted: Sequence[str]) -> list[tuple[str, str]]:
    """(name, image) of every init container that runs bpfinit-agent with an image not in `trusted`:
    only the webhook puts the agent in place, so such a container is not ours whatever its name."""
    out = []
    for index, container in enumerate(_as_list(pod_spec.get("initContainers"))):
        if runs_agent(container):
            image = container.get("image")
            if not isinstance(image, str) or image not in trusted:
                out.append((str(container.get("name", f"#{index}")), image if isinstance(image, str) else ""))
    return out


def describe_untrusted_agent(name: str, image: str, trusted: Sequence[str]) -> str:
    shown = f'"{image}"' if image else "(no image)"
    return (f'init container "{name}" runs bpfinit-agent with image {shown}, which is not an accepted bpfinit '
            f"agent image [{', '.join(trusted)}]: only the bpfinit webhook puts the agent in place, so this "
            "container is not ours and its privileges are not granted (accepted images: --agent-image and "
            "--accepted-agent-images)")


@dataclass(frozen=True)
class MutationResult:
    outcome: str                      # one word, used as a metrics label
    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    denial: str | None = None         # set ⇒ the pod must be refused with this message


def escape_pointer_token(token: str) -> str:
    """RFC 6901: `~` first, then `/`."""
    return token.replace("~", "~0").replace("/", "~1")


def pointer(*tokens: str | int) -> str:
    return "".join("/" + escape_pointer_token(str(t)) for t in tokens)


def _set_op(container: dict, key: str, path: str, value: Any) -> dict:
    return {"op": "replace" if key in container else "add", "path": path, "value": value}


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _literal_env(env: list) -> dict[str, str]:
    # Only literal values can be known at admission time; valueFrom entries are
    # carried over to the agent, which resolves them itself at run time.
    return {e["name"]: e["value"] for e in env
            if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("value"), str)}


def _find_container(containers: list, name: str) -> int | None:
    for index, container in enumerate(containers):
        if isinstance(container, dict) and container.get("name") == name:
            return index
    return None


def _agent_args(istio_args: list[str], annotations: dict, egress_allow: Sequence[str] | None) -> list[str]:
    args = list(istio_args[1:])  # drop the `istio-iptables` subcommand word
    # An explicit CLI flag beats the env (CLI > env): `false` must also win over BPFINIT_ACCELERATE /
    # BPFINIT_ACCEL_SKIP_SPLICE_CHECK / BPFINIT_ACCEL_SKIP_BACKPRESSURE_CHECK / BPFINIT_ACCEL_SKIP_WAITALL_CHECK /
    # BPFINIT_ACCEL_POD_TO_POD / ISTIO_META_DNS_CAPTURE coming from proxyMetadata. The self-test waivers and
    # pod-to-pod are passed whatever the accelerate annotation says: acceleration may also come from
    # proxyMetadata, and without acceleration the agent ignores them. Fixed order: accelerate, splice waiver,
    # backpressure waiver, waitall waiver, pod-to-pod.
    for annotation, flag in ((ann.BPFINIT_ACCELERATE, "--accelerate"),
                             (ann.BPFINIT_ACCELERATE_SKIP_SPLICE_CHECK, "--accelerate-skip-splice-check"),
                             (ann.BPFINIT_ACCELERATE_SKIP_BACKPRESSURE_CHECK,
                              "--accelerate-skip-backpressure-check"),
                             (ann.BPFINIT_ACCELERATE_SKIP_WAITALL_CHECK,
                              "--accelerate-skip-waitall-check"),
                             (ann.BPFINIT_ACCELERATE_POD_TO_POD, "--accelerate-pod-to-pod")):
        value = annotations.get(annotation)
        if value == "true":
            args.append(flag)
        elif value == "false":
            args.append(f"{flag}=false")
    dns = annotations.get(ann.BPFINIT_DNS_CAPTURE)
    if dns in ann.BOOLEAN_VALUES:
        args.append(f"--redirect-dns={dns}")
    if egress_allow is not None:
        args += ["--egress-allow", ",".join(egress_allow)]
    return args


def _agent_security_context(old: dict) -> dict:
    context = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"add": list(AGENT_CAPABILITIES), "drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "runAsUser": 0,
    }
    for key in KEPT_SECURITY_FIELDS:
        if key in old:
            context[key] = copy.deepcopy(old[key])
    return context


def _container_ops(base: str, old: dict, agent_args: list[str], image: str) -> list[dict]:
    # Values may share istio-init's env entries/mounts: they are serialised, never mutated.
    env = [e for e in _as_list(old.get("env"))
           if not (isinstance(e, dict) and e.get("name") in AGENT_ENV_NAMES)] + agent_env()
    mounts = _as_list(old.get("volumeMounts"))
    mount_names = {m.get("name") for m in mounts if isinstance(m, dict)}
    mount_paths = {m.get("mountPath") for m in mounts if isinstance(m, dict)}
    new_mounts = list(mounts) + [m for m in agent_volume_mounts()
                                 if m["name"] not in mount_names and m["mountPath"] not in mount_paths]
    return [
        _set_op(old, "image", base + "/image", image),
        _set_op(old, "command", base + "/command", list(AGENT_COMMAND)),
        _set_op(old, "args", base + "/args", agent_args),
        _set_op(old, "env", base + "/env", env),
        _set_op(old, "securityContext", base + "/securityContext",
                _agent_security_context(_as_dict(old.get("securityContext")))),
        _set_op(old, "volumeMounts", base + "/volumeMounts", new_mounts),
    ]


def _volume_ops(spec: dict) -> list[dict]:
    if "volumes" not in spec or not isinstance(spec.get("volumes"), list):
        return [_set_op(spec, "volumes", "/spec/volumes", agent_volumes())]
    present = {v.get("name") for v in spec["volumes"] if isinstance(v, dict)}
    # Pod volumes are a shared, unkeyed array: append, never overwrite.
    return [{"op": "add", "path": "/spec/volumes/-", "value": v}
            for v in agent_volumes() if v["name"] not in present]


def _describe_volume(volume: dict) -> str:
    sources = [k for k in volume if k != "name"]
    if sources == ["hostPath"] and isinstance(volume["hostPath"], dict):
        host = volume["hostPath"]
        return f"hostPath {host.get('path')}" + (f" (type {host['type']})" if host.get("type") else "")
    if sources == ["downwardAPI"]:
        return "downwardAPI metadata.labels as file labels"
    return " + ".join(sources) if sources else "no source"


def _downward_items(volume: dict) -> list:
    items = _as_list(_as_dict(volume.get("downwardAPI")).get("items"))
    return [(_as_dict(i).get("path"), _as_dict(_as_dict(i).get("fieldRef")).get("fieldPath")) for i in items]


def _same_volume(existing: dict, ours: dict) -> bool:
    """Does a pod volume carrying one of our names give the agent what ours would? Compared by meaning,
    not bytes: the apiserver defaults fields (hostPath type "", downwardAPI defaultMode/apiVersion), and
    on reinvocation our own volumes come back that way."""
    source = next(k for k in ours if k != "name")
    if [k for k in existing if k != "name"] != [source]:
        return False
    if source == "hostPath":
        have, want = _as_dict(existing.get("hostPath")), ours["hostPath"]
        return have.get("path") == want["path"] and (have.get("type") or "") == want.get("type", "")
    return _downward_items(existing) == _downward_items(ours)


def _reserved_name_conflicts(spec: dict, istio_init: dict) -> list[str]:
    """Pod volumes / istio-init mounts that use one of our names (or mount paths) for something else: kept
    as they are, the agent would pin into the user's emptyDir instead of the node's bpffs (and so on)."""
    problems = []
    volumes = {v.get("name"): v for v in _as_list(spec.get("volumes")) if isinstance(v, dict)}
    for ours in agent_volumes():
        existing = volumes.get(ours["name"])
        if existing is not None and not _same_volume(existing, ours):
            problems.append(f'pod volume "{ours["name"]}" is reserved for the bpfinit agent and must be '
                            f"{_describe_volume(ours)}, not {_describe_volume(existing)}; rename the pod's volume")
    for mount in _as_list(istio_init.get("volumeMounts")):
        if not isinstance(mount, dict):
            continue
        for ours in agent_volume_mounts():
            if (mount.get("name") == ours["name"] or mount.get("mountPath") == ours["mountPath"]) and (
                    mount.get("name"), mount.get("mountPath")) != (ours["name"], ours["mountPath"]):
                problems.append(f'istio-init volumeMount "{mount.get("name")}" at {mount.get("mountPath")} '
                                f'collides with the agent\'s "{ours["name"]}" at {ours["mountPath"]}')
    return problems


def _status_ops(pod: dict, record: dict) -> list[dict]:
    value = json.dumps(record, separators=(",", ":"), sort_keys=True)
    if not isinstance(pod.get("metadata"), dict):
        return [_set_op(pod, "metadata", "/metadata", {"annotations": {ann.BPFINIT_STATUS: value}})]
    metadata = pod["metadata"]
    if not isinstance(metadata.get("annotations"), dict):
        return [_set_op(metadata, "annotations", "/metadata/annotations", {ann.BPFINIT_STATUS: value})]
    return [_set_op(metadata["annotations"], ann.BPFINIT_STATUS,
                    pointer("metadata", "annotations", ann.BPFINIT_STATUS), value)]


def _self_check(pod: dict, ops: list[dict], index: int, agent_args: list[str]) -> str | None:
    """Apply our own patch; a patch that fails to apply would fail the pod even under
    failurePolicy Ignore (apiserver InternalError), so we never send one. The strict
    copy-on-write applier proves the same thing as jsonpatch on a deep copy, ~10x cheaper."""
    try:
        patched = patchcheck.apply_patch(pod, ops)
        container = patched["spec"]["initContainers"][index]
    except (patchcheck.PatchError, KeyError, IndexError, TypeError) as exc:
        return f"patch does not apply: {exc}"
    if container.get("command") != AGENT_COMMAND or container.get("args") != agent_args:
        return "patched container is not the agent"
    return None


def mutate(pod: dict, settings: MutationSettings, egress_allow: Sequence[str] | None = None) -> MutationResult:
    """Decide what to do with one Pod (CREATE) and build the patch."""
    metadata = _as_dict(pod.get("metadata"))
    raw_annotations = metadata.get("annotations")
    annotations = _as_dict(raw_annotations)

    # Pods we leave alone are never refused: their annotations are validated only once we know we would
    # swap (docs/webhook.md "What the mutation does"; mirror pods cannot even be changed).
    spec = _as_dict(pod.get("spec"))
    if MIRROR_POD_ANNOTATION in annotations:
        return MutationResult("mirror-pod")        # static pods cannot be changed
    if spec.get("hostNetwork") is True:
        return MutationResult("host-network")      # Istio never injects these
    init_containers = _as_list(spec.get("initContainers"))
    # A hand-written "agent" (bpfinit-agent with someone else's image) must not pass as already swapped.
    trusted = settings.trusted_agent_images
    forged = untrusted_agent_containers(spec, trusted)
    if forged:
        return MutationResult("untrusted-agent-image",
                              denial="; ".join(describe_untrusted_agent(n, i, trusted) for n, i in forged))
    index = _find_container(init_containers, ISTIO_INIT)
    if index is None:
        if _find_container(init_containers, ISTIO_VALIDATION) is not None:
            return MutationResult("istio-cni", warnings=[
                "bpfinit: pod left unchanged: istio-cni already captures its traffic (istio-validation)"])
        # Istio may not have injected yet (we may run first): silence, reinvocation brings us back.
        return MutationResult("no-istio-init")

    istio_init = init_containers[index]
    if istio_init.get("command") == AGENT_COMMAND:
        return MutationResult("already-swapped")
    if annotations.get(ann.BPFINIT_INJECT) == "false":
        return MutationResult("opted-out", warnings=[
            f'bpfinit: pod keeps iptables istio-init: annotation {ann.BPFINIT_INJECT}="false"'])

    args = istio_init.get("args")
    if (istio_init.get("command") not in (None, [])
            or not isinstance(args, list) or not args or args[0] != ISTIO_IPTABLES
            or not all(isinstance(a, str) for a in args)):
        return MutationResult("user-override", warnings=[
            "bpfinit: pod keeps istio-init: its command/args were overridden (not istio-iptables)"])

    # Opt-in: an istio-init that is not from the mesh's image is not Istio's, and its args would become ours.
    if not istio_image_accepted(istio_init.get("image"), settings.accepted_istio_images):
        return MutationResult("untrusted-istio-image",
                              denial=describe_untrusted_istio_init(istio_init.get("image"),
                                                                   settings.accepted_istio_images))

    if raw_annotations is not None and not isinstance(raw_annotations, dict):
        return MutationResult("invalid-annotations", denial="metadata.annotations must be a map of strings")
    problems = ann.validate_annotations(annotations)
    if problems:
        return MutationResult("invalid-annotations", denial="; ".join(problems))

    conflicts = _reserved_name_conflicts(spec, istio_init)
    if conflicts:
        return MutationResult("reserved-volume", denial="; ".join(conflicts))

    agent_args = _agent_args(args, annotations, egress_allow)
    env = _as_list(istio_init.get("env"))
    try:
        config = agent_flags.parse(agent_args, _literal_env(env))
    except agent_flags.FlagError as reason:
        return MutationResult("unsupported-flags", warnings=warning_lines(
            f"bpfinit: pod keeps iptables istio-init: agent cannot parse its flags: {reason}"))
    if config.unsupported:   # one kubectl line per reason
        return MutationResult("unsupported-flags", warnings=[
            line for reason in config.unsupported
            for line in warning_lines(f"bpfinit: pod keeps iptables istio-init: {reason}")])

    base = pointer("spec", "initContainers", index)
    record = {
        "version": STATUS_VERSION,
        "container": ISTIO_INIT,
        "agentImage": settings.agent_image,
        "replacedImage": istio_init.get("image", ""),
        "egressGuard": egress_allow is not None,
        "accelerate": bool(config.accelerate),
        "dnsCapture": bool(config.redirect_dns),
    }
    ops = (_container_ops(base, istio_init, agent_args, settings.agent_image)
           + _volume_ops(spec) + _status_ops(pod, record))
    failure = _self_check(pod, ops, index, agent_args)
    if failure:
        return MutationResult("internal-error", warnings=warning_lines(
            f"bpfinit: pod left unchanged: internal error building the patch ({failure})"))
    return MutationResult("swapped", patch=ops)
