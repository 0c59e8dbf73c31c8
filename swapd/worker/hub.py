"""`ConnectionHub`: every connection and accept loop of one worker process.

Runs in the application's process (part of `swapd.worker`; the picture is in
`swapd.worker.connection`). The hub owns the listeners' accept loops (one accept per
wakeup, backing off when out of descriptors), starts a handler task per connection
(accepted, or handed over by a predecessor: `adopt`, `adopt_many`), and does what a
drain or a handoff asks of the connections as a set: let idle ones go after the drain's
grace, close what is left at its deadline; quiesce (stop accepting, wait for every busy
connection to reach a boundary or to wait only for its client, hand all over but the
pinned ones), then resume on an abort or release the handed ones after the commit.

`Handover` is what a quiesce hands over: everything, or with a pre-send open (`Tracking`,
in `swapd.worker.client`) only the delta since. One connection's own state and API are in
`swapd.worker.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from swapd.worker.client import Connection, HandedOff, Handler, Tracking

log = logging.getLogger("swapd.worker")

_ACCEPT_BATCH = 1
# accept() errors that mean "out of a resource", not "this one connection failed": retrying
# at once would spin (the connection stays queued and the listener stays readable).
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_LOG_INTERVAL = 10.0  # one log line per interval while accept keeps failing
ADOPT_BATCH = 256  # handed-over connections whose handlers start per loop turn


@dataclass
class Handover:
    """The connections a quiesced worker hands to its successor: all it has (`count`; the
    hub's `conns`), and for a pre-send, what changed since."""

    count: int
    gone: list[int]  # pre-sent ids that closed since
    changed: list[Connection]  # pre-sent, with new meta or pending bytes
    new: list[Connection]  # not pre-sent
    replayed: int = 0  # handed over mid-request


class ConnectionHub:
    """All connections and accept loops of one worker process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_grace: float) -> None:
        self.loop = loop
        self.idle_grace = idle_grace
        self.handlers: dict[str, Handler] = {}
        self.accept_batch: dict[str, int] = {}
        self._kinds: dict[str, tuple[socket.AddressFamily, socket.SocketKind, int]] = {}
        self.listeners: dict[str, socket.socket] = {}
        self.conns: set[Connection] = set()
        self.busy: set[Connection] = set()  # between a request's first byte and its boundary
        self.pinned: set[Connection] = set()  # open and pinned: never handed over
        self.tasks: set[asyncio.Task[None]] = set()
        self.handing = False  # every open connection is handed over (quiesce decided) ...
        self.stay: set[Connection] = set()  # ... but these, pinned when it was decided
        self._replayed = 0
        self.orphans: list[Connection] = []  # handed, and their handler ended (resume: restart)
        self.tracking: Tracking | None = None
        self.accepting = False
        self.draining = False
        self.quiescing = False
        self._changed = asyncio.Event()
        self._ids = 0
        self._backoff = 0.0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._accept_failures = 0
        self._accept_logged = 0.0

    def new_id(self) -> int:
        self._ids += 1
        return self._ids

    def changed(self) -> None:
        self._changed.set()

    def register(self, name: str, sock: socket.socket, handler: Handler,
                 accept_batch: int = _ACCEPT_BATCH) -> None:
        self.accept_batch[name] = max(1, accept_batch)
        self._kinds[name] = (sock.family, sock.type, sock.proto)
        sock.setblocking(False)
        self.listeners[name] = sock
        self.handlers[name] = handler
        if self.accepting and self._backoff_timer is None:
            self.loop.add_reader(sock.fileno(), self._on_acceptable, name)

    def start_accepting(self) -> None:
        if not self.accepting:
            self.accepting = True
            self._add_accept_readers()

    def stop_accepting(self) -> float:
        """Stop at once; returns the CLOCK_MONOTONIC instant (comparable across processes)."""
        if self.accepting:
            self.accepting = False
            if self._backoff_timer is not None:
                self._backoff_timer.cancel()
                self._backoff_timer = None
            else:
                self._remove_accept_readers()
        return time.monotonic()

    def _add_accept_readers(self) -> None:
        for name, sock in self.listeners.items():
            self.loop.add_reader(sock.fileno(), self._on_acceptable, name)

    def _remove_accept_readers(self) -> None:
        for sock in self.listeners.values():
            self.loop.remove_reader(sock.fileno())

    def _on_acceptable(self, name: str) -> None:
        # One accept per wakeup (nginx's default, multi_accept off): every worker of the
        # generation is woken by a new connection, and taking one at a time gives the
        # others their chance, where draining the queue in a batch handed a burst of
        # connections to whichever worker woke first. (It still spreads long-lived
        # connections only as evenly as the wakeups do; see docs/worker.md.) A listener
        # registered with a larger accept_batch takes up to that many per wakeup.
        sock = self.listeners[name]
        family, kind, proto = self._kinds[name]
        tcp = family in (socket.AF_INET, socket.AF_INET6)
        for _ in range(self.accept_batch.get(name, _ACCEPT_BATCH)):
            if not self.accepting:
                return
            try:
                # What socket.accept() does, minus its per-call family/type lookups (enum
                # conversions): ~10 us per connection, a tenth of a short request's cost.
                fd, _ = sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in _RESOURCE_ERRORS:
                    self._accept_backoff(name, e)
                else:  # this one connection failed (EPROTO, ENETDOWN...): the next may not
                    log.warning("event=accept.failed listener=%s error=%r", name, str(e))
                return
            if self._backoff:
                log.info("event=accept.recovered listener=%s failures=%d", name,
                         self._accept_failures)
                self._backoff = 0.0
                self._accept_failures = 0
            client = socket.socket(family, kind, proto, fileno=fd)
            self.adopt(Connection(client, name, self, tcp=tcp))

    def _accept_backoff(self, name: str, error: OSError) -> None:
        """Out of descriptors (or memory): stop polling the listeners for a while.

        The connection stays in the kernel's queue and the listener stays readable, so
        retrying at once would spin the loop (and the log) at full speed. Back off,
        doubling up to ACCEPT_BACKOFF_MAX, and log the first failure and then one line per
        ACCEPT_LOG_INTERVAL with the count.
        """
        self._accept_failures += 1
        now = self.loop.time()
        if self._accept_failures == 1 or now - self._accept_logged >= ACCEPT_LOG_INTERVAL:
            log.error("event=accept.failed listener=%s error=%r failures=%d backoff=%gs",
                      name, str(error), self._accept_failures,
                      min(max(self._backoff * 2, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX))
            self._accept_logged = now
        self._backoff = min(max(self._backoff * 2, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
        if self._backoff_timer is None:
            self._remove_accept_readers()
            self._backoff_timer = self.loop.call_later(self._backoff, self._end_backoff)

    def _end_backoff(self) -> None:
        self._backoff_timer = None
        if self.accepting:
            self._add_accept_readers()

    @property
    def accept_backoff(self) -> float:
        """Seconds of the current accept backoff (0: accepting normally)."""
        return self._backoff

    def adopt(self, conn: Connection) -> None:
        """Start serving a connection (accepted, or handed over by a predecessor)."""
        handler = self.handlers.get(conn.listener)
        if handler is None:
            log.error("event=conn.orphan listener=%s: no handler registered; closing",
                      conn.listener)
            conn.sock.close()
            return
        conn._boundary = False  # the handler starts: busy until its first boundary
        conn._detached = False
        self.busy.add(conn)
        self.conns.add(conn)
        if self.tracking is not None:
            self.tracking.touched.add(conn)
        task = self.loop.create_task(self._serve(conn, handler))
        conn._task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def adopt_many(self, conns: list[Connection] | dict[int, Connection],
                   watch: select.epoll | None = None,
                   done: Callable[[], None] | None = None) -> None:
        """Start handlers for handed-over connections, a batch per loop turn, those with
        input waiting first, so the listener and active clients are served in between.

        `watch`: an epoll set holding these connections' fds (built before the pause by
        whoever received them); it is closed once every handler has started. `done` is
        called then. `conns` may come keyed by fd already (built before the pause).
        """
        if isinstance(conns, dict):
            pending = conns
        else:
            pending = {c.sock.fileno(): c for c in conns if not c.closed}
        if len(pending) <= ADOPT_BATCH:
            for conn in pending.values():
                self.adopt(conn)
            if watch is not None:
                watch.close()
            if done is not None:
                done()
            return
        if watch is None:
            watch = select.epoll(len(pending))
            for fd in pending:
                watch.register(fd, select.EPOLLIN)
        self._adopt_batch(pending, watch, done)

    def _adopt_batch(self, pending: dict[int, Connection], watch: select.epoll,
                     done: Callable[[], None] | None) -> None:
        batch = [fd for fd, _ in watch.poll(0, ADOPT_BATCH) if fd in pending]
        if len(batch) < ADOPT_BATCH:
            chosen = set(batch)
            for fd in pending:
                if len(batch) >= ADOPT_BATCH:
                    break
                if fd not in chosen:
                    batch.append(fd)
        for fd in batch:
            conn = pending.pop(fd)
            with contextlib.suppress(OSError):
                watch.unregister(fd)
            if not conn.closed:
                self.adopt(conn)
        if pending:
            self.loop.call_soon(self._adopt_batch, pending, watch, done)
        else:
            watch.close()
            if done is not None:
                done()

    async def _serve(self, conn: Connection, handler: Handler) -> None:
        again = False
        try:
            await handler(conn)
        except HandedOff:
            if conn.handed:
                self.orphans.append(conn)  # resume gives it a fresh handler call
            elif conn._detached and not conn.closed and not conn._released:
                again = True  # detached, and the swap aborted before this handler returned
        except Exception:
            log.exception("event=handler.error listener=%s peer=%s", conn.listener, conn.peer)
        finally:
            if conn._task is asyncio.current_task():
                if again:
                    self.conns.discard(conn)  # adopt() adds it back, unless it has no handler
                    self.adopt(conn)
                else:
                    if not conn.handed:
                        conn.close()
                        self.conns.discard(conn)
                    self.busy.discard(conn)
            self._changed.set()

    # -- drain and quiesce ------------------------------------------------------

    def begin_drain(self) -> None:
        self.draining = True
        self.stop_accepting()
        for conn in list(self.conns):
            conn.start_grace(self.idle_grace)

    def close_all(self) -> int:
        """The drain deadline: close every remaining connection and cancel every handler
        (also those still working after handing their connection over)."""
        count = 0
        for conn in list(self.conns):
            if conn.handed:
                continue
            count += 1
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        self._changed.set()
        return count

    def begin_tracking(self) -> Tracking:
        """Start recording changes: the connections are about to be pre-sent."""
        self.tracking = Tracking()
        return self.tracking

    def end_tracking(self) -> None:
        self.tracking = None

    async def quiesce(self, deadline: float, boundary_wait: float) -> Handover:
        """Stop reading idle connections; wait until every busy one reaches a boundary or,
        after `boundary_wait`, waits only for its client (replayed); hand all over."""
        self.quiescing = True
        loop = self.loop
        start = loop.time()
        end = start + deadline
        replay_at = start + boundary_wait
        while True:
            now = loop.time()
            blocking = [c for c in self.busy
                        if not (c._pinned or (now >= replay_at and c.replayable))]
            if not blocking:
                break
            if now >= end:
                waiting = sum(1 for c in blocking if c._wait is not None)
                raise TimeoutError(
                    f"{len(blocking)} connection(s) still mid-request after {deadline:g}s "
                    f"({len(blocking) - waiting} in their handler, {waiting} waiting for "
                    "their client after sending or dispatching)")
            self._changed.clear()
            wake = replay_at if now < replay_at else end
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, wake - now))
        self._hand_over()
        return self.handover()

    def _hand_over(self) -> None:
        """Hand every open connection but the pinned ones over, at once: from here
        `conn.handed` is true for them (no per-connection work: the pause must not grow
        with idle connections; only the few pinned ones are looked at)."""
        self.stay = {c for c in self.pinned if c in self.conns}
        self._replayed = sum(1 for c in self.busy if not c.closed and c not in self.stay)
        self.handing = True

    def handover(self) -> Handover:
        """What the quiesce in flight hands over, as of now: taken again after the app's
        snapshot, which may still change the handed connections' meta and bytes."""
        assert self.handing
        stay = self.stay
        count = len(self.conns) - sum(1 for c in stay if c in self.conns)
        tracking = self.tracking
        if tracking is None:
            new = list(self.conns - stay) if stay else list(self.conns)
            return Handover(count, [], [], new, self._replayed)
        gone: list[int] = []
        changed: list[Connection] = []
        new = []
        for c in tracking.touched | self.busy:
            if c.id not in tracking.sent:
                if not c.closed and c not in stay:
                    new.append(c)
            elif c.closed or c in stay:  # a pinned one stays: the successor drops its copy
                gone.append(c.id)
            else:  # its bytes (or meta) may differ from what was pre-sent
                changed.append(c)
        return Handover(count, gone, changed, new, self._replayed)

    def resume(self) -> None:
        """Abort of a handoff: serve every connection again, as if nothing happened."""
        self.quiescing = False
        self.handing = False
        self.stay = set()
        for conn in self.conns:
            conn._resume_wait()
        orphans, self.orphans = self.orphans, []
        for conn in orphans:
            if not conn.closed:
                self.conns.discard(conn)  # adopt() adds it back, unless it has no handler now
                self.adopt(conn)
        self._changed.set()

    def release_handed(self) -> int:
        """After commit: the successor owns duplicates of these sockets; close ours. Returns
        how many were released."""
        count = 0
        if self.handing:
            stay = self.stay
            for conn in self.conns:
                if conn not in stay:
                    conn._release()
                    count += 1
            self.conns = {c for c in stay if c in self.conns}
            self.busy &= self.conns
            self.pinned &= self.conns
            self.handing = False
            self.stay = set()
            self.quiescing = False
            for conn in self.conns:  # pinned ones stay: serve them on
                conn._resume_wait()
        self.orphans = []
        self._changed.set()
        return count

    async def wait_empty(self) -> None:
        while self.conns or self.tasks:
            self._changed.clear()
            if not self.conns and self.tasks:
                await asyncio.wait(list(self.tasks))
                continue
            await self._changed.wait()
