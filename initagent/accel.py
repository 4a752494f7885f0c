"""Optional sockmap acceleration (--accelerate / BPFINIT_ACCELERATE / bpfinit.io/accelerate).

Off by default: sk_msg redirection has a long bug record (stalls with large responses on some kernels,
splice() interactions; ebpf-landscape.md §4). So it is switched on for a pod only when
  1. the kernel passes a version gate, and
  2. a start-up self-test in the pod itself passes: app<->proxy-port loopback connection, keep-alive
     (several exchanges on one connection), a response of several MB, and the receiver reading it
     with splice(2), all byte-exact and within a deadline, and none of it crossing lo (so it really
     was accelerated). The test's other connections must not cross lo either. It checks that
  3. backpressure holds: a second accelerated connection whose receiver stops reading must stop taking
     bytes, as TCP does at its socket buffers. The kernel's sk_msg ingress path charges only the global TCP
     memory limit, not the receiver's buffer (this machine's 6.18 too); bpf/accel.c bounds it with the
     peer's sk_rmem_alloc, at the offset accel_cflags() reads from the kernel's BTF. Without that an app
     could queue unbounded kernel memory in its proxy's socket, and the proxy's own flow control (Envoy
     stops reading a downstream whose upstream is slow) would no longer hold.
  4. reads that wait for a minimum amount keep waiting: recv(MSG_WAITALL) returns the full amount, and a
     socket with SO_RCVLOWAT is not readable before that many bytes. tcp_bpf's recvmsg ignores both on
     this machine's 6.18 (a 1 MiB MSG_WAITALL read returned 64 KiB), which breaks an app relying on them.
The splice(2) part (--accelerate-skip-splice-check), the backpressure part
(--accelerate-skip-backpressure-check) and the MSG_WAITALL / SO_RCVLOWAT part (--accelerate-skip-waitall-check)
can each be waived by the operator; the log line then says what was NOT checked.
Otherwise the pod is re-configured without acceleration and the agent says so (it never fails the pod
for it). The sk_msg program is attached to the pinned sockhash, so it outlives the agent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import select
import socket
import sys
import threading
import time
from pathlib import Path

MIN_KERNEL = (5, 15)            # bpf_get_netns_cookie in sk_msg (the key's netns); sockhash + redirect fixes
SELFTEST_SIZES = (100, 4 * 1024 * 1024, 100)
SELFTEST_DEADLINE_S = 5.0
# Said in the "acceleration on" line whenever the operator waived a part: never silent.
SPLICE_WAIVED = ("splice(2) NOT checked: waived by the operator (--accelerate-skip-splice-check / "
                 "BPFINIT_ACCEL_SKIP_SPLICE_CHECK / bpfinit.io/accelerate-skip-splice-check)")
BACKPRESSURE_WAIVED = ("backpressure NOT checked: waived by the operator (--accelerate-skip-backpressure-check / "
                       "BPFINIT_ACCEL_SKIP_BACKPRESSURE_CHECK / bpfinit.io/accelerate-skip-backpressure-check)")
WAITALL_WAIVED = ("MSG_WAITALL / SO_RCVLOWAT NOT checked: waived by the operator (--accelerate-skip-waitall-check / "
                  "BPFINIT_ACCEL_SKIP_WAITALL_CHECK / bpfinit.io/accelerate-skip-waitall-check)")
WAITALL_SIZE = 256 << 10           # one MSG_WAITALL read, written in WAITALL_PARTS pieces
WAITALL_PARTS = 4
LOWAT_QUIET_S = 0.1                # how long a socket below SO_RCVLOWAT must stay unreadable
BACKPRESSURE_MIN_LIMIT = 64 << 20   # what a receiver that does not read may be sent before the check fails
BACKPRESSURE_CHUNK = 64 << 10
BACKPRESSURE_PROBE = 256 << 10     # read by the peer first: its bytes show the connection is accelerated


def kernel_gate(release: str | None = None) -> tuple[bool, str]:
    release = release or platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return False, f"cannot parse kernel release {release!r}"
    version = (int(m.group(1)), int(m.group(2)))
    if version < MIN_KERNEL:
        return False, f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}"
    return True, f"kernel {release}"


def accel_cflags() -> list[str]:
    """Compile flags for bpf/accel.c on this kernel (the loader adds them): where struct sock keeps
    sk_rmem_alloc, from the kernel's own BTF, so sk_msg can bound what a peer holds unread. Without BTF
    nothing is bounded in BPF, and the self-test's backpressure part decides."""
    from initagent import kbtf
    try:
        return [f"-DBI_SK_RMEM_ALLOC_OFF={kbtf.load().offset('sock', 'sk_backlog.rmem_alloc')}"]
    except kbtf.BtfError:
        return []


def attach_sk_msg(build) -> None:
    """sk_msg verdict program on the (pinned) sockhash; re-attaching the same program is harmless."""
    from initagent import bpfsys
    bpfsys.prog_attach(build.map_fd("bi_accel_socks"), build.prog_fd("bpfinit_sk_msg"),
                       bpfsys.ATTACH["sk_msg_verdict"], flags=0)


def _pattern(n: int) -> bytes:
    block = bytes(range(251))          # prime length: misplaced bytes do not line up by chance
    return (block * (n // len(block) + 1))[:n]


def _recv_exact(sock: socket.socket, n: int, deadline: float, use_splice: bool) -> bytes:
    chunks, got = [], 0
    pipe_r = pipe_w = -1
    if use_splice:
        pipe_r, pipe_w = os.pipe()
    try:
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                how = "splice(2)" if use_splice else "recv(2)"
                raise TimeoutError(f"{how} stalled after {got} of {n} bytes")
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                continue
            if use_splice:
                try:
                    moved = os.splice(sock.fileno(), pipe_w, min(65536, n - got), flags=os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    # readable for poll() but nothing for splice(): the sockmap ingress queue is invisible
                    # to tcp_splice_read on some kernels; retry until the deadline, then call it a stall
                    time.sleep(0.01)
                    continue
                data = os.read(pipe_r, moved) if moved else b""
            else:
                data = sock.recv(min(1 << 20, n - got))
            if not data:
                raise ConnectionError(f"closed after {got} of {n} bytes")
            chunks.append(data)
            got += len(data)
    finally:
        if use_splice:
            os.close(pipe_r)
            os.close(pipe_w)
    return b"".join(chunks)


def _tcp_buffer_max(name: str) -> int:
    """Largest buffer autotuning may give one TCP socket in this netns (tcp_rmem / tcp_wmem max)."""
    try:
        return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 << 20


def tcp_queue_max() -> int:
    """What TCP lets one connection hold for a receiver that does not read: sender's plus receiver's buffer."""
    return _tcp_buffer_max("tcp_wmem") + _tcp_buffer_max("tcp_rmem")


def backpressure_limit() -> int:
    """Bytes a non-reading receiver may be sent before we call it unbounded: twice what TCP allows, and
    never below 64 MiB."""
    return max(BACKPRESSURE_MIN_LIMIT, 2 * tcp_queue_max())


def lo_tx_bytes() -> int:
    """Bytes sent on this netns's loopback so far (/proc/self/net follows the netns we are in; /sys may not)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    raise OSError("no lo in /proc/self/net/dev")


def _accelerated(payload: int, lo_bytes: int) -> bool:
    """Redirected bytes never touch lo; only the handshake and the teardown do."""
    return lo_bytes < payload // 4


def _not_accelerated(what: str, payload: int, lo_bytes: int) -> str:
    return f"{what} was not accelerated ({lo_bytes >> 10} KiB of {payload >> 10} KiB crossed lo)"


@contextlib.contextmanager
def _accepted_pair(srv: socket.socket, port: int, deadline: float):
    """(client, accepted peer) of one loopback connection to srv; accept() returns after the kernel ran
    the peer's PASSIVE_ESTABLISHED, so both ends are in the sockhash before the first write."""
    with socket.create_connection(("127.0.0.1", port), timeout=max(0.1, deadline - time.monotonic())) as cli:
        srv.settimeout(max(0.1, deadline - time.monotonic()))
        peer, _ = srv.accept()
        with peer:
            yield cli, peer


def backpressure_holds(srv: socket.socket, port: int, deadline: float,
                       require_acceleration: bool = True) -> tuple[bool, str]:
    """Non-blocking writes to a peer that stopped reading must hit EAGAIN before the limit. First the peer
    reads a probe block, whose bytes must not cross lo (unless told otherwise, as for plain TCP): that
    shows this very connection is accelerated."""
    limit = backpressure_limit()
    with _accepted_pair(srv, port, deadline) as (cli, peer):
        errors: list[str] = []

        def read_probe():
            try:
                _recv_exact(peer, BACKPRESSURE_PROBE, deadline, use_splice=False)
            except (OSError, TimeoutError, ConnectionError) as err:
                errors.append(str(err))

        lo_before = lo_tx_bytes()
        reader = threading.Thread(target=read_probe, daemon=True)
        reader.start()
        cli.sendall(b"\1" * BACKPRESSURE_PROBE)
        reader.join(timeout=max(0.1, deadline - time.monotonic()))
        lo_bytes = lo_tx_bytes() - lo_before
        if errors or reader.is_alive():
            return False, f"backpressure check: the probe block was not received ({errors or 'timeout'})"
        if require_acceleration and not _accelerated(BACKPRESSURE_PROBE, lo_bytes):
            return False, _not_accelerated("the backpressure connection", BACKPRESSURE_PROBE, lo_bytes)
        # from here on the peer never reads
        cli.setblocking(False)
        chunk, queued, stopped = b"\0" * BACKPRESSURE_CHUNK, 0, ""
        while queued < limit and time.monotonic() < deadline:
            try:
                queued += cli.send(chunk)
            except (BlockingIOError, InterruptedError):
                stopped = f"backpressure after {queued >> 10} KiB"
                break
            except OSError as err:   # ENOMEM and the like also stop the writer: bounded
                stopped = f"backpressure after {queued >> 10} KiB ({err.strerror})"
                break
    if stopped:
        return True, stopped
    if queued >= limit:
        return False, (f"no backpressure: {queued >> 20} MiB queued to a peer that does not read (TCP stops at "
                       f"its socket buffers, at most {tcp_queue_max() >> 20} MiB here); the kernel's sockmap "
                       "ingress ignores the receive buffer, so an app could fill kernel memory through its proxy")
    return False, f"backpressure check ran out of time after {queued >> 20} MiB"


def min_reads_hold(srv: socket.socket, port: int, deadline: float,
                   require_acceleration: bool = True) -> tuple[bool, str]:
    """recv(MSG_WAITALL) of WAITALL_SIZE written in pieces returns all of it; with SO_RCVLOWAT set, a few
    bytes do not make the socket readable. On an accelerated connection (its bytes must not cross lo)."""
    with _accepted_pair(srv, port, deadline) as (cli, peer):
        peer.setblocking(True)   # MSG_WAITALL means nothing on a non-blocking socket (Python's timeouts are)
        got: list[int] = []
        reader = threading.Thread(target=lambda: got.append(len(peer.recv(WAITALL_SIZE, socket.MSG_WAITALL))),
                                  daemon=True)
        lo_before = lo_tx_bytes()
        reader.start()
        piece = WAITALL_SIZE // WAITALL_PARTS
        for _ in range(WAITALL_PARTS):
            cli.sendall(b"\2" * piece)
            time.sleep(0.005)   # separate arrivals: each would satisfy a plain recv()
        reader.join(timeout=max(0.1, deadline - time.monotonic()))
        if reader.is_alive():            # never satisfied: unblock it, then report
            peer.shutdown(socket.SHUT_RDWR)
            reader.join(timeout=1.0)
            return False, f"recv(MSG_WAITALL) of {WAITALL_SIZE >> 10} KiB never returned"
        lo_bytes = lo_tx_bytes() - lo_before
        if require_acceleration and not _accelerated(WAITALL_SIZE, lo_bytes):
            return False, _not_accelerated("the MSG_WAITALL connection", WAITALL_SIZE, lo_bytes)
        if not got or got[0] != WAITALL_SIZE:
            return False, (f"recv(MSG_WAITALL) of {WAITALL_SIZE >> 10} KiB returned "
                           f"{(got[0] >> 10) if got else 0} KiB: the kernel ignores MSG_WAITALL on "
                           "accelerated sockets")
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, piece)
        cli.sendall(b"\3" * 100)
        early, _, _ = select.select([peer], [], [], LOWAT_QUIET_S)
        if early:
            return False, (f"a socket with SO_RCVLOWAT {piece >> 10} KiB became readable with 100 bytes: "
                           "the kernel ignores SO_RCVLOWAT on accelerated sockets")
        cli.sendall(b"\3" * piece)
        ready, _, _ = select.select([peer], [], [], max(0.1, deadline - time.monotonic()))
        if not ready:
            return False, "a socket with SO_RCVLOWAT never became readable"
    return True, "MSG_WAITALL and SO_RCVLOWAT honoured"


def self_test(port: int, deadline_s: float = SELFTEST_DEADLINE_S,
              check_splice: bool = True, check_backpressure: bool = True,
              check_waitall: bool = True) -> tuple[bool, str]:
    """Loopback client -> 127.0.0.1:<port> in this netns/cgroup; see module doc. (ok, detail)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(("127.0.0.1", port))
        except OSError as err:
            return False, f"cannot listen on 127.0.0.1:{port} for the self-test ({err.strerror})"
        srv.listen(1)
        ok, why = _exchanges(srv, port, deadline_s, check_splice)
        if not ok:
            return False, why
        details = [why, "received with splice(2)" if check_splice else SPLICE_WAIVED]
        for wanted, check, name, waived in ((check_waitall, min_reads_hold, "MSG_WAITALL check", WAITALL_WAIVED),
                                            (check_backpressure, backpressure_holds, "backpressure check",
                                             BACKPRESSURE_WAIVED)):
            if not wanted:
                details.append(waived)
                continue
            try:
                ok, why = check(srv, port, time.monotonic() + deadline_s)
            except OSError as err:
                ok, why = False, f"{name}: {err.strerror or err}"
            if not ok:
                return False, why
            details.append(why)
        return True, ", ".join(details)


def _exchanges(srv: socket.socket, port: int, deadline_s: float, check_splice: bool) -> tuple[bool, str]:
    """Keep-alive exchanges of SELFTEST_SIZES on one connection, byte-exact, that must not cross lo."""
    deadline = time.monotonic() + deadline_s
    errors: list[str] = []

    def serve():
        try:
            srv.settimeout(deadline_s)
            conn, _ = srv.accept()
            with conn:
                for _ in SELFTEST_SIZES:
                    size = int(_recv_exact(conn, 8, deadline, use_splice=False))
                    conn.sendall(_pattern(size))
        except (OSError, ValueError, TimeoutError) as err:
            errors.append(f"server: {err}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    lo_before = lo_tx_bytes()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as cli:
            for i, n in enumerate(SELFTEST_SIZES):
                cli.sendall(b"%08d" % n)
                data = _recv_exact(cli, n, deadline, use_splice=check_splice and n > 4096)
                if data != _pattern(n):
                    return False, f"response {i + 1} ({n} bytes) was corrupted"
    except (OSError, TimeoutError, ConnectionError) as err:
        return False, f"client: {err}"
    finally:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    if errors:
        return False, errors[0]
    payload, lo_bytes = sum(SELFTEST_SIZES) + 8 * len(SELFTEST_SIZES), lo_tx_bytes() - lo_before
    if not _accelerated(payload, lo_bytes):
        return False, _not_accelerated("the connection", payload, lo_bytes)
    return True, f"{len(SELFTEST_SIZES)} keep-alive exchanges up to {max(SELFTEST_SIZES) >> 20} MiB"


def enable_or_fall_back(build, cfg, facts, cgroup_path, result):
    """After setup with acceleration on: gate + self-test; on failure re-apply without it. Returns cfg."""
    from initagent import attach, netns
    ok, why = kernel_gate()
    if ok:
        try:
            attach_sk_msg(build)
            # Operator waiver for workloads known never to splice() (on this machine's 6.18 kernel splice
            # stalls on accelerated sockets, so the full self-test always falls back). Logged, never silent.
            ok, why = self_test(cfg.proxy_port, check_splice=not cfg.accelerate_skip_splice_check,
                                check_backpressure=not cfg.accelerate_skip_backpressure_check,
                                check_waitall=not cfg.accelerate_skip_waitall_check)
        except OSError as err:
            ok, why = False, f"sk_msg attach failed: {err.strerror}"
    if ok:
        scope = ", pod to pod too (with pods on this node that have it)" if cfg.accelerate_pod_to_pod else ""
        print(f"bpfinit-agent: acceleration on{scope} (self-test passed: {why})")
        return cfg
    print(f"bpfinit-agent: acceleration self-test failed: {why}; running without acceleration",
          file=sys.stderr)
    plain = dataclasses.replace(cfg, accelerate=False)
    attach.setup_pod(build, cfg.bpffs, plain, facts, netns.cookie(), cgroup_path)
    return plain
