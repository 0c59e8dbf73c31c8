"""Connections and accept loops for `swapd.worker`: the parts that make drain and handoff exact.

Why the library owns accept and receive instead of leaving them to asyncio
streams: a swap must stop accepting at a precise instant and must know, for
every open connection, whether it sits at a request boundary. Both are only
exact when the accept and the `recv` happen synchronously inside our own reader
callbacks: nothing is ever accepted and then dropped, and no received byte ever
sits in a buffer we cannot account for.

A handler marks request boundaries by receiving with `idle=True` ("I have no
partial request; the next bytes start a new one"). While a worker quiesces, a
connection waiting idle is *detached*: its handler gets `HandedOff` and must
return without closing it; the socket then travels to the successor (stateful
swap) or, on abort, is given back to a fresh handler call. While a worker
drains, an idle wait lasts at most `idle_grace` seconds and then reads as EOF,
so only connections that stayed silent that long are closed under a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("swapd.worker")

Handler = Callable[["Connection"], Awaitable[None]]
_ACCEPT_BATCH = 1


class HandedOff(Exception):
    """The connection now belongs to the swap: return without closing it."""


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
        tcp: bool | None = None,  # known by the caller (the listener's family): saves a lookup
    ) -> None:
        sock.setblocking(False)
        if tcp if tcp is not None else sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.listener = listener
        self.meta: dict[str, Any] = meta if meta is not None else {}
        self.buffer = bytearray(buffered)
        self._hub = hub
        self._loop = hub.loop
        self._wait: asyncio.Future[bool] | None = None
        self._idle = False
        self._grace: asyncio.TimerHandle | None = None
        # The task of the handler call serving it now: after a resume, an earlier one may
        # still be finishing (cleanup after HandedOff) and must not close it under the new one.
        self._task: asyncio.Task[None] | None = None
        self.detached = False
        self.closed = False
        self._pinned = False
        self._boundary = False
        self._reading = False  # our reader is registered with the loop for this socket

    @property
    def draining(self) -> bool:
        """The worker is going away: finish this request and close (e.g. `Connection: close`)."""
        return self._hub.draining

    @property
    def quiescing(self) -> bool:
        """A stateful handoff has begun collecting this worker's connections (until it aborts)."""
        return self._hub.quiescing

    @property
    def pinned(self) -> bool:
        """A pinned connection stays with this worker: a handoff neither waits for it nor moves
        it, and it ends during the drain (a streaming response, a WebSocket that cannot move)."""
        return self._pinned

    @pinned.setter
    def pinned(self, value: bool) -> None:
        self._pinned = value
        self._hub._changed.set()  # a quiesce waiting for this connection may be done now

    def set_boundary(self, at_boundary: bool) -> None:
        """For full-duplex protocols whose reader always waits (WebSocket): say whether the
        connection sits at a boundary now (nothing half received, half sent or in process).

        While it does, a quiescing worker detaches it as it detaches an `idle=True` wait (the
        pending recv raises HandedOff); unlike `idle=True`, a draining worker does not close
        it after `idle_grace`: the protocol decides when it ends."""
        if at_boundary == self._boundary:
            return
        self._boundary = at_boundary
        if at_boundary and self._wait is not None and not self._wait.done():
            self._hub.became_idle(self)

    @property
    def peer(self) -> Any:
        try:
            return self.sock.getpeername()
        except OSError:
            return None

    async def recv(self, n: int = 65536, *, idle: bool = False) -> bytes:
        """Bytes from the client; b"" at EOF. `idle=True` marks a request boundary."""
        if self.buffer:
            data = bytes(self.buffer[:n])
            del self.buffer[:n]
            return data
        while True:
            try:
                return self.sock.recv(n)
            except (BlockingIOError, InterruptedError):
                pass
            except ConnectionResetError:
                return b""
            if not await self._wait_readable(idle):
                return b""

    async def readline(self, *, idle: bool = False, limit: int = 65536) -> bytes:
        """One line including the newline, or what remains at EOF.

        `idle=True` counts only while nothing of the line has arrived yet.
        """
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > limit:
                raise ValueError(f"line longer than {limit} bytes")
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                if not await self._wait_readable(idle and not self.buffer):
                    chunk = b""
                else:
                    continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                line = bytes(self.buffer)
                self.buffer.clear()
                return line
            self.buffer += chunk

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        if not self.closed and not self.detached:
            self.closed = True
            self._stop_reading()
            self.sock.close()

    # -- library side -----------------------------------------------------------

    async def _wait_readable(self, idle: bool) -> bool:
        """Wait for input; False means 'treat as EOF' (drain grace expired)."""
        if (idle or self._boundary) and self._hub.quiescing and not self._pinned:
            self._mark_detached()
            raise HandedOff()
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._wait = fut
        if not self._reading:
            # The reader stays registered while waits follow each other (request after
            # request): adding and removing it around every wait costs two epoll_ctl calls
            # and, with uvloop, a poll handle per request.
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True
        if idle:
            self._idle = True
            self._hub.became_idle(self)
            if self._hub.draining:
                self.start_grace(self._hub.idle_grace)
        try:
            return await fut
        finally:
            self._wait = None
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            self._idle = False

    def try_detach(self) -> bool:
        """Take an idle connection away from its handler (quiesce); False if not idle now."""
        if (self._pinned or not (self._idle or self._boundary) or self._wait is None
                or self._wait.done()):
            return False
        self._mark_detached()
        self._wait.set_exception(HandedOff())
        return True

    def _on_readable(self) -> None:
        fut = self._wait
        if fut is None or fut.done():
            # Nobody waits (the handler is busy with what it read): stop watching until it
            # waits again, or level-triggered polling would call us on every iteration.
            self._stop_reading()
            return
        fut.set_result(True)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock.fileno())

    def _mark_detached(self) -> None:
        self.detached = True
        self._stop_reading()
        self._hub.detached.append(self)

    def start_grace(self, seconds: float) -> None:
        if self._idle and self._grace is None and self._wait is not None:
            self._grace = self._loop.call_later(seconds, _resolve, self._wait, False)

    def reattach(self) -> None:
        self.detached = False


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


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
        self.tasks: set[asyncio.Task[None]] = set()
        self.detached: list[Connection] = []
        self.accepting = False
        self.draining = False
        self.quiescing = False
        self._changed = asyncio.Event()

    def register(self, name: str, sock: socket.socket, handler: Handler,
                 accept_batch: int = _ACCEPT_BATCH) -> None:
        self.accept_batch[name] = max(1, accept_batch)
        self._kinds[name] = (sock.family, sock.type, sock.proto)
        sock.setblocking(False)
        self.listeners[name] = sock
        self.handlers[name] = handler
        if self.accepting:
            self.loop.add_reader(sock.fileno(), self._on_acceptable, name)

    def start_accepting(self) -> None:
        if not self.accepting:
            self.accepting = True
            for name, sock in self.listeners.items():
                self.loop.add_reader(sock.fileno(), self._on_acceptable, name)

    def stop_accepting(self) -> float:
        """Stop at once; returns the CLOCK_MONOTONIC instant (comparable across processes)."""
        if self.accepting:
            self.accepting = False
            for sock in self.listeners.values():
                self.loop.remove_reader(sock.fileno())
        return time.monotonic()

    def _on_acceptable(self, name: str) -> None:
        # One accept per wakeup (nginx's default, multi_accept off): every worker of the
        # generation is woken by a new connection, and taking one at a time gives the
        # others their chance, where draining the queue in a batch handed a burst of
        # connections to whichever worker woke first. (It still spreads long-lived
        # connections only as evenly as the wakeups do; see docs/worker.md.)
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
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: log and let the kernel backlog hold the rest.
                log.error("event=accept.failed listener=%s error=%r", name, str(e))
                return
            client = socket.socket(family, kind, proto, fileno=fd)
            self.adopt(Connection(client, name, self, tcp=tcp))

    def adopt(self, conn: Connection) -> None:
        """Start serving a connection (accepted, or handed over by a predecessor)."""
        handler = self.handlers.get(conn.listener)
        if handler is None:
            log.error("event=conn.orphan listener=%s: no handler registered; closing",
                      conn.listener)
            conn.sock.close()
            return
        conn.reattach()
        self.conns.add(conn)
        task = self.loop.create_task(self._serve(conn, handler))
        conn._task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: Connection, handler: Handler) -> None:
        try:
            await handler(conn)
        except HandedOff:
            pass
        except Exception:
            log.exception("event=handler.error listener=%s peer=%s", conn.listener, conn.peer)
        finally:
            if conn._task is asyncio.current_task():
                if not conn.detached:
                    conn.close()
                self.conns.discard(conn)
            self._changed.set()

    def became_idle(self, conn: Connection) -> None:
        if self.quiescing:
            conn.try_detach()
        self._changed.set()

    # -- drain and quiesce ------------------------------------------------------

    def begin_drain(self) -> None:
        self.draining = True
        self.stop_accepting()
        for conn in list(self.conns):
            conn.start_grace(self.idle_grace)

    async def quiesce(self, deadline: float) -> list[Connection]:
        """Detach every connection at its next request boundary; the rest must close (pinned
        ones excepted: they stay here)."""
        self.quiescing = True
        self.detached = []
        for conn in list(self.conns):
            conn.try_detach()
        loop = self.loop
        end = loop.time() + deadline
        while any(not c.detached and not c.pinned for c in self.conns):
            self._changed.clear()
            remaining = end - loop.time()
            if remaining <= 0:
                busy = sum(1 for c in self.conns if not c.detached and not c.pinned)
                raise TimeoutError(f"{busy} connection(s) still busy after {deadline:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return [c for c in self.detached if not c.closed]

    def resume(self) -> None:
        """Abort of a handoff: detached connections get fresh handlers; accept again."""
        self.quiescing = False
        detached, self.detached = self.detached, []
        for conn in detached:
            self.conns.discard(conn)  # adopt() adds it back, unless it has no handler now
            self.adopt(conn)

    def release_detached(self) -> None:
        """After commit: the successor owns duplicates of these sockets; close ours."""
        for conn in self.detached:
            self.conns.discard(conn)
            conn.sock.close()
        self.detached = []
        self._changed.set()

    async def wait_empty(self) -> None:
        while self.conns or self.tasks:
            self._changed.clear()
            if not self.conns and self.tasks:
                await asyncio.wait(list(self.tasks))
                continue
            await self._changed.wait()
