"""Flask application factory: HTTP transport around the pure admission logic.

Endpoints: POST /mutate, POST /validate, GET /healthz, GET /readyz, GET /metrics.
Every AdmissionReview decision is HTTP 200 (a refusal is `allowed: false`);
unreadable requests get 400/413/415 with a JSON reason; nothing ever answers
with a stack trace.

Extension points for the policy engineer (one function each, no transport work):
- /validate calls `webhook.validate.validate_review(request, policy_store)` where
  `request` is the AdmissionReview's `request` dict; it returns an object with
  `allowed, code, message, warnings, metric_labels` (e.g. webhook.admission.Decision).
  Until `webhook/validate.py` exists, /validate allows everything. It is also given
  `agent_images=` (the agent images this webhook accepts, see WebhookSettings),
  `istio_images=` (its accepted Istio proxy images; empty: not checked) and
  `mesh_privileged_proxies=` (Istio's privileged proxy shape is exempt).
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
from webhook.mutate import DEFAULT_AGENT_IMAGE, MutationSettings, clean_images, mutate, trusted_agent_images
# Beyond this an oversized upload is cut off (connection closed) rather than drained.
DRAIN_LIMIT_BYTES = 4 * admission.MAX_BODY_BYTES
INTERNAL_ERROR = "internal-error"
ERROR_LINE_CHARS = 200


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`, short enough for a warning or status message."""
    try:
        message = str(error).strip()
    except Exception:  # noqa: BLE001 - a broken __str__ must not turn the answer into a 500
        message = ""
    text = message.splitlines()[0].strip() if message else ""
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= ERROR_LINE_CHARS else line[:ERROR_LINE_CHARS - 3] + "..."


def internal_error_decision(webhook: str, uid: str, error: BaseException) -> Decision:
    """What an internal error answers (HTTP 200, never 500: the apiserver gets a decision it can show)."""
    uid = uid if len(uid) <= 64 else uid[:61] + "..."   # apiserver uids are UUIDs; a client's may be anything
    if webhook == "mutate":
        # Same as failurePolicy Ignore: the pod keeps iptables istio-init, which is safe.
        return Decision(allowed=True, warnings=[
            f"bpfinit internal error (request {uid}); pod left unchanged: it keeps iptables istio-init",
            *admission.warning_lines(f"bpfinit internal error: {one_line(error)}")])
    # The validator fails closed: a policy we could not evaluate is not a pass. The message is visible
    # to the user, and the uid finds the traceback in the webhook's log.
    return Decision(allowed=False, code=500,
                    message=f"bpfinit internal error evaluating policy (request {uid}): {one_line(error)}")


@dataclass(frozen=True)
class WebhookSettings:
    agent_image: str = DEFAULT_AGENT_IMAGE
    # more images a container running bpfinit-agent may carry (rolling upgrade: the previous agent image);
    # agent_image is always accepted, so the default accepts exactly the configured one
    accepted_agent_images: tuple[str, ...] = ()
    # opt-in: the images Istio's capture containers (istio-init, istio-validation, istio-proxy) must carry
    # to be Istio's (`REPOSITORY:*` = any tag/digest); empty, the default: Istio's images are not checked
    accepted_istio_images: tuple[str, ...] = ()
    # opt-in: the mesh sets Istio's values.global.proxy.privileged, so istio-init / istio-proxy with exactly
    # that rendering (privileged + allowPrivilegeEscalation) are exempt; off, the default: unverifiable
    mesh_privileged_proxies: bool = False
    cert_dir: str | None = None      # /readyz and the expiry gauge check the certificates here when set
    own_namespace: str = "bpfinit-system"   # where the webhook runs (`serve --namespace`)
    node_namespace: str = "bpfinit-node"    # where the exporter/gc DaemonSet runs (`serve --node-namespace`)

    @property
    def protected_namespaces(self) -> frozenset[str]:
        return admission.protected_namespaces(self.own_namespace, self.node_namespace)

    @property
    def trusted_agent_images(self) -> tuple[str, ...]:
        return trusted_agent_images(self.agent_image, self.accepted_agent_images)


def _json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")


def _load_validator() -> Callable[[dict, Any], Any] | None:
    # Only "module absent" means allow-all; a module that exists but fails to
    # import must fail loudly at start-up, never silently bypass the policy.
    if importlib.util.find_spec("webhook.validate") is None:
        return None
    return importlib.import_module("webhook.validate").validate_review


def _allow_all(_request: dict, _store: Any, **_options: Any) -> Decision:
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


def _decide_mutation(review_request: dict, settings: MutationSettings, policy_store: Any,
                     protected: frozenset[str] = frozenset()) -> tuple[Decision, str]:
    if not admission.is_pod_create(review_request):
        return Decision(allowed=True), "not-a-pod-create"
    namespace = admission.request_namespace(review_request)
    if namespace in protected:
        # Defence in depth behind the configurations' namespaceSelector: never touch the control plane
        # or our own pods, even if someone edits the selectors.
        return Decision(allowed=True), "protected-namespace"
    pod = review_request["object"]
    egress_allow = None
    egress_allow_for = getattr(policy_store, "egress_allow_for", None)
    if egress_allow_for is not None:
        egress_allow = egress_allow_for(pod, namespace)
    result = mutate(pod, settings, egress_allow)
    if result.denial:
        return Decision(allowed=False, code=422, message=f"bpfinit: {result.denial}",
                        warnings=result.warnings), result.outcome
    return Decision(allowed=True, patch=result.patch or None, warnings=result.warnings), result.outcome


def _decision_word(decision: Any, outcome: str | None = None) -> str:
    if outcome == INTERNAL_ERROR:
        return "error"
    if not decision.allowed:
        return "denied"
    return "patched" if getattr(decision, "patch", None) else "allowed"


def create_app(settings: WebhookSettings | None = None, policy_store: Any = None) -> Flask:
    settings = settings or WebhookSettings()
    mutation_settings = MutationSettings(agent_image=settings.agent_image,
                                         accepted_agent_images=tuple(settings.accepted_agent_images),
                                         accepted_istio_images=clean_images(settings.accepted_istio_images))
    agent_images = settings.trusted_agent_images
    istio_images = mutation_settings.accepted_istio_images
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
        except Exception as error:  # noqa: BLE001 - no uid yet, so no AdmissionReview; still never a 500
            log.exception("internal error reading the request", extra={"webhook": webhook})
            _guarded(metrics.observe_internal_error, webhook)
            _guarded(metrics.observe_http_error, webhook, 400, time.perf_counter() - started)
            return _json_response({"error": f"cannot read the AdmissionReview: {one_line(error)}"}, 400)
        review_request = admission.request_of(review)
        uid = review_request["uid"]
        token = logs.request_uid.set(uid)
        try:
            dry_run = admission.is_dry_run(review_request)
            try:
                decision, outcome = decide(review_request)
                answer = _json_response(admission.build_response(review, decision))
            except Exception as error:  # noqa: BLE001 - the apiserver must get a decision, not a 500
                log.exception("internal error", extra={"webhook": webhook, "error": one_line(error)})
                decision, outcome = internal_error_decision(webhook, uid, error), INTERNAL_ERROR
                answer = _json_response(admission.build_response(review, decision))
            if outcome == INTERNAL_ERROR:
                _guarded(metrics.observe_internal_error, webhook)
            word = _decision_word(decision, outcome)
            seconds = time.perf_counter() - started
            _guarded(metrics.observe_review, webhook, word, dry_run, seconds, outcome)
            _guarded(log_admission, webhook, review_request, decision, word, outcome, dry_run, seconds)
            return answer
        finally:
            logs.request_uid.reset(token)

    def _guarded(record: Callable[..., Any], *args: Any) -> None:
        # Metrics and logs are bookkeeping: a failure there must not cost the apiserver its answer.
        try:
            record(*args)
        except Exception:  # noqa: BLE001
            log.exception("bookkeeping failed", extra={"what": getattr(record, "__name__", "?")})

    def log_admission(webhook: str, review_request: dict, decision: Any, word: str, outcome: str | None,
                      dry_run: bool, seconds: float) -> None:
        obj = review_request.get("object") if isinstance(review_request.get("object"), dict) else {}
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        log.info("admission", extra={
            "webhook": webhook, "decision": word, "outcome": outcome, "dry_run": dry_run,
            "operation": review_request.get("operation"), "namespace": admission.request_namespace(review_request),
            "object_name": review_request.get("name") or meta.get("name") or meta.get("generateName"),
            "warnings": len(decision.warnings or []), "duration_ms": round(seconds * 1000, 3)})

    def decide_mutate(review_request: dict) -> tuple[Any, str | None]:
        return _decide_mutation(review_request, mutation_settings, policy_store, settings.protected_namespaces)

    def decide_validate(review_request: dict) -> tuple[Any, str | None]:
        if admission.request_namespace(review_request) in settings.protected_namespaces:
            # Defence in depth: the control plane and our own pods must start even if the validator's
            # namespaceSelector was edited, or our fail-closed validator could lock itself out.
            return Decision(allowed=True), "protectedNamespace"
        decision = validate_review(review_request, policy_store, agent_images=agent_images,
                                   istio_images=istio_images,
                                   mesh_privileged_proxies=settings.mesh_privileged_proxies)
        labels = getattr(decision, "metric_labels", None) or {}
        # A validating answer must never carry a patch (VerifyAdmissionResponse).
        plain = Decision(allowed=bool(decision.allowed), code=getattr(decision, "code", None),
                         message=getattr(decision, "message", "") or "",
                         warnings=list(getattr(decision, "warnings", None) or []),
                         audit_annotations=dict(getattr(decision, "audit_annotations", None) or {}))
        if {"policy", "mode", "reason"} <= set(labels):  # webhook.validate's egress-policy decision
            _guarded(metrics.observe_policy_decision, labels["policy"], labels["mode"], labels["reason"])
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
        body, content_type = metrics.render(settings.cert_dir)
        return Response(body, status=200, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return _json_response({"error": error.description or error.name}, error.code or 500)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        log.exception("unhandled error")
        return _json_response({"error": "internal error (see webhook logs)"}, 500)

    return app
