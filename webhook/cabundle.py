"""Built-in certificates without cert-manager (`bpfinit-webhook certs`).

Every webhook replica runs this (once as an init container, then as a sidecar loop). Together they keep:
  * ONE shared Secret holding the CA and the serving certificate (ca.crt, ca.key, tls.crt, tls.key), so
    every replica serves a certificate the same caBundle trusts;
  * the serving files in the pod's in-memory cert dir, which the server hot-reloads (webhook/certs.py);
  * `clientConfig.caBundle` of every webhook in our two webhook configurations.

One writer without a Lease: the Secret is created with create-if-absent semantics (POST; 409 AlreadyExists
means another replica won, so we read theirs) and renewed with an optimistic-concurrency update (PUT with
the resourceVersion we read; 409 Conflict means someone else renewed first, so we read again). caBundle
patches are JSON patches guarded by a `test` of the webhook's name, and are only sent when the bundle
differs, so N replicas converge on the same state and a reordered list is never patched at the wrong
index. Each round re-reads everything: a caBundle blanked by `kubectl apply` or a rotated Secret is
re-patched at the next round (interval 30 s by default). Errors are retried with capped backoff.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from webhook import certs

log = logging.getLogger("bpfinit.cabundle")

SECRET_KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")
LEAF_RENEW_BEFORE = dt.timedelta(days=30)
CA_RENEW_BEFORE = dt.timedelta(days=365)


class CertsError(Exception):
    """A one-line, operator-facing reason (no traceback)."""


@dataclass(frozen=True)
class CertsConfig:
    namespace: str
    secret: str
    service: str
    mutating: tuple[str, ...] = ()
    validating: tuple[str, ...] = ()
    out_dir: Path | None = None
    interval_s: float = 30.0
    max_backoff_s: float = 60.0

    @property
    def sans(self) -> list[str]:
        return certs.service_dns_names(self.service, self.namespace)


# ---- pure: certificate material ----------------------------------------------------------------------

def _load_pems(data: dict[str, bytes]):
    ca_certs = x509.load_pem_x509_certificates(data["ca.crt"])
    ca_key = serialization.load_pem_private_key(data["ca.key"], password=None)
    leaf = x509.load_pem_x509_certificate(data["tls.crt"])
    serialization.load_pem_private_key(data["tls.key"], password=None)
    return ca_certs, ca_key, leaf


def _sans_of(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(ext.get_values_for_type(x509.DNSName))


def renewal_reason(data: dict[str, bytes] | None, sans: list[str], now: dt.datetime) -> str | None:
    """Why the Secret's material must be (re)made, or None if it is good as it is."""
    if not data:
        return "no certificate yet"
    missing = [k for k in SECRET_KEYS if not data.get(k)]
    if missing:
        return f"Secret lacks {', '.join(missing)}"
    try:
        ca_certs, ca_key, leaf = _load_pems(data)
    except (ValueError, TypeError) as exc:
        return f"Secret holds unreadable PEM ({exc})"
    current_ca = ca_certs[0]
    if current_ca.public_key().public_numbers() != ca_key.public_key().public_numbers():
        return "ca.key does not match ca.crt"
    if leaf.issuer != current_ca.subject:
        return "tls.crt was not issued by the current CA"
    try:
        leaf.verify_directly_issued_by(current_ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        return f"tls.crt does not verify against ca.crt ({type(exc).__name__})"
    if not set(sans) <= _sans_of(leaf):
        return f"tls.crt SANs {sorted(_sans_of(leaf))} do not cover {sans}"
    if current_ca.not_valid_after_utc - now < CA_RENEW_BEFORE:
        return f"CA expires {current_ca.not_valid_after_utc:%Y-%m-%d}"
    if leaf.not_valid_after_utc - now < LEAF_RENEW_BEFORE:
        return f"serving certificate expires {leaf.not_valid_after_utc:%Y-%m-%d}"
    if leaf.not_valid_before_utc > now:
        return "serving certificate is not valid yet"
    return None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # rename() is atomic: the server's reloader sees the old file or the new one, never half of one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def new_material(previous: dict[str, bytes] | None, sans: list[str], now: dt.datetime,
                 leaf_days: int = certs.LEAF_DAYS) -> dict[str, bytes]:
    """Fresh serving cert; the CA is kept while it has more than CA_RENEW_BEFORE left.

    When the CA itself is replaced, ca.crt carries the new CA first and the old one after it while the
    old one is still valid, so replicas still serving an old leaf stay trusted during the roll.
    """
    ca_cert = ca_key = None
    old_cas: list[x509.Certificate] = []
    if previous and previous.get("ca.crt") and previous.get("ca.key"):
        try:
            old_cas = x509.load_pem_x509_certificates(previous["ca.crt"])
            key = serialization.load_pem_private_key(previous["ca.key"], password=None)
            if (old_cas[0].public_key().public_numbers() == key.public_key().public_numbers()
                    and old_cas[0].not_valid_after_utc - now >= CA_RENEW_BEFORE):
                ca_cert, ca_key = old_cas[0], key
        except (ValueError, TypeError):
            old_cas = []
    bundle_tail: list[x509.Certificate] = []
    if ca_cert is None:
        ca_cert, ca_key = certs.make_ca()
        bundle_tail = [c for c in old_cas[:1] if c.not_valid_after_utc > now]
    else:
        bundle_tail = [c for c in old_cas[1:] if c.not_valid_after_utc > now]
    leaf, leaf_key = certs.issue_serving_cert(ca_cert, ca_key, sans, days=leaf_days)
    return {
        "ca.crt": b"".join(_pem(c) for c in [ca_cert, *bundle_tail]),
        "ca.key": _key_pem(ca_key),
        "tls.crt": _pem(leaf),
        "tls.key": _key_pem(leaf_key),
    }


# ---- pure: Kubernetes objects ----------------------------------------------------------------------

def secret_object(cfg: CertsConfig, data: dict[str, bytes], resource_version: str | None = None) -> dict:
    meta = {"name": cfg.secret, "namespace": cfg.namespace,
            "labels": {"app.kubernetes.io/name": "bpfinit", "app.kubernetes.io/component": "webhook",
                       "app.kubernetes.io/managed-by": "bpfinit-webhook-certs"}}
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "kubernetes.io/tls",
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def secret_data(secret: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def ca_bundle_patch(configuration: dict, ca_pem: bytes) -> list[dict]:
    """JSON patch setting caBundle on every webhook of a configuration whose bundle differs.

    Each replace/add is preceded by a `test` of that webhook's name: if the list was reordered between
    our read and our patch, the apiserver rejects the whole patch and we retry on a fresh read.
    """
    want = base64.b64encode(ca_pem).decode()
    ops: list[dict] = []
    for index, hook in enumerate(configuration.get("webhooks") or []):
        client_config = hook.get("clientConfig") or {}
        if client_config.get("caBundle") == want:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": hook["name"]})
        ops.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": want})
    return ops


# ---- I/O: the API server -----------------------------------------------------------------------------

@dataclass
class RoundResult:
    secret_action: str = "unchanged"          # created / renewed / adopted / unchanged
    patched: list[str] = field(default_factory=list)
    files_written: bool = False


class CertsReconciler:
    """One reconcile round = make sure Secret, files and caBundles agree. Safe to run in many replicas."""

    def __init__(self, cfg: CertsConfig, api_client, now=lambda: dt.datetime.now(dt.timezone.utc)):
        from kubernetes import client  # imported here so pure users of this module need no client
        self.cfg = cfg
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.admreg = client.AdmissionregistrationV1Api(api_client)
        self.now = now

    def _plain(self, obj) -> dict:
        return self.api_client.sanitize_for_serialization(obj)

    def ensure_secret(self) -> tuple[dict[str, bytes], str]:
        from kubernetes.client.exceptions import ApiException
        cfg = self.cfg
        for _ in range(5):  # bounded: each iteration only repeats after another writer won a race
            try:
                current = self._plain(self.core.read_namespaced_secret(cfg.secret, cfg.namespace))
            except ApiException as exc:
                if exc.status != 404:
                    raise
                current = None
            if current is None:
                data = new_material(None, cfg.sans, self.now())
                try:
                    self.core.create_namespaced_secret(cfg.namespace, secret_object(cfg, data))
                    log.info("created Secret %s/%s with a new CA", cfg.namespace, cfg.secret)
                    return data, "created"
                except ApiException as exc:
                    if exc.status == 409:   # another replica created it first: adopt theirs
                        continue
                    raise
            data = secret_data(current)
            reason = renewal_reason(data, cfg.sans, self.now())
            if reason is None:
                return data, "unchanged"
            fresh = new_material(data, cfg.sans, self.now())
            rv = (current.get("metadata") or {}).get("resourceVersion")
            try:
                self.core.replace_namespaced_secret(cfg.secret, cfg.namespace, secret_object(cfg, fresh, rv))
                log.info("renewed Secret %s/%s: %s", cfg.namespace, cfg.secret, reason)
                return fresh, "renewed"
            except ApiException as exc:
                if exc.status == 409:       # someone renewed it first: re-read and check theirs
                    continue
                raise
        raise CertsError(f"Secret {cfg.namespace}/{cfg.secret} keeps changing under us (5 conflicts in a row)")

    def patch_bundles(self, ca_pem: bytes) -> list[str]:
        from kubernetes.client.exceptions import ApiException
        patched = []
        targets = [("MutatingWebhookConfiguration", n, self.admreg.read_mutating_webhook_configuration,
                    self.admreg.patch_mutating_webhook_configuration) for n in self.cfg.mutating]
        targets += [("ValidatingWebhookConfiguration", n, self.admreg.read_validating_webhook_configuration,
                     self.admreg.patch_validating_webhook_configuration) for n in self.cfg.validating]
        for kind, name, read, patch in targets:
            try:
                ops = ca_bundle_patch(self._plain(read(name)), ca_pem)
                if ops:
                    patch(name, ops, _content_type="application/json-patch+json")
                    patched.append(name)
                    log.info("patched caBundle of %s %s (%d webhooks)", kind, name, len(ops) // 2)
            except ApiException as exc:
                if exc.status == 404:
                    raise CertsError(f"{kind} {name} not found: apply bpfinit's manifests first") from None
                raise
        return patched

    def write_files(self, data: dict[str, bytes]) -> bool:
        out = self.cfg.out_dir
        if out is None:
            return False
        changed = False
        # The server needs only the serving pair and the CA certificate; the CA key stays in the Secret.
        for name, mode in (("ca.crt", 0o644), ("tls.key", 0o600), ("tls.crt", 0o644)):
            path = out / name
            try:
                if path.read_bytes() == data[name]:
                    continue
            except OSError:
                pass
            _write_atomically(path, data[name], mode)
            changed = True
        return changed

    def reconcile(self) -> RoundResult:
        data, action = self.ensure_secret()
        result = RoundResult(secret_action=action)
        result.files_written = self.write_files(data)
        result.patched = self.patch_bundles(data["ca.crt"])
        return result


def _describe(exc: Exception) -> str:
    from kubernetes.client.exceptions import ApiException
    if isinstance(exc, ApiException):
        return f"API server answered {exc.status} {exc.reason}".strip()
    if isinstance(exc, CertsError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run(reconciler: CertsReconciler, stop: threading.Event, once: bool = False,
        deadline_s: float = 120.0) -> int:
    """Reconcile until stopped; with once=True, until the first success or the deadline (exit 1)."""
    cfg = reconciler.cfg
    backoff = 0.5
    started = time.monotonic()
    while not stop.is_set():
        try:
            result = reconciler.reconcile()
            if once:
                log.info("certificates ready (secret %s, patched %s)", result.secret_action, result.patched or "none")
                return 0
            backoff = 0.5
            stop.wait(cfg.interval_s)
            continue
        except Exception as exc:  # noqa: BLE001 - every failure is retried; the reason is logged in one line
            reason = _describe(exc)
        if once and time.monotonic() - started + backoff > deadline_s:
            print(f"bpfinit-webhook certs: giving up after {deadline_s:.0f}s: {reason}", file=sys.stderr)
            return 1
        log.warning("certificate reconcile failed (%s); retrying in %.1fs", reason, backoff)
        stop.wait(backoff * random.uniform(0.8, 1.2))
        backoff = min(backoff * 2, cfg.max_backoff_s)
    return 0


# ---- CLI ---------------------------------------------------------------------------------------------

def _api_client(kubeconfig: str | None):
    from kubernetes import client, config
    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        where = kubeconfig or "the in-cluster service account"
        raise CertsError(f"cannot load Kubernetes credentials from {where}: {str(exc).splitlines()[0]}") from None
    return client.ApiClient(configuration)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpfinit-webhook certs",
                                description="Keep the shared webhook CA/serving-cert Secret, the served files "
                                            "and both webhook configurations' caBundle in agreement.")
    p.add_argument("--namespace", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--service", required=True, help="webhook Service name (the certificate's SANs)")
    p.add_argument("--mutating-webhook-configuration", action="append", default=[], dest="mutating")
    p.add_argument("--validating-webhook-configuration", action="append", default=[], dest="validating")
    p.add_argument("--out-dir", default=None, help="write ca.crt, tls.crt, tls.key here for the server")
    p.add_argument("--once", action="store_true", help="one successful round, then exit (init container)")
    p.add_argument("--deadline", type=float, default=120.0, help="with --once: seconds before giving up")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between rounds")
    p.add_argument("--kubeconfig", default=None, help="out of cluster only; default: in-cluster account")
    return p


def register(subparsers) -> None:
    """Adds `bpfinit-webhook certs` (webhook/cli.py SUBCOMMAND_MODULES)."""
    parser = subparsers.add_parser("certs", help="keep the built-in CA/serving-cert Secret and caBundle current",
                                   description=_parser().description, add_help=False, parents=[_parser()])
    parser.set_defaults(func=run_cli)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_parser().parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not (args.mutating or args.validating):
        print("bpfinit-webhook certs: name at least one --mutating- or --validating-webhook-configuration",
              file=sys.stderr)
        return 2
    if args.interval <= 0 or args.deadline <= 0:
        print("bpfinit-webhook certs: --interval and --deadline must be positive", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None and not out_dir.is_dir():
        print(f"bpfinit-webhook certs: --out-dir {out_dir} is not a directory", file=sys.stderr)
        return 2
    cfg = CertsConfig(namespace=args.namespace, secret=args.secret, service=args.service,
                      mutating=tuple(args.mutating), validating=tuple(args.validating), out_dir=out_dir,
                      interval_s=args.interval)
    try:
        reconciler = CertsReconciler(cfg, _api_client(args.kubeconfig))
    except CertsError as exc:
        print(f"bpfinit-webhook certs: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return run(reconciler, stop, once=args.once, deadline_s=args.deadline)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
