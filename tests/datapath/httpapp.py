"""Test application: an HTTP/1.1 server (keep-alive). GET /echo answers JSON with the request headers
and the peer; GET /big?n=N answers N bytes of a fixed pattern. Prints READY when listening."""
from __future__ import annotations

import argparse
import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def pattern(n: int) -> bytes:
    block = bytes(range(251))
    return (block * (n // 251 + 1))[:n]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/big"):
            n = int(self.path.split("n=", 1)[1])
            body = pattern(n)
            ctype = "application/octet-stream"
        else:
            body = json.dumps({"headers": dict(self.headers), "peer": list(self.client_address[:2]),
                               "local": list(self.connection.getsockname()[:2])}).encode()
            ctype = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    srv = Server(("::", args.port), Handler)
    print("READY", flush=True)
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
