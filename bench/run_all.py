"""Runs every benchmark in sequence (root needed for all but the webhook one). `make bench` calls this.

Benchmarks are not tests: they report numbers with their conditions (bench/results/*.json) and never
fail on a target. Run them on a quiet machine: each one records the load average it saw.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ("webhook admission latency", ["webhook_bench.py"]),
    ("agent setup time (cold/warm)", ["setup_time.py"]),
    ("connect cost vs exclusion CIDRs", ["cidr_scale.py"]),
    ("datapath: no mesh / floor / iptables / bpfinit / accel / accel pod to pod", ["datapath.py"]),
    ("kernel cost of the programs per proxied request", ["bpf_cost.py"]),
    ("... with acceleration, keep-alive (sk_msg)", ["bpf_cost.py", "--config", "D_bpfinit_accel", "--mode",
                                                     "keepalive", "--out",
                                                     str(HERE / "results" / "bpf_cost_D_keepalive.json")]),
    ("... with acceleration, new connection per request (sockhash inserts)",
     ["bpf_cost.py", "--config", "D_bpfinit_accel", "--mode", "close", "--out",
      str(HERE / "results" / "bpf_cost_D_close.json")]),
    ("cost of decision events", ["events_overhead.py", "--json", str(HERE / "results" / "events_overhead.json")]),
]


def main() -> int:
    failed = []
    for title, args in BENCHMARKS:
        print(f"== {title}: {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]]).returncode != 0:
            failed.append(title)
    if failed:
        print("benchmarks that did not complete: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
