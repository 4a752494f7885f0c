"""Probe client and server used by the kernel tests; run as a script inside a pod or the cluster netns.

Server: `probe.py serve --name NAME --bind ADDR --port P [--count N] [--timeout S] [--fastopen]`
  Accepts TCP connections and answers each with one JSON line:
  {"server": NAME, "local": [ip, port], "remote": [ip, port], "orig_dst": [ip, port] | null}
  where orig_dst is what getsockopt(SO_ORIGINAL_DST) returns on the accepted socket (conntrack or bpfinit).
  Prints "READY" on stdout once listening.

Client: `probe.py connect HOST PORT [--src ADDR] [--timeout S] [--fastopen]`
  --fastopen: TCP Fast Open (server: TCP_FASTOPEN on the listener; client: sendto(MSG_FASTOPEN) of one
  line instead of connect, so the SYN carries data). The netns needs net.ipv4.tcp_fastopen to allow it.
  Prints one JSON line: {"outcome": "ok", "reply": {...server line...}} or
  {"outcome": "refused"|"timeout"|"eperm"|"unreachable"|"error", "errno": N, "detail": "..."}
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import select
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80


def original_dst(conn: socket.socket) -> list | None:
    """SO_ORIGINAL_DST as Envoy asks for it: SOL_IP for IPv4 (also v4-mapped peers), SOL_IPV6 for IPv6."""
    try:
        v4_mapped = conn.family == socket.AF_INET6 and conn.getpeername()[0].startswith("::ffff:")
        if conn.family == socket.AF_INET6 and not v4_mapped:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            addr = ipaddress.IPv6Address(raw[8:24])
            mapped = addr.ipv4_mapped
            return [str(mapped or addr), port]
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        return [socket.inet_ntoa(raw[4:8]), port]
    except OSError:
        return None


def _addr(pair) -> list:
    host = pair[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return [host, pair[1]]


def serve(name: str, bind: str, port: int, count: int, timeout: float, fastopen: bool = False) -> int:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fastopen:
        srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 64)
    if family == socket.AF_INET6 and bind == "::":
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((bind, port))
    srv.listen(128)
    print("READY", flush=True)
    deadline = time.monotonic() + timeout
    served = 0
    while served < count and time.monotonic() < deadline:
        ready, _, _ = select.select([srv], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
        if not ready:
            continue
        conn, peer = srv.accept()
        with conn:
            line = {"server": name, "local": _addr(conn.getsockname()), "remote": _addr(peer),
                    "orig_dst": original_dst(conn)}
            try:
                conn.sendall((json.dumps(line) + "\n").encode())
            except OSError:
                pass
        served += 1
    return 0


_OUTCOMES = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout", errno.EPERM: "eperm",
             errno.EACCES: "eperm", errno.ENETUNREACH: "unreachable", errno.EHOSTUNREACH: "unreachable"}


def connect(host: str, port: int, src: str | None, timeout: float, fastopen: bool = False,
            before_connect=None) -> dict:
    """`before_connect()`, if given, runs between socket() and connect() (e.g. to change identity)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if src:
            sock.bind((src, 0))
        if before_connect:
            before_connect()
        if fastopen:
            sock.sendto(b"hello over fast open\n", socket.MSG_FASTOPEN, (host, port))
        else:
            sock.connect((host, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        if not data:
            return {"outcome": "closed"}
        return {"outcome": "ok", "reply": json.loads(data.decode().splitlines()[0])}
    except socket.timeout:
        return {"outcome": "timeout", "errno": errno.ETIMEDOUT}
    except OSError as exc:
        return {"outcome": _OUTCOMES.get(exc.errno, "error"), "errno": exc.errno, "detail": str(exc)}
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=1_000_000)
    s.add_argument("--timeout", type=float, default=120.0)
    s.add_argument("--fastopen", action="store_true")
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--src")
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--fastopen", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.name, args.bind, args.port, args.count, args.timeout, args.fastopen)
    print(json.dumps(connect(args.host, args.port, args.src, args.timeout, args.fastopen)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
