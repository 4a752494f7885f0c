"""HAProxy as a stand-in Istio sidecar: outbound listener on 127.0.0.1:<-p> forwarding to the original
destination (SO_ORIGINAL_DST), inbound listener on <-z> forwarding to the original destination from the
passthrough source 127.0.0.6. Each hop stamps the original destination it saw into a header."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

TEMPLATE = """
global
    maxconn 4000
    nbthread 1
defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend outbound
    bind 127.0.0.1:{p}
    http-request set-header X-Out-Orig-Dst %[dst]:%[dst_port]
    default_backend original_dst_out
backend original_dst_out
    http-reuse never
    server orig 0.0.0.0
frontend inbound
    bind 0.0.0.0:{z}
    bind :::{z} v6only
    http-request set-header X-In-Orig-Dst %[dst]:%[dst_port]
    default_backend original_dst_in
backend original_dst_in
    http-reuse never
    source 127.0.0.6
    server orig 0.0.0.0
"""


def haproxy_config(proxy_port: int = 15001, inbound_port: int = 15006) -> str:
    return TEMPLATE.format(p=proxy_port, z=inbound_port)


def start(pod, proxy_port: int = 15001, inbound_port: int = 15006, uid: int = 1337):
    """Run HAProxy in the pod as the proxy uid/gid; returns (Popen, config dir)."""
    assert shutil.which("haproxy"), "haproxy is missing (scripts/install-system-deps.sh)"
    tmp = Path(tempfile.mkdtemp(prefix="bpfinit-sidecar-"))
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(haproxy_config(proxy_port, inbound_port))
    tmp.chmod(0o755)
    cfg.chmod(0o644)
    proc = pod.popen(["haproxy", "-db", "-f", str(cfg)], uid=uid, gid=uid)
    return proc, tmp
