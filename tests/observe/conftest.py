"""Fixtures for observability kernel tests: a private bpffs, a pod, and our own tiny bcc program."""
from __future__ import annotations

import json
import sys

import pytest

from tests.podenv import Pod, bpffs_mount, require_kernel

CLIENT = r"""
import errno, json, socket, sys, time
# argv: host port count [timeout_s]; connects `count` times (bounded by timeout) and reports outcomes.
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limit = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
outcomes = {}
deadline = time.monotonic() + limit
done = 0
for _ in range(count):
    if time.monotonic() > deadline:
        break
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((host, port))
        name = "ok"
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    finally:
        s.close()
    outcomes[name] = outcomes.get(name, 0) + 1
    done += 1
print(json.dumps({"done": done, "outcomes": outcomes}))
"""


def connect_many(pod: Pod, host: str, port: int, count: int = 1, uid: int | None = None,
                 gid: int | None = None, cpu: int | None = None, timeout: float = 60.0) -> dict:
    cmd = [sys.executable, "-c", CLIENT, host, str(port), str(count), str(timeout)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    res = pod.run(cmd, uid=uid, gid=gid, timeout=timeout + 30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture
def bpffs():
    require_kernel()
    with bpffs_mount() as path:
        yield path


@pytest.fixture
def pod():
    with Pod("obs") as p:
        yield p


@pytest.fixture
def obsprog(bpffs, pod):
    from tests.observe.obsprog import ObsTestProgram
    prog = ObsTestProgram(bpffs, pod.cgroup)
    try:
        yield prog
    finally:
        prog.close()
