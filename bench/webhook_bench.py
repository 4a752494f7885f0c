#!/usr/bin/env python3
"""Load the running webhook over HTTPS with `hey` using Istio's injected pods; report throughput and latency.

    .venv/bin/python bench/webhook_bench.py                 # starts its own server on loopback
    .venv/bin/python bench/webhook_bench.py --url https://127.0.0.1:8443   # an already running server

Runs closed-loop (as fast as possible) at concurrency 1, 16 and 64, then an open-loop run at the target
rate (500 admissions/s), each over several real Istio pods (AdmissionReview bodies built from
tests/data/istio/injected). Latency is hey's per-request response time (client side: includes TLS record
work, HTTP and the Go client); the server-side handler time comes from the webhook's own histogram.
Writes bench/results/webhook.json and bench/results/webhook.md. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.webhook.istio_pods import INJECTED, pod_create_review, pods_in_file  # noqa: E402

RESULTS = REPO / "bench" / "results"
# Representative mix: swaps (Deployment, traffic annotations, non-native sidecar) and a CNI pod left alone.
BENCH_PODS = ("hello.yaml.injected", "traffic-annotations.yaml.injected", "hello-old-version.yaml.injected",
              "hello.yaml.cni.injected")
TARGET_RATE = 500
TARGET_P99_MS = 5.0
READY_TIMEOUT_S = 30


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def start_server(workdir: Path, workers: int, threads: int,
                 log_level: str = "info") -> tuple[subprocess.Popen, str, Path]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(workdir / "server.log", "wb")
    process = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "bpfinit-webhook"), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--cert-dir", str(workdir / "certs"), "--metrics-dir", str(workdir / "metrics"),
         "--workers", str(workers), "--threads", str(threads), "--log-level", log_level],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    log.close()
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{(workdir / 'server.log').read_text()[-2000:]}")
        probe = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", url + "/readyz"],
                               capture_output=True, text=True, timeout=10)
        if probe.stdout == "200":
            return process, url, workdir / "certs" / "ca.crt"
        time.sleep(0.2)
    process.kill()
    process.wait(timeout=10)
    raise SystemExit("server did not become ready")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def write_bodies(workdir: Path) -> list[Path]:
    bodies = []
    for name in BENCH_PODS:
        path = workdir / (name + ".json")
        path.write_text(json.dumps(pod_create_review(pods_in_file(INJECTED / name)[0])))
        bodies.append(path)
    return bodies


def run_hey(url: str, body: Path, concurrency: int, seconds: float, rate_per_worker: float | None) -> list[dict]:
    command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
               "-D", str(body), "-o", "csv", "-cpus", "1"]
    if rate_per_worker:
        command += ["-q", f"{rate_per_worker:g}"]
    done = subprocess.run(command + [url + "/mutate"], capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise SystemExit(f"hey failed: {done.stderr[-2000:]}")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    return [{"seconds": float(r["response-time"]), "status": int(r["status-code"]), "offset": float(r["offset"])}
            for r in rows]


def server_handler_stats(url: str) -> dict:
    """Server-side handler latency from the webhook's own histogram (all workers merged)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = subprocess.run(["curl", "-sk", url + "/metrics"], capture_output=True, text=True, timeout=10).stdout
    buckets: dict[float, float] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("webhook") != "mutate" or sample.labels.get("decision") == "error":
                continue
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value

    def bucket_quantile(q: float) -> float:
        for bound in sorted(buckets):
            if buckets[bound] >= q * count:
                return bound * 1000
        return float("nan")

    return {"requests": int(count), "mean_ms": round(total / count * 1000, 3) if count else None,
            "p50_upper_bound_ms": bucket_quantile(0.5), "p99_upper_bound_ms": bucket_quantile(0.99)}


def measure_pure_mutation(repeat: int = 2000) -> dict:
    """mutate() alone, in this process: what the handler cannot go below."""
    from webhook.mutate import MutationSettings, mutate

    pod = pods_in_file(INJECTED / "hello.yaml.injected")[0]
    body = json.dumps(pod_create_review(pod))
    settings = MutationSettings(agent_image="bench/agent:1")
    started = time.perf_counter()
    for _ in range(repeat):
        mutate(pod, settings)
    mutate_us = (time.perf_counter() - started) / repeat * 1e6
    started = time.perf_counter()
    for _ in range(repeat):
        json.loads(body)
    parse_us = (time.perf_counter() - started) / repeat * 1e6
    return {"mutate_us": round(mutate_us, 1), "json_parse_us": round(parse_us, 1), "body_bytes": len(body)}


def server_cpu_seconds(pid: int | None) -> float | None:
    """User+system CPU of the server (arbiter and its workers) so far; None for an external server."""
    if pid is None:
        return None
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    ticks = 0
    for one in pids:
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])   # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_level(url: str, bodies: list[Path], concurrency: int, seconds_per_body: float,
              rate_total: float | None, server_pid: int | None = None) -> dict:
    latencies, errors, requests, elapsed = [], 0, 0, 0.0
    # Worker processes live as long as the server (no max_requests), so the CPU delta is this level's.
    cpu_before = server_cpu_seconds(server_pid)
    for body in bodies:
        rate = rate_total / concurrency if rate_total else None
        rows = run_hey(url, body, concurrency, seconds_per_body, rate)
        ok = [r for r in rows if r["status"] == 200]
        errors += len(rows) - len(ok)
        requests += len(rows)
        latencies += [r["seconds"] * 1000 for r in ok]
        elapsed += max((r["offset"] + r["seconds"] for r in rows), default=seconds_per_body)
    return {
        "concurrency": concurrency, "target_rate": rate_total, "requests": requests, "errors": errors,
        "throughput_rps": round(requests / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 0.50), 3), "p90_ms": round(percentile(latencies, 0.90), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3), "max_ms": round(max(latencies, default=float("nan")), 3),
        "mean_ms": round(statistics.fmean(latencies), 3) if latencies else None,
        "server_cpu_ms_per_request": (round((server_cpu_seconds(server_pid) - cpu_before) * 1000 / requests, 3)
                                      if server_pid is not None and requests else None),
    }


def conditions(workers: int, threads: int, external: bool, log_level: str) -> dict:
    hey_version = "hey (Debian package)"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
        "server": "external" if external else (f"bpfinit-webhook serve, gunicorn gthread, {workers} workers x "
                                                f"{threads} threads, log level {log_level}"),
        "load_generator": f"{hey_version}, -cpus 1, same machine (competes with the server for the 2 cores)",
        "transport": "HTTPS (TLS 1.3, keep-alive), loopback",
        "pods": list(BENCH_PODS),
    }


def markdown(report: dict) -> str:
    lines = ["# Webhook benchmark", "", "Conditions: " + "; ".join(f"{k}: {v}" for k, v in report["conditions"].items()
                                                                  if k != "pods"),
             "", "Pods: " + ", ".join(report["conditions"]["pods"]), "",
             "| concurrency | rate limit | requests | errors | throughput (req/s) | p50 ms | p90 ms | p99 ms | max ms "
             "| server CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['concurrency']} | {run['target_rate'] or 'none'} | {run['requests']} | {run['errors']} | "
                     f"{run['throughput_rps']} | {run['p50_ms']} | {run['p90_ms']} | {run['p99_ms']} | {run['max_ms']} "
                     f"| {run.get('server_cpu_ms_per_request') or '-'} |")
    target = report["target"]
    lines += ["", f"Target p99 <= {TARGET_P99_MS} ms at {TARGET_RATE} admissions/s: "
                  f"**{'met' if target['met'] else 'not met'}** (p99 {target['p99_ms']} ms at "
                  f"{target['throughput_rps']} req/s, hey -c 4 -q 125; with -c 16 -q 31, i.e. synchronized bursts of 16, "
                  f"p99 {target['bursty_c16_p99_ms']} ms).",
              "", f"Server-side handler time (webhook histogram, all runs): {report['server_handler']}",
              f"In-process cost per admission: {report['pure']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--seconds", type=float, default=12.0, help="duration per concurrency level (default 12)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--levels", default="1,16,64", help="closed-loop concurrency levels (default 1,16,64)")
    parser.add_argument("--log-level", default="info",
                        help="server log level (default info, the production default: one JSON line per admission)")
    parser.add_argument("--output", default=str(RESULTS / "webhook.json"))
    args = parser.parse_args(argv)
    if shutil.which("hey") is None:
        print("webhook_bench: `hey` is not installed (apt-get install hey)", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="bpfinit-webhook-bench-"))
    process = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            process, url, _ = start_server(workdir, args.workers, args.threads, args.log_level)
        server_pid = process.pid if process is not None else None
        bodies = write_bodies(workdir)
        report = {"conditions": conditions(args.workers, args.threads, bool(args.url), args.log_level), "runs": []}
        per_body = max(1.0, args.seconds / len(bodies))
        run_level(url, bodies[:1], 4, 2.0, None)  # warm-up: imports, connections, caches
        for concurrency in [int(c) for c in args.levels.split(",") if c]:
            report["runs"].append(run_level(url, bodies, concurrency, per_body, None, server_pid))
            print(json.dumps(report["runs"][-1]), file=sys.stderr)
        # hey's rate limit ticks every worker at the same instant: -c 16 -q 31 sends bursts of 16
        # simultaneous requests every 32 ms (a worst case); -c 4 -q 125 is closer to independent arrivals.
        target = run_level(url, bodies, 4, per_body, TARGET_RATE, server_pid)
        bursty = run_level(url, bodies, 16, per_body, TARGET_RATE, server_pid)
        for run in (target, bursty):
            report["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
        report["target"] = {"rate": TARGET_RATE, "p99_ms": target["p99_ms"],
                            "throughput_rps": target["throughput_rps"],
                            "met": target["p99_ms"] <= TARGET_P99_MS and target["throughput_rps"] >= 0.95 * TARGET_RATE,
                            "bursty_c16_p99_ms": bursty["p99_ms"]}
        report["server_handler"] = server_handler_stats(url)
        report["pure"] = measure_pure_mutation()
        report["conditions"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        output.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return 0
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
