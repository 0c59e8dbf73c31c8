"""One client's side of the wire: a connection (and the poll that tells whether it may be
reused), one request-reply exchange on it, and the one-shot fetch() built from both."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

from swapd.loadgen.outcomes import RequestFailed, ResponseError, classify
from swapd.loadgen.request import Mode, Request
from swapd.loadgen.target import Endpoint, Target
from swapd.loadgen.wire import parse_int, read_http_response, read_line_reply


class Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def closed_while_idle(self) -> bool:
        """True if the server ended (or wrote to) this connection since the last reply."""
        if self.reader.at_eof() or self.reader.exception() is not None:
            return True
        if self.writer.transport.is_closing():
            return True
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        # Readable while idle means EOF, a reset, or unsolicited bytes (a 408 before a close):
        # none of them leaves a usable connection. The kernel knows before the event loop does.
        poller = select.poll()
        poller.register(sock.fileno(), _IDLE_POLL)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


_IDLE_POLL = select.POLLIN | select.POLLPRI | int(getattr(select, "POLLRDHUP", 0))


async def exchange(conn: Connection, request: Request, payload: bytes) -> tuple[int | None, bool]:
    """Send one request and read its reply: (value, connection reusable)."""
    conn.writer.write(payload)
    if request.protocol == "line":
        return await read_line_reply(conn.reader), True
    response = await read_http_response(conn.reader)
    if response.status != 200:
        raise ResponseError(f"status {response.status}")
    return (parse_int(response.body) if request.expects_int else None), response.reusable


async def fetch(target: Target, request: Request, *, timeout: float = 2.0) -> int | None:
    """Send one request on a fresh connection; return its value. RequestFailed on failure."""
    endpoint = Endpoint.of(target)
    conn: Connection | None = None
    try:
        async with asyncio.timeout(timeout):
            conn = Connection(*await endpoint.open())
            value, _ = await exchange(conn, request, request.encode(endpoint, Mode.CLOSE))
    except Exception as exc:
        outcome, detail = classify(exc)
        raise RequestFailed(outcome, detail) from exc
    finally:
        if conn is not None:
            conn.close()
    return value


def fetch_sync(
    target: Target, request: Request, *, timeout: float = 2.0, use_uvloop: bool = True
) -> int | None:
    """``fetch`` from synchronous code (not from a thread already running an event loop)."""
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        return runner.run(fetch(target, request, timeout=timeout))


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop when asked for and installed (swapd runs on it), else asyncio's."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop
