"""What every connection of one `swapd serve` process shares: options, the app, counters, the
response headers every response carries, and the loggers."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Protocol

from swapd.serve.options import Options

if TYPE_CHECKING:
    from swapd.worker import Connection, Worker


# What the registries below hold, as those who walk them use it. Protocols, not the classes
# (h1.H1, ws.Session), because those modules are built on this one.

class BodyReader(Protocol):
    def hurry(self) -> None: ...


class Session(Protocol):
    conn: Connection
    state: int
    app_task: asyncio.Task[None] | None

    async def flushed(self) -> None: ...

    def export(self, batch: tuple[str, int]) -> None: ...

    def unexport(self) -> None: ...

    def hand_off(self) -> None: ...

    def pin_if_stuck(self) -> None: ...

    def close_for_drain(self, wait: float) -> None: ...

    async def run(self, *, start_app: bool = True) -> None: ...

log = logging.getLogger("swapd.serve")
access = logging.getLogger("swapd.serve.access")


class Context:
    def __init__(self, options: Options, app: Any, interface: str, worker: Worker) -> None:
        self.options = options
        self.limits = options.limits
        self.timeouts = options.timeouts
        self.app = app
        self.interface = interface  # "asgi3" (ASGI 2 is wrapped) or "wsgi"
        self.worker = worker
        self.loop = asyncio.get_running_loop()
        self.lifespan_state: dict[str, Any] = {}
        self.pool: ThreadPoolExecutor | None = None  # WSGI
        self.connections = 0  # open, served by a handler now
        self.requests = 0
        self.ws_sessions: set[Session] = set()  # open WebSockets (handed ones until moved)
        self.ws_handed: dict[Connection, Session] = {}  # handed, reader ended, not exported
        self.barriers: dict[str, Any] = {}  # ws.Barrier of resumed WebSockets, by handoff
        self.app_tasks: set[asyncio.Task[None]] = set()  # WebSocket apps, flushes
        self.changed = asyncio.Event()  # a connection or app task ended
        self.body_readers: set[BodyReader] = set()  # waiting inside a request body now
        self.access_log = options.access_log
        self._extra = b"".join(b"%s: %s\r\n" % (n, v) for n, v in options.headers)
        self._server_line = b""
        if options.server_header and not any(n == b"server" for n, _ in options.headers):
            self._server_line = b"server: swapd\r\n"
        self._static = self._server_line + self._extra
        self._server: dict[str, tuple[str, int | None]] = {}
        self._date_second = -1
        self._date_line = b""
        self._headers = self._static

    def default_headers(self) -> bytes:
        """`server`, `date` (cached per second) and --header lines, ready to append."""
        if not self.options.date_header:
            return self._static
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date_line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
            self._headers = self._date_line + self._static
        return self._headers

    def default_headers_without(self, *, date: bool, server: bool) -> bytes:
        """default_headers() less our `date` and/or `server` line: the app sent its own (a
        WSGI app's Date from Werkzeug's send_file), and either is a singleton field."""
        if not date and not server:
            return self.default_headers()
        self.default_headers()  # refresh the cached date line
        return b"".join([b"" if date or not self.options.date_header else self._date_line,
                         b"" if server else self._server_line, self._extra])

    def server_address(self, conn: Connection) -> tuple[str, int | None]:
        """ASGI `server` of a connection: its listener's address unless that is a wildcard
        (then the address the client reached, per connection)."""
        cached = self._server.get(conn.listener)
        if cached is not None:
            return cached
        address = sockname(conn.sock)
        listener = self.worker.listeners.get(conn.listener)
        if (listener is not None and address[0] not in ("0.0.0.0", "::", "")
                and sockname(listener) == address):
            self._server[conn.listener] = address
        return address

    def task_done(self, task: asyncio.Task[None]) -> None:
        self.app_tasks.discard(task)
        self.changed.set()

    @property
    def busy(self) -> bool:
        return bool(self.connections or self.app_tasks)

    def access_enabled(self) -> bool:
        return self.access_log and access.isEnabledFor(logging.INFO)


def sockname(sock: socket.socket) -> tuple[str, int | None]:
    """ASGI `server`: (host, port) for TCP, (path, None) for a Unix socket."""
    try:
        addr = sock.getsockname()
    except OSError:
        return ("", None)
    if isinstance(addr, tuple):
        return (str(addr[0]), int(addr[1]))
    return (addr if isinstance(addr, str) else addr.decode(errors="replace"), None)


def peername(sock: socket.socket) -> tuple[str, int] | None:
    """ASGI `client`: (host, port), or None for a Unix socket peer."""
    try:
        addr = sock.getpeername()
    except OSError:
        return None
    if isinstance(addr, tuple):
        return (str(addr[0]), int(addr[1]))
    return None
