"""Fixtures: a real `bpfinit-webhook serve` (gunicorn, TLS) on loopback, started and reaped by the test."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_BIN = Path(sys.executable).with_name("bpfinit-webhook")
AGENT_IMAGE = "registry.test/bpfinit/agent:test"
START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class WebhookServer:
    process: subprocess.Popen
    port: int
    cert_dir: Path
    log_path: Path
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.cert_dir / "ca.crt")

    def post(self, path: str, body, content_type: str = "application/json", session=None) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": content_type} if content_type is not None else {}
        return (session or self.session).post(self.url + path, data=data, headers=headers,
                                              verify=self.ca, timeout=10)

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.url + path, verify=self.ca, timeout=10)

    def review(self, review: dict, path: str = "/mutate") -> dict:
        response = self.post(path, review)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        return response.json()

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def stop(self) -> None:
        self.session.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(tmp: Path, *extra: str, workers: int = 2, cert_dir: Path | None = None,
                 launcher: list[str] | None = None) -> WebhookServer:
    """Start the server; retried on another port if the chosen one was taken meanwhile.
    `launcher` replaces `bpfinit-webhook serve` (a script that takes the same flags)."""
    cert_dir = cert_dir or tmp / "certs"
    for attempt in range(3):
        port = free_port()
        log_path = tmp / f"server-{port}.log"
        log = open(log_path, "wb")
        process = subprocess.Popen(
            [*(launcher or [str(WEBHOOK_BIN), "serve"]), "--host", "127.0.0.1", "--port", str(port), "--cert-dir", str(cert_dir),
             "--metrics-dir", str(tmp / f"metrics-{port}"), "--agent-image", AGENT_IMAGE,
             "--workers", str(workers), *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        server = WebhookServer(process, port, cert_dir, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if (cert_dir / "ca.crt").exists() and server.get("/readyz").status_code == 200:
                    return server
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.1)
        server.stop()
        if "in use" not in log_path.read_text():
            break
    raise AssertionError(f"webhook server did not become ready:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def webhook_server(tmp_path_factory) -> WebhookServer:
    server = start_server(tmp_path_factory.mktemp("webhook"))
    yield server
    server.stop()


def decode_patch(answer: dict) -> list | None:
    response = answer["response"]
    if "patch" not in response:
        return None
    return json.loads(base64.b64decode(response["patch"]))


def validator_options(monkeypatch, settings, pod: dict) -> dict:
    """The keyword options create_app(settings) passes to validate_review for one /validate of `pod`
    (the real validator still answers; this only records what the app handed it)."""
    from webhook import validate
    from webhook.app import create_app
    from tests.webhook.istio_pods import pod_create_review
    seen: dict = {}
    real = validate.validate_review

    def recording(request, store, **options):
        seen.update(options)
        return real(request, store, **options)
    monkeypatch.setattr(validate, "validate_review", recording)
    create_app(settings).test_client().post("/validate", json=pod_create_review(pod))
    return seen
