"""AdmissionReview envelope: request checks in, response out (no Flask here).

Rules (admission-webhook-practices.md §4.1, apiserver VerifyAdmissionResponse):
the response carries the request's apiVersion (v1 or v1beta1), kind
AdmissionReview, the request uid, and `patchType` iff `patch`. A body we cannot
read is a transport error (HTTP 400/413/415 with a JSON reason), never a 500;
a policy refusal is HTTP 200 with `allowed: false`.
"""
from __future__ import annotations

import base64
import json
import textwrap
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
# controller-runtime's cap: an UPDATE carries object + oldObject (2 x 3 MiB) + envelope.
MAX_BODY_BYTES = 7 * 1024 * 1024
# kubectl prints each warning as a `Warning:` line. admission-webhook-practices.md §3.3: keep each <= 120
# chars (the apiserver may truncate entries over 256). Texts we write are short; variable parts (user
# values, exception text) are wrapped onto further warning lines at word boundaries, never cut.
WARNING_CHARS = 120
# Pods here are never mutated or policed, whatever the webhook configurations' selectors say.
ALWAYS_PROTECTED_NAMESPACES = ("kube-system",)
STATUS_REASONS = {403: "Forbidden", 422: "Invalid", 500: "InternalError"}


class EnvelopeError(Exception):
    """The HTTP request is not a usable AdmissionReview; `status` is the HTTP code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Decision:
    allowed: bool = True
    code: int | None = None           # HTTP-like status code for a denial (403 by default)
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    patch: list[dict[str, Any]] | None = None
    metric_labels: dict[str, str] = field(default_factory=dict)
    audit_annotations: dict[str, str] = field(default_factory=dict)  # egress policy Audit/Warn records


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json"


def parse_review(body: bytes, content_type: str | None) -> dict:
    """Return the AdmissionReview as a dict, or raise EnvelopeError."""
    if not is_json_content_type(content_type):
        raise EnvelopeError(415, f"unsupported content type {content_type or '(none)'!r}; expected application/json")
    if not body:
        raise EnvelopeError(400, "empty body; expected an AdmissionReview")
    if len(body) > MAX_BODY_BYTES:
        raise EnvelopeError(413, f"body of {len(body)} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:   # a legal but absurdly nested document: a client error, not ours
        raise EnvelopeError(400, "body nests JSON deeper than the parser allows") from None
    if not isinstance(review, dict):
        raise EnvelopeError(400, "body is not a JSON object")
    if review.get("kind") != "AdmissionReview":
        raise EnvelopeError(400, f"kind {review.get('kind')!r} is not AdmissionReview")
    if review.get("apiVersion") not in SUPPORTED_API_VERSIONS:
        raise EnvelopeError(400, f"apiVersion {review.get('apiVersion')!r} is not one of {', '.join(SUPPORTED_API_VERSIONS)}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise EnvelopeError(400, "AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise EnvelopeError(400, "AdmissionReview request has no uid")
    for key in ("object", "oldObject"):
        if request.get(key) is not None and not isinstance(request[key], dict):
            raise EnvelopeError(400, f"request.{key} is not an object")
    return review


def request_of(review: dict) -> dict:
    return review["request"]


def is_dry_run(request: dict) -> bool:
    return request.get("dryRun") is True


def request_namespace(request: dict) -> str:
    """The object's namespace as the apiserver states it (`request.namespace`); a pod in a CREATE
    often lacks metadata.namespace (generateName, namespace from the URL), so that is only a fallback."""
    namespace = request.get("namespace")
    if isinstance(namespace, str) and namespace:
        return namespace
    obj = request.get("object") if isinstance(request.get("object"), dict) else {}
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    fallback = meta.get("namespace")
    return fallback if isinstance(fallback, str) else ""


def protected_namespaces(own_namespace: str, node_namespace: str = "") -> frozenset[str]:
    """kube-system, the webhook's own namespace and the node DaemonSet's: admitting there must never depend on us."""
    return frozenset(n for n in (*ALWAYS_PROTECTED_NAMESPACES, own_namespace, node_namespace) if n)


def is_pod_create(request: dict) -> bool:
    kind = request.get("kind") if isinstance(request.get("kind"), dict) else {}
    resource = request.get("resource") if isinstance(request.get("resource"), dict) else {}
    is_pod = (kind.get("group", "") == "" and kind.get("kind") == "Pod") or \
             (resource.get("group", "") == "" and resource.get("resource") == "pods")
    return (is_pod and request.get("operation") == "CREATE"
            and not request.get("subResource") and isinstance(request.get("object"), dict))


def warning_lines(text: str, limit: int = WARNING_CHARS) -> list[str]:
    """One warning as kubectl lines of <= `limit` chars: as it is when short enough, else wrapped at word
    boundaries (continuation lines indented by two spaces; only a single word longer than a line is split)."""
    if len(text) <= limit:
        return [text]
    return textwrap.wrap(text, width=limit, subsequent_indent="  ", break_on_hyphens=False) or [text[:limit]]


def build_response(review: dict, decision: Decision) -> dict:
    """The AdmissionReview answer for `review` (same apiVersion, uid echoed)."""
    response: dict[str, Any] = {"uid": request_of(review)["uid"], "allowed": bool(decision.allowed)}
    if not decision.allowed:
        code = decision.code if isinstance(decision.code, int) and decision.code >= 400 else 403
        response["status"] = {"code": code, "message": decision.message or "denied by bpfinit",
                              "reason": STATUS_REASONS.get(code, "BadRequest")}
    elif decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(decision.patch, separators=(",", ":")).encode()).decode("ascii")
    if decision.warnings:
        response["warnings"] = [line for w in decision.warnings for line in warning_lines(w)]
    if decision.audit_annotations:
        response["auditAnnotations"] = dict(decision.audit_annotations)
    return {"apiVersion": review["apiVersion"], "kind": "AdmissionReview", "response": response}


def verify_response(review: dict, answer: dict, mutating: bool) -> list[str]:
    """Port of apiserver VerifyAdmissionResponse: problems the apiserver would reject."""
    problems = []
    if answer.get("apiVersion") != review.get("apiVersion") or answer.get("kind") != "AdmissionReview":
        problems.append(f"expected webhook response of {review.get('apiVersion')}, Kind=AdmissionReview, "
                        f"got {answer.get('apiVersion')}, Kind={answer.get('kind')}")
    response = answer.get("response")
    if not isinstance(response, dict):
        return problems + ["response is missing"]
    if response.get("uid") != request_of(review).get("uid"):
        problems.append(f"expected response.uid={request_of(review).get('uid')!r}, got {response.get('uid')!r}")
    if not isinstance(response.get("allowed"), bool):
        problems.append("response.allowed is not a boolean")
    has_patch, has_type = "patch" in response, "patchType" in response
    if review.get("apiVersion") == "admission.k8s.io/v1" and has_patch != has_type:
        problems.append("response.patch and response.patchType must be set together")
    if has_type and response["patchType"] != "JSONPatch":
        problems.append(f"response.patchType {response['patchType']!r} is not JSONPatch")
    if not mutating and (has_patch or has_type):
        problems.append("validating webhook may not return response.patch or response.patchType")
    return problems
