"""An internal error is never an HTTP 500: the real server (gunicorn, TLS) with a PolicyStore subclass that
raises answers /validate `allowed: false` code 500 (fail closed, message naming the request) and /mutate
`allowed: true` without a patch (the pod keeps istio-init), logs the traceback as JSON and counts it."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import requests

from tests.webhook.conftest import decode_patch, start_server
from tests.webhook.exploding_store_server import FAILURE
from tests.webhook.istio_pods import INJECTED, pod_create_review, pods_in_file
from tests.webhook.test_metrics import samples, value
from webhook import admission
from webhook.app import one_line

SCRIPT = Path(__file__).with_name("exploding_store_server.py")
REPO = Path(__file__).resolve().parents[2]
REQUESTS_EACH = 6


@pytest.fixture(scope="module")
def exploding_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("exploding"), launcher=[sys.executable, str(SCRIPT)])
    yield server
    server.stop()


def _swappable_pod() -> dict:
    return pods_in_file(INJECTED / "hello.yaml.injected")[0]


def test_validate_fails_closed_with_a_visible_one_line_reason(exploding_server):
    review = pod_create_review(_swappable_pod(), namespace="shop")
    uid = review["request"]["uid"]
    response = exploding_server.post("/validate", review)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert admission.verify_response(review, answer, mutating=False) == []
    status = answer["response"]["status"]
    assert answer["response"]["allowed"] is False
    assert status["code"] == 500 and status["reason"] == "InternalError"
    assert status["message"] == (f"bpfinit internal error evaluating policy (request {uid}): "
                                 f"RuntimeError: {FAILURE.splitlines()[0]}")
    assert "Traceback" not in response.text and "second line" not in response.text


def test_mutate_fails_open_without_a_patch_and_says_so(exploding_server):
    review = pod_create_review(_swappable_pod(), namespace="shop")
    uid = review["request"]["uid"]
    answer = exploding_server.review(review)
    assert admission.verify_response(review, answer, mutating=True) == []
    response = answer["response"]
    assert response["allowed"] is True and decode_patch(answer) is None and "patchType" not in response
    first, *error = response["warnings"]
    assert first == f"bpfinit internal error (request {uid}); pod left unchanged: it keeps iptables istio-init"
    assert error and error[0].startswith("bpfinit internal error: KeyError: ")
    assert all(len(w) <= 120 and "Traceback" not in w for w in response["warnings"])


def test_traceback_is_logged_as_json_with_the_uid(exploding_server):
    review = pod_create_review(_swappable_pod(), namespace="shop")
    uid = review["request"]["uid"]
    assert exploding_server.post("/validate", review).status_code == 200
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline:
        lines = [line for line in exploding_server.log_lines() if line.get("uid") == uid]
        if any(line.get("level") == "error" for line in lines):
            break
        time.sleep(0.1)
    (error,) = [line for line in lines if line.get("level") == "error"]
    assert error["msg"] == "internal error" and error["webhook"] == "validate"
    assert error["exception"].startswith("Traceback") and "exploding_store_server.py" in error["exception"]
    assert FAILURE.splitlines()[1] in error["exception"]          # the whole story stays in the log
    (admission_line,) = [line for line in lines if line.get("msg") == "admission"]
    assert admission_line["decision"] == "error" and admission_line["outcome"] == "internal-error"


def test_internal_errors_are_counted(tmp_path):
    server = start_server(tmp_path, launcher=[sys.executable, str(SCRIPT)], workers=1)
    try:
        for _ in range(REQUESTS_EACH):
            with requests.Session() as fresh:
                assert server.post("/validate", pod_create_review(_swappable_pod()), session=fresh).status_code == 200
                assert server.post("/mutate", pod_create_review(_swappable_pod()), session=fresh).status_code == 200
        found = samples(server)
        for webhook in ("validate", "mutate"):
            assert value(found, "bpfinit_webhook_internal_errors_total", webhook=webhook) == REQUESTS_EACH
            assert value(found, "bpfinit_webhook_requests_total", webhook=webhook, decision="error",
                         dry_run="false") == REQUESTS_EACH
            assert value(found, "bpfinit_webhook_outcomes_total", webhook=webhook,
                         outcome="internal-error") == REQUESTS_EACH
    finally:
        server.stop()


def test_a_request_that_needs_no_policy_is_still_answered_normally(exploding_server):
    """Only the requests that reach the broken store are affected: a non-pod mutate needs no policy."""
    review = pod_create_review(_swappable_pod())
    review["request"]["operation"] = "DELETE"
    answer = exploding_server.review(review)
    assert answer["response"]["allowed"] is True and "warnings" not in answer["response"]


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("no text")


@pytest.mark.parametrize("error,expected", [
    (RuntimeError("a\nb"), "RuntimeError: a"),
    (KeyError("k"), "KeyError: 'k'"),
    (ValueError(""), "ValueError"),
    (_UnprintableError(), "_UnprintableError"),
    (RuntimeError("x" * 500), "RuntimeError: " + "x" * 183 + "..."),
])
def test_one_line_is_short_single_line_and_never_raises(error, expected):
    assert one_line(error) == expected
