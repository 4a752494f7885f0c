"""Flask application factory: HTTP transport around the pure admission logic.

Endpoints: POST /mutate, POST /validate, GET /healthz, GET /readyz, GET /metrics.
Every AdmissionReview decision is HTTP 200 (a refusal is `allowed: false`);
unreadable requests get 400/413/415 with a JSON reason; nothing ever answers
with a stack trace.

Extension points for the policy engineer (one function each, no transport work):
- /validate calls `webhook.validate.validate_review(request, policy_store)` where
  `request` is the AdmissionReview's `request` dict; it returns an object with
  `allowed, code, message, warnings, metric_labels` (e.g. webhook.admission.Decision).
  Until `webhook/validate.py` exists, /validate allows everything.
- /mutate asks `policy_store.egress_allow_for(pod, namespace) -> list[str] | None`
  when the store has that method, and passes the list to `mutate()`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from webhook import admission, logs, metrics
from webhook.admission import Decision, EnvelopeError
from webhook.certs import certificate_status
from webhook.mutate import MutationSettings, mutate

DEFAULT_AGENT_IMAGE = "ghcr.io/bpfinit/bpfinit:0.1.0"
# Beyond this an oversized upload is cut off (connection closed) rather than drained.
DRAIN_LIMIT_BYTES = 4 * admission.MAX_BODY_BYTES


@dataclass(frozen=True)
class WebhookSettings:
    agent_image: str = DEFAULT_AGENT_IMAGE
    cert_dir: str | None = None      # /readyz checks the certificates here when set


def _json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")


def _load_validator() -> Callable[[dict, Any], Any] | None:
    # Only "module absent" means allow-all; a module that exists but fails to
    # import must fail loudly at start-up, never silently bypass the policy.
    if importlib.util.find_spec("webhook.validate") is None:
        return None
    return importlib.import_module("webhook.validate").validate_review


def _allow_all(_request: dict, _store: Any) -> Decision:
    return Decision(allowed=True, metric_labels={"outcome": "no-policy"})


def _drain_oversized_body() -> None:
    """Read and drop (a bounded amount of) an oversized body before answering 413.

    A client that is still uploading when the server closes gets a broken pipe
    instead of our status; draining up to DRAIN_LIMIT_BYTES lets it read the 413.
    """
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return
    remaining = DRAIN_LIMIT_BYTES
    try:
        while remaining > 0:
            chunk = stream.read(min(65536, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
    except (OSError, ValueError):
        return


def _read_review() -> dict:
    """The AdmissionReview of the current Flask request, or EnvelopeError."""
    length = request.content_length
    if length is not None and length > admission.MAX_BODY_BYTES:
        if length <= DRAIN_LIMIT_BYTES:
            _drain_oversized_body()
        raise EnvelopeError(413, f"body of {length} bytes exceeds the {admission.MAX_BODY_BYTES}-byte limit")
    if not admission.is_json_content_type(request.content_type):
        raise EnvelopeError(415, f"unsupported content type {request.content_type or '(none)'!r}; "
                                 "expected application/json")
    too_large = EnvelopeError(413, f"body exceeds the {admission.MAX_BODY_BYTES}-byte limit")
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        _drain_oversized_body()
        raise too_large from None
    # Without Content-Length (chunked upload) Werkzeug stops at the limit without
    # saying so: one more byte on the wire means the body was too large.
    if len(body) >= admission.MAX_BODY_BYTES and request.content_length is None:
        stream = request.environ.get("wsgi.input")
        if stream is not None and stream.read(1):
            _drain_oversized_body()
            raise too_large
    return admission.parse_review(body, request.content_type)


def _decide_mutation(review_request: dict, settings: MutationSettings, policy_store: Any) -> tuple[Decision, str]:
    if not admission.is_pod_create(review_request):
        return Decision(allowed=True), "not-a-pod-create"
    pod = review_request["object"]
    egress_allow = None
    egress_allow_for = getattr(policy_store, "egress_allow_for", None)
    if egress_allow_for is not None:
        egress_allow = egress_allow_for(pod, review_request.get("namespace") or "")
    result = mutate(pod, settings, egress_allow)
    if result.denial:
        return Decision(allowed=False, code=422, message=f"bpfinit: {result.denial}",
                        warnings=result.warnings), result.outcome
    return Decision(allowed=True, patch=result.patch or None, warnings=result.warnings), result.outcome


def _decision_word(decision: Any) -> str:
    if not decision.allowed:
        return "denied"
    return "patched" if getattr(decision, "patch", None) else "allowed"


def create_app(settings: WebhookSettings | None = None, policy_store: Any = None) -> Flask:
    settings = settings or WebhookSettings()
    mutation_settings = MutationSettings(agent_image=settings.agent_image)
    validate_review = _load_validator() or _allow_all
    log = logs.get_logger()

    app = Flask("bpfinit-webhook")
    app.config["MAX_CONTENT_LENGTH"] = admission.MAX_BODY_BYTES

    def serve_review(webhook: str, decide: Callable[[dict], tuple[Any, str | None]]) -> Response:
        started = time.perf_counter()
        try:
            review = _read_review()
        except EnvelopeError as error:
            metrics.observe_http_error(webhook, error.status, time.perf_counter() - started)
            log.warning("request refused", extra={"webhook": webhook, "http_status": error.status,
                                                  "reason": error.message})
            return _json_response({"error": error.message}, error.status)
        review_request = admission.request_of(review)
        token = logs.request_uid.set(review_request["uid"])
        try:
            dry_run = admission.is_dry_run(review_request)
            try:
                decision, outcome = decide(review_request)
            except Exception:  # noqa: BLE001 - the apiserver must get a decision, not a 500
                log.exception("internal error", extra={"webhook": webhook})
                decision, outcome = internal_error_decision(webhook), "internal-error"
            answer = admission.build_response(review, decision)
            word = _decision_word(decision)
            seconds = time.perf_counter() - started
            metrics.observe_review(webhook, word, dry_run, seconds, outcome)
            obj = review_request.get("object") if isinstance(review_request.get("object"), dict) else {}
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            log.info("admission", extra={
                "webhook": webhook, "decision": word, "outcome": outcome, "dry_run": dry_run,
                "operation": review_request.get("operation"), "namespace": review_request.get("namespace"),
                "object_name": review_request.get("name") or meta.get("name") or meta.get("generateName"),
                "warnings": len(decision.warnings or []), "duration_ms": round(seconds * 1000, 3)})
            return _json_response(answer)
        finally:
            logs.request_uid.reset(token)

    def internal_error_decision(webhook: str) -> Decision:
        if webhook == "mutate":
            # Same as failurePolicy Ignore: the pod keeps iptables istio-init, which is safe.
            return Decision(allowed=True, warnings=["bpfinit: internal error, pod left unchanged (see webhook logs)"])
        # The validator fails closed: a policy we could not evaluate is not a pass.
        return Decision(allowed=False, code=500,
                        message="bpfinit: internal error while evaluating the egress policy (see webhook logs)")

    def decide_mutate(review_request: dict) -> tuple[Any, str | None]:
        return _decide_mutation(review_request, mutation_settings, policy_store)

    def decide_validate(review_request: dict) -> tuple[Any, str | None]:
        decision = validate_review(review_request, policy_store)
        labels = getattr(decision, "metric_labels", None) or {}
        # A validating answer must never carry a patch (VerifyAdmissionResponse).
        plain = Decision(allowed=bool(decision.allowed), code=getattr(decision, "code", None),
                         message=getattr(decision, "message", "") or "",
                         warnings=list(getattr(decision, "warnings", None) or []),
                         audit_annotations=dict(getattr(decision, "audit_annotations", None) or {}))
        if {"policy", "mode", "reason"} <= set(labels):  # webhook.validate's egress-policy decision
            metrics.observe_policy_decision(labels["policy"], labels["mode"], labels["reason"])
        return plain, labels.get("outcome") or labels.get("reason")

    @app.post("/mutate")
    def mutate_endpoint() -> Response:
        return serve_review("mutate", decide_mutate)

    @app.post("/validate")
    def validate_endpoint() -> Response:
        return serve_review("validate", decide_validate)

    @app.get("/healthz")
    def healthz() -> Response:
        return _json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        if settings.cert_dir is None:
            return _json_response({"status": "ready"})
        ready, reason = certificate_status(settings.cert_dir)
        return _json_response({"status": "ready" if ready else "not ready", "reason": reason},
                              200 if ready else 503)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, status=200, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return _json_response({"error": error.description or error.name}, error.code or 500)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        log.exception("unhandled error")
        return _json_response({"error": "internal error (see webhook logs)"}, 500)

    return app
