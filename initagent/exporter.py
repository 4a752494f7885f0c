"""`bpfinit-agent exporter`: Prometheus endpoint for the per-pod decision counters of this node.

Meant as a small DaemonSet with the host bpffs mounted (opening pins needs CAP_BPF). Every scrape reads
the pinned maps afresh (no cache, so values are exact at scrape time):

    bpfinit_connections_total{direction,verdict,reason,namespace,pod}   counter
    bpfinit_events_emitted_total / _lost_total / _suppressed_total      counter (node-wide)
    bpfinit_counter_errors_total                                        counter (counter map full)
    bpfinit_pods                                                        gauge (registered pods)
    bpfinit_exporter_scrape_errors_total                                counter
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from initagent import counters, obsmaps
from initagent.cliparse import OneLineParser

DEFAULT_LISTEN = "0.0.0.0:9965"


class BpfinitCollector:
    """Reads the pins on every collect(); a node with no bpfinit pods yet exports zeros, not an error."""

    def __init__(self, bpffs: Path | str):
        self.bpffs = Path(bpffs)
        self.scrape_errors = 0

    def collect(self):
        conns = CounterMetricFamily(
            "bpfinit_connections", "Capture decisions made by bpfinit's kernel programs, per pod.",
            labels=["direction", "verdict", "reason", "namespace", "pod"])
        emitted = CounterMetricFamily("bpfinit_events_emitted", "Decision events written to the event buffer.")
        lost = CounterMetricFamily("bpfinit_events_lost",
                                   "Decision events dropped because the event buffer was full (counters stay exact).")
        suppressed = CounterMetricFamily("bpfinit_events_suppressed",
                                         "Decision events held back by the per-pod rate limit (counters stay exact).")
        counter_errors = CounterMetricFamily("bpfinit_counter_errors",
                                             "Decisions that could not be counted because the counter map was full.")
        pods_gauge = GaugeMetricFamily("bpfinit_pods", "Pods registered with bpfinit observability on this node.")
        errors = CounterMetricFamily("bpfinit_exporter_scrape_errors", "Scrapes that failed to read the BPF maps.")
        try:
            gens = obsmaps.find_generations(self.bpffs)
            pods = counters.pod_counters(self.bpffs) if gens else []
            stats = counters.node_stats(self.bpffs) if gens else dict.fromkeys(obsmaps.STAT_NAMES.values(), 0)
            # Several generations may name the same pod (upgrade); sum per label set.
            acc: dict[tuple, int] = {}
            for pod in pods:
                ns = pod["namespace"] or "unknown"
                name = pod["pod"] or f"pod-idx-{pod['pod_idx']}"
                for r in pod["counters"]:
                    key = (r["direction"].lower(), r["verdict"].lower(), r["reason"], ns, name)
                    acc[key] = acc.get(key, 0) + r["count"]
            for key, value in sorted(acc.items()):
                conns.add_metric(list(key), value)
            emitted.add_metric([], stats["emitted"])
            lost.add_metric([], stats["lost"])
            suppressed.add_metric([], stats["suppressed"])
            counter_errors.add_metric([], stats["counter_full"])
            pods_gauge.add_metric([], len({(p["namespace"], p["pod"]) for p in pods if p["pod"]}))
        except (obsmaps.BpfError, OSError) as e:
            self.scrape_errors += 1
            print(f"bpfinit-agent exporter: scrape failed: {e}", file=sys.stderr)
        errors.add_metric([], self.scrape_errors)
        yield from (conns, emitted, lost, suppressed, counter_errors, pods_gauge, errors)


def make_app(bpffs: Path | str):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BpfinitCollector(bpffs))
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"see /metrics\n"]
    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):     # one line per scrape is noise in a DaemonSet log
        pass


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(bpffs: Path | str, listen: str, ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> None:
    host, port = parse_listen(listen)
    server = make_server(host, port, make_app(bpffs), handler_class=_QuietHandler)
    server.timeout = 0.5
    if ready is not None:
        ready.port = server.server_port        # lets tests bind port 0
        ready.set()
    print(f"bpfinit-agent exporter: serving http://{host}:{server.server_port}/metrics", file=sys.stderr, flush=True)
    try:
        while stop is None or not stop.is_set():
            server.handle_request()
    finally:
        server.server_close()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or OneLineParser(prog="bpfinit-agent exporter",
                                description="Prometheus endpoint for bpfinit's per-pod counters.")
    p.add_argument("--bpffs", default=os.environ.get("BPFINIT_BPFFS", "/sys/fs/bpf"))
    p.add_argument("--listen", default=os.environ.get("BPFINIT_EXPORTER_LISTEN", DEFAULT_LISTEN))
    return p


def run(args: argparse.Namespace) -> int:
    try:
        serve(args.bpffs, args.listen)
    except ValueError as e:
        print(f"bpfinit-agent exporter: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"bpfinit-agent exporter: cannot listen on {args.listen}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
