"""Cost of bpfinit's decision events: datapath RPS with events on (default sampling) vs off (counters only).

Setup (all inside namespaces this script creates; needs root):
  pod netns + cgroup, `bpfinit-agent setup -p 15001 -u 1337 -i '*'` (the real programs), HAProxy as the
  outbound sidecar (uid 1337, SO_ORIGINAL_DST backend), an HAProxy HTTP server answering 200 on
  10.96.0.10:8080 in the cluster netns, wrk in the pod as uid 1000.
Modes, interleaved round by round so drift hits both alike:
  off       = `observe --events-off` (counters still counted)
  default   = events on, default per-pod rate limit
  unlimited = events on, no rate limit, nobody reading (worst case: every decision reserves ring space
              or counts a loss)
Two loads: `close` (new connection per request: 2 decisions per request, the app's redirect and the
proxy's upstream bypass) and `keepalive` (no decision per request).

    .venv/bin/python bench/events_overhead.py [--rounds 3] [--seconds 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from initagent import counters  # noqa: E402
from tests.podenv import Pod, bpffs_mount, require_kernel  # noqa: E402

SERVICE = "10.96.0.10"
SIDECAR = """
global
  maxconn 8000
  nbthread 1
  uid 1337
  gid 1337
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend outbound
  bind 127.0.0.1:15001
  default_backend original_destination
backend original_destination
  server orig 0.0.0.0
"""
UPSTREAM = f"""
global
  maxconn 8000
  nbthread 1
defaults
  mode http
  timeout client 30s
  timeout server 30s
  timeout connect 2s
frontend web
  bind {SERVICE}:8080
  http-request return status 200 content-type text/plain string ok
"""


def observe(bpffs: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "initagent.cli", "observe", "--bpffs", str(bpffs), *args],
                   check=True, capture_output=True, text=True, cwd=REPO, timeout=60)


def wrk(pod: Pod, seconds: int, close: bool) -> float:
    cmd = ["wrk", "-t1", "-c16", f"-d{seconds}s", f"http://{SERVICE}:8080/"]
    if close:
        cmd[1:1] = ["-H", "Connection: close"]
    res = pod.run(cmd, uid=1000, gid=1000, timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if not m:
        raise RuntimeError(f"wrk failed: {res.stdout} {res.stderr}")
    return float(m.group(1))


def enable_bpf_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): run-time accounting while the returned fd is open (node-wide,
    so keep the window short)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.c_uint32(0)
    fd = libc.syscall(321, 32, ctypes.byref(attr), 4)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS failed")
    return fd


def prog_stats(path: Path) -> tuple[int, int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(path)], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def wait_listening(pod_run, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "LISTEN" in pod_run(["ss", "-ltn", f"sport = :{port}"]).stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    require_kernel()
    modes = {"off": ["--events-off"], "default": ["--events-on", "--set-rate", "200", "--set-burst", "400"],
             "unlimited": ["--events-on", "--set-rate", "4294967295"]}
    results: dict = {"conditions": {}, "rps": {}}
    with tempfile.TemporaryDirectory() as tmp, bpffs_mount() as bpffs, Pod("bench") as pod:
        os.chmod(tmp, 0o755)
        pod.cluster.add_address(SERVICE)
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "BCC_KERNEL_SOURCE")}
        env.update(POD_NAME="bench", POD_NAMESPACE="bench")
        subprocess.run([sys.executable, "-m", "initagent.cli", "setup", "-p", "15001", "-u", "1337", "-i", "*",
                        "--bpffs", str(bpffs), "--cgroup", str(pod.cgroup), "--netns", pod.netns_path],
                       check=True, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
        (Path(tmp) / "sidecar.cfg").write_text(SIDECAR)
        (Path(tmp) / "upstream.cfg").write_text(UPSTREAM)
        sidecar = pod.popen(["haproxy", "-db", "-f", f"{tmp}/sidecar.cfg"])
        upstream = pod.peer_popen(["haproxy", "-db", "-f", f"{tmp}/upstream.cfg"])
        try:
            wait_listening(pod.run, 15001)
            wait_listening(pod.peer_run, 8080)
            wrk(pod, 2, close=True)                          # warm-up
            for load in ("close", "keepalive"):
                per_mode: dict[str, list[float]] = {m: [] for m in modes}
                names = list(modes)
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[:r % len(names)]   # rotate: no mode always first
                    for mode in order:
                        observe(bpffs, *modes[mode])
                        per_mode[mode].append(wrk(pod, args.seconds, close=(load == "close")))
                        observe(bpffs)                       # drain what was buffered (not timed)
                results["rps"][load] = per_mode
                base = statistics.median(per_mode["off"])
                for mode, values in per_mode.items():
                    med = statistics.median(values)
                    print(f"{load:<9} {mode:<9} RPS median {med:9.0f}  ({', '.join(f'{v:.0f}' for v in values)})"
                          f"  vs off: {100 * (med / base - 1):+.1f} %", flush=True)
            # In-kernel cost of connect4 (where every outbound decision is recorded) per mode, measured
            # with BPF run-time stats during a close-mode load: independent of other load on the machine.
            progs = next((bpffs / "bpfinit").glob("*/progs/bpfinit_connect4"))
            results["connect4_ns_per_run"] = {}
            stats_fd = enable_bpf_stats()
            try:
                for r in range(args.rounds):
                    for mode in list(modes)[r % 3:] + list(modes)[:r % 3]:
                        observe(bpffs, *modes[mode])
                        t0, c0 = prog_stats(progs)
                        wrk(pod, 2, close=True)
                        t1, c1 = prog_stats(progs)
                        results["connect4_ns_per_run"].setdefault(mode, []).append((t1 - t0) / max(1, c1 - c0))
                        observe(bpffs)
            finally:
                os.close(stats_fd)
            ns = {m: statistics.median(v) for m, v in results["connect4_ns_per_run"].items()}
            # Host CPU per close-mode request, upper bound: all CPUs busy at the "off" rate.
            cpu_ns_per_req = os.cpu_count() * 1e9 / statistics.median(results["rps"]["close"]["off"])
            results["estimate"] = {}
            for mode, values in results["connect4_ns_per_run"].items():
                extra = 2 * (ns[mode] - ns["off"])          # two connect4 runs per proxied request
                results["estimate"][mode] = {"extra_ns_per_request": extra,
                                             "overhead_pct": 100 * extra / cpu_ns_per_req}
                print(f"connect4  {mode:<9} ns/run median {ns[mode]:7.0f}  ({', '.join(f'{v:.0f}' for v in values)})"
                      f"  => {extra:+.0f} ns/request = {100 * extra / cpu_ns_per_req:+.2f} % of "
                      f"{cpu_ns_per_req / 1000:.0f} us CPU/request", flush=True)
        finally:
            for p in (sidecar, upstream):
                p.terminate()
                p.wait(timeout=10)
        stats = counters.node_stats(bpffs)
        pods = counters.pod_counters(bpffs)
        results["events"] = stats
        results["decisions"] = pods[0]["totals"] if pods else {}
        print(f"events: {stats}\ndecisions: {results['decisions']}")
    results["conditions"] = {
        "kernel": os.uname().release, "cpus": os.cpu_count(), "rounds": args.rounds, "seconds": args.seconds,
        "wrk": "-t1 -c16", "sidecar": "HAProxy 2.6 nbthread 1, uid 1337", "upstream": "HAProxy http-request return",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_after": os.getloadavg(),   # other sessions share this VM: read RPS ratios with this in mind
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
