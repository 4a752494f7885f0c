"""`setup --run-validation`: Istio's redirect validator (contract §1.8), reproduced.

Listeners on 127.0.0.1:<-p> and 127.0.0.1:<-z> ([::1] for IPv6 pods); a client running as the proxy
uid/gid connects to 127.0.0.6:<probe port> ([::6]); the check passes once a listener accepts a connection
whose SO_ORIGINAL_DST port is the probe port, within --probe-timeout. Otherwise exit code 126, as Istio.
The client must be the proxy's identity: the hairpin rule (proxy -> non-127.0.0.1 over lo -> <-z>) is
what carries the probe, exactly as with istio-iptables in CNI mode (istio-validation runs as 1337).
"""
from __future__ import annotations

import ipaddress
import select
import socket
import struct
import subprocess
import sys
import time

VALIDATION_ERROR_CODE = 126
SO_ORIGINAL_DST = 80

_CLIENT = r"""
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
while time.monotonic() < deadline:
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect((host, port))
        s.close()
        break
    except OSError:
        s.close()
        time.sleep(0.1)
"""


def _orig_dst_port(conn: socket.socket) -> int | None:
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        else:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    return struct.unpack("!H", raw[2:4])[0]


def validate(cfg, ipv6: bool = False) -> tuple[bool, str]:
    """Run the probe once; returns (ok, one-line message)."""
    listen_host = "::1" if ipv6 else "127.0.0.1"
    probe_host = "::6" if ipv6 else "127.0.0.6"
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    listeners = []
    try:
        for port in dict.fromkeys((cfg.proxy_port, cfg.inbound_capture_port)):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((listen_host, port))
            except OSError as err:
                s.close()
                return False, f"validation: cannot listen on {listen_host}:{port}: {err.strerror}"
            s.listen(8)
            listeners.append(s)
        uid = cfg.proxy_uids[0] if cfg.proxy_uids else 1337
        gid = cfg.proxy_gids[0] if cfg.proxy_gids else uid
        timeout = max(0.5, cfg.probe_timeout_s)
        client = subprocess.Popen([sys.executable, "-c", _CLIENT, probe_host, str(cfg.probe_port), str(timeout)],
                                  user=uid, group=gid, extra_groups=[], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        seen = []
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select(listeners, [], [], max(0.0, min(0.2, deadline - time.monotonic())))
                for srv in ready:
                    conn, _ = srv.accept()
                    with conn:
                        port = _orig_dst_port(conn)
                        seen.append(port)
                        if port == cfg.probe_port:
                            return True, (f"validation passed: {probe_host}:{cfg.probe_port} reached "
                                          f"{listen_host}:{srv.getsockname()[1]} with SO_ORIGINAL_DST port {port}")
        finally:
            if client.poll() is None:
                client.kill()
            client.wait(timeout=5)
        got = f"accepted with SO_ORIGINAL_DST ports {seen}" if seen else "no connection reached the listeners"
        return False, (f"validation failed: a connection to {probe_host}:{cfg.probe_port} as uid {uid} was not "
                       f"redirected with its original destination within {timeout:g}s ({got}); the pod is not "
                       "captured (consider cni.repair.deletePods)")
    finally:
        for s in listeners:
            s.close()


def run(cfg, ipv6: bool = False) -> int:
    """Print the outcome; 0 or 126 (Istio's ValidationErrorCode)."""
    ok, message = validate(cfg, ipv6)
    print(f"bpfinit-agent: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else VALIDATION_ERROR_CODE
