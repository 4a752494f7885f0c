"""`make demo`: bpfinit end to end on one machine, no cluster (needs root, cgroup v2, bcc).

1. starts the webhook server (gunicorn + TLS) with the repository's sample egress policy;
2. sends it Istio's own injected pod (tests/data/istio/injected/pod.yaml.injected) as an AdmissionReview,
   with one Istio annotation (excludeOutboundIPRanges) rendered into istio-init's args as Istio's template
   does, and shows the mutated init container; asks the validator about a pod excluding 0.0.0.0/0;
3. brings that pod up locally: a network namespace + cgroup (tests/podenv.py), the swapped init
   container's exact command, HAProxy as the sidecar (uid 1337, forwards to SO_ORIGINAL_DST) and a
   small app;
4. sends a proxied request, an excluded-CIDR bypass and a request the egress policy denies, then prints
   the agent's counters and observed flows, and cleans everything up.
All traffic stays inside namespaces the demo creates. Exit code 0 only if every step behaved as expected.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonpatch
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the demo's pod is the test fixture's (netns + cgroup), and so is its sidecar
from tests.podenv import Cluster, bpffs_mount  # noqa: E402
from tests.sidecar import HAProxy, sidecar_config  # noqa: E402

VENV_BIN = Path(sys.executable).parent
NAMESPACE = "high-performance-app"          # the sample policy's namespace
SERVICE_ADDR = "10.97.0.10"                 # a "service" in the mesh: captured, goes through the sidecar
KAFKA_ADDR = "172.20.0.10"                  # in the excluded CIDR: bypasses the sidecar
EXCLUDED = "172.20.0.0/16"
PROXY_UID = 1337
APP_UID = 1000


def say(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def wait_until(check, what: str, timeout: float = 30.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, requests.RequestException) as exc:
            last = exc
        time.sleep(step)
    raise RuntimeError(f"timed out waiting for {what} ({last})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- 1. the webhook ------------------------------------------------------------------------------

SERVER_CODE = """
import sys
from webhook.policy import PolicyStore
from webhook.server import ServerOptions, serve
store = PolicyStore.from_file(sys.argv[3])
sys.exit(serve(ServerOptions(host="127.0.0.1", port=int(sys.argv[1]), cert_dir=sys.argv[2], workers=1, threads=2,
                            agent_image="bpfinit:demo"),
               policy_store=store))
"""


@contextlib.contextmanager
def webhook_server(workdir: Path):
    from webhook import certs
    cert_dir = workdir / "certs"
    certs.ensure_certificates(cert_dir, certs.default_sans("bpfinit-webhook", "bpfinit-system"))
    port = free_port()
    policy = REPO / "manifests/examples/sample-policy.yaml"
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(port), str(cert_dir), str(policy)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "webhook.log", "w"))
    base = f"https://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(f"{base}/readyz", verify=str(cert_dir / "ca.crt"), timeout=2).ok,
                   "the webhook's /readyz")
        yield base, str(cert_dir / "ca.crt")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def review(pod: dict, uid: str) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": NAMESPACE,
        "operation": "CREATE", "userInfo": {"username": "demo"}, "object": pod, "dryRun": False}}


def istio_pod_with_exclusion() -> dict:
    docs = yaml.safe_load_all((REPO / "tests/data/istio/injected/pod.yaml.injected").read_text())
    pod = next(d for d in docs if d and d.get("kind") == "Pod")
    pod["metadata"]["namespace"] = NAMESPACE
    pod["metadata"].setdefault("labels", {})["app"] = "producer"
    pod["metadata"].setdefault("annotations", {})["traffic.sidecar.istio.io/excludeOutboundIPRanges"] = EXCLUDED
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    args = init["args"]
    args[args.index("-x") + 1] = EXCLUDED       # what Istio's template renders for that annotation
    return pod


def mutate_and_validate(base: str, ca: str) -> list[str]:
    pod = istio_pod_with_exclusion()
    before = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    print("Istio's istio-init:", json.dumps({"image": before["image"], "args": before["args"]}))
    answer = requests.post(f"{base}/mutate", json=review(pod, "demo-1"), verify=ca, timeout=10).json()["response"]
    patch = json.loads(base64.b64decode(answer["patch"]))
    mutated = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
    after = next(c for c in mutated["spec"]["initContainers"] if c["name"] == "istio-init")
    print(f"webhook answered allowed={answer['allowed']} with {len(patch)} patch operations; warnings: "
          f"{answer.get('warnings') or []}")
    print("bpfinit's istio-init:", json.dumps({"image": after["image"], "command": after.get("command"),
                                               "args": after.get("args")}))
    wide = istio_pod_with_exclusion()
    wide["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundIPRanges"] = "0.0.0.0/0"
    verdict = requests.post(f"{base}/validate", json=review(wide, "demo-2"), verify=ca, timeout=10).json()["response"]
    print(f"validator on excludeOutboundIPRanges=0.0.0.0/0: allowed={verdict['allowed']} "
          f"message={(verdict.get('status') or {}).get('message', '')[:200]!r}")
    if verdict["allowed"] or "not inside" not in (verdict.get("status") or {}).get("message", ""):
        raise RuntimeError("the validator did not deny, for the policy, a pod that bypasses the sidecar to 0.0.0.0/0")
    command = [*after.get("command", []), *after.get("args", [])]
    if command[:2] != ["bpfinit-agent", "setup"]:
        raise RuntimeError(f"the init container was not swapped: {command}")
    return command


# ---- 3/4. the local pod ----------------------------------------------------------------------------

SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{sys.argv[2]} saw a request from {self.client_address[0]}\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[3])), H).serve_forever()
"""

CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print("OK", data.decode().splitlines()[-1])
except OSError as e:
    print("ERROR", e.errno, e.strerror)
"""


def run_pod(command: list[str]) -> dict:
    results = {}
    with bpffs_mount() as bpffs, Cluster() as cluster, contextlib.ExitStack() as sidecar:
        pod = cluster.add_pod("demo")
        for addr in (SERVICE_ADDR, KAFKA_ADDR):
            cluster.add_address(addr)
        # "the rest of the cluster": a service and a Kafka broker, in the cluster netns
        for addr, name, port in ((SERVICE_ADDR, "service", 8080), (KAFKA_ADDR, "kafka", 9092),
                                 (KAFKA_ADDR, "not-allowed", 8080)):
            cluster.popen([sys.executable, "-c", SERVER, addr, name, str(port)])
        say("init container: the swapped istio-init's exact command (+ where the node's bpffs/cgroup are)")
        agent = [str(VENV_BIN / command[0]), *command[1:], f"--cgroup={pod.cgroup}", f"--bpffs={bpffs}"]
        print(" ".join(command))
        # nsenter (not `ip netns exec`): the agent must see the host's cgroupfs and bpffs, as in a pod
        setup = subprocess.run(["nsenter", f"--net={pod.netns_path}", *agent], capture_output=True, text=True,
                               timeout=180, env={**os.environ, "POD_NAME": "demo", "POD_NAMESPACE": NAMESPACE})
        print((setup.stdout + setup.stderr).strip()[-800:])
        if setup.returncode != 0:
            raise RuntimeError(f"bpfinit-agent setup failed ({setup.returncode})")
        say("sidecar: HAProxy as uid 1337")
        # `server orig 0.0.0.0`: HAProxy connects to the original destination (SO_ORIGINAL_DST, from bpfinit)
        sidecar.enter_context(HAProxy(pod, sidecar_config(), uid=PROXY_UID))
        print("haproxy listening on 127.0.0.1:15001")
        wait_until(lambda: "OK" in cluster.run([sys.executable, "-c", CLIENT, KAFKA_ADDR, "9092"]).stdout,
                   "the demo servers")
        say("app (uid 1000): three requests")
        for label, addr, port in (("proxied (captured, via the sidecar)", SERVICE_ADDR, 8080),
                                  ("excluded CIDR, allowed by the policy (bypass)", KAFKA_ADDR, 9092),
                                  ("excluded CIDR, port not allowed (policy denial)", KAFKA_ADDR, 8080)):
            out = pod.run([sys.executable, "-c", CLIENT, addr, str(port)], uid=APP_UID, gid=APP_UID).stdout.strip()
            results[label] = out
            print(f"{label:50s} {addr}:{port} -> {out}")
        say("bpfinit-agent status (this pod's counters)")
        status = subprocess.run(["nsenter", f"--net={pod.netns_path}", str(VENV_BIN / "bpfinit-agent"), "status",
                                 f"--bpffs={bpffs}"], capture_output=True, text=True, timeout=60)
        print((status.stdout + status.stderr).strip()[-2500:])
        say("bpfinit-agent observe (recent decisions)")
        observe = subprocess.run([str(VENV_BIN / "bpfinit-agent"), "observe", f"--bpffs={bpffs}", "-o", "table",
                                  "--max-events", "20", "--timeout", "3"], capture_output=True, text=True, timeout=60)
        print((observe.stdout + observe.stderr).strip()[-2500:])
        subprocess.run(["nsenter", f"--net={pod.netns_path}", str(VENV_BIN / "bpfinit-agent"), "cleanup",
                        f"--bpffs={bpffs}"], capture_output=True, text=True, timeout=60)
    return results


def check(results: dict) -> list[str]:
    proxied, bypass, denied = results.values()
    problems = []
    # Through the sidecar, the service sees HAProxy's connection (from the pod's address too, but it only
    # answers if HAProxy found the original destination through SO_ORIGINAL_DST).
    if not proxied.startswith("OK service"):
        problems.append(f"proxied request failed: {proxied}")
    if not bypass.startswith("OK kafka"):
        problems.append(f"allowed bypass failed: {bypass}")
    if not denied.startswith("ERROR 1 "):          # EPERM from the kernel guard
        problems.append(f"policy denial expected EPERM, got: {denied}")
    return problems


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bpfinit-demo-"))
    try:
        say("webhook: serving /mutate and /validate with the sample egress policy")
        with webhook_server(workdir) as (base, ca):
            print(f"webhook ready at {base}")
            say("admission: Istio's injected pod -> bpfinit")
            command = mutate_and_validate(base, ca)
        results = run_pod(command)
    except (RuntimeError, OSError, subprocess.SubprocessError, requests.RequestException, KeyError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        log = workdir / "webhook.log"
        if log.exists():
            print(log.read_text()[-1500:], file=sys.stderr)
        return 1
    finally:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    problems = check(results)
    say("result")
    print("\n".join(problems) if problems else "proxied, bypassed and denied exactly as the policy says")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
