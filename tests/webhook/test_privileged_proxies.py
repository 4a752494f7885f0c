"""Opt-in `--mesh-privileged-proxies` (env BPFINIT_MESH_PRIVILEGED_PROXIES): plumbed through serve, the app and
audit like the image lists; on without --accepted-istio-images, serve warns at start-up in one line."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.webhook.conftest import WEBHOOK_BIN, start_server, validator_options
from tests.webhook.istio_pods import INJECTED, pod_create_review, pods_in_file
from webhook import cli
from webhook.app import WebhookSettings, create_app

AGENT = "registry.test/bpfinit/agent:2"
MESH = ("registry.istio.io/testing/proxyv2:*",)
WARNING = ("bpfinit-webhook: warning: --mesh-privileged-proxies is on without --accepted-istio-images: any "
           "container named istio-init or istio-proxy with Istio's privileged shape is exempt whatever its image")
POLICY = ("apiVersion: bpfinit.io/v1alpha1\nkind: EgressBypassPolicy\n"
          "metadata: {name: mesh, namespace: demo}\n"
          "spec:\n  mode: Enforce\n  selector: {matchLabels: {app: hello}}\n"
          "  allowedDestinations: [0.0.0.0/0, '::/0']\n")


def privileged_pod() -> dict:
    """hello.yaml's golden as Istio renders it under values.global.proxy.privileged=true."""
    pod = pods_in_file(INJECTED / "hello.yaml.injected")[0]
    for container in pod["spec"]["initContainers"]:
        if container["name"] in ("istio-init", "istio-proxy"):
            container["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    return pod


# ---- settings ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [("", False), ("0", False), ("false", False), ("Off", False),
                                            ("no", False), ("1", True), ("true", True), ("TRUE", True),
                                            ("yes", True), ("on", True), (" true ", True)])
def test_the_setting_reads_as_a_boolean(value, expected):
    assert cli.mesh_privileged_proxies(value) is expected


def test_anything_else_is_not_a_boolean():
    with pytest.raises(ValueError, match=r"BPFINIT_MESH_PRIVILEGED_PROXIES='maybe' is not a boolean"):
        cli.mesh_privileged_proxies("maybe")


def test_cli_reads_the_flag_and_the_env(monkeypatch):
    monkeypatch.delenv("BPFINIT_MESH_PRIVILEGED_PROXIES", raising=False)
    parse = cli.build_parser().parse_args
    assert cli.mesh_privileged_proxies(parse(["serve"]).mesh_privileged_proxies) is False
    assert cli.mesh_privileged_proxies(parse(["serve", "--mesh-privileged-proxies"]).mesh_privileged_proxies)
    assert cli.mesh_privileged_proxies(parse(["audit", "--mesh-privileged-proxies"]).mesh_privileged_proxies)
    monkeypatch.setenv("BPFINIT_MESH_PRIVILEGED_PROXIES", "true")
    parse = cli.build_parser().parse_args
    assert cli.mesh_privileged_proxies(parse(["serve"]).mesh_privileged_proxies)
    assert cli.mesh_privileged_proxies(parse(["audit"]).mesh_privileged_proxies)


def test_the_warning_is_only_for_privileged_without_images():
    assert cli.privileged_without_images_warning(True, ()) == WARNING.removeprefix("bpfinit-webhook: ")
    assert cli.privileged_without_images_warning(True, MESH) is None
    assert cli.privileged_without_images_warning(False, ()) is None


@pytest.mark.parametrize("command", ["serve", "audit"])
def test_a_value_that_is_not_a_boolean_is_refused(tmp_path, command):
    extra = ["--cert-dir", str(tmp_path / "c"), "--port", "1"] if command == "serve" else ["-f", "-"]
    result = subprocess.run([str(WEBHOOK_BIN), command, *extra], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, input="", env={**os.environ, "BPFINIT_MESH_PRIVILEGED_PROXIES": "maybe"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    prefix = "bpfinit-webhook" if command == "serve" else "bpfinit-webhook audit"
    assert result.stderr.strip() == (f"{prefix}: BPFINIT_MESH_PRIVILEGED_PROXIES='maybe' is not a boolean "
                                     "(true/false, 1/0, yes/no, on/off)")


# ---- the app passes it to the validator ------------------------------------------------------------------
@pytest.mark.parametrize("on", [False, True])
def test_the_app_passes_the_setting_to_the_validator(monkeypatch, on):
    seen = validator_options(monkeypatch, WebhookSettings(agent_image=AGENT, mesh_privileged_proxies=on),
                             privileged_pod())
    assert seen == {"agent_images": (AGENT,), "istio_images": (), "mesh_privileged_proxies": on}


def test_the_mutator_is_unchanged():
    pod = privileged_pod()
    answers = [create_app(WebhookSettings(agent_image=AGENT, mesh_privileged_proxies=on)).test_client()
               .post("/mutate", json=pod_create_review(pod)).get_json()["response"] for on in (False, True)]
    assert answers[0]["patch"] == answers[1]["patch"]


# ---- audit ---------------------------------------------------------------------------------------------
def test_audit_cli_takes_the_setting(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    objects = json.dumps(dict(privileged_pod(), kind="Pod", metadata={"name": "hello", "namespace": "demo",
                                                                        "labels": {"app": "hello"}}))

    def run(*extra, env=None):
        return subprocess.run([str(WEBHOOK_BIN), "audit", "--policy", str(policy), "-f", "-", *extra],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, input=objects,
                              env={**os.environ, **(env or {})})
    off = run(env={"BPFINIT_MESH_PRIVILEGED_PROXIES": ""})
    assert off.returncode == 1 and off.stdout.count("so the pod's capture cannot be verified") == 2
    for on in (run("--mesh-privileged-proxies"), run(env={"BPFINIT_MESH_PRIVILEGED_PROXIES": "true"})):
        assert on.returncode == 0, on.stdout + on.stderr
        assert on.stdout.startswith("1 objects checked, 0 with violations")


# ---- the server: start-up warning, and the setting reaches /validate ---------------------------------------
def _validate(server, pod) -> dict:
    return server.review(pod_create_review(pod, namespace="demo"), path="/validate")["response"]


def test_serve_warns_when_on_without_accepted_images_and_admits_the_privileged_shape(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    server = start_server(tmp_path, "--mesh-privileged-proxies", "--policy", str(policy), "--policy-crds", "off",
                          workers=1)
    try:
        assert _validate(server, privileged_pod())["allowed"] is True
    finally:
        server.stop()
    lines = server.log_path.read_text().splitlines()
    assert lines.count(WARNING) == 1, lines


@pytest.mark.parametrize("extra,env", [
    (["--accepted-istio-images", MESH[0]], {"BPFINIT_MESH_PRIVILEGED_PROXIES": "true"}),   # on, with images
    ([], {"BPFINIT_MESH_PRIVILEGED_PROXIES": ""}),                                          # off
])
def test_serve_does_not_warn_otherwise(tmp_path, monkeypatch, extra, env):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server = start_server(tmp_path, "--policy", str(policy), "--policy-crds", "off", *extra, workers=1)
    try:
        answer = _validate(server, privileged_pod())
        on = env["BPFINIT_MESH_PRIVILEGED_PROXIES"] == "true"
        assert answer["allowed"] is on, answer
        if not on:
            assert "cannot prove the mesh sets it" in answer["status"]["message"]
    finally:
        server.stop()
    assert "--mesh-privileged-proxies" not in server.log_path.read_text()
