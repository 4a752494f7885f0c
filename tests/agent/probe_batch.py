"""Run many probes from one process (one pod identity, or a peer netns): argv[1] = JSON list of probes.

A probe is [host, port, src|null] (a TCP connect, tests/probe.py's format) or [kind, host, port, src|null]
with kind one of:
  "tcp"        the TCP connect above;
  "dns-udp"    an A query sent with sendto() on an unconnected UDP socket; reports the answer and the
               source address of the reply (resolvers such as glibc drop replies from another source);
  "dns-udpc"   the same on a connected UDP socket (connect(), send(), recv());
  "dns-tcp"    the query over TCP (2-byte length framing). A JSON line instead of a DNS reply means a
               tests/probe.py server answered (e.g. the proxy's hairpin listener): reported as such.
or ["owned", creator, user, probe]: the socket is created as `creator` and used (connect/sendto) as `user`,
each [ruid, euid, rgid, egid] (fsuid/fsgid follow the effective ids); the batch must run as root.
Prints one JSON list of outcomes. Bounded: at most 2000 probes, each with a 2 s timeout.
"""
import errno
import ipaddress
import json
import os
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from probe import _OUTCOMES, connect  # noqa: E402

TIMEOUT_S = 2.0
QUERY_ID = 0x4242


def dns_query() -> bytes:
    """A recursive A query for svc.test (fixed id: one query per socket)."""
    header = struct.pack("!HHHHHH", QUERY_ID, 0x0100, 1, 0, 0, 0)
    return header + b"\x03svc\x04test\x00" + struct.pack("!HH", 1, 1)


def dns_answer(reply: bytes) -> str | None:
    """The first A record of a reply to our query, or None when it is not one."""
    if len(reply) < 12 or struct.unpack("!H", reply[:2])[0] != QUERY_ID:
        return None
    if struct.unpack("!H", reply[6:8])[0] < 1 or len(reply) < 4:
        return None
    return str(ipaddress.IPv4Address(reply[-4:]))


def _unmap(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def failure(exc: OSError) -> dict:
    """tests/probe.py's outcome names for a failed probe."""
    if isinstance(exc, socket.timeout):
        return {"outcome": "timeout", "errno": errno.ETIMEDOUT}
    return {"outcome": _OUTCOMES.get(exc.errno, "error"), "errno": exc.errno, "detail": str(exc)}


def dns_probe(kind: str, host: str, port: int, src: str | None, before_use=None) -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if kind == "dns-tcp" else socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT_S)
    try:
        if src:
            sock.bind((src, 0))
        if before_use:
            before_use()
        if kind == "dns-udp":
            sock.sendto(dns_query(), (host, port))
            reply, peer = sock.recvfrom(4096)
            return {"outcome": "ok", "answer": dns_answer(reply), "from": [_unmap(peer[0]), peer[1]]}
        if kind == "dns-udpc":
            sock.connect((host, port))
            sock.send(dns_query())
            reply = sock.recv(4096)
            return {"outcome": "ok", "answer": dns_answer(reply), "from": None}
        sock.connect((host, port))
        query = dns_query()
        sock.sendall(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 65538:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"{") and data.endswith(b"\n"):
                break
            if len(data) >= 2 and not data.startswith(b"{") and len(data) >= 2 + struct.unpack("!H", data[:2])[0]:
                break
        if data.startswith(b"{"):
            return {"outcome": "ok", "reply": json.loads(data.decode().splitlines()[0])}
        if len(data) < 2:
            return {"outcome": "closed"}
        return {"outcome": "ok", "answer": dns_answer(data[2:]), "from": None}
    except OSError as exc:   # socket.timeout included
        return failure(exc)
    finally:
        sock.close()


def become(ids: list) -> None:
    """Real and effective ids [ruid, euid, rgid, egid]; the saved ids stay 0, so root can come back."""
    os.setresuid(0, 0, 0)
    ruid, euid, rgid, egid = ids
    os.setresgid(rgid, egid, 0)
    os.setresuid(ruid, euid, 0)


def run(probe: list, before_use=None) -> dict:
    if probe[0] == "owned":
        _kind, creator, user, inner = probe
        os.setgroups([])
        become(creator)
        try:
            return run(inner, before_use=lambda: become(user))
        finally:
            become([0, 0, 0, 0])
    if len(probe) == 3 or probe[0] == "tcp":
        host, port, src = probe[-3:]
        return connect(host, port, src, TIMEOUT_S, before_connect=before_use)
    kind, host, port, src = probe
    if kind not in ("dns-udp", "dns-udpc", "dns-tcp"):
        return {"outcome": "error", "detail": f"unknown probe kind {kind!r}"}
    return dns_probe(kind, host, port, src, before_use)


if __name__ == "__main__":
    probes = json.loads(sys.argv[1])
    print(json.dumps([run(p) for p in probes[:2000]]), flush=True)
