"""Kernel cost of bpfinit's programs per proxied request, from the kernel's own bpf_stats.

Sets up bench/datapath.py's two pods for config C (bpfinit) or D (bpfinit + acceleration), turns on
kernel.bpf_stats_enabled for one wrk window, and reports for each bpfinit program how often it ran per
request, its ns per run and its µs per request (bpf_stats adds its own ~20-50 ns per run). Output:
bench/results/bpf_cost.json.
Run as root:  .venv/bin/python bench/bpf_cost.py [--config C_bpfinit] [--mode close] [--duration 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from datapath import MODES, parse_wrk, two_pods  # noqa: E402
from tests.podenv import bpffs_mount  # noqa: E402

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def bpfinit_progs() -> dict[int, dict]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    return {p["id"]: p for p in json.loads(out) if p.get("name", "").startswith("bpfinit_")}


def measure(config: str, mode: str, duration: float, proxy_mode: str) -> dict:
    with bpffs_mount() as bpffs, two_pods(config, bpffs, proxy_mode) as (client, _server, _sidecars, url):
        before_flag = STATS.read_text().strip()
        STATS.write_text("1")
        try:
            p0 = bpfinit_progs()
            out = client.run(["wrk", *MODES[mode], f"-d{duration:g}s", url], uid=1000, gid=1000,
                             timeout=duration + 30)
            p1 = bpfinit_progs()
        finally:
            STATS.write_text(before_flag)
    requests = max(1, parse_wrk(out.stdout)["requests"])
    progs: dict[str, dict] = {}
    for pid, prog in p1.items():
        runs = prog.get("run_cnt", 0) - p0.get(pid, {}).get("run_cnt", 0)
        ns = prog.get("run_time_ns", 0) - p0.get(pid, {}).get("run_time_ns", 0)
        if runs:
            row = progs.setdefault(prog["name"], {"runs": 0, "ns": 0})
            row["runs"] += runs
            row["ns"] += ns
    table = {name: {"runs_per_request": round(r["runs"] / requests, 2), "ns_per_run": round(r["ns"] / r["runs"]),
                    "us_per_request": round(r["ns"] / requests / 1000, 3)} for name, r in sorted(progs.items())}
    return {"config": config, "mode": mode, "proxy_mode": proxy_mode, "duration_s": duration,
            "requests": requests, "programs": table,
            "total_us_per_request": round(sum(r["us_per_request"] for r in table.values()), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("C_bpfinit", "D_bpfinit_accel"), default="C_bpfinit")
    ap.add_argument("--mode", choices=tuple(MODES), default="close")
    ap.add_argument("--proxy-mode", choices=("tcp", "http"), default="tcp")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bpf_cost.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/bpf_cost.py needs root (namespaces, bpf)", file=sys.stderr)
        return 2
    result = measure(args.config, args.mode, args.duration, args.proxy_mode)
    result.update(kernel=platform.release(), cpus=os.cpu_count(), measured=time.strftime("%Y-%m-%d %H:%M:%S"),
                  loadavg_end=Path("/proc/loadavg").read_text().split()[:3])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
