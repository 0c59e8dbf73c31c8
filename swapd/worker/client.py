"""`Connection`: one client connection as the application's handler sees it, and its request state.

Runs in the application's process (part of `swapd.worker`; the picture of drain and
handoff is in `swapd.worker.connection`, the public import path of these names).

Here: the handler's API (`recv`, `readline`, `send`, `boundary()`, `set_boundary()`,
`dispatched()`, `pinned`, `meta`, `detach()`), and what the hub needs to know about each
connection to hand it over exactly: whether it sits at a request boundary or is busy, the
bytes of a partial request kept for a replay, whether its handler waits for input (and
the reader that wakes it), and what changed since a pre-send (`Tracking`).

A connection sees its hub through `Hub`, the part of `swapd.worker.hub.ConnectionHub`
it reads and updates (the sets the hub keeps of its connections, the swap's flags): the
hub creates connections, so this module cannot import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Handler = Callable[["Connection"], Awaitable[None]]
MAX_REPLAY = 1 << 20  # bytes of one partial request kept for a mid-request handover


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


@dataclass
class Tracking:
    """What changed since the connections were pre-sent to the successor."""

    sent: dict[int, Connection] = field(default_factory=dict)  # id -> connection pre-sent
    touched: set[Connection] = field(default_factory=set)  # accepted, closed, meta, bytes


class Hub(Protocol):
    """What a connection reads and updates of its hub (`ConnectionHub` is the one)."""

    loop: asyncio.AbstractEventLoop
    idle_grace: float
    conns: set[Connection]
    busy: set[Connection]  # between a request's first byte and its boundary
    pinned: set[Connection]  # open and pinned: never handed over
    handing: bool  # every open connection is handed over (quiesce decided) ...
    stay: set[Connection]  # ... but these, pinned when it was decided
    tracking: Tracking | None
    draining: bool
    quiescing: bool

    def new_id(self) -> int: ...

    def changed(self) -> None: ...


class Connection:
    """One client connection, owned by the library, served by an app handler."""

    def __init__(
        self,
        sock: socket.socket,
        listener: str,
        hub: Hub,
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
