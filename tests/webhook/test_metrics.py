"""/metrics aggregates every gunicorn worker (prometheus multiprocess mode), checked against what we sent."""
from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.webhook.conftest import start_server
from tests.webhook.istio_pods import INJECTED, pod_create_review, pods_in_file

MAX_REQUESTS = 300


def samples(server) -> dict:
    text = server.get("/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_aggregated_across_two_workers(tmp_path):
    server = start_server(tmp_path, workers=2)
    try:
        swap = pods_in_file(INJECTED / "hello.yaml.injected")[0]
        cni = pods_in_file(INJECTED / "hello.yaml.cni.injected")[0]
        sent = {"patched": 0, "allowed": 0, "dry": 0, "errors": 0}
        pids: set[int] = set()
        # A new TLS connection per request lets the kernel hand them to either worker.
        for count in range(MAX_REQUESTS):
            with requests.Session() as fresh:
                if count % 4 == 3:
                    response = server.post("/mutate", pod_create_review(cni), session=fresh)
                    sent["allowed"] += 1
                elif count % 4 == 2:
                    response = server.post("/mutate", pod_create_review(swap, dry_run=True), session=fresh)
                    sent["dry"] += 1
                elif count % 4 == 1:
                    response = server.post("/mutate", b"", session=fresh)
                    sent["errors"] += 1
                else:
                    response = server.post("/mutate", pod_create_review(swap), session=fresh)
                    sent["patched"] += 1
            assert response.status_code in (200, 400)
            if count >= 40 and count % 4 == 3:
                pids = {line["pid"] for line in server.log_lines() if line.get("webhook") == "mutate"}
                if len(pids) >= 2:
                    break
        assert len(pids) >= 2, "requests never reached the second worker"
        # Any worker answers /metrics with the same, merged numbers.
        for _ in range(3):
            found = samples(server)
            assert value(found, "bpfinit_webhook_requests_total", webhook="mutate", decision="patched",
                         dry_run="false") == sent["patched"]
            assert value(found, "bpfinit_webhook_requests_total", webhook="mutate", decision="patched",
                         dry_run="true") == sent["dry"]
            assert value(found, "bpfinit_webhook_requests_total", webhook="mutate", decision="allowed",
                         dry_run="false") == sent["allowed"]
            assert value(found, "bpfinit_webhook_http_errors_total", webhook="mutate", code="400") == sent["errors"]
            assert value(found, "bpfinit_webhook_request_duration_seconds_count", webhook="mutate",
                         decision="patched", dry_run="false") == sent["patched"]
            assert value(found, "bpfinit_webhook_outcomes_total", webhook="mutate",
                         outcome="swapped") == sent["patched"] + sent["dry"]
            assert value(found, "bpfinit_webhook_outcomes_total", webhook="mutate",
                         outcome="istio-cni") == sent["allowed"]
            bucket_5ms = value(found, "bpfinit_webhook_request_duration_seconds_bucket", webhook="mutate",
                               decision="patched", dry_run="false", le="+Inf")
            assert bucket_5ms == sent["patched"]
    finally:
        server.stop()
