"""The JSON-answering HTTP handler the tests' kube-apiserver stand-ins share (none can run here for real)."""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class JsonHandler(BaseHTTPRequestHandler):
    def send_json(self, code: int, body) -> None:
        """Answer `body` (bytes as they are, anything else JSON-encoded) with status `code`."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):   # keep pytest output clean
        pass
