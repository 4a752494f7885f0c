"""Transport choices made for per-admission CPU and p99 (docs/webhook.md "Performance"), on the real
server: new keep-alive connections are spread over the gunicorn workers, and gunicorn's access-log
record is only built when the access log is on."""
from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from gunicorn.config import Config

from tests.webhook.conftest import start_server
from webhook import worker
from webhook.server import AccessLogOnDemand, _gunicorn_log_config

CONNECTIONS = 8


def test_only_a_worker_holding_more_than_another_waits():
    assert not worker.should_wait(0, None) and not worker.should_wait(5, None)   # alone: never waits
    assert not worker.should_wait(2, 2) and not worker.should_wait(1, 3)         # among the fewest: at once
    assert worker.should_wait(3, 2)
    assert worker.ACCEPT_WAIT_S <= 0.002   # a new connection never waits long


def test_connection_table_slots_are_claimed_released_and_reclaimed_from_dead_workers():
    table = worker.ConnectionTable(slots=2)
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    first, second = table.claim(os.getpid()), table.claim(dead.pid)
    assert (first, second) == (0, 1)
    table.counts[first], table.counts[second] = 4, 1
    assert table.fewest_elsewhere(first) == 1 and table.fewest_elsewhere(second) == 4
    assert table.claim(os.getppid()) == second and table.counts[second] == 0   # the dead worker's slot
    table.release(os.getppid())
    assert table.pids[second] == 0 and table.fewest_elsewhere(first) is None


def _worker_of_each_connection(server_port: int) -> dict[int, int]:
    """client port -> pid of the worker holding the server side of that connection (from `ss`)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{server_port} )"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    owners = {}
    for line in out.splitlines():
        columns = line.split()   # Recv-Q Send-Q Local Peer Process (with `state`, no State column)
        pid = re.search(r"pid=(\d+)", line)
        if len(columns) >= 5 and pid:
            owners[int(columns[3].rsplit(":", 1)[1])] = int(pid.group(1))
    return owners


def _wait_until_workers_poll(server_pid: int, workers: int, timeout_s: float = 20.0) -> list[int]:
    """The worker pids, once each has been seen waiting in its poller (app loaded, accepting): a worker
    still importing the app cannot take connections, balanced or not."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = [int(p) for p in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()]
        for pid in children:
            try:
                if Path(f"/proc/{pid}/wchan").read_text() == "do_epoll_wait":
                    seen.add(pid)
            except OSError:
                pass
        if len(children) == workers and seen >= set(children):
            return children
        time.sleep(0.05)
    raise AssertionError(f"workers not all polling after {timeout_s} s: {seen}")


def test_keep_alive_connections_are_spread_over_the_workers(tmp_path):
    """Opened one after the other (each answered, then kept open), as a client's connection pool fills:
    plain gthread lets the same worker win the accept race again and again; here the worker holding
    fewer connections takes the next one."""
    server = start_server(tmp_path, workers=2)
    worker_pids = _wait_until_workers_poll(server.process.pid, 2)
    context = ssl.create_default_context(cafile=server.ca)
    connections = []
    try:
        for _ in range(CONNECTIONS):
            connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200 and response.read() == b'{"status":"ok"}'
            connections.append(connection)
        client_ports = [c.sock.getsockname()[1] for c in connections]
        deadline = time.monotonic() + 5
        while True:
            owners = _worker_of_each_connection(server.port)
            if all(port in owners for port in client_ports) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        per_worker = Counter(owners[port] for port in client_ports)
        assert set(per_worker) == set(worker_pids), f"not spread over both workers: {per_worker}"
        assert min(per_worker.values()) >= CONNECTIONS // 2 - 1, per_worker
    finally:
        for connection in connections:
            connection.close()
        server.stop()


def _gunicorn_logger(access_log: bool) -> AccessLogOnDemand:
    config = Config()
    config.set("logconfig_dict", _gunicorn_log_config("info", access_log))
    return AccessLogOnDemand(config)


def test_access_record_is_not_built_when_the_access_log_is_off(monkeypatch):
    logger = _gunicorn_logger(access_log=False)
    assert not logger.access_log.isEnabledFor(logging.INFO)
    monkeypatch.setattr(logger, "atoms", lambda *args: pytest.fail("access atoms built for a disabled log"))
    logger.access(None, None, {}, None)   # returns before touching any of its arguments


def test_access_log_still_works_when_asked_for(tmp_path):
    server = start_server(tmp_path, "--access-log", workers=1)
    try:
        assert server.get("/healthz").status_code == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            access = [line for line in server.log_lines() if line.get("logger") == "gunicorn.access"]
            if any("GET /healthz" in line["msg"] for line in access):
                break
            time.sleep(0.1)
        assert any("GET /healthz" in line["msg"] for line in access), access
    finally:
        server.stop()
    (tmp_path / "quiet").mkdir()
    quiet = start_server(tmp_path / "quiet", workers=1)
    try:
        assert quiet.get("/healthz").status_code == 200
        time.sleep(0.3)
        assert not [line for line in quiet.log_lines() if line.get("logger") == "gunicorn.access"]
    finally:
        quiet.stop()
