"""A tiny authoritative stand-in DNS server (UDP and TCP) for the DNS capture tests.

`dnsserver.py --bind ADDR --port P --answer IP [--timeout S]` answers every A query with IP (TTL 5),
prints READY once both sockets listen, and exits after --timeout seconds. Test traffic only.
"""
from __future__ import annotations

import argparse
import ipaddress
import select
import socket
import struct
import sys
import time


def answer(query: bytes, ip: str) -> bytes:
    if len(query) < 12:
        return b""
    qid, flags, qd = struct.unpack("!HHH", query[:6])
    end = 12
    while end < len(query) and query[end] != 0:
        end += query[end] + 1
    question = query[12:end + 5]
    header = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, 1, 0, 0)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + ipaddress.IPv4Address(ip).packed
    return header + question + rr


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--answer", required=True)
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    fam = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    udp = socket.socket(fam, socket.SOCK_DGRAM)
    udp.bind((args.bind, args.port))
    tcp = socket.socket(fam, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((args.bind, args.port))
    tcp.listen(16)
    print("READY", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([udp, tcp], [], [], 0.5)
        for s in ready:
            if s is udp:
                data, peer = udp.recvfrom(4096)
                udp.sendto(answer(data, args.answer), peer)
            else:
                conn, _ = tcp.accept()
                conn.settimeout(2)
                try:
                    size = struct.unpack("!H", conn.recv(2))[0]
                    data = b""
                    while len(data) < size:
                        chunk = conn.recv(size - len(data))
                        if not chunk:
                            break
                        data += chunk
                    reply = answer(data, args.answer)
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except (OSError, struct.error):
                    pass
                finally:
                    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
