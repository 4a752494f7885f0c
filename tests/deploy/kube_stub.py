"""A small HTTPS stand-in for the few kube-apiserver endpoints `bpfinit-webhook certs` uses.

A real kube-apiserver (with etcd) cannot run on this machine, so this stub serves, over real TLS on
127.0.0.1 with bearer-token auth, exactly these endpoints with the apiserver's semantics that matter:
  GET/POST/PUT  /api/v1/namespaces/{ns}/secrets[/{name}]      (POST on an existing name -> 409
                AlreadyExists; PUT with a stale metadata.resourceVersion -> 409 Conflict)
  GET/PATCH     /apis/admissionregistration.k8s.io/v1/{mutating,validating}webhookconfigurations/{name}
                (PATCH = RFC 6902 JSON patch, applied with `jsonpatch`; a failed `test` -> 422)
Errors are metav1.Status objects. `fail_next` injects 5xx answers to exercise retries.
"""
from __future__ import annotations

import copy
import json
import re
import threading
from http.server import ThreadingHTTPServer

import jsonpatch

from tests.jsonhttp import JsonHandler

TOKEN = "stub-token-not-a-secret"
SECRETS = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets(?:/([^/?]+))?$")
WEBHOOKS = re.compile(r"^/apis/admissionregistration\.k8s\.io/v1/(mutating|validating)webhookconfigurations/([^/?]+)$")


def _status(code: int, reason: str, message: str) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason,
            "message": message, "metadata": {}}


class KubeStub:
    def __init__(self, tls_cert_pem_path: str, tls_key_pem_path: str):
        self.lock = threading.Lock()
        self.secrets: dict[tuple[str, str], dict] = {}
        self.configs: dict[tuple[str, str], dict] = {}   # (mutating|validating, name) -> object
        self.requests: list[tuple[str, str]] = []
        self.fail_next: list[int] = []                    # status codes to answer before serving normally
        self._rv = 100
        stub = self

        class Handler(JsonHandler):

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def _handle(self, method: str):
                path = self.path.split("?", 1)[0]
                with stub.lock:
                    stub.requests.append((method, path))
                    injected = stub.fail_next.pop(0) if stub.fail_next else None
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.send_json(401, _status(401, "Unauthorized", "bad token"))
                if injected:
                    return self.send_json(injected, _status(injected, "InternalError", "injected failure"))
                body = self._body() if method in ("POST", "PUT", "PATCH") else None
                code, answer = stub.dispatch(method, path, body, self.headers.get("Content-Type", ""))
                return self.send_json(code, answer)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_PATCH(self):
                self._handle("PATCH")

        import ssl
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert_pem_path, tls_key_pem_path)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    # -- lifecycle
    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # -- state helpers for tests
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def add_config(self, kind: str, obj: dict) -> None:
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
        self.configs[(kind, obj["metadata"]["name"])] = obj

    def config(self, kind: str, name: str) -> dict:
        with self.lock:
            return copy.deepcopy(self.configs[(kind, name)])

    def writes(self) -> list[tuple[str, str]]:
        with self.lock:
            return [r for r in self.requests if r[0] != "GET"]

    # -- the API semantics
    def dispatch(self, method: str, path: str, body, content_type: str) -> tuple[int, dict]:
        with self.lock:
            m = SECRETS.match(path)
            if m:
                return self._secrets(method, m.group(1), m.group(2), body)
            m = WEBHOOKS.match(path)
            if m:
                return self._webhooks(method, m.group(1), m.group(2), body, content_type)
            return 404, _status(404, "NotFound", f"the stub does not serve {path}")

    def _secrets(self, method, ns, name, body):
        key = (ns, name)
        if method == "GET" and name:
            if key not in self.secrets:
                return 404, _status(404, "NotFound", f'secrets "{name}" not found')
            return 200, copy.deepcopy(self.secrets[key])
        if method == "POST" and not name:
            key = (ns, body["metadata"]["name"])
            if key in self.secrets:
                return 409, _status(409, "AlreadyExists", f'secrets "{key[1]}" already exists')
            obj = copy.deepcopy(body)
            obj["metadata"].update(namespace=ns, resourceVersion=self._next_rv())
            self.secrets[key] = obj
            return 201, copy.deepcopy(obj)
        if method == "PUT" and name:
            if key not in self.secrets:
                return 404, _status(404, "NotFound", f'secrets "{name}" not found')
            sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            if sent_rv != self.secrets[key]["metadata"]["resourceVersion"]:
                return 409, _status(409, "Conflict", "the object has been modified; please apply your changes "
                                                     "to the latest version and try again")
            obj = copy.deepcopy(body)
            obj["metadata"].update(namespace=ns, resourceVersion=self._next_rv())
            self.secrets[key] = obj
            return 200, copy.deepcopy(obj)
        return 405, _status(405, "MethodNotAllowed", f"{method} {name or ''}")

    def _webhooks(self, method, kind, name, body, content_type):
        key = (kind, name)
        if key not in self.configs:
            return 404, _status(404, "NotFound", f'{kind}webhookconfigurations "{name}" not found')
        if method == "GET":
            return 200, copy.deepcopy(self.configs[key])
        if method == "PATCH":
            if content_type.split(";")[0] != "application/json-patch+json":
                return 415, _status(415, "UnsupportedMediaType", content_type)
            try:
                patched = jsonpatch.apply_patch(self.configs[key], body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return 422, _status(422, "Invalid", f"the server rejected our request due to an error in our "
                                                    f"request: {exc}")
            patched["metadata"]["resourceVersion"] = self._next_rv()
            self.configs[key] = patched
            return 200, copy.deepcopy(patched)
        return 405, _status(405, "MethodNotAllowed", method)


def write_kubeconfig(path, port: int, ca_pem_path: str) -> None:
    import yaml
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "stub",
           "clusters": [{"name": "stub", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                      "certificate-authority": ca_pem_path}}],
           "users": [{"name": "stub", "user": {"token": TOKEN}}],
           "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}]}
    path.write_text(yaml.safe_dump(cfg))
