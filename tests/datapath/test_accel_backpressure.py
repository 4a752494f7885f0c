"""Acceleration keeps TCP's flow control: a writer whose peer stops reading blocks.

The kernel queues sk_msg-redirected bytes on the peer without checking its receive buffer, so without a
bound in bpf/accel.c a writer never blocks (a manual probe queued 512 MiB on this kernel) and an app could
park any amount of kernel memory in its proxy's socket. With the bound, a message that would leave the
peer holding more than 8 MiB unread takes the TCP path, with the rest of the connection, and TCP's window
(which counts the same unread bytes) stops the writer. Then the reader drains the stream, and every byte
arrives in order across the switch from redirected to TCP.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from initagent import accel, counters
from tests.datapath import agentrun
from tests.datapath.agentrun import REPO
from tests.podenv import Cluster, bpffs_mount

pytestmark = pytest.mark.kernel
PY = sys.executable
QUEUE_MAX = 8 << 20   # BI_ACCEL_QUEUE_MAX in bpf/accel.c

# A pair on the proxy's 127.0.0.1:15001 in one pod. Phase 1: the reader takes a 1 MiB block (lo bytes show
# whether it was redirected). Phase 2: the reader stops; the writer goes on non-blocking until EAGAIN.
# Phase 3: the reader drains while the writer sends 4 MiB more, blocking; the whole stream is checked.
STREAM = r"""
import json, socket, threading, time
def lo_tx():
    for line in open("/proc/self/net/dev"):
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
block = bytes(range(251))
def pattern(start, n):
    off = start % 251
    reps = (off + n) // 251 + 1
    return (block * reps)[off:off + n]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 15001)); srv.listen(1)
cli = socket.create_connection(("127.0.0.1", 15001)); peer, _ = srv.accept()
sent = 0
def send(n):
    global sent
    cli.sendall(pattern(sent, n)); sent += n
lo0 = lo_tx()
def read_first_block():   # a loop: MSG_WAITALL is not honoured on accelerated sockets
    got = 0
    while got < (1 << 20):
        got += len(peer.recv((1 << 20) - got))
t = threading.Thread(target=read_first_block); t.start()
send(1 << 20); t.join(10)
first_block_lo = lo_tx() - lo0
received = 1 << 20
cli.setblocking(False)
queued = 0
deadline = time.monotonic() + 10
while time.monotonic() < deadline and queued < (256 << 20):
    try:
        n = cli.send(pattern(sent, 65536)); sent += n; queued += n
    except BlockingIOError:
        break
cli.setblocking(True)
ok = True
def drain():
    global received, ok
    peer.settimeout(10)
    while received < sent_total:
        data = peer.recv(1 << 20)
        if not data:
            break
        if data != pattern(received, len(data)):
            ok = False
        received += len(data)
sent_total = sent + (4 << 20)
t = threading.Thread(target=drain); t.start()
send(4 << 20); t.join(20)
print(json.dumps({"first_block_lo": first_block_lo, "queued_before_eagain": queued, "sent": sent,
                  "received": received, "in_order": ok, "writer_port": cli.getsockname()[1]}), flush=True)
"""


def test_writer_blocks_when_its_peer_stops_reading_and_the_stream_stays_in_order():
    with bpffs_mount() as bpffs, Cluster() as cluster:
        pod = cluster.add_pod("accbp")
        res = agentrun.setup(pod, bpffs, agentrun.TEMPLATE_ARGS + ["--accelerate", "--accelerate-skip-splice-check",
                                                                    "--accelerate-skip-waitall-check"])
        assert res.returncode == 0 and "acceleration on" in res.stdout, res.stdout + res.stderr
        assert "backpressure after" in res.stdout, res.stdout          # the self-test's own check passed
        run = pod.run([PY, "-c", STREAM], uid=1337, gid=1337, timeout=60)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        (pod_counters,) = counters.pod_counters(bpffs)
        by_reason = {(r["direction"], r["verdict"], r["reason"]): r["count"] for r in pod_counters["counters"]}
        observed = subprocess.run([PY, "-m", "initagent.cli", "observe", "--bpffs", str(bpffs), "--reason",
                                   "accel_tcp_path"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert observed.returncode == 0, observed.stderr
        flows = [json.loads(line)["flow"] for line in observed.stdout.splitlines()]
    assert out["first_block_lo"] < (1 << 20) // 4, out               # the first MiB was redirected
    # bounded: the peer's 8 MiB plus what TCP itself holds once the connection has switched to it
    assert 0 < out["queued_before_eagain"] <= QUEUE_MAX + accel.tcp_queue_max(), out
    assert out["received"] == out["sent"] and out["in_order"], out
    # kernel-level counters: both ends accelerated, then the writer's connection left for TCP once
    assert by_reason.get(("OUTBOUND", "REDIRECTED", "accel"), 0) >= 2, by_reason
    assert by_reason.get(("OUTBOUND", "REDIRECTED", "accel_tcp_path")) == 1, by_reason
    # and an event names the writer's socket: from its own port to the proxy port. (The agent's self-test ran
    # into the same bound in this netns; setup restarts the pod's counters after it, but its event stays.)
    ours = [(f["verdict"], f["IP"]["source"], f["IP"]["destination"], f["l4"]["TCP"]["destination_port"])
            for f in flows if f["l4"]["TCP"]["source_port"] == out["writer_port"]]
    assert ours == [("REDIRECTED", "127.0.0.1", "127.0.0.1", 15001)], flows
