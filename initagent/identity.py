"""Pod identity for observability: pod_idx -> namespace, pod name, labels (and netns cookie).

The agent registers its pod at setup, from the downward API (POD_NAMESPACE, POD_NAME and the labels file
named by BPFINIT_POD_LABELS_FILE), into the pinned `obs_identity` map of the program generation it
attached (<bpffs>/bpfinit/<hash>/). Programs never read this map; observe, status and the exporter
use it to name pods. Registering also clears the pod_idx's counters and rate-limit state: a pod_idx
reused by a new pod must not inherit the previous pod's numbers (counters survive nothing but the pod).

    from initagent import identity
    identity.register(pin_dir, netns_cookie, pod_idx, namespace, name, labels)
    identity.lookup(pin_dir, pod_idx) -> {"namespace", "pod", "labels", "netns_cookie", ...} | None
    identity.forget(pin_dir, pod_idx)          # gc: the pod is gone
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from initagent import obsmaps
from initagent.obsmaps import BpfError, CounterKey, ObsIdentity

# Kubernetes limits: namespace is a DNS label (63), pod name a DNS subdomain (253).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class IdentityError(ValueError):
    """Bad identity input (one-line reason, shown to the operator as is)."""


def pin_dir_for(path: Path | str) -> Path:
    """Accept a generation dir (<bpffs>/bpfinit/<hash>) or a bpffs root with exactly one generation."""
    path = Path(path)
    if (path / "obs_identity").exists() or (path / "maps" / "obs_identity").exists():
        return path
    gens = obsmaps.find_generations(path)
    if len(gens) == 1:
        return gens[0].directory
    if not gens:
        raise BpfError(f"no bpfinit observability maps pinned under {path}")
    raise BpfError(f"{len(gens)} program generations under {path}; pass the one this pod is attached to")


def parse_downward_labels(text: str) -> dict[str, str]:
    """Parse a downward-API labels file: one `key="value"` per line, value quoted Go-style (%q)."""
    labels: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        if not sep or len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
            raise IdentityError(f"labels file line {lineno} is not key=\"value\": {line[:80]!r}")
        try:
            value = json.loads(quoted)   # Go %q escapes are a superset-compatible subset of JSON's here
        except json.JSONDecodeError:
            value = quoted[1:-1]
        labels[key.strip()] = value
    return labels


def identity_from_env(env: Mapping[str, str]) -> tuple[str, str, dict[str, str]] | None:
    """(namespace, pod, labels) from the downward-API env; None when the pod name/namespace are absent."""
    namespace, name = env.get("POD_NAMESPACE", ""), env.get("POD_NAME", "")
    if not namespace or not name:
        return None
    labels: dict[str, str] = {}
    labels_file = env.get("BPFINIT_POD_LABELS_FILE", "")
    if labels_file:
        try:
            labels = parse_downward_labels(Path(labels_file).read_text())
        except OSError as e:
            raise IdentityError(f"cannot read labels file {labels_file}: {e.strerror}") from None
    return namespace, name, labels


def encode(netns_cookie: int, namespace: str, name: str, labels: Mapping[str, str]) -> ObsIdentity:
    """Validate and pack one identity; labels that do not fit are dropped (largest last) and flagged."""
    if not _DNS_LABEL.match(namespace or ""):
        raise IdentityError(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
    if not _DNS_SUBDOMAIN.match(name or ""):
        raise IdentityError(f"pod name {name!r} is not a valid Kubernetes object name")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise IdentityError("labels must map strings to strings")
    ident = ObsIdentity()
    ident.netns_cookie = netns_cookie
    kept = dict(sorted(labels.items()))
    blob = json.dumps(kept, separators=(",", ":"), ensure_ascii=False).encode()
    # Keep as many labels as fit (drop the longest first so the most labels survive) and say we truncated.
    while len(blob) >= obsmaps.ID_LABELS_LEN:
        longest = max(kept, key=lambda k: len(k) + len(kept[k]))
        del kept[longest]
        ident.flags |= obsmaps.OBS_ID_F_LABELS_TRUNCATED
        blob = json.dumps(kept, separators=(",", ":"), ensure_ascii=False).encode()
    ident.namespace = namespace.encode()
    ident.name = name.encode()
    ident.labels = blob
    return ident


def decode(ident: ObsIdentity) -> dict:
    try:
        labels = json.loads(ident.labels.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        labels = {}
    return {
        "namespace": ident.namespace.decode(errors="replace"),
        "pod": ident.name.decode(errors="replace"),
        "labels": labels,
        "labels_truncated": bool(ident.flags & obsmaps.OBS_ID_F_LABELS_TRUNCATED),
        "netns_cookie": ident.netns_cookie,
    }


def _key(pod_idx: int) -> bytes:
    if not 0 <= pod_idx < 2**32:
        raise IdentityError(f"pod_idx {pod_idx} out of range")
    return pod_idx.to_bytes(4, "little")


def clear_pod_state(pins: obsmaps.ObsPins, pod_idx: int) -> int:
    """Delete a pod_idx's counters and reset its rate-limit bucket. Returns counters removed."""
    removed = 0
    with pins.open("obs_counters") as counters:
        for raw, _ in counters.items():    # batched: warm setup stays cheap with many pods on the node
            if CounterKey.from_buffer_copy(raw).pod_idx == pod_idx and counters.delete(raw):
                removed += 1
    with pins.open("obs_bucket") as buckets:
        buckets.delete(_key(pod_idx))
    return removed


def register(pin_dir: Path | str, netns_cookie: int, pod_idx: int, namespace: str, name: str,
             labels: Mapping[str, str] | None = None) -> dict:
    """Record who pod_idx is and start its counters from zero. Returns the stored identity."""
    ident = encode(netns_cookie, namespace, name, dict(labels or {}))
    pins = obsmaps.ObsPins(pin_dir_for(pin_dir))
    clear_pod_state(pins, pod_idx)
    with pins.open("obs_identity") as m:
        m.update(_key(pod_idx), bytes(ident))
    return decode(ident)


def lookup(pin_dir: Path | str, pod_idx: int) -> dict | None:
    pins = obsmaps.ObsPins(pin_dir_for(pin_dir))
    with pins.open("obs_identity") as m:
        found = m.lookup(_key(pod_idx))
    return None if found is None else decode(ObsIdentity.from_buffer_copy(found[0]))


def all_identities(pins: obsmaps.ObsPins) -> dict[int, dict]:
    with pins.open("obs_identity") as m:
        out = {}
        for raw, found in m.items(limit=m.max_entries + 1):
            out[int.from_bytes(raw, "little")] = decode(ObsIdentity.from_buffer_copy(found[0]))
        return out


def forget(pin_dir: Path | str, pod_idx: int) -> None:
    """The pod is gone (gc): drop its identity, counters and bucket."""
    pins = obsmaps.ObsPins(pin_dir_for(pin_dir))
    with pins.open("obs_identity") as m:
        m.delete(_key(pod_idx))
    clear_pod_state(pins, pod_idx)


def register_from_env(pin_dir: Path | str, netns_cookie: int, pod_idx: int, env: Mapping[str, str]) -> dict | None:
    """What `bpfinit-agent setup` calls: always restart the pod_idx's counters; record the downward-API
    identity when POD_NAMESPACE/POD_NAME are set. A bad identity never blocks the pod: it only affects
    how observability names it, so it is reported as a warning on stderr."""
    import sys
    try:
        found = identity_from_env(env)
        if found is None:
            clear_pod_state(obsmaps.ObsPins(pin_dir_for(pin_dir)), pod_idx)
            return None
        namespace, name, labels = found
        return register(pin_dir, netns_cookie, pod_idx, namespace, name, labels)
    except (IdentityError, BpfError) as e:
        print(f"bpfinit-agent: warning: pod identity for observability not recorded: {e}", file=sys.stderr)
        return None
