"""Egress-bypass policy: model, loading (YAML file with hot reload, CRD watch) and policy resolution.

A policy says, for the pods it selects, which destinations traffic that bypasses the proxy may reach
(`allowedDestinations`: `CIDR`, `CIDR:PORT`, `CIDR:LOW-HIGH`, `[V6CIDR]:PORT` — the same syntax as the
agent's `--egress-allow`) and which other bypass vectors are allowed at all (`allowedVectors`).
The rules of precedence ("most specific wins", modes, exemptions) are documented in docs/policy.md and
implemented in `PolicySet.resolve`. Everything here except `PolicyStore`'s watchers is pure.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

from initagent.flags import EgressRule, FlagError, parse_egress_allow

log = logging.getLogger("bpfinit.webhook.policy")

API_GROUP = "bpfinit.io"
API_VERSION = "v1alpha1"
API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
POLICY_KIND = "EgressBypassPolicy"
POLICY_PLURAL = "egressbypasspolicies"
SETTINGS_KIND = "EgressBypassSettings"

MODES = ("Enforce", "Warn", "Audit")
IP_FAMILIES = ("IPv4", "IPv6")

# Bypass vectors other than destinations, which a policy may allow by name (see docs/policy.md).
VECTORS: dict[str, str] = {
    "excludeInterfaces": "traffic on the listed NICs is never captured",
    "kubevirtInterfaces": "traffic from the listed virtual NICs is handled as outbound (VMs, DinD)",
    "interceptionModeNone": "interceptionMode NONE: no capture at all",
    "injectDisabled": 'sidecar.istio.io/inject other than y/yes/true/on/"" (e.g. "false", "no"): no sidecar, no capture',
    "injectTemplates": "inject.istio.io/templates without the sidecar template: no capture",
    "proxyIdentity": "a non-proxy container runs as the proxy UID/GID, or the proxy UID/GID is 0",
    "ownerGroups": "ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]: processes in some groups bypass capture",
    "netAdmin": "a non-proxy container has NET_ADMIN/SYS_ADMIN/BPF/ALL or is privileged",
    "hostNetwork": "hostNetwork: true, the pod is outside any capture",
    "istioInit": "the pod keeps iptables istio-init: bypassed traffic is not confined by the kernel guard",
    "captureDisabled": "the init container is told to program nothing (skip-rule-apply, dry-run, cleanup-only)",
    "untrustedCaptureImage": "an init container runs bpfinit-agent with an image the webhook does not accept as its "
                             "agent (not --agent-image / --accepted-agent-images): not ours, whatever its name; "
                             "or, with --accepted-istio-images set, istio-init / istio-validation / istio-proxy "
                             "with an image not on that list: not Istio's",
}
# Vectors "*" does not include: a policy allows them only by naming them.
EXPLICIT_ONLY_VECTORS = frozenset({"untrustedCaptureImage"})

DEFAULT_POLICY_NAMESPACE = "bpfinit-system"

_POLICY_SPEC_FIELDS = {"mode", "selector", "namespaces", "allowedDestinations", "allowedVectors",
                       "exemption", "description"}
_EXEMPTION_SPEC_FIELDS = {"selector", "namespaces", "exemption", "description"}
_SETTINGS_SPEC_FIELDS = {"clusterPolicyNamespace", "exemptionNamespace", "defaultMode", "namespaceModes",
                         "ipFamilies"}
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class PolicyError(ValueError):
    """An invalid policy; str(err) says where (source, document, object, field) and why."""


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSelector:
    """metav1.LabelSelector semantics; an empty selector selects every pod."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def specificity(self) -> int:
        return len(self.match_labels) + len(self.match_expressions)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        for key, operator, values in self.match_expressions:
            present = key in labels
            if operator == "In" and not (present and labels[key] in values):
                return False
            if operator == "NotIn" and present and labels[key] in values:
                return False
            if operator == "Exists" and not present:
                return False
            if operator == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    selector: LabelSelector = LabelSelector()
    mode: Optional[str] = None                 # None: inherit (namespace mode, then default)
    namespaces: Optional[tuple[str, ...]] = None  # cluster-wide scope ("*" = all); None for namespaced
    allowed: tuple[EgressRule, ...] = ()
    allowed_vectors: frozenset[str] = frozenset()
    exemption: bool = False
    description: str = ""
    source: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def cluster_wide(self) -> bool:
        return self.namespaces is not None

    def applies_to_namespace(self, namespace: str) -> bool:
        if self.namespaces is None:
            return namespace == self.namespace
        return "*" in self.namespaces or namespace in self.namespaces

    def allow_list(self) -> list[str]:
        return [str(rule) for rule in self.allowed]


@dataclass(frozen=True)
class Settings:
    cluster_policy_namespace: str = DEFAULT_POLICY_NAMESPACE
    exemption_namespace: str = DEFAULT_POLICY_NAMESPACE
    default_mode: str = "Enforce"
    namespace_modes: tuple[tuple[str, str], ...] = ()
    ip_families: tuple[str, ...] = IP_FAMILIES

    def namespace_mode(self, namespace: str) -> Optional[str]:
        return dict(self.namespace_modes).get(namespace)


@dataclass(frozen=True)
class Resolution:
    """Which policy governs a pod, and in which mode."""

    policy: Optional[Policy]      # None: no policy selects the pod
    exemption: Optional[Policy]   # set when an exemption applies (then policy is None)
    mode: str

    @property
    def ref(self) -> str:
        chosen = self.exemption or self.policy
        return chosen.ref if chosen else "none"


@dataclass(frozen=True)
class PolicySet:
    settings: Settings = Settings()
    policies: tuple[Policy, ...] = ()

    def resolve(self, namespace: str, labels: Mapping[str, str]) -> Resolution:
        """Most specific wins: exemptions first; then namespaced policy > cluster-wide policy naming the
        namespace > cluster-wide policy for "*"; then the selector with more requirements; then the
        name (alphabetical), so the outcome never depends on load order."""
        labels = labels or {}
        candidates = [p for p in self.policies if p.applies_to_namespace(namespace) and p.selector.matches(labels)]
        exemptions = [p for p in candidates if p.exemption]
        if exemptions:
            chosen = min(exemptions, key=lambda p: (-p.selector.specificity, p.ref))
            return Resolution(None, chosen, "Exempt")
        if not candidates:
            return Resolution(None, None, self.settings.namespace_mode(namespace) or self.settings.default_mode)

        def tier(p: Policy) -> int:
            if not p.cluster_wide:
                return 3
            return 2 if namespace in p.namespaces else 1

        chosen = min(candidates, key=lambda p: (-tier(p), -p.selector.specificity, p.ref))
        return Resolution(chosen, None, self.mode_for(chosen, namespace))

    def mode_for(self, policy: Policy, namespace: str) -> str:
        """Most specific wins for modes too: a namespaced policy's own mode > the namespace's mode >
        a cluster-wide policy's own mode > the default mode."""
        ns_mode = self.settings.namespace_mode(namespace)
        if policy.mode and not policy.cluster_wide:
            return policy.mode
        return ns_mode or policy.mode or self.settings.default_mode

    def allow_list_for(self, namespace: str, labels: Mapping[str, str]) -> Optional[list[str]]:
        """The agent's `--egress-allow` for a pod: the governing policy's destinations when it is
        enforced; None (no kernel guard) when no policy applies, the pod is exempt, or the mode is
        Warn/Audit (those modes must never break traffic)."""
        resolution = self.resolve(namespace, labels)
        if resolution.policy is None or resolution.mode != "Enforce":
            return None
        return resolution.policy.allow_list()


# ----------------------------------------------------------------------------------------------------
# parsing (the file and the CRD share `parse_policy_object`)
# ----------------------------------------------------------------------------------------------------
def _where(source: str, obj: Any, index: Optional[int]) -> str:
    parts = [source] if source else []
    if index is not None:
        parts.append(f"document {index}")
    if isinstance(obj, dict):
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        kind = obj.get("kind", "?")
        name = meta.get("name", "?")
        ns = meta.get("namespace")
        parts.append(f"{kind} {ns}/{name}" if ns else f"{kind} {name}")
    return ", ".join(parts)


def _fail(where: str, path: str, reason: str):
    raise PolicyError(f"{where}: {path}: {reason}" if path else f"{where}: {reason}")


def _check_fields(where: str, path: str, mapping: dict, known: set[str]):
    unknown = sorted(set(mapping) - known)
    if unknown:
        _fail(where, f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")


def _string_list(where: str, path: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(where, path, "must be a list of strings")
    return value


def _parse_selector(where: str, path: str, raw: Any) -> LabelSelector:
    if raw is None:
        return LabelSelector()
    if not isinstance(raw, dict):
        _fail(where, path, "must be a label selector (matchLabels / matchExpressions)")
    _check_fields(where, path, raw, {"matchLabels", "matchExpressions"})
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        _fail(where, f"{path}.matchLabels", "must map label names to string values")
    expressions = []
    raw_expressions = raw.get("matchExpressions") or []
    if not isinstance(raw_expressions, list):
        _fail(where, f"{path}.matchExpressions", "must be a list")
    for i, expr in enumerate(raw_expressions):
        epath = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            _fail(where, epath, "must be an object with key, operator and values")
        _check_fields(where, epath, expr, {"key", "operator", "values"})
        key, operator = expr.get("key"), expr.get("operator")
        if not isinstance(key, str) or not key:
            _fail(where, f"{epath}.key", "required")
        if operator not in _SELECTOR_OPERATORS:
            _fail(where, f"{epath}.operator", f"{operator!r} is not one of {', '.join(_SELECTOR_OPERATORS)}")
        values = _string_list(where, f"{epath}.values", expr.get("values") or [])
        if operator in ("In", "NotIn") and not values:
            _fail(where, f"{epath}.values", f"must not be empty for operator {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            _fail(where, f"{epath}.values", f"must be empty for operator {operator}")
        expressions.append((key, operator, tuple(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


def parse_destination(text: str) -> EgressRule:
    """One allowed destination, agent syntax, stricter than the agent: no host bits, no port 0."""
    if not isinstance(text, str) or text == "" or "," in text:
        raise PolicyError(f"{text!r} must be one CIDR[:PORT[-HIGH]] item")
    try:
        (rule,) = parse_egress_allow(text)
    except FlagError as err:
        raise PolicyError(f"{text!r}: {err}") from None
    body = text
    if body.startswith("["):
        body = body[1:].partition("]")[0]
    elif body.count(":") == 1:
        body = body.partition(":")[0]
    address, slash, _bits = body.partition("/")
    if slash and ipaddress.ip_address(address) != rule.network.network_address:
        raise PolicyError(f"{text!r} has host bits set (did you mean {rule.network}?)")
    if rule.port_low == 0 and rule.port_high != 65535:
        raise PolicyError(f"{text!r}: port 0 is not a destination port")
    return rule


def _parse_mode(where: str, path: str, raw: Any) -> Optional[str]:
    if raw is None:
        return None
    if raw not in MODES:
        _fail(where, path, f"{raw!r} is not one of {', '.join(MODES)}")
    return raw


def parse_policy_object(obj: Any, settings: Settings, source: str = "", index: Optional[int] = None) -> Policy:
    """An `EgressBypassPolicy` object (file document or CRD object) -> Policy, or PolicyError."""
    where = _where(source, obj, index)
    if not isinstance(obj, dict):
        _fail(where, "", "must be an object")
    if obj.get("apiVersion") != API_GROUP_VERSION:
        _fail(where, "apiVersion", f"{obj.get('apiVersion')!r} is not {API_GROUP_VERSION}")
    if obj.get("kind") != POLICY_KIND:
        _fail(where, "kind", f"{obj.get('kind')!r} is not {POLICY_KIND}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        _fail(where, "metadata", "required (name and namespace)")
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        _fail(where, "metadata.name", "required")
    if not isinstance(namespace, str) or not namespace:
        _fail(where, "metadata.namespace", f"required (cluster-wide policies live in {settings.cluster_policy_namespace})")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        _fail(where, "spec", "required")

    exemption = spec.get("exemption", False)
    if not isinstance(exemption, bool):
        _fail(where, "spec.exemption", "must be true or false")
    _check_fields(where, "spec", spec, _EXEMPTION_SPEC_FIELDS if exemption else _POLICY_SPEC_FIELDS)
    description = spec.get("description", "")
    if not isinstance(description, str):
        _fail(where, "spec.description", "must be a string")
    selector = _parse_selector(where, "spec.selector", spec.get("selector"))

    namespaces = None
    if "namespaces" in spec:
        namespaces = tuple(_string_list(where, "spec.namespaces", spec["namespaces"]))
        if not namespaces:
            _fail(where, "spec.namespaces", 'must not be empty (use ["*"] for every namespace)')
    if exemption:
        if namespace != settings.exemption_namespace:
            _fail(where, "spec.exemption",
                  f"exemptions can only be granted from namespace {settings.exemption_namespace}")
        if namespaces is None:
            _fail(where, "spec.namespaces", 'required for an exemption (use ["*"] for every namespace)')
        return Policy(namespace, name, selector, None, namespaces, (), frozenset(), True, description, source)

    if namespace == settings.cluster_policy_namespace:
        namespaces = namespaces or ("*",)
    elif namespaces is not None:
        _fail(where, "spec.namespaces",
              f"only cluster-wide policies (namespace {settings.cluster_policy_namespace}) may list namespaces")

    mode = _parse_mode(where, "spec.mode", spec.get("mode"))
    allowed = []
    for i, item in enumerate(_string_list(where, "spec.allowedDestinations", spec.get("allowedDestinations") or [])):
        try:
            allowed.append(parse_destination(item))
        except PolicyError as err:
            _fail(where, f"spec.allowedDestinations[{i}]", str(err))
    vectors = _string_list(where, "spec.allowedVectors", spec.get("allowedVectors") or [])
    for i, vector in enumerate(vectors):
        if vector != "*" and vector not in VECTORS:
            _fail(where, f"spec.allowedVectors[{i}]", f"unknown vector {vector!r} (known: *, {', '.join(VECTORS)})")
    allowed_vectors = frozenset(vectors) - {"*"}
    if "*" in vectors:  # every vector except those that must be named
        allowed_vectors |= frozenset(VECTORS) - EXPLICIT_ONLY_VECTORS
    return Policy(namespace, name, selector, mode, namespaces, tuple(allowed), allowed_vectors, False,
                  description, source)


def parse_settings_object(obj: dict, source: str = "", index: Optional[int] = None) -> Settings:
    where = _where(source, obj, index)
    if obj.get("apiVersion") != API_GROUP_VERSION:
        _fail(where, "apiVersion", f"{obj.get('apiVersion')!r} is not {API_GROUP_VERSION}")
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        _fail(where, "spec", "must be an object")
    _check_fields(where, "spec", spec, _SETTINGS_SPEC_FIELDS)
    cluster_ns = spec.get("clusterPolicyNamespace", DEFAULT_POLICY_NAMESPACE)
    if not isinstance(cluster_ns, str) or not cluster_ns:
        _fail(where, "spec.clusterPolicyNamespace", "must be a namespace name")
    exemption_ns = spec.get("exemptionNamespace", cluster_ns)
    if not isinstance(exemption_ns, str) or not exemption_ns:
        _fail(where, "spec.exemptionNamespace", "must be a namespace name")
    default_mode = _parse_mode(where, "spec.defaultMode", spec.get("defaultMode")) or "Enforce"
    raw_modes = spec.get("namespaceModes") or {}
    if not isinstance(raw_modes, dict):
        _fail(where, "spec.namespaceModes", "must map namespace names to modes")
    for ns, mode in raw_modes.items():
        _parse_mode(where, f"spec.namespaceModes.{ns}", mode)
    families = _string_list(where, "spec.ipFamilies", spec.get("ipFamilies", list(IP_FAMILIES)))
    for i, family in enumerate(families):
        if family not in IP_FAMILIES:
            _fail(where, f"spec.ipFamilies[{i}]", f"{family!r} is not one of {', '.join(IP_FAMILIES)}")
    if not families:
        _fail(where, "spec.ipFamilies", "must not be empty")
    return Settings(cluster_ns, exemption_ns, default_mode, tuple(sorted(raw_modes.items())), tuple(families))


def _flatten(documents: Iterable[Any]) -> list[tuple[int, Any]]:
    out = []
    for index, doc in enumerate(documents):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend((index, item) for item in doc["items"])
        else:
            out.append((index, doc))
    return out


def parse_policy_documents(documents: Iterable[Any], source: str = "") -> PolicySet:
    """A stream of EgressBypassSettings (at most one) and EgressBypassPolicy objects -> PolicySet.
    The whole stream is rejected on the first error, so a half-valid file never takes effect."""
    items = _flatten(documents)
    settings_docs = [(i, d) for i, d in items if isinstance(d, dict) and d.get("kind") == SETTINGS_KIND]
    if len(settings_docs) > 1:
        _fail(_where(source, settings_docs[1][1], settings_docs[1][0]), "", f"only one {SETTINGS_KIND} is allowed")
    settings = parse_settings_object(settings_docs[0][1], source, settings_docs[0][0]) if settings_docs else Settings()
    policies: list[Policy] = []
    seen: set[str] = set()
    for index, doc in items:
        if isinstance(doc, dict) and doc.get("kind") == SETTINGS_KIND:
            continue
        if not isinstance(doc, dict) or doc.get("kind") != POLICY_KIND:
            kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            _fail(_where(source, doc, index), "kind", f"{kind!r} is not {POLICY_KIND} or {SETTINGS_KIND}")
        policy = parse_policy_object(doc, settings, source, index)
        if policy.ref in seen:
            _fail(_where(source, doc, index), "metadata", f"duplicate policy {policy.ref}")
        seen.add(policy.ref)
        policies.append(policy)
    return PolicySet(settings, tuple(policies))


def parse_policy_text(text: str, source: str = "") -> PolicySet:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PolicyError(f"{source}: invalid YAML{at}: {problem}") from None
    return parse_policy_documents(documents, source)


def load_policy_file(path: str) -> PolicySet:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise PolicyError(f"{path}: cannot read policy file: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: policy file is not UTF-8") from None
    return parse_policy_text(text, path)


# ----------------------------------------------------------------------------------------------------
# the live store: file reload + CRD watch; readers get an immutable PolicySet
# ----------------------------------------------------------------------------------------------------
class PolicyStore:
    """Holds the policy in force. Readers call `.current()` (an immutable PolicySet, swapped atomically).

    Sources: an optional policy file (settings + policies; re-read when it changes, including a
    ConfigMap's atomic `..data` symlink swap) and optional CRD objects (policies only). A CRD object
    with the same namespace/name as a file policy replaces it. An invalid file keeps the last good
    file content in force; an invalid CRD object keeps that object's last good version in force.
    Watcher threads are (re)started lazily in whichever process calls `.current()`, so the store
    survives gunicorn's fork.
    """

    def __init__(self, policy_set: Optional[PolicySet] = None, *, path: Optional[str] = None,
                 poll_interval: float = 1.0):
        self._lock = threading.RLock()
        self._path = path
        self._poll_interval = poll_interval
        self._file_set = policy_set or PolicySet()
        self._file_fingerprint: Optional[tuple] = None
        self._crd_raw: dict[str, dict] = {}
        self._crd_good: dict[str, Policy] = {}
        self._current = self._file_set
        self.generation = 0
        self.last_error: Optional[str] = None
        self.errors: dict[str, str] = {}      # per source key -> last error (file path or CRD ref)
        self._watch_pid: Optional[int] = None
        self._stop = threading.Event()
        self._listeners: list[Callable[[PolicySet], None]] = []
        self._crd_factory: Optional[Callable[[], Any]] = None

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str, *, poll_interval: float = 1.0, watch: bool = True) -> "PolicyStore":
        """Load `path` (raises PolicyError when the first load is invalid: nothing to fall back on)."""
        store = cls(path=path, poll_interval=poll_interval)
        fingerprint, policy_set = store._read_file()
        store._file_set, store._file_fingerprint = policy_set, fingerprint
        store._rebuild()
        if watch:
            store.ensure_watching()
        return store

    # --- readers ------------------------------------------------------------------------------------
    def current(self) -> PolicySet:
        if self._watch_pid != os.getpid() and ((self._path and self._poll_interval > 0) or self._crd_factory):
            self.ensure_watching()
        return self._current

    def enable_crd_watch(self, api_client_factory: Optional[Callable[[], Any]] = None) -> None:
        """Watch EgressBypassPolicy objects from the first `.current()` of each process (threads do not
        survive gunicorn's fork). `api_client_factory() -> kubernetes ApiClient`; default: in-cluster."""
        self._crd_factory = api_client_factory or _in_cluster_api_client

    def allow_list_for(self, namespace: str, labels: Mapping[str, str]) -> Optional[list[str]]:
        return self.current().allow_list_for(namespace, labels)

    def egress_allow_for(self, pod: Mapping, namespace: str) -> Optional[list[str]]:
        """The mutating side's hook (webhook/app.py): the allow-list for this Pod's labels."""
        meta = pod.get("metadata") if isinstance(pod, Mapping) else None
        labels = meta.get("labels") if isinstance(meta, Mapping) else None
        namespace = namespace or (meta.get("namespace") if isinstance(meta, Mapping) else "") or "default"
        return self.allow_list_for(namespace, labels if isinstance(labels, Mapping) else {})

    def status(self) -> dict:
        current = self._current
        return {"generation": self.generation, "policies": [p.ref for p in current.policies],
                "errors": dict(self.errors), "path": self._path}

    def add_listener(self, callback: Callable[[PolicySet], None]) -> None:
        """Called with the new PolicySet after every change (e.g. to count reloads in metrics)."""
        self._listeners.append(callback)

    # --- file ---------------------------------------------------------------------------------------
    def _fingerprint(self) -> tuple:
        # stat() follows symlinks, so a ConfigMap `..data` swap shows up as a new inode/mtime
        st = os.stat(self._path)
        return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)

    def _read_file(self) -> tuple[tuple, PolicySet]:
        try:
            fingerprint = self._fingerprint()
        except OSError as err:
            raise PolicyError(f"{self._path}: cannot read policy file: {err.strerror}") from None
        with open(self._path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        return fingerprint + (digest,), load_policy_file(self._path)

    def reload_now(self) -> bool:
        """Re-read the file if it changed. Returns True when a new policy took effect."""
        if not self._path:
            return False
        try:
            if self._file_fingerprint and self._fingerprint() == self._file_fingerprint[:4]:
                return False
            fingerprint, policy_set = self._read_file()
        except (PolicyError, OSError) as err:
            message = str(err) if isinstance(err, PolicyError) else \
                f"{self._path}: cannot read policy file: {err.strerror or err}"
            self._record_error(self._path, message)
            try:  # remember the bad version so it is not re-parsed and re-logged every poll
                self._file_fingerprint = self._fingerprint() + ("bad",)
            except OSError:
                pass
            return False
        with self._lock:
            if self._file_fingerprint and fingerprint[4] == self._file_fingerprint[-1]:
                self._file_fingerprint = fingerprint  # touched, same content
                self.errors.pop(self._path, None)
                return False
            settings_changed = policy_set.settings != self._file_set.settings
            self._file_set, self._file_fingerprint = policy_set, fingerprint
            self.errors.pop(self._path, None)
            if settings_changed:
                self._revalidate_crds(policy_set.settings)
            self._rebuild()
        log.info("policy file %s loaded: %d policies", self._path, len(policy_set.policies))
        return True

    def ensure_watching(self) -> None:
        with self._lock:
            if self._watch_pid == os.getpid():
                return
            self._watch_pid = os.getpid()
            self._stop = threading.Event()
            if self._path and self._poll_interval > 0:
                threading.Thread(target=self._poll_file, name="bpfinit-policy-file", daemon=True).start()
            if self._crd_factory is not None:
                try:
                    self.watch_crds(self._crd_factory(), stop=self._stop)
                except Exception as err:  # e.g. no in-cluster config: serve the file policy, say why
                    self._record_error("crd watch", f"cannot watch {POLICY_PLURAL}: {err}")

    def _poll_file(self) -> None:
        stop = self._stop
        while not stop.wait(self._poll_interval):
            try:
                self.reload_now()
            except Exception:  # a watcher must never die silently; keep serving the last good policy
                log.exception("policy file watcher error")

    def close(self) -> None:
        self._stop.set()

    # --- CRD ----------------------------------------------------------------------------------------
    def apply_crd_event(self, event_type: str, obj: dict) -> Optional[str]:
        """Apply one watch event (ADDED/MODIFIED/DELETED). Returns the error text for an invalid object
        (which is then kept out; its previous good version, if any, stays in force)."""
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict):
            return self._record_error("crd", "CRD event without metadata ignored")
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        with self._lock:
            if event_type == "DELETED":
                self._crd_raw.pop(key, None)
                self._crd_good.pop(key, None)
                self.errors.pop(f"crd {key}", None)
                self._rebuild()
                return None
            self._crd_raw[key] = obj
            error = self._parse_crd(key, obj, self._file_set.settings)
            self._rebuild()
            return error

    def replace_crd_objects(self, objects: Iterable[dict]) -> list[str]:
        """A full re-list: objects not in `objects` are dropped."""
        errors = []
        with self._lock:
            fresh = {}
            for obj in objects:
                meta = obj.get("metadata") or {}
                fresh[f"{meta.get('namespace')}/{meta.get('name')}"] = obj
            for key in set(self._crd_good) - set(fresh):
                self._crd_good.pop(key)
            self._crd_raw = fresh
            for key, obj in fresh.items():
                error = self._parse_crd(key, obj, self._file_set.settings)
                if error:
                    errors.append(error)
            self._rebuild()
        return errors

    def _parse_crd(self, key: str, obj: dict, settings: Settings) -> Optional[str]:
        try:
            self._crd_good[key] = parse_policy_object(obj, settings, "crd")
            self.errors.pop(f"crd {key}", None)
            return None
        except PolicyError as err:
            return self._record_error(f"crd {key}", str(err))

    def _record_error(self, key: str, message: str) -> str:
        if self.errors.get(key) != message:
            log.error("policy rejected, last good policy stays in force: %s", message)
        self.errors[key] = message
        self.last_error = message
        return message

    def _revalidate_crds(self, settings: Settings) -> None:
        """New settings may make a CRD object invalid (e.g. an exemption outside the new exemption
        namespace): re-check the latest version, else the last good one, else drop it."""
        for key, obj in self._crd_raw.items():
            try:
                self._crd_good[key] = parse_policy_object(obj, settings, "crd")
                self.errors.pop(f"crd {key}", None)
                continue
            except PolicyError as err:
                self._record_error(f"crd {key}", str(err))
            previous = self._crd_good.get(key)
            if previous is None:
                continue
            try:
                parse_policy_object(_policy_to_object(previous), settings, "crd")
            except PolicyError:
                self._crd_good.pop(key)

    def _rebuild(self) -> None:
        with self._lock:
            merged = {p.ref: p for p in self._file_set.policies}
            merged.update(self._crd_good)
            self._current = PolicySet(self._file_set.settings, tuple(merged[k] for k in sorted(merged)))
            self.generation += 1
            current = self._current
        for callback in list(self._listeners):
            try:
                callback(current)
            except Exception:
                log.exception("policy listener failed")

    def watch_crds(self, api_client=None, *, stop: Optional[threading.Event] = None,
                   timeout_seconds: int = 300, max_backoff: float = 30.0) -> threading.Thread:
        """Start a thread that lists then watches EgressBypassPolicy objects in every namespace with the
        `kubernetes` client (in-cluster config unless `api_client` is given); re-lists on 410 Gone."""
        from kubernetes import client as k8s_client, watch as k8s_watch

        api_client = api_client or _in_cluster_api_client()
        api = k8s_client.CustomObjectsApi(api_client)
        stop = stop or self._stop

        def run():
            backoff, version = 1.0, None
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if version is None:  # (re-)list: the start, and after the apiserver says 410 Gone
                        listing = api.list_cluster_custom_object(API_GROUP, API_VERSION, POLICY_PLURAL)
                        self.replace_crd_objects(listing.get("items") or [])
                        version = (listing.get("metadata") or {}).get("resourceVersion") or ""
                    watcher = k8s_watch.Watch()
                    for event in watcher.stream(api.list_cluster_custom_object, API_GROUP, API_VERSION,
                                                POLICY_PLURAL, resource_version=version,
                                                timeout_seconds=timeout_seconds):
                        if stop.is_set():
                            watcher.stop()
                            break
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            version = None
                            break
                        if kind in ("ADDED", "MODIFIED", "DELETED") and isinstance(obj, dict):
                            self.apply_crd_event(kind, obj)
                            version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    self.errors.pop("crd watch", None)
                    backoff = 1.0
                    if time.monotonic() - started < 1.0:
                        stop.wait(1.0)  # a watch that ends at once must not become a busy loop
                except Exception as err:  # network/API errors: keep the last good policies, retry
                    self._record_error("crd watch", f"CRD watch failed, retrying: {err}")
                    version = None
                    stop.wait(backoff)
                    backoff = min(backoff * 2, max_backoff)

        thread = threading.Thread(target=run, name="bpfinit-policy-crd", daemon=True)
        thread.start()
        return thread


def _in_cluster_api_client():
    from kubernetes import client as k8s_client, config as k8s_config

    k8s_config.load_incluster_config()
    return k8s_client.ApiClient()


def _policy_to_object(policy: Policy) -> dict:
    """Round-trip a parsed policy to its object form (used to re-check it under new settings)."""
    spec: dict[str, Any] = {}
    if policy.selector.specificity:
        spec["selector"] = {
            "matchLabels": dict(policy.selector.match_labels),
            "matchExpressions": [{"key": k, "operator": o, "values": list(v)}
                                 for k, o, v in policy.selector.match_expressions]}
    if policy.exemption:
        spec["exemption"] = True
    if policy.namespaces is not None:
        spec["namespaces"] = list(policy.namespaces)
    if not policy.exemption:
        if policy.mode:
            spec["mode"] = policy.mode
        spec["allowedDestinations"] = policy.allow_list()
        spec["allowedVectors"] = sorted(policy.allowed_vectors)
    return {"apiVersion": API_GROUP_VERSION, "kind": POLICY_KIND,
            "metadata": {"name": policy.name, "namespace": policy.namespace}, "spec": spec}


# ----------------------------------------------------------------------------------------------------
# `bpfinit-webhook serve` integration (webhook/cli.py calls these two)
# ----------------------------------------------------------------------------------------------------
def add_serve_arguments(parser) -> None:
    parser.add_argument("--policy", default=os.environ.get("BPFINIT_POLICY_FILE"),
                        help="egress-bypass policy YAML (EgressBypassSettings + EgressBypassPolicy documents), "
                             "re-read when it changes, e.g. a mounted ConfigMap (env BPFINIT_POLICY_FILE; "
                             "default: no file)")
    parser.add_argument("--policy-crds", choices=["auto", "on", "off"],
                        default=os.environ.get("BPFINIT_POLICY_CRDS", "auto"),
                        help="also watch EgressBypassPolicy objects with the in-cluster kubernetes client; "
                             "auto = when running in a cluster (env BPFINIT_POLICY_CRDS; default %(default)s)")


def store_from_args(args) -> PolicyStore:
    """The serving store; raises PolicyError (one line) when the policy file is unusable at start."""
    store = PolicyStore.from_file(args.policy, watch=False) if args.policy else PolicyStore()
    crds = getattr(args, "policy_crds", "auto")
    if crds == "on" or (crds == "auto" and os.environ.get("KUBERNETES_SERVICE_HOST")):
        store.enable_crd_watch()
    return store
