"""Prometheus metrics, correct under gunicorn's several worker processes.

prometheus-client picks multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set
*before it is imported*; `webhook.server` sets it (and wipes the directory)
before any worker starts, and `render()` then merges every worker's files.
Without the variable (in-process use, tests of the app factory) the metrics
live in this module's own registry.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from cryptography import x509
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest, multiprocess, values)
from prometheus_client.core import GaugeMetricFamily

# Admission latency on a 2-core node is sub-millisecond to a few ms: fine buckets there.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Metrics:
    """Built on first use, i.e. in the worker, after the multiprocess mode is decided:
    importing this module early (e.g. by the CLI) must not pin single-process mode."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bpfinit_webhook_requests_total",
            "AdmissionReview requests answered, by webhook (mutate|validate), decision "
            "(allowed|patched|denied|error) and dry_run (true|false).",
            ["webhook", "decision", "dry_run"], registry=self.registry)
        self.latency = Histogram(
            "bpfinit_webhook_request_duration_seconds",
            "Time from request received to response ready, by webhook, decision and dry_run.",
            ["webhook", "decision", "dry_run"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.outcomes = Counter(
            "bpfinit_webhook_outcomes_total",
            "What the webhook concluded: for mutate the mutation outcome (swapped, already-swapped, "
            "no-istio-init, istio-cni, opted-out, user-override, unsupported-flags, invalid-annotations, "
            "reserved-volume, untrusted-agent-image, untrusted-istio-image, host-network, mirror-pod, "
            "not-a-pod-create, protected-namespace, internal-error); for validate "
            "the policy's reason (or protectedNamespace, internal-error).",
            ["webhook", "outcome"], registry=self.registry)
        self.policy_decisions = Counter(
            "bpfinit_webhook_policy_decisions_total",
            "Egress-bypass policy decisions of /validate, by policy (namespace/name or none), mode "
            "(Enforce|Warn|Audit|Exempt) and reason (compliant, noPolicy, exempt, or the first violated vector).",
            ["policy", "mode", "reason"], registry=self.registry)
        self.internal_errors = Counter(
            "bpfinit_webhook_internal_errors_total",
            "Unexpected errors inside the webhook (traceback in the log). Each was still answered: "
            "mutate allows the pod unchanged (it keeps istio-init), validate denies with code 500.",
            ["webhook"], registry=self.registry)
        self.http_errors = Counter(
            "bpfinit_webhook_http_errors_total",
            "Requests refused before any decision (400 malformed, 413 too large, 415 content type).",
            ["webhook", "code"], registry=self.registry)


_metrics: _Metrics | None = None
_lock = threading.Lock()


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def enable_multiprocess(path: str) -> None:
    """Switch prometheus-client to multiprocess mode even if it was imported already."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.get_value_class()


def observe_review(webhook: str, decision: str, dry_run: bool, seconds: float, outcome: str | None) -> None:
    m = _get()
    dry = "true" if dry_run else "false"
    m.requests.labels(webhook, decision, dry).inc()
    m.latency.labels(webhook, decision, dry).observe(seconds)
    if outcome:
        m.outcomes.labels(webhook, outcome).inc()


def observe_internal_error(webhook: str) -> None:
    _get().internal_errors.labels(webhook).inc()


def observe_policy_decision(policy: str, mode: str, reason: str) -> None:
    _get().policy_decisions.labels(policy, mode, reason).inc()


def observe_http_error(webhook: str, code: int, seconds: float) -> None:
    m = _get()
    m.http_errors.labels(webhook, str(code)).inc()
    m.requests.labels(webhook, "error", "false").inc()
    m.latency.labels(webhook, "error", "false").observe(seconds)


def multiprocess_dir() -> str | None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if path and os.path.isdir(path) else None


CERT_EXPIRY_METRIC = "bpfinit_webhook_certificate_expiry_timestamp_seconds"


class CertificateExpiryCollector:
    """The serving certificate's notAfter, read from tls.crt at scrape time, so a rotation (Secret
    volume swap, `certs` sidecar) shows at once and every worker reports the same value. No sample
    when the file cannot be read (/readyz then says why)."""

    def __init__(self, cert_dir: str | os.PathLike):
        self.cert_path = Path(cert_dir) / "tls.crt"

    def collect(self):
        family = GaugeMetricFamily(CERT_EXPIRY_METRIC,
                                   "Expiry (notAfter) of the webhook's serving certificate, Unix seconds.")
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError):
            return [family]
        family.add_metric([], cert.not_valid_after_utc.timestamp())
        return [family]


def render(cert_dir: str | os.PathLike | None = None) -> tuple[bytes, str]:
    """Exposition text for /metrics: every worker's samples when multiprocess, plus the certificate
    expiry gauge when the server has a cert dir."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(_get().registry)
    if cert_dir is not None:
        # Computed per scrape, not stored: multiprocess gauges would need per-worker files for a
        # value that is the same in every worker.
        extra = CollectorRegistry()
        extra.register(CertificateExpiryCollector(cert_dir))
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """gunicorn child_exit hook: drop live-gauge files of a dead worker."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)
