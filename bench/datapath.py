"""Datapath benchmark: sidecar redirection with istio-iptables vs bpfinit, against no mesh and the floor.

Two "pods" (client, server; tests/podenv.py namespaces joined by a bridge), real components only:
  A  nomesh   : wrk -> server app (HAProxy `http-request return`, the fastest app on this box)
  F  floor    : wrk -> 127.0.0.1:15001 client HAProxy -> server:15006 server HAProxy -> 127.0.0.1:8080 app
                (explicit proxies, no redirection at all: no redirection mechanism can beat this)
  B  iptables : Istio's golden default rules (iptables-restore, nft backend) in both pods + HAProxy sidecars
                following SO_ORIGINAL_DST (conntrack)
  C  bpfinit  : `bpfinit-agent setup` in both pods + the same HAProxy sidecars
  D  bpfinit+accel : C with --accelerate: sk_msg carries the app<->sidecar hops on each pod's loopback; the
                sidecar-to-sidecar hop stays TCP, as it does between pods on two nodes. On this kernel two parts
                of the self-test fail (sockmap data is invisible to splice(2), and recv(MSG_WAITALL) /
                SO_RCVLOWAT are ignored), so D and E run with both waived (HAProxy and wrk use neither here)
                and are labelled as such.
  E  bpfinit+accel, pod to pod : D with --accelerate-pod-to-pod in both pods: the sidecar-to-sidecar hop, both
                pods being on this node, also skips both stacks and the veth/bridge path.
Sidecars: HAProxy `mode tcp` by default (the brief's stand-in for Envoy: one upstream connection per client
connection, to the original destination); `--proxy-mode http` runs them as HTTP proxies that parse every request.
Both sidecars are in the path for F, B, C, D, E. Load: wrk keep-alive 16 connections, new connection per
request (Connection: close) 16 connections, and 1 connection (unloaded latency). Configs interleaved,
--runs rounds (>= 4). Output: bench/results/datapath-<ts>.json and .png (matplotlib, `pip install .[bench]`).
Run as root:  .venv/bin/python bench/datapath.py [--runs 4] [--duration 5]
Pool earlier runs:  .venv/bin/python bench/datapath.py --merge bench/results/datapath-X.json bench/results/datapath-Y.json
Experiments, not the headline. On this VM the guest halts an idle vCPU at once (halt-polling is off on its
kernel command line), so each wake-up of a halted vCPU is a VM exit. Three ways to keep vCPUs from halting during
each wrk window only:
  --poll-idle  holds a PM QoS request of 0 µs on /dev/cpu_dma_latency (what latency-tuned hosts do): the idle
               loop polls instead of halting, so a waker sets a flag instead of sending an IPI;
  --kernel-haltpoll  sets the haltpoll governor's guest_halt_poll_ns to Linux's default (200 µs, grown and
               shrunk adaptively) instead of the 0 this VM boots with: an idle vCPU polls briefly before halting,
               as on a KVM guest with default settings;
  --idle-spin  runs one SCHED_IDLE busy loop per CPU (their CPU time is subtracted from the host's busy time).
Results go to datapath-pollidle-*.json / datapath-haltpoll-*.json / datapath-idlespin-*.json and only pool with
their own kind.
  --pin-pods   one CPU per pod (client pod: wrk and its sidecar on CPU 0; server pod: its sidecar and the app on
               CPU 1), as the kubelet's static CPU manager pins a one-CPU Guaranteed pod; results go to
               datapath[-...]-pinned-*.json and pool only with pinned runs.
  --app nginx  serves the app with nginx-light (one worker), the app the measurement document's figures used,
               instead of HAProxy; results go to datapath[-...]-nginx-*.json and pool only with their own app.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.datapath import agentrun  # noqa: E402
from tests.podenv import Cluster, bpffs_mount  # noqa: E402
from tests.sidecar import HAProxy, sidecar_config  # noqa: E402

CONFIGS = ["A_nomesh", "F_floor", "B_iptables", "C_bpfinit", "D_bpfinit_accel", "E_bpfinit_accel_pod_to_pod"]
ACCEL_WAIVED = ["--accelerate", "--accelerate-skip-splice-check", "--accelerate-skip-waitall-check"]
AGENT_EXTRA = {"C_bpfinit": [], "D_bpfinit_accel": ACCEL_WAIVED,
               "E_bpfinit_accel_pod_to_pod": ACCEL_WAIVED + ["--accelerate-pod-to-pod"]}
MODES = {"keepalive": ["-t2", "-c16"], "close": ["-t2", "-c16", "-H", "Connection: close"],
         "1conn": ["-t1", "-c1"]}

APP_CFG = """
global
    maxconn 8000
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend app
    bind :::8080 v4v6
    http-request return status 200 content-type text/plain string "hello from the app"
"""

PROXY_MODES = ("tcp", "http")

# `--app nginx`: the server app the measurement document's figures were taken with (nginx-light), one worker
# like the HAProxy app's one thread. Keep-alive connections are never closed by the app.
NGINX_APP_CFG = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8000; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 60s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 8080;
        listen [::]:8080;
        location / {{ default_type text/plain; return 200 "hello from the app"; }}
    }}
}}
"""
APPS = ("haproxy", "nginx")


class NginxApp(HAProxy):
    """nginx-light in the foreground, managed like the HAProxy app (same start, readiness wait and stop)."""

    config_name = "nginx.conf"

    def __init__(self, pod, *, uid: int, name: str = "app"):
        super().__init__(pod, "", uid=uid, listen=(8080,), name=name)

    def config_text(self, directory: Path) -> str:
        tmp = directory / "tmp"                  # nginx writes its pid and temp files as `uid`
        tmp.mkdir()
        os.chown(tmp, self.uid, self.uid)
        return NGINX_APP_CFG.format(tmp=tmp)

    def command(self, cfg: Path) -> list[str]:
        return ["nginx", "-p", str(cfg.parent / "tmp"), "-c", str(cfg), "-e", "stderr"]


def app_server(pod, app: str):
    """The server pod's HTTP app on :8080, as uid 1000 (outside the proxy's uid)."""
    if app == "nginx":
        return NginxApp(pod, uid=1000)
    return HAProxy(pod, APP_CFG, uid=1000, name="app")


def sidecar_mesh(proxy_mode: str) -> str:
    """The transparent sidecar: original destination from SO_ORIGINAL_DST (conntrack for B, bpfinit for C/D)."""
    return sidecar_config(inbound_port=15006, http=proxy_mode == "http", inbound_ipv6=False,
                          reuse_upstream=True, maxconn=8000)


def sidecar_floor(server_ip: str, proxy_mode: str) -> str:
    """The floor: the same two proxies, addressed explicitly (no original destination involved)."""
    return sidecar_config(inbound_port=15006, http=proxy_mode == "http", outbound_server=f"{server_ip}:15006",
                          inbound_server="127.0.0.1:8080", inbound_source=None, inbound_ipv6=False,
                          reuse_upstream=True, maxconn=8000)


# Istio's default rules (contract §0: inbound-ports-wildcard.golden + the template's -i '*' and -d list)
ISTIO_RULES = """*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""


SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
"""


@contextlib.contextmanager
def idle_spinners(seconds: float):
    """One SCHED_IDLE busy loop per CPU for at most `seconds`; yields their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(cpu), str(seconds)])
             for cpu in sorted(os.sched_getaffinity(0))]
    try:
        time.sleep(0.2)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@contextlib.contextmanager
def poll_idle():
    """A PM QoS CPU latency request of 0 µs while open: cpuidle keeps to its polling state."""
    fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    try:
        os.write(fd, (0).to_bytes(4, sys.byteorder))
        yield []
    finally:
        os.close(fd)


HALTPOLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
LINUX_DEFAULT_HALTPOLL_NS = 200_000   # drivers/cpuidle/governors/haltpoll.c: guest_halt_poll_ns


@contextlib.contextmanager
def kernel_haltpoll():
    """The haltpoll governor with Linux's default poll window (200 µs, adaptive) instead of this VM's 0."""
    try:
        before = HALTPOLL_NS.read_text().strip()
    except OSError as err:
        raise SystemExit(f"--kernel-haltpoll needs the haltpoll cpuidle governor ({HALTPOLL_NS}: {err.strerror})")
    HALTPOLL_NS.write_text(str(LINUX_DEFAULT_HALTPOLL_NS))
    try:
        yield []
    finally:
        HALTPOLL_NS.write_text(before)


# idle mode -> (prefix of a session's result file, prefix of a merged one); runs pool only with their own mode
IDLE_MODES = {"halt": ("datapath", "datapath-merged"),
              "poll": ("datapath-pollidle", "datapath-merged-poll"),
              "haltpoll": ("datapath-haltpoll", "datapath-merged-haltpoll"),
              "spin": ("datapath-idlespin", "datapath-merged-spin")}


def idle_mode_cm(mode: str, seconds: float):
    if mode == "spin":
        return idle_spinners(seconds)
    if mode == "poll":
        return poll_idle()
    if mode == "haltpoll":
        return kernel_haltpoll()
    return contextlib.nullcontext([])


def host_busy_us() -> float:
    """Busy CPU time of the whole host (all CPUs, steal excluded), in microseconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) * 1e6 / os.sysconf("SC_CLK_TCK")


def proc_cpu_us(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) * 1e6 / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            pass
    return total


_LAT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out: str) -> dict:
    def lat(text):
        m = re.match(r"([\d.]+)(us|ms|s)", text)
        return float(m.group(1)) * _LAT[m.group(2)] if m else None
    res = {"rps": None, "avg_ms": None, "p50_ms": None, "p99_ms": None, "requests": 0, "errors": 0}
    for line in out.splitlines():
        s = line.split()
        if line.strip().startswith("Latency") and len(s) >= 2 and res["avg_ms"] is None:
            res["avg_ms"] = lat(s[1])
        elif s[:1] == ["50%"]:
            res["p50_ms"] = lat(s[1])
        elif s[:1] == ["99%"]:
            res["p99_ms"] = lat(s[1])
        elif line.startswith("Requests/sec:"):
            res["rps"] = float(s[1])
        elif "requests in" in line:
            res["requests"] = int(s[0])
        elif "Non-2xx" in line or "Socket errors" in line:
            res["errors"] += sum(int(x) for x in re.findall(r"\d+", line.split(":", 1)[1]))
    return res


# `--pin-pods`: one CPU per pod, as the kubelet's static CPU manager gives a Guaranteed pod of 1 CPU; the
# client pod (wrk and its sidecar) and the server pod (its sidecar and the app) each keep to their own.
POD_CPUS = {"client": 0, "server": 1}


def pin_process(pid: int, cpu: int) -> None:
    """Every thread of `pid` onto `cpu`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


@contextlib.contextmanager
def two_pods(config: str, bpffs: Path, proxy_mode: str = "tcp", app: str = "haproxy", pin: bool = False):
    """The client and server pods of `config`, app and sidecars running and checked with one request.
    With `pin`, each pod's processes keep to one CPU of their own (POD_CPUS).
    Yields (client, server, sidecars, url)."""
    with Cluster() as cluster, contextlib.ExitStack() as proxies:
        client, server = cluster.add_pod("bcl"), cluster.add_pod("bsv")
        server.popen(["true"]).wait()
        app_proc = proxies.enter_context(app_server(server, app))   # ready when listening
        sidecars = []
        if config == "B_iptables":
            for pod in (client, server):
                r = subprocess.run(["ip", "netns", "exec", pod.name, "iptables-restore", "--noflush"],
                                   input=ISTIO_RULES, text=True, capture_output=True, timeout=30)
                assert r.returncode == 0, r.stderr
        if config in AGENT_EXTRA:
            extra = AGENT_EXTRA[config]
            for pod in (client, server):
                r = agentrun.setup(pod, bpffs, agentrun.TEMPLATE_ARGS + extra)
                assert r.returncode == 0, r.stderr
                if extra:
                    assert "acceleration on" in r.stdout, r.stdout + r.stderr
        if config != "A_nomesh":
            text = sidecar_floor(server.addr4, proxy_mode) if config == "F_floor" else sidecar_mesh(proxy_mode)
            for pod in (client, server):
                sidecars.append(proxies.enter_context(HAProxy(pod, text, name=f"sidecar-{pod.label}")))
        if pin:
            pin_process(app_proc.pid, POD_CPUS["server"])
            for sidecar, side in zip(sidecars, ("client", "server")):
                pin_process(sidecar.pid, POD_CPUS[side])
        url = "http://127.0.0.1:15001/" if config == "F_floor" else f"http://{server.addr4}:8080/"
        check = client.run(["wrk", "-t1", "-c1", "-d1s", url], uid=1000, gid=1000, timeout=30)
        assert parse_wrk(check.stdout)["requests"] > 0, check.stdout + check.stderr
        yield client, server, sidecars, url


def one_config(config: str, duration: float, bpffs: Path, proxy_mode: str = "tcp",
               idle_mode: str = "halt", app: str = "haproxy", pin: bool = False) -> dict:
    results = {}
    wrk = ["taskset", "-c", str(POD_CPUS["client"]), "wrk"] if pin else ["wrk"]
    with two_pods(config, bpffs, proxy_mode, app, pin) as (client, server, sidecars, url):
        for mode, args in MODES.items():
            time.sleep(1.0)
            load = Path("/proc/loadavg").read_text().split()[:3]
            pids = [p.pid for p in sidecars]
            lo0 = [pod.lo_tx_bytes() for pod in (client, server)]
            eth0 = server.tx_bytes("eth0")
            with idle_mode_cm(idle_mode, duration + 3) as spin:
                t0, h0, p0, s0 = time.monotonic(), host_busy_us(), proc_cpu_us(pids), proc_cpu_us(spin)
                out = client.run([*wrk, *args, f"-d{duration:g}s", "--latency", url], uid=1000, gid=1000,
                                 timeout=duration + 30)
                t1, h1, p1, s1 = time.monotonic(), host_busy_us(), proc_cpu_us(pids), proc_cpu_us(spin)
            h1 -= s1 - s0    # the spinners' time is not the config's
            lo1 = [pod.lo_tx_bytes() for pod in (client, server)]
            eth1 = server.tx_bytes("eth0")
            r = parse_wrk(out.stdout)
            n = max(1, r["requests"])
            r.update(host_cpu_us_per_req=(h1 - h0) / n, proxy_cpu_us_per_req=(p1 - p0) / n if pids else 0.0,
                     host_busy_cores=(h1 - h0) / 1e6 / (t1 - t0), loadavg_before=load,
                     # ~0 when sk_msg carries both app<->sidecar hops (D); the request and response otherwise
                     lo_bytes_per_req={"client": (lo1[0] - lo0[0]) / n, "server": (lo1[1] - lo0[1]) / n},
                     # ~0 when sk_msg also carries the sidecar-to-sidecar hop (E)
                     server_eth_bytes_per_req=(eth1 - eth0) / n)
            if config == "B_iptables" and mode == "close":
                ct = subprocess.run(["ip", "netns", "exec", client.name, "cat", "/proc/net/nf_conntrack"],
                                    capture_output=True, text=True)
                r["client_conntrack_entries"] = len(ct.stdout.splitlines())
            results[mode] = r
    return results


def summarize(runs: list[dict]) -> dict:
    summary: dict = {}
    for config in CONFIGS:
        for mode in MODES:
            rows = [r[config][mode] for r in runs if config in r and mode in r[config]]
            if not rows:
                continue
            def mean(key):
                vals = [row[key] for row in rows if row.get(key) is not None]
                return statistics.mean(vals) if vals else None
            summary.setdefault(config, {})[mode] = {
                k: mean(k) for k in ("rps", "avg_ms", "p50_ms", "p99_ms", "host_cpu_us_per_req",
                                     "proxy_cpu_us_per_req", "host_busy_cores")}
            summary[config][mode]["lo_bytes_per_req"] = {
                pod: statistics.mean(row["lo_bytes_per_req"][pod] for row in rows) for pod in ("client", "server")}
            eth = [row["server_eth_bytes_per_req"] for row in rows if "server_eth_bytes_per_req" in row]
            summary[config][mode]["server_eth_bytes_per_req"] = statistics.mean(eth) if eth else None
            summary[config][mode]["rps_runs"] = [row["rps"] for row in rows]
            summary[config][mode]["errors"] = sum(row["errors"] for row in rows)
    ratios: dict = {}
    for config in CONFIGS:
        for mode in ("keepalive", "close"):
            rps = summary.get(config, {}).get(mode, {}).get("rps")
            refs = {ref: summary.get(ref, {}).get(mode, {}).get("rps") for ref in ("A_nomesh", "F_floor", "B_iptables")}
            if rps:     # a run of a subset of the configs has ratios to the references it measured
                ratios.setdefault(config, {})[mode] = {
                    f"vs_{ref}": round(rps / ref_rps, 3) for ref, ref_rps in refs.items() if ref_rps}
        try:
            ratios.setdefault(config, {})["p99_keepalive_vs_B"] = round(
                summary[config]["keepalive"]["p99_ms"] / summary["B_iptables"]["keepalive"]["p99_ms"], 3)
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    return {"summary": summary, "ratios": ratios}


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install '.[bench]'): no plot", file=sys.stderr)
        return False
    summary = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = [c for c in CONFIGS if c in summary]
    for ax, (mode, key, title) in zip(axes, [("keepalive", "rps", "RPS, keep-alive, 16 conns"),
                                              ("close", "rps", "RPS, new conn per request, 16 conns"),
                                              ("1conn", "p99_ms", "p99 latency ms, 1 conn")]):
        vals = [summary[c][mode][key] or 0 for c in labels]
        errs = [statistics.pstdev(summary[c][mode]["rps_runs"]) if key == "rps" else 0 for c in labels]
        ax.bar(range(len(labels)), vals, yerr=errs, color=["#888", "#4a4", "#c44", "#44c", "#a4c", "#c84"][:len(labels)])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([l.split("_", 1)[1] for l in labels], rotation=20)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"bpfinit datapath, {result['machine']['kernel']}, {result['machine']['cpus']} vCPU, "
                 f"HAProxy sidecars in {result.get('proxy_mode', 'http')} mode, app {result.get('app', 'haproxy')}, "
                 f"{result['runs']} interleaved runs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def idle_mode_of(result: dict) -> str:
    return result.get("idle_mode") or ("spin" if result.get("idle_spin") else "halt")


def result_prefix(result: dict, merged: bool = False) -> str:
    """File name prefix: idle mode first (IDLE_MODES), then the app when it is not the default, then
    `pinned` for --pin-pods."""
    prefix = IDLE_MODES[idle_mode_of(result)][1 if merged else 0]
    app = result.get("app", "haproxy")
    if app != "haproxy":
        prefix = f"{prefix}-{app}"
    return f"{prefix}-pinned" if result.get("pinned") else prefix


def merge(paths: list[str], out: Path) -> int:
    """Pool the runs of several result files into one summary (more runs, tighter ratios)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    modes = {r.get("proxy_mode", "http") for r in results}
    if len(modes) != 1:
        print(f"cannot pool different proxy modes: {sorted(modes)}", file=sys.stderr)
        return 2
    idle_modes = {idle_mode_of(r) for r in results}
    if len(idle_modes) != 1:
        print(f"cannot pool runs of different idle modes: {sorted(idle_modes)}", file=sys.stderr)
        return 2
    apps = {r.get("app", "haproxy") for r in results}
    if len(apps) != 1:
        print(f"cannot pool runs with different server apps: {sorted(apps)}", file=sys.stderr)
        return 2
    pinned = {bool(r.get("pinned")) for r in results}
    if len(pinned) != 1:
        print("cannot pool runs with pods pinned to CPUs (--pin-pods) and runs without", file=sys.stderr)
        return 2
    runs = [run for r in results for run in r["raw"]]
    result = {"machine": results[-1]["machine"], "runs": len(runs), "duration_s": results[-1]["duration_s"],
              "proxy_mode": modes.pop(), "idle_mode": idle_modes.pop(), "app": apps.pop(), "pinned": pinned.pop(),
              "merged_from": [Path(p).name for p in paths],
              "started": min(r["started"] for r in results), "raw": runs}
    return write_result(result, out, result_prefix(result, merged=True))


def write_result(result: dict, out: Path, prefix: str) -> int:
    """Summarise result["raw"], write <prefix>-<time>.json and .png under `out`, print the summary."""
    result.update(summarize(result["raw"]))
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{prefix}-{stamp}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{prefix}-{stamp}.png")
    print(json.dumps({"summary": result["summary"], "ratios": result["ratios"]}, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--proxy-mode", choices=PROXY_MODES, default="tcp",
                    help="sidecars as TCP proxies (default, like Envoy's original-destination passthrough) or HTTP")
    ap.add_argument("--app", choices=APPS, default="haproxy",
                    help="the server pod's app: HAProxy `http-request return` (default, the fastest here) or "
                         "nginx-light (the app of the measurement document's figures)")
    idle = ap.add_mutually_exclusive_group()
    idle.add_argument("--poll-idle", action="store_true",
                      help="experiment: idle vCPUs poll instead of halting during each window (PM QoS 0 µs)")
    idle.add_argument("--kernel-haltpoll", action="store_true",
                      help="experiment: during each window, the haltpoll governor polls up to Linux's default "
                           "200 µs before halting (this VM boots with 0)")
    idle.add_argument("--idle-spin", action="store_true",
                      help="experiment: keep idle vCPUs busy during each window (SCHED_IDLE busy loops)")
    ap.add_argument("--pin-pods", action="store_true",
                    help="one CPU per pod: the client pod's wrk and sidecar on CPU 0, the server pod's sidecar and "
                         "app on CPU 1 (the kubelet's static CPU manager, one CPU per Guaranteed pod)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--merge", nargs="+", metavar="RESULT_JSON",
                    help="measure nothing: pool the runs of earlier result files (same proxy mode) into one summary")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    if os.geteuid() != 0:
        print("bench/datapath.py needs root (namespaces, bpf)", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        print(f"unknown configs: {sorted(unknown)}", file=sys.stderr)
        return 2
    idle_mode = ("poll" if args.poll_idle else "haltpoll" if args.kernel_haltpoll else
                 "spin" if args.idle_spin else "halt")
    runs = []
    started = time.time()
    with bpffs_mount() as bpffs:
        for i in range(args.runs):
            order = configs if i % 2 == 0 else list(reversed(configs))   # interleaved, alternating order
            run = {}
            for config in order:
                print(f"run {i + 1}/{args.runs} {config}", flush=True)
                run[config] = one_config(config, args.duration, bpffs, args.proxy_mode, idle_mode, args.app,
                                         args.pin_pods)
            runs.append(run)
    result = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                          "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
                          "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]},
              "runs": args.runs, "duration_s": args.duration, "proxy_mode": args.proxy_mode,
              "idle_mode": idle_mode, "app": args.app, "pinned": args.pin_pods, "started": started, "raw": runs}
    return write_result(result, Path(args.out), result_prefix(result))


if __name__ == "__main__":
    sys.exit(main())
