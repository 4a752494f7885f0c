"""`bpfinit-webhook audit`: every violation of the current policy, from a kubectl JSON file or the cluster."""
from __future__ import annotations

import json
import subprocess
import threading
from http.server import ThreadingHTTPServer

import yaml

from tests.jsonhttp import JsonHandler
from tests.webhook.conftest import WEBHOOK_BIN
from webhook.audit import audit, objects_from_cluster, objects_from_text
from webhook.policy import parse_policy_documents

from .corpus import NAMESPACE, PRODUCER_LABELS, annotate, base_objects, policy_doc, set_labels
from .test_validate import VECTORS, make

POLICY = [policy_doc("allow-kafka-egress", NAMESPACE, mode="Audit", selector={"matchLabels": dict(PRODUCER_LABELS)},
                     allowedDestinations=["172.20.0.0/16:9092"])]


def _with_namespace(obj, namespace=NAMESPACE):
    obj.setdefault("metadata", {})["namespace"] = namespace
    return obj


def _inventory():
    """A cluster snapshot: one clean Deployment, one with the seed's bad annotation, a hostNetwork Pod,
    a Service (ignored) and a pod nobody's policy selects."""
    clean = _with_namespace(make("Deployment"))
    bad = _with_namespace(make("Deployment", VECTORS[0]))
    bad["metadata"]["name"] = "producer-wide"
    host = _with_namespace(make("Pod", next(v for v in VECTORS if v.id == "host-network")))
    other = _with_namespace(set_labels(base_objects()["Pod"], {"app": "consumer"}))
    annotate(other, **{"traffic.sidecar.istio.io/excludeOutboundIPRanges": "0.0.0.0/0"})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": NAMESPACE}, "spec": {}}
    return [clean, bad, host, other, service]


def test_audit_reports_every_violation_whatever_the_mode():
    report = audit(_inventory(), parse_policy_documents(POLICY, "t"))
    assert report.checked == 4 and report.errors == []
    by_object = {(v.kind, v.name): v for v in report.violations}
    pod_name = base_objects()["Pod"]["metadata"]["name"]
    assert set(by_object) == {("Deployment", "producer-wide"), ("Pod", pod_name)}  # clean and unselected: none
    wide = by_object[("Deployment", "producer-wide")]
    assert (wide.mode, wide.reason, wide.policy) == ("Audit", "excludedCidr", f"{NAMESPACE}/allow-kafka-egress")
    assert wide.message == ("traffic.sidecar.istio.io/excludeOutboundIPRanges: 0.0.0.0/0 is not inside "
                            "[172.20.0.0/16:9092]")
    assert any(v.reason == "hostNetwork" for v in report.violations)


def test_kubectl_output_shapes_are_read():
    pod = _with_namespace(make("Pod", VECTORS[0]))
    pod_list = {"apiVersion": "v1", "kind": "PodList", "items": [{k: v for k, v in pod.items() if k != "kind"}]}
    assert objects_from_text(json.dumps(pod_list), "x")[0]["kind"] == "Pod"   # kind-less items of a typed list
    assert len(objects_from_text(yaml.safe_dump_all([pod, pod]), "x")) == 2    # `-o yaml` streams
    assert objects_from_text(json.dumps(pod), "x") == [pod]                     # a single object


def _run_cli(tmp_path, objects, *extra, policy=POLICY):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump_all(policy))
    objects_file = tmp_path / "objects.json"
    objects_file.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    return subprocess.run([str(WEBHOOK_BIN), "audit", "--policy", str(policy_file), "-f", str(objects_file), *extra],
                          capture_output=True, text=True, timeout=60)


def test_cli_text_and_exit_codes(tmp_path):
    result = _run_cli(tmp_path, _inventory())
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"Audit    {NAMESPACE}/Deployment/producer-wide: traffic.sidecar.istio.io/"
                               "excludeOutboundIPRanges: 0.0.0.0/0 is not inside [172.20.0.0/16:9092] "
                               f"(policy {NAMESPACE}/allow-kafka-egress)") for line in lines), lines
    assert lines[-1].startswith("4 objects checked, 2 with violations")
    clean = _run_cli(tmp_path, [_with_namespace(make("Deployment"))])
    assert clean.returncode == 0 and clean.stdout.startswith("1 objects checked, 0 with violations")


def test_cli_json_and_namespace_filter(tmp_path):
    result = _run_cli(tmp_path, _inventory(), "-o", "json")
    data = json.loads(result.stdout)
    assert data["checked"] == 4 and {v["reason"] for v in data["violations"]} >= {"excludedCidr", "hostNetwork"}
    other_ns = _run_cli(tmp_path, _inventory(), "-n", "elsewhere")
    assert other_ns.returncode == 0 and other_ns.stdout.startswith("0 objects checked")


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "junk.json").write_text("{ [")
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(yaml.safe_dump_all(POLICY))
    for args, fragment in [
        (["--policy", str(policy_file), "-f", str(tmp_path / "junk.json")], "neither JSON nor YAML"),
        (["--policy", str(policy_file), "-f", str(tmp_path / "missing.json")], "cannot read: No such file"),
        (["-f", str(tmp_path / "junk.json")], "no policy to audit against"),
        (["--policy", str(tmp_path / "missing.yaml"), "-f", "-"], "cannot read policy file"),
    ]:
        result = subprocess.run([str(WEBHOOK_BIN), "audit", *args], capture_output=True, text=True, timeout=60,
                                input="")
        assert result.returncode == 2 and fragment in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


class _FakeApiserver(JsonHandler):
    """List endpoints only (there is no kube-apiserver binary on this machine)."""
    lists: dict = {}

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        self.send_json(200, self.lists.get(path, {"apiVersion": "v1", "kind": "List", "items": []}))


def test_cluster_listing_with_the_kubernetes_client():
    from kubernetes import client

    bad_pod = _with_namespace(make("Pod", VECTORS[0]))
    bad_deploy = _with_namespace(make("Deployment", VECTORS[0]))
    _FakeApiserver.lists = {
        "/api/v1/pods": {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [bad_pod]},
        "/apis/apps/v1/deployments": {"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {},
                                      "items": [bad_deploy]},
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApiserver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = client.Configuration()
        config.host = f"http://127.0.0.1:{server.server_address[1]}"
        objects = objects_from_cluster(client.ApiClient(config))
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(o["kind"] for o in objects) == ["Deployment", "Pod"]
    report = audit(objects, parse_policy_documents(POLICY, "t"))
    assert {v.kind for v in report.violations} == {"Pod", "Deployment"}
    assert all(v.reason == "excludedCidr" for v in report.violations)
