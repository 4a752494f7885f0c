"""gunicorn's gthread worker, with new connections steered to the worker holding the fewest.

All workers poll the one listening socket, and whichever wakes first accepts. Keep-alive clients (the
apiserver, `hey`) open a few long-lived connections at once, so this race routinely gave one worker 3 or
4 of 4 connections while the other idled: its requests then queue behind one GIL while a core is free
(measured: a 3:1 or 4:0 split in 6 of 8 trials; admission p99 at 500/s was set by those runs).

Each worker publishes its open-connection count in a small shared-memory table (made by the arbiter
before it forks). A worker holding no more connections than any other accepts at once, as plain
gthread does; one holding more waits ACCEPT_WAIT_S first, so a less-loaded worker takes the connection,
and accepts itself if none did. At least one worker always accepts without waiting, so a client that
opens connections quickly never sees them pile up in the backlog (an earlier "every busy worker waits"
variant made Go clients dial spare connections on every request at -c 16). The wait unregisters the
listeners from this worker's poller (never a sleep: the poller also serves the keep-alive connections)
and bounds the poller's timeout so they come back on time.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import selectors
import time

from gunicorn.workers.gthread import ThreadWorker

ACCEPT_WAIT_S = 0.001
# After a wait, the first accept within this time goes ahead (the connection that was waited for).
ACCEPT_GRACE_S = 0.002


class ConnectionTable:
    """Per-worker open-connection counts in shared memory: slot = (pid, connections). Made by the arbiter
    before forking; plain aligned integer stores, read without locking (a hint, not an invariant)."""

    def __init__(self, slots: int):
        self.pids = multiprocessing.RawArray(ctypes.c_long, slots)
        self.counts = multiprocessing.RawArray(ctypes.c_long, slots)
        self.lock = multiprocessing.Lock()

    def claim(self, pid: int) -> int:
        """A slot for `pid`: a free one, or one left by a worker that is gone."""
        with self.lock:
            for slot, owner in enumerate(self.pids):
                if owner == 0 or not _alive(owner):
                    self.pids[slot], self.counts[slot] = pid, 0
                    return slot
        return -1   # more workers than slots: this one just does not take part in balancing

    def release(self, pid: int) -> None:
        for slot, owner in enumerate(self.pids):
            if owner == pid:
                self.counts[slot], self.pids[slot] = 0, 0

    def fewest_elsewhere(self, own_slot: int) -> int | None:
        """The smallest connection count among the other live workers (None: no other worker)."""
        others = [self.counts[s] for s, owner in enumerate(self.pids) if owner and s != own_slot]
        return min(others) if others else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def should_wait(own_connections: int, fewest_elsewhere: int | None) -> bool:
    """Wait before accepting only if another worker holds fewer connections than this one."""
    return fewest_elsewhere is not None and fewest_elsewhere < own_connections


class BalancedThreadWorker(ThreadWorker):
    table: ConnectionTable | None = None   # set by webhook.server in the arbiter, before forking

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slot = -1
        self._accept_paused_until: float | None = None
        self._accept_grace_until = 0.0

    def init_process(self):
        if self.table is not None:
            self._slot = self.table.claim(os.getpid())
        super().init_process()

    def _publish(self) -> None:
        if self._slot >= 0:
            self.table.counts[self._slot] = self.nr_conns

    def accept(self, listener):
        now = time.monotonic()
        waited = now <= self._accept_grace_until
        if self._slot < 0 or waited or not should_wait(self.nr_conns, self.table.fewest_elsewhere(self._slot)):
            self._accept_grace_until = 0.0  # one connection per wait: the next one is judged afresh
            super().accept(listener)
            self._publish()
            return
        for sock in self.sockets:
            self.poller.unregister(sock)
        self._accept_paused_until = now + ACCEPT_WAIT_S

    def _resume_accepting(self) -> None:
        self._accept_paused_until = None
        self._accept_grace_until = time.monotonic() + ACCEPT_GRACE_S
        for sock in self.sockets:
            self.poller.register(sock, selectors.EVENT_READ, self.accept)

    def set_accept_enabled(self, enabled):
        if self._accept_paused_until is not None:
            # Waiting: the listeners are not in the poller while `_accepting` still says True.
            self._accept_paused_until = None
            if enabled:
                self._resume_accepting()
                return
            self._accepting = False
            return
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout):
        self._publish()   # connections also end in finish_request/murder_*: keep the count current
        if self._accept_paused_until is not None:
            remaining = self._accept_paused_until - time.monotonic()
            if remaining <= 0:
                self._resume_accepting()
            else:
                timeout = min(timeout, remaining)
        super().wait_for_and_dispatch_events(timeout)
