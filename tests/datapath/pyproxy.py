"""A minimal transparent sidecar for the IPv6 end-to-end test, run as the proxy uid inside a pod.

HAProxy 2.6 cannot stand in for Envoy on IPv6: on an AF_INET6 socket it never asks for
IP6T_SO_ORIGINAL_DST and forwards to the listener's own address. This proxy asks the way Envoy does
(tests/probe.py original_dst), then relays bytes with recv/send (never splice):
  outbound: [<outbound-bind>]:<-p>  -> the original destination
  inbound:  [::]:<-z> (v6only)       -> the original destination, from the passthrough source ::6
Prints READY once listening, then one JSON line per accepted connection:
  {"listener": "outbound"|"inbound", "orig_dst": [ip, port]}
Usage: pyproxy.py [--outbound-bind ::1] [--outbound-port 15001] [--inbound-port 15006] [--inbound-source ::6]
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.probe import original_dst  # noqa: E402

_print_lock = threading.Lock()


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def handle(conn: socket.socket, listener: str, inbound_source: str) -> None:
    dst = original_dst(conn)
    with _print_lock:
        print(json.dumps({"listener": listener, "orig_dst": dst}), flush=True)
    if dst is None:
        conn.close()
        return
    upstream = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        if listener == "inbound":
            upstream.bind((inbound_source, 0))
        upstream.connect((dst[0], dst[1]))
    except OSError:
        conn.close()
        upstream.close()
        return
    back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
    back.start()
    pump(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def listen(addr: str, port: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    srv.bind((addr, port))
    srv.listen(128)
    return srv


def accept_loop(srv: socket.socket, listener: str, inbound_source: str) -> None:
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, listener, inbound_source), daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outbound-bind", default="::1")
    ap.add_argument("--outbound-port", type=int, default=15001)
    ap.add_argument("--inbound-port", type=int, default=15006)
    ap.add_argument("--inbound-source", default="::6")
    args = ap.parse_args()
    listeners = [(listen(args.outbound_bind, args.outbound_port), "outbound"),
                 (listen("::", args.inbound_port), "inbound")]
    print("READY", flush=True)
    threads = [threading.Thread(target=accept_loop, args=(srv, name, args.inbound_source), daemon=True)
               for srv, name in listeners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
