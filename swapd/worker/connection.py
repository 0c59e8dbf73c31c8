"""Connections and accept loops for `swapd.worker`: the parts that make drain and handoff exact.

Why the library owns accept and receive instead of leaving them to asyncio
streams: a swap must stop accepting at a precise instant and must know, for
every open connection, whether it sits at a request boundary. Both are only
exact when the accept and the `recv` happen synchronously inside our own reader
callbacks: nothing is ever accepted and then dropped, and no received byte ever
sits in a buffer we cannot account for.

Request boundaries. A handler marks one by receiving with `idle=True` ("I hold no
partial request; the next bytes start a new one") or by calling `boundary()` once a
response is complete (work after the response, such as Django's `request_finished`,
then runs without holding a swap up). A connection is *busy* from the first byte
the handler consumes after a boundary until its next boundary.

Quiesce (stateful swap), without touching idle connections one by one:

    stop accepting ─▶ wait until no connection is busy ─▶ hand over ─▶ commit / resume
                      (busy ones blocked on their client
                       mid-request for `boundary_wait`:
                       handed over with the request's
                       bytes so far, replayed)

A *pinned* connection (`conn.pinned = True`: a streaming response, a WebSocket that cannot
move) stays with this worker: the quiesce does not wait for it, the pre-send and the
handover leave it out, its handler keeps serving it, and it ends in the drain.
Full-duplex protocols whose reader always waits (WebSocket) say where their boundaries
are with `set_boundary()`.

Handlers parked at a boundary are not woken: their reader callback, when input
arrives while quiescing, leaves the bytes in the kernel for the successor (and
re-arms on resume). Only after the commit, in the old worker that is going away,
does each parked handler get `HandedOff`; on resume (abort) it never notices. A
handler that touches a handed-over connection (post-response work calling `send`
or `recv`) gets `HandedOff` at once.

While a worker drains, an idle wait lasts at most `idle_grace` seconds and then
reads as EOF, so only connections that stayed silent that long are closed under a
client; at the drain deadline every remaining connection is closed.

Pre-send bookkeeping (`Tracking`): while a swap's pre-send is open, the hub records
which connections changed in a way the successor must hear about (accepted,
closed, meta changed, bytes buffered), so the pause sends only that delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("swapd.worker")

Handler = Callable[["Connection"], Awaitable[None]]
_ACCEPT_BATCH = 1
MAX_REPLAY = 1 << 20  # bytes of one partial request kept for a mid-request handover
# accept() errors that mean "out of a resource", not "this one connection failed": retrying
# at once would spin (the connection stays queued and the listener stays readable).
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_LOG_INTERVAL = 10.0  # one log line per interval while accept keeps failing
ADOPT_BATCH = 256  # handed-over connections whose handlers start per loop turn


class HandedOff(Exception):
    """The connection now belongs to the swap: return without closing it."""


class ConnMeta(dict[str, Any]):
    """`conn.meta`: a dict that tells its connection when it changes (pre-send delta).

    Nested in-place changes (`conn.meta["player"]["hp"] -= 1`) bypass it: call
    `conn.touch()` for those, as with a tracked dict.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conn = conn

    def _changed(self) -> None:
        self._conn.touch()

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def __ior__(self, other: Any) -> ConnMeta:  # type: ignore[override,misc]
        super().__ior__(other)
        self._changed()
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self._changed()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._changed()
        return super().setdefault(key, default)

    def __reduce__(self) -> Any:  # travels as a plain dict
        return (dict, (dict(self),))


class Connection:
    """One client connection, owned by the library, served by an app handler."""

    def __init__(
        self,
        sock: socket.socket,
        listener: str,
        hub: ConnectionHub,
        meta: dict[str, Any] | None = None,
        buffered: bytes = b"",
        *,
        prepared: bool = False,
        tcp: bool | None = None,  # known by the caller (the listener's family): saves a lookup
    ) -> None:
        # `prepared`: a predecessor set these already; O_NONBLOCK belongs to the open file
        # description and TCP_NODELAY to the socket, both shared with it.
        if not prepared:
            sock.setblocking(False)
            if tcp if tcp is not None else sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.listener = listener
        self.id = hub.new_id()
        self._meta = ConnMeta(self, meta or {})
        self._meta_dirty = False
        self.buffer = bytearray(buffered)
        self._hub = hub
        self._loop = hub.loop
        self._wait: asyncio.Future[bool] | None = None
        self._wait_idle = False
        # The fd our reader is registered on, -1 if none. It stays registered while waits
        # follow each other (request after request): adding and removing it around every
        # wait costs two epoll_ctl calls and, with uvloop, a poll handle per request.
        self._armed = -1
        self._grace: asyncio.TimerHandle | None = None
        # Request state: at a boundary (no byte consumed since), or busy with the bytes of
        # the current request kept for a replay (None: too large or not replayable).
        self._boundary = False
        self._replay: list[bytes] | None = []
        self._replay_size = 0
        self._sent = False  # bytes sent since the last boundary: a replay would repeat them
        self._dispatched = False
        # The task of the handler call serving it now: after a resume, an earlier one may
        # still be finishing (cleanup after HandedOff) and must not close it under the new one.
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self._released = False  # handed over and committed: the successor's for good
        self._pinned = False
        self._detached = False  # detach(): its handler let go of it during a handover

    # -- the application's API ---------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """Per-connection state that travels with the connection when it is handed over."""
        return self._meta

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self._meta = ConnMeta(self, value)
        self.touch()

    @property
    def handed(self) -> bool:
        """Handed over by the quiesce in flight: the successor's, unless the swap aborts.
        (A quiesce hands over every open connection but the pinned ones at once; it stays
        open here.)"""
        hub = self._hub
        return hub.handing and not self.closed and self not in hub.stay

    @property
    def draining(self) -> bool:
        """The worker is going away: finish this request and close (e.g. `Connection: close`)."""
        return self._hub.draining

    @property
    def quiescing(self) -> bool:
        """A stateful handoff is collecting this worker's connections (until it aborts or
        commits)."""
        return self._hub.quiescing

    @property
    def pinned(self) -> bool:
        """A pinned connection stays with this worker: a handoff neither waits for it nor
        pre-sends or hands it over, and it ends during the drain (a streaming response, a
        WebSocket that cannot move). Whether it stays is decided when the quiesce hands
        over: a change after that counts from the next swap."""
        return self._pinned

    @pinned.setter
    def pinned(self, value: bool) -> None:
        if value == self._pinned:
            return
        self._pinned = value
        hub = self._hub
        if value:
            hub.pinned.add(self)
        else:
            hub.pinned.discard(self)
        if hub.tracking is not None:  # pre-sent, it must now be dropped (or sent) in the delta
            hub.tracking.touched.add(self)
        hub.changed()  # a quiesce waiting for this connection may be done now

    @property
    def peer(self) -> Any:
        try:
            return self.sock.getpeername()
        except OSError:
            return None

    def touch(self) -> None:
        """Say that `meta` changed in place (nested values), so a handover in flight sends it."""
        self._meta_dirty = True
        tracking = self._hub.tracking
        if tracking is not None:
            tracking.touched.add(self)

    def boundary(self) -> None:
        """The request being served is complete (its response fully sent) and the handler
        holds no received byte of the next one (bytes left in `conn.buffer` are fine: they
        travel). From now until the handler receives again, a swap may hand the connection
        over while the handler still runs (post-response work); if it does, the handler's
        next `recv`, `readline` or `send` on it raises `HandedOff`."""
        self._check_handed()
        self._enter_boundary()

    def set_boundary(self, at_boundary: bool) -> None:
        """For full-duplex protocols whose reader always waits (WebSocket): say whether the
        connection sits at a boundary now (nothing half received, half sent or in process).

        True: as a receive with `idle=True`, a quiesce hands it over without waking its
        handler (the reader reads nothing more while the worker quiesces); unlike
        `idle=True`, a draining worker does not close it after `idle_grace`: the protocol
        decides when it ends. False: busy, and never handed over with its bytes replayed
        (the protocol holds state the bytes cannot rebuild): a quiesce waits for it.
        Never raises, even on a connection handed over."""
        if at_boundary:
            if not self._boundary:
                self._enter_boundary()
            return
        self._dispatched = True
        self._replay = None  # never replayed: keep no bytes for it
        if self._boundary:
            self._boundary = False
            self._hub.busy.add(self)
            if self._wait is not None and not self._wait.done() and not self.handed:
                self._arm()  # its wait was parked (quiescing): the quiesce now waits for it

    def detach(self) -> None:
        """On a connection handed over by the quiesce in flight, whose state the app has put
        into `meta` (and `buffer`): end its handler now (the pending or next receive raises
        HandedOff). On commit it goes as every handed connection; on abort it gets a fresh
        handler call, which finds that state as the successor would have."""
        if not self.handed:
            raise RuntimeError("detach() needs a connection handed over by a quiesce")
        self._detached = True
        if self._wait is not None and not self._wait.done():
            self._wait.set_exception(HandedOff())

    def dispatched(self) -> None:
        """The handler starts acting on the request it is still reading (a streamed upload
        written as it arrives): until the next boundary this connection is never handed
        over mid-request with its bytes replayed; a swap waits for its boundary."""
        self._dispatched = True
        self._replay = None  # never replayed: keep no bytes for it

    async def recv(self, n: int = 65536, *, idle: bool = False) -> bytes:
        """Bytes from the client; b"" at EOF. `idle=True` marks a request boundary."""
        self._check_handed()
        if idle:
            self._enter_boundary()
        if self.buffer:
            data = bytes(self.buffer[:n])
            del self.buffer[:n]
            self._consumed(data)
            return data
        while True:
            # Checked on every turn: a wait that ended just before a quiesce handed this
            # connection over must not read what now belongs to the successor.
            self._check_handed()
            if not self._parked():
                try:
                    data = self.sock.recv(n)
                except (BlockingIOError, InterruptedError):
                    pass
                except ConnectionResetError:
                    return b""
                else:
                    self._consumed(data)
                    return data
            if not await self._wait_readable(idle):
                return b""

    async def readline(self, *, idle: bool = False, limit: int = 65536) -> bytes:
        """One line including the newline, or what remains at EOF.

        `idle=True`: a boundary; a partial line already received stays in `conn.buffer`,
        which travels with the connection, so a slow client mid-line holds no swap up.
        """
        self._check_handed()
        if idle:
            self._enter_boundary()
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                self._consumed(line)
                return line
            if len(self.buffer) > limit:
                raise ValueError(f"line longer than {limit} bytes")
            self._check_handed()
            try:
                if self._parked():
                    raise BlockingIOError
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                if not await self._wait_readable(idle and not self.buffer, boundary=idle):
                    chunk = b""
                else:
                    continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                line = bytes(self.buffer)
                self.buffer.clear()
                self._consumed(line)
                return line
            self.buffer += chunk
            self._buffered()

    async def send(self, data: bytes) -> None:
        self._check_handed()
        if data:
            self._sent = True
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        if self.closed or self.handed:
            return
        self.closed = True
        tracking = self._hub.tracking
        if tracking is not None and self.id in tracking.sent:
            # The successor holds a duplicate of this socket: close() alone would send no
            # FIN while that copy lives. shutdown() acts on the connection itself.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            tracking.touched.add(self)
        self._disarm()
        if self._wait is not None and not self._wait.done():
            self._wait.set_result(False)  # a handler waiting for input reads EOF
        hub = self._hub
        hub.conns.discard(self)
        hub.busy.discard(self)
        hub.pinned.discard(self)
        self.sock.close()

    # -- request state ---------------------------------------------------------------

    def _check_handed(self) -> None:
        if self._released or self.handed:
            raise HandedOff()

    def _parked(self) -> bool:
        """At a boundary while the worker quiesces: read nothing, the connection waits to be
        handed over (no new request starts, so the quiesce cannot be kept busy). A pinned
        one stays here: it is served on."""
        return self._boundary and self._hub.quiescing and not self._pinned

    def _enter_boundary(self) -> None:
        hub = self._hub
        if not self._boundary:
            self._boundary = True
            hub.busy.discard(self)
            if hub.quiescing:
                hub.changed()
            if hub.tracking is not None:  # its pending bytes differ from what was pre-sent
                hub.tracking.touched.add(self)
        self._replay = []
        self._replay_size = 0
        self._sent = False
        self._dispatched = False

    def _consumed(self, data: bytes) -> None:
        if not data:
            return
        if self._boundary:
            self._boundary = False
            self._hub.busy.add(self)
        if self._replay is not None:
            self._replay.append(data)
            self._replay_size += len(data)
            if self._replay_size > MAX_REPLAY:
                self._replay = None
        self._buffered()

    def _buffered(self) -> None:
        tracking = self._hub.tracking
        if tracking is not None:
            tracking.touched.add(self)

    @property
    def replayable(self) -> bool:
        """Busy, but only waiting for its client: can travel with the request's bytes."""
        return (self._wait is not None and not self._wait_idle and not self._sent
                and not self._dispatched and self._replay is not None)

    def pending_bytes(self) -> bytes:
        """What the successor's handler must read first: the consumed bytes of a partial
        request (replayed), then the unconsumed buffer."""
        head = b"" if self._boundary or not self._replay else b"".join(self._replay)
        return head + bytes(self.buffer)

    # -- waiting for input ---------------------------------------------------------

    async def _wait_readable(self, idle: bool, *, boundary: bool | None = None) -> bool:
        """Wait for input; False means 'treat as EOF' (drain grace expired).

        `idle`: the drain grace applies; `boundary` (default: idle): a wait at a request
        boundary, parked without a reader while the worker quiesces.
        """
        hub = self._hub
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._wait = fut
        self._wait_idle = idle if boundary is None else boundary
        if not self._parked():
            self._arm()
        if hub.quiescing:
            hub.changed()  # a busy connection may have become replayable
        if idle and hub.draining:
            self.start_grace(hub.idle_grace)
        try:
            return await fut
        finally:
            # The reader stays registered: the next wait usually follows at once.
            self._wait = None
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None

    def _arm(self) -> None:
        if self._armed < 0 and not self.closed:
            self._armed = self.sock.fileno()
            self._loop.add_reader(self._armed, self._on_readable)

    def _disarm(self) -> None:
        if self._armed >= 0:
            self._loop.remove_reader(self._armed)
            self._armed = -1

    def _on_readable(self) -> None:
        if self.handed or self._parked():
            # Input for a connection being handed over: it waits in the kernel for the
            # successor, or for this worker if the swap aborts (resume re-arms).
            self._disarm()
            return
        fut = self._wait
        if fut is None or fut.done():
            # Nobody waits (the handler is busy with what it read): stop watching until it
            # waits again, or level-triggered polling would call us on every iteration.
            self._disarm()
            return
        fut.set_result(True)

    def start_grace(self, seconds: float) -> None:
        if self._wait_idle and not self.buffer and self._grace is None and self._wait is not None:
            self._grace = self._loop.call_later(seconds, _resolve, self._wait, False)

    def _resume_wait(self) -> None:
        if self._wait is not None and not self._wait.done():
            self._arm()

    def _release(self) -> None:
        """After commit: the successor owns this connection; end our handler, drop our copy."""
        self._disarm()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._wait is not None and not self._wait.done():
            self._wait.set_exception(HandedOff())
        self.closed = self._released = True
        self.sock.close()


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


@dataclass
class Tracking:
    """What changed since the connections were pre-sent to the successor."""

    sent: dict[int, Connection] = field(default_factory=dict)  # id -> connection pre-sent
    touched: set[Connection] = field(default_factory=set)  # accepted, closed, meta, bytes


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

