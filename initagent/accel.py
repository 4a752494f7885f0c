"""Optional sockmap acceleration (--accelerate / BPFINIT_ACCELERATE / bpfinit.io/accelerate).

Off by default: sk_msg redirection has a long bug record (stalls with large responses on some kernels,
splice() interactions; ebpf-landscape.md §4). So it is switched on for a pod only when
  1. the kernel passes a version gate, and
  2. a start-up self-test in the pod itself passes: app<->proxy-port loopback connection, keep-alive
     (several exchanges on one connection), a response of several MB, and the receiver reading it
     with splice(2), all byte-exact and within a deadline, with both sockets really in the sockhash.
The splice(2) part alone can be waived by the operator (--accelerate-skip-splice-check), for workloads
that never splice(); the log line then says splice was NOT checked.
Otherwise the pod is re-configured without acceleration and the agent says so (it never fails the pod
for it). The sk_msg program is attached to the pinned sockhash, so it outlives the agent.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import select
import socket
import sys
import threading
import time

MIN_KERNEL = (5, 15)            # bpf_get_netns_cookie in sk_msg (the key's netns); sockhash + redirect fixes
SOCK_KEY_SIZE = 56              # struct bi_sock_key (maps.h)
SELFTEST_SIZES = (100, 4 * 1024 * 1024, 100)
SELFTEST_DEADLINE_S = 5.0
# Said in the "acceleration on" line whenever the operator waived the splice part: never silent.
SPLICE_WAIVED = ("splice(2) NOT checked: waived by the operator (--accelerate-skip-splice-check / "
                 "BPFINIT_ACCEL_SKIP_SPLICE_CHECK / bpfinit.io/accelerate-skip-splice-check)")


def kernel_gate(release: str | None = None) -> tuple[bool, str]:
    release = release or platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return False, f"cannot parse kernel release {release!r}"
    version = (int(m.group(1)), int(m.group(2)))
    if version < MIN_KERNEL:
        return False, f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}"
    return True, f"kernel {release}"


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


def self_test(port: int, count_socks=None, deadline_s: float = SELFTEST_DEADLINE_S,
              check_splice: bool = True) -> tuple[bool, str]:
    """Loopback client -> 127.0.0.1:<port> in this netns/cgroup; see module doc. (ok, detail)."""
    deadline = time.monotonic() + deadline_s
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(("127.0.0.1", port))
    except OSError as err:
        srv.close()
        return False, f"cannot listen on 127.0.0.1:{port} for the self-test ({err.strerror})"
    srv.listen(1)
    errors: list[str] = []

    def serve():
        try:
            srv.settimeout(deadline_s)
            conn, _ = srv.accept()
            with conn:
                for n in SELFTEST_SIZES:
                    req = _recv_exact(conn, 8, deadline, use_splice=False)
                    size = int(req)
                    conn.sendall(_pattern(size))
        except (OSError, ValueError, TimeoutError) as err:
            errors.append(f"server: {err}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    in_map = 0
    try:
        cli = socket.create_connection(("127.0.0.1", port), timeout=deadline_s)
        with cli:
            for i, n in enumerate(SELFTEST_SIZES):
                cli.sendall(b"%08d" % n)
                data = _recv_exact(cli, n, deadline, use_splice=check_splice and n > 4096)
                if data != _pattern(n):
                    return False, f"response {i + 1} ({n} bytes) was corrupted"
                if i == 0 and count_socks is not None:
                    in_map = count_socks()
    except (OSError, TimeoutError, ConnectionError) as err:
        return False, f"client: {err}"
    finally:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
        srv.close()
    if errors:
        return False, errors[0]
    if count_socks is not None and in_map < 2:
        return False, f"the connection was not accelerated ({in_map} sockets in the sockhash)"
    how = "received with splice(2)" if check_splice else SPLICE_WAIVED
    return True, f"{len(SELFTEST_SIZES)} keep-alive exchanges up to {max(SELFTEST_SIZES) >> 20} MiB, {how}"


def enable_or_fall_back(build, cfg, facts, cgroup_path, result):
    """After setup with acceleration on: gate + self-test; on failure re-apply without it. Returns cfg."""
    from initagent import attach, bpfsys, netns
    ok, why = kernel_gate()
    if ok:
        try:
            attach_sk_msg(build)
            fd = build.map_fd("bi_accel_socks")
            # Operator waiver for workloads known never to splice() (on this machine's 6.18 kernel splice
            # stalls on accelerated sockets, so the full self-test always falls back). Logged, never silent.
            ok, why = self_test(cfg.proxy_port, lambda: len(bpfsys.map_keys(fd, SOCK_KEY_SIZE, limit=65536)),
                                check_splice=not cfg.accelerate_skip_splice_check)
        except OSError as err:
            ok, why = False, f"sk_msg attach failed: {err.strerror}"
    if ok:
        print(f"bpfinit-agent: acceleration on (self-test passed: {why})")
        return cfg
    print(f"bpfinit-agent: acceleration self-test failed: {why}; running without acceleration",
          file=sys.stderr)
    plain = dataclasses.replace(cfg, accelerate=False)
    attach.setup_pod(build, cfg.bpffs, plain, facts, netns.cookie(), cgroup_path)
    return plain
