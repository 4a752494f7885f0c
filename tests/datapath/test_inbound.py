"""Inbound capture on the real kernel: sk_lookup steering to the proxy's <-z> listener."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from initagent.flags import parse
from tests.podenv import Pod, bpffs_mount

pytestmark = pytest.mark.kernel
PROBE = str(Path(__file__).resolve().parents[1] / "probe.py")
PY = sys.executable


def serve(pod, name, port, bind="::", uid=None):
    proc = pod.popen([PY, PROBE, "serve", "--name", name, "--bind", bind, "--port", str(port), "--timeout", "60"],
                     uid=uid, gid=uid)
    line = proc.stdout.readline().strip()
    assert line == "READY", proc.stderr.read()
    return proc


def connect(run, host, port, **kw):
    res = run([PY, PROBE, "connect", host, str(port), "--timeout", "2"], **kw)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def stop(proc):
    proc.terminate()
    proc.wait(timeout=5)


def setup_pod(datapath, pod, bpffs, args, pod_idx):
    # dual-stack: the v6 probes below need an "IPv6" pod (istio has no ip6tables rules otherwise, §1.5)
    cfg = parse(args, {"ISTIO_DUAL_STACK": "true"})
    datapath.attach_pod(pod, cfg, pod_idx, bpffs)
    return cfg


def test_captured_port_goes_to_proxy_with_original_destination(datapath):
    with bpffs_mount() as bpffs, Pod("inb") as pod:
        setup_pod(datapath, pod, bpffs, ["-p", "15001", "-z", "15006", "-u", "1337", "-b", "*",
                                         "-d", "15090,15021,15020"], pod_idx=11)
        app = serve(pod, "app", 8080)
        proxy = serve(pod, "proxy", 15006, uid=1337)
        try:
            for host in (pod.addr4, pod.addr6):
                out = connect(pod.peer_run, host, 8080)
                assert out["outcome"] == "ok", out
                reply = out["reply"]
                assert reply["server"] == "proxy"
                assert reply["local"] == [host, 8080]          # accepted socket keeps the original dst
                assert reply["orig_dst"] == [host, 8080]       # SO_ORIGINAL_DST answers it
                assert reply["remote"][0] in (pod.peer_addr4, pod.peer_addr6)  # source preserved
            # excluded port (-d) and the tunnel port (-e 15008) reach the app directly
            app2 = serve(pod, "app-15020", 15020)
            tunnel = serve(pod, "tunnel", 15008)
            assert connect(pod.peer_run, pod.addr4, 15020)["reply"]["server"] == "app-15020"
            assert connect(pod.peer_run, pod.addr4, 15008)["reply"]["server"] == "tunnel"
            # the pod talking to its own IP is not captured (istio: nat PREROUTING never sees it)
            assert connect(pod.run, pod.addr4, 8080)["reply"]["server"] == "app"
            stop(app2), stop(tunnel)
        finally:
            stop(app), stop(proxy)


def test_no_proxy_listening_means_refused_never_the_app(datapath):
    with bpffs_mount() as bpffs, Pod("ref") as pod:
        setup_pod(datapath, pod, bpffs, ["-b", "*"], pod_idx=12)
        app = serve(pod, "app", 8080)
        try:
            for host in (pod.addr4, pod.addr6):
                out = connect(pod.peer_run, host, 8080)
                assert out["outcome"] == "refused", out   # RST from the kernel (SK_DROP), app untouched
            # the proxy comes up late: from then on, captured
            proxy = serve(pod, "proxy", 15006, uid=1337)
            assert connect(pod.peer_run, pod.addr4, 8080)["reply"]["server"] == "proxy"
            stop(proxy)
            time.sleep(0.1)
            # the proxy dies: refused again (the closed listener left the sockmap by itself)
            assert connect(pod.peer_run, pod.addr4, 8080)["outcome"] == "refused"
        finally:
            stop(app)


def test_inbound_port_list_and_empty(datapath):
    with bpffs_mount() as bpffs, Pod("lst") as pod:
        setup_pod(datapath, pod, bpffs, ["-b", "32000,31000"], pod_idx=13)
        procs = [serve(pod, "proxy", 15006, uid=1337), serve(pod, "app-32000", 32000), serve(pod, "app-8080", 8080)]
        try:
            assert connect(pod.peer_run, pod.addr4, 32000)["reply"]["server"] == "proxy"
            assert connect(pod.peer_run, pod.addr6, 32000)["reply"]["server"] == "proxy"
            assert connect(pod.peer_run, pod.addr4, 8080)["reply"]["server"] == "app-8080"
        finally:
            for p in procs:
                stop(p)
    with bpffs_mount() as bpffs, Pod("emp") as pod:
        setup_pod(datapath, pod, bpffs, ["-b", ""], pod_idx=14)
        procs = [serve(pod, "proxy", 15006, uid=1337), serve(pod, "app", 8080)]
        try:
            assert connect(pod.peer_run, pod.addr4, 8080)["reply"]["server"] == "app"
        finally:
            for p in procs:
                stop(p)


def test_excluded_interface_is_not_captured(datapath):
    with bpffs_mount() as bpffs, Pod("exc") as pod:
        pod.add_interface("eth1", addr4="10.251.0.2/24", peer_addr4="10.251.0.1/24")
        pod.extra_addrs = ["10.251.0.2"]
        setup_pod(datapath, pod, bpffs, ["-b", "*", "-c", "eth1"], pod_idx=15)
        procs = [serve(pod, "proxy", 15006, uid=1337), serve(pod, "app", 8080)]
        try:
            assert connect(pod.peer_run, pod.addr4, 8080)["reply"]["server"] == "proxy"
            assert connect(pod.peer_run, "10.251.0.2", 8080)["reply"]["server"] == "app"
        finally:
            for p in procs:
                stop(p)
