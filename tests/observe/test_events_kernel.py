"""Counters, events, identity, filters, rate limit, perf fallback and exporter on the real kernel.

Traffic comes from a "pod" (netns + cgroup) and is judged by our own tiny cgroup/connect program that
calls the real record() helper of bpf/events.h (tests/observe/obsprog.py), so these tests do not depend
on the datapath; tests/observe/test_datapath_kernel.py repeats the key cases through the real programs.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from initagent import counters, exporter, identity, obsmaps, observe
from tests.observe.conftest import connect_many

pytestmark = pytest.mark.kernel

R = {name: num for num, name in obsmaps.REASON_NAMES.items()}
V = {name: num for num, name in obsmaps.VERDICT_NAMES.items()}
OUT, INB = 1, 2
REPO = Path(__file__).resolve().parents[2]

# Scripted destination ports (on the cluster gateway, 10.250.0.1) and what the program records for them.
P_DENY, P_BYPASS, P_REDIRECT = 41001, 41002, 41003


def script_default(prog, pod_idx=7):
    prog.script(P_DENY, pod_idx, OUT, V["DENIED"], R["egress_policy"], deny=True)
    prog.script(P_BYPASS, pod_idx, OUT, V["BYPASSED"], R["excluded_cidr"])
    prog.script(P_REDIRECT, pod_idx, OUT, V["REDIRECTED"], R["none"])   # -> 127.0.0.1:41004


def drain(bpffs, **filters) -> list[dict]:
    flt = observe.FlowFilter.from_args(**filters)
    out: list[dict] = []
    observe.Observer(Path(bpffs), flt, "test-node").stream(out.append, follow=False)
    return out


def pod_rows(bpffs, name):
    found = [p for p in counters.pod_counters(bpffs) if p["pod"] == name]
    assert len(found) == 1, found
    return {(r["direction"], r["verdict"], r["reason"]): r["count"] for r in found[0]["counters"]}


def test_counters_and_events_are_exact_and_name_the_pod(bpffs, pod, obsprog):
    big = 2_103_275_758            # the agent allocates sparse 32-bit pod indexes
    identity.register(obsprog.pin_dir, 1, big, "shop", "cart-1", {"app": "cart"})
    script_default(obsprog, big)
    server = pod.popen([sys.executable, str(REPO / "tests" / "probe.py"), "serve", "--name", "proxy",
                        "--bind", "127.0.0.1", "--port", "41004", "--count", "1", "--timeout", "20"])
    assert server.stdout.readline().strip() == "READY"
    gw = pod.peer_addr4
    assert connect_many(pod, gw, P_DENY, 1, uid=1000, gid=1000)["outcomes"] == {"EPERM": 1}
    assert connect_many(pod, gw, P_BYPASS, 3)["outcomes"] == {"ECONNREFUSED": 3}   # nobody listens there
    assert connect_many(pod, gw, P_REDIRECT, 1)["outcomes"] == {"ok": 1}           # reached the "proxy"
    server.wait(timeout=10)

    assert pod_rows(bpffs, "cart-1") == {("OUTBOUND", "DENIED", "egress_policy"): 1,
                                         ("OUTBOUND", "BYPASSED", "excluded_cidr"): 3,
                                         ("OUTBOUND", "REDIRECTED", "none"): 1}
    flows = [r["flow"] for r in drain(bpffs)]
    assert [(f["verdict"], f["bpfinit"]["reason"]) for f in flows] == [
        ("DENIED", "egress_policy"), ("BYPASSED", "excluded_cidr"), ("BYPASSED", "excluded_cidr"),
        ("BYPASSED", "excluded_cidr"), ("REDIRECTED", "none")]
    for f in flows:
        assert f["source"] == {"namespace": "shop", "pod_name": "cart-1", "labels": ["k8s:app=cart"]}
        assert f["IP"]["destination"] == gw and f["Type"] == "L3_L4"
    deny, redirect = flows[0], flows[-1]
    assert deny["drop_reason_desc"] == "POLICY_DENIED" and deny["bpfinit"]["uid"] == 1000
    assert deny["l4"]["TCP"]["destination_port"] == P_DENY
    assert redirect["bpfinit"]["redirected_to"] == {"ip": "127.0.0.1", "port": 41004}
    assert redirect["bpfinit"]["original_destination"] == {"ip": gw, "port": P_REDIRECT}
    stats = counters.node_stats(bpffs)
    assert stats == {"emitted": 5, "lost": 0, "suppressed": 0, "counter_full": 0}


def test_register_resets_a_reused_pod_idx_and_forget_removes_it(bpffs, pod, obsprog):
    identity.register(obsprog.pin_dir, 1, 7, "shop", "old-pod", {})
    script_default(obsprog)
    connect_many(pod, pod.peer_addr4, P_BYPASS, 2)
    assert pod_rows(bpffs, "old-pod") == {("OUTBOUND", "BYPASSED", "excluded_cidr"): 2}
    identity.register(obsprog.pin_dir, 2, 7, "shop", "new-pod", {"app": "new"})
    assert identity.lookup(obsprog.pin_dir, 7)["pod"] == "new-pod"
    assert pod_rows(bpffs, "new-pod") == {}
    connect_many(pod, pod.peer_addr4, P_BYPASS, 1)
    assert pod_rows(bpffs, "new-pod") == {("OUTBOUND", "BYPASSED", "excluded_cidr"): 1}
    identity.forget(obsprog.pin_dir, 7)
    assert identity.lookup(obsprog.pin_dir, 7) is None
    assert counters.pod_counters(bpffs) == []


def run_observe(bpffs, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "initagent.observe", "--bpffs", str(bpffs), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@contextlib.contextmanager
def following_observe(bpffs, *args):
    """`observe --follow ARGS` running in the background, reading the ring buffer after a second; killed if
    still running when the block ends. Yields the process (communicate() it inside the block)."""
    proc = subprocess.Popen([sys.executable, "-m", "initagent.observe", "--bpffs", str(bpffs), "--follow", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        time.sleep(1.0)   # let it take the lock and open the ring buffer
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_observe_cli_filters_select_exactly_the_expected_events(bpffs, pod, obsprog):
    identity.register(obsprog.pin_dir, 1, 7, "shop", "cart-1", {})
    identity.register(obsprog.pin_dir, 1, 8, "other", "web-1", {})
    script_default(obsprog)
    obsprog.script(41010, 8, OUT, V["BYPASSED"], R["excluded_port"])
    gw = pod.peer_addr4

    def traffic():
        connect_many(pod, gw, P_DENY, 1)
        connect_many(pod, gw, P_BYPASS, 2)
        connect_many(pod, gw, 41010, 1)

    cases = [
        (["--verdict", "DENIED"], [("cart-1", "DENIED", P_DENY)]),
        (["--namespace", "other"], [("web-1", "BYPASSED", 41010)]),
        (["--pod", "shop/cart-1", "--reason", "excluded_cidr"], [("cart-1", "BYPASSED", P_BYPASS)] * 2),
        (["--port", "41010"], [("web-1", "BYPASSED", 41010)]),
        (["--to-cidr", "10.250.0.0/24", "--verdict", "bypassed,denied", "--namespace", "shop"],
         [("cart-1", "DENIED", P_DENY)] + [("cart-1", "BYPASSED", P_BYPASS)] * 2),
        (["--to-cidr", "192.0.2.0/24"], []),
        (["--since", "1h", "--pod", "web-1"], [("web-1", "BYPASSED", 41010)]),
    ]
    for args, expected in cases:
        traffic()
        res = run_observe(bpffs, *args)
        assert res.returncode == 0, res.stderr
        got = [json.loads(line)["flow"] for line in res.stdout.splitlines()]
        assert [(f["source"]["pod_name"], f["verdict"], f["l4"]["TCP"]["destination_port"]) for f in got] == \
            expected, args
    traffic()
    table = run_observe(bpffs, "-o", "table", "--verdict", "DENIED")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 1
    assert "shop/cart-1" in table.stdout and "DENIED (egress_policy)" in table.stdout


def test_observe_follow_streams_new_events_and_stops_at_max_events(bpffs, pod, obsprog):
    identity.register(obsprog.pin_dir, 1, 7, "shop", "cart-1", {})
    script_default(obsprog)
    with following_observe(bpffs, "--verdict", "DENIED", "--max-events", "2", "--timeout", "30") as proc:
        connect_many(pod, pod.peer_addr4, P_BYPASS, 3)
        connect_many(pod, pod.peer_addr4, P_DENY, 3)
        out, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    assert [json.loads(line)["flow"]["verdict"] for line in out.splitlines()] == ["DENIED", "DENIED"]


def test_a_second_reader_is_refused_while_the_first_reads(bpffs, pod, obsprog):
    """One ring buffer, one reader: a second observe on the node says who has it instead of silently
    sharing (and losing) events; once the first exits, the next one reads everything."""
    identity.register(obsprog.pin_dir, 1, 7, "shop", "cart-1", {})
    script_default(obsprog)
    with following_observe(bpffs, "--timeout", "3") as first:
        second = run_observe(bpffs)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "another `bpfinit-agent observe` is reading this node's events" in second.stderr
        _out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    connect_many(pod, pod.peer_addr4, P_DENY, 2)
    after = run_observe(bpffs)
    assert after.returncode == 0, after.stderr
    assert [json.loads(line)["flow"]["verdict"] for line in after.stdout.splitlines()] == ["DENIED", "DENIED"]


def test_observe_errors_are_one_line(bpffs, tmp_path):
    res = run_observe(tmp_path)
    assert res.returncode == 2 and "no bpfinit programs are pinned" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_observe(bpffs, "--verdict", "DROPPED")
    assert res.returncode == 2 and "--verdict 'DROPPED'" in res.stderr and "Traceback" not in res.stderr


def test_rate_limit_holds_back_events_but_counters_stay_exact(bpffs, pod, obsprog):
    identity.register(obsprog.pin_dir, 1, 7, "shop", "cart-1", {})
    script_default(obsprog)
    res = run_observe(bpffs, "--set-rate", "1", "--set-burst", "5")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stderr)["event_config"] == {"events": True, "rate_per_sec": 1, "burst": 5}
    # One CPU, so one bucket: GCRA lets burst+1 through at once, then one per second.
    assert connect_many(pod, pod.peer_addr4, P_DENY, 50, cpu=0)["done"] == 50
    stats = counters.node_stats(bpffs)
    assert pod_rows(bpffs, "cart-1") == {("OUTBOUND", "DENIED", "egress_policy"): 50}
    assert stats["emitted"] + stats["suppressed"] == 50 and stats["lost"] == 0
    assert 6 <= stats["emitted"] <= 8
    first = drain(bpffs)
    assert len(first) == stats["emitted"]
    time.sleep(1.2)
    connect_many(pod, pod.peer_addr4, P_DENY, 1, cpu=0)
    later = drain(bpffs)
    assert len(later) == 1 and later[0]["flow"]["bpfinit"]["suppressed_before"] == stats["suppressed"]
    # Events off: counters only.
    assert run_observe(bpffs, "--events-off").returncode == 0
    connect_many(pod, pod.peer_addr4, P_DENY, 5)
    assert drain(bpffs) == []
    assert pod_rows(bpffs, "cart-1")[("OUTBOUND", "DENIED", "egress_policy")] == 56


@pytest.mark.slow
def test_flood_100k_connections_keeps_counters_exact_and_reports_loss(bpffs, pod, obsprog):
    identity.register(obsprog.pin_dir, 1, 7, "shop", "flood", {})
    script_default(obsprog)
    n = 100_000
    # Default sampling: a busy pod is rate limited.
    t0 = time.monotonic()
    # Real TCP attempts: SYN over the veth, RST back from the cluster netns (nobody listens there).
    assert connect_many(pod, pod.peer_addr4, P_BYPASS, n, timeout=120)["outcomes"] == {"ECONNREFUSED": n}
    elapsed = time.monotonic() - t0
    stats = counters.node_stats(bpffs)
    assert pod_rows(bpffs, "flood") == {("OUTBOUND", "BYPASSED", "excluded_cidr"): n}
    assert stats["emitted"] + stats["suppressed"] + stats["lost"] == n
    # 2 CPUs x (burst 400 + 200/s) bounds what one pod can emit.
    assert stats["emitted"] <= 2 * (obsmaps.OBS_DEFAULT_BURST + 1 + obsmaps.OBS_DEFAULT_RATE * (elapsed + 1))
    assert stats["suppressed"] > 0
    assert len(drain(bpffs)) == stats["emitted"]
    # No rate limit and no reader: the ring buffer fills, the rest is counted as lost, never silent.
    assert run_observe(bpffs, "--set-rate", str(obsmaps.OBS_RATE_UNLIMITED)).returncode == 0
    before = counters.node_stats(bpffs)
    assert connect_many(pod, pod.peer_addr4, P_BYPASS, n, timeout=120)["outcomes"] == {"ECONNREFUSED": n}
    after = counters.node_stats(bpffs)
    assert pod_rows(bpffs, "flood") == {("OUTBOUND", "BYPASSED", "excluded_cidr"): 2 * n}
    emitted, lost = after["emitted"] - before["emitted"], after["lost"] - before["lost"]
    assert after["suppressed"] == before["suppressed"]
    assert emitted + lost == n and lost > 0 and emitted > 1000
    assert len(drain(bpffs)) == emitted


def test_perf_buffer_fallback_delivers_events_and_counts_loss(bpffs, pod):
    from tests.observe.obsprog import ObsTestProgram
    prog = ObsTestProgram(bpffs, pod.cgroup, perfbuf=True)
    try:
        identity.register(prog.pin_dir, 1, 7, "shop", "cart-1", {})
        script_default(prog)
        # No reader attached yet: perf output fails and is counted as lost.
        connect_many(pod, pod.peer_addr4, P_DENY, 2)
        assert counters.node_stats(bpffs)["lost"] == 2
        got: list[dict] = []
        done = threading.Event()

        def follow():
            observe.Observer(Path(bpffs)).stream(got.append, follow=True, max_events=3, timeout_s=20)
            done.set()
        t = threading.Thread(target=follow)
        t.start()
        time.sleep(1.0)
        connect_many(pod, pod.peer_addr4, P_BYPASS, 3)
        t.join(timeout=30)
        assert done.is_set()
        assert [(r["flow"]["verdict"], r["flow"]["source"]["pod_name"]) for r in got] == [("BYPASSED", "cart-1")] * 3
        assert pod_rows(bpffs, "cart-1") == {("OUTBOUND", "DENIED", "egress_policy"): 2,
                                             ("OUTBOUND", "BYPASSED", "excluded_cidr"): 3}
    finally:
        prog.close()


def test_kernel_has_ringbuf():
    assert observe.kernel_has_ringbuf() is True    # Linux 6.18 here


def test_exporter_serves_exact_per_pod_counters(bpffs, pod, obsprog):
    identity.register(obsprog.pin_dir, 1, 7, "shop", "cart-1", {})
    script_default(obsprog)
    connect_many(pod, pod.peer_addr4, P_DENY, 2)
    connect_many(pod, pod.peer_addr4, P_BYPASS, 3)
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=exporter.serve, args=(bpffs, "127.0.0.1:0", ready, stop), daemon=True)
    t.start()
    try:
        assert ready.wait(10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{ready.port}/metrics", timeout=10).read().decode()
        health = urllib.request.urlopen(f"http://127.0.0.1:{ready.port}/healthz", timeout=10).read()
    finally:
        stop.set()
        t.join(timeout=5)
    assert health == b"ok\n"
    assert ('bpfinit_connections_total{direction="outbound",namespace="shop",pod="cart-1",'
            'reason="egress_policy",verdict="denied"} 2.0') in body
    assert ('bpfinit_connections_total{direction="outbound",namespace="shop",pod="cart-1",'
            'reason="excluded_cidr",verdict="bypassed"} 3.0') in body
    assert "bpfinit_events_lost_total 0.0" in body
    assert "bpfinit_events_emitted_total 5.0" in body
    assert "bpfinit_pods 1.0" in body
    assert "# TYPE bpfinit_connections_total counter" in body


def test_status_table_shows_pod_totals(bpffs, pod, obsprog):
    identity.register(obsprog.pin_dir, 1, 7, "shop", "cart-1", {})
    script_default(obsprog)
    connect_many(pod, pod.peer_addr4, P_DENY, 1)
    connect_many(pod, pod.peer_addr4, P_BYPASS, 2)
    text = counters.format_table(counters.pod_counters(bpffs), counters.node_stats(bpffs))
    assert text.splitlines()[0] == "shop/cart-1  redirected=0 captured=0 bypassed=2 denied=1 refused=0 dns=0"
    assert "events: emitted=3 lost=0 suppressed=0 counter_full=0" in text
