"""A small HTTP/1.1 server layer for the examples: h11 for parsing, swapd.worker for lifecycle.

What makes keep-alive clients see zero errors across swaps lives here:
- the receive that waits for the *next* request is marked `idle=True`, so a
  quiescing worker can hand the connection over between requests, and a
  draining worker closes it only after it stayed silent for the grace period;
- once a response is sent, `conn.boundary()` says so at once: work the app does
  after its response (`Response.after`, like Django's `request_finished`) does not
  hold a swap up;
- a request that arrives while the worker drains is answered normally, with
  `Connection: close`, so the client reconnects (to the new generation) instead
  of finding its connection closed under it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11

from swapd.worker import Connection


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    # Work to do once the response is sent, before the next request is read (cleanup,
    # logging, Django's request_finished). The connection is at a request boundary then.
    after: Callable[[], Awaitable[None]] | None = None


App = Callable[[Request], Awaitable[Response]]
MAX_BODY = 1 << 20


async def serve_http(conn: Connection, app: App) -> None:
    """Serve HTTP/1.1 requests on one connection until either side closes it."""
    h = h11.Connection(h11.SERVER)
    while True:
        request = await _read_request(conn, h)
        if request is None:
            return
        try:
            response = await app(request)
        except Exception:
            response = Response(500, b"internal error\n")
            await _respond(conn, h, response, close=True)
            raise
        await _respond(conn, h, response, close=conn.draining)
        if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
            if response.after is not None:
                await response.after()
            return
        try:
            h.start_next_cycle()
        except h11.LocalProtocolError:
            return
        if not h.trailing_data[0]:
            # The response is complete and nothing of the next request is buffered here:
            # a request boundary, even while `after` still runs.
            conn.boundary()
        if response.after is not None:
            await response.after()


async def _read_request(conn: Connection, h: h11.Connection) -> Request | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as e:
            await _respond(conn, h, Response(e.error_status_hint, b"bad request\n"), close=True)
            return None
        if event is h11.NEED_DATA:
            # Between requests (nothing of the next one received yet) is a boundary.
            idle = request is None and h.their_state is h11.IDLE and not h.trailing_data[0]
            h.receive_data(await conn.recv(idle=idle))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                await _respond(conn, h, Response(413, b"body too large\n"), close=True)
                return None
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return Request(request.method.decode(), request.target.decode(),
                           list(request.headers), bytes(body))
        else:  # ConnectionClosed or PAUSED
            return None


async def _respond(conn: Connection, h: h11.Connection, response: Response, *, close: bool
                   ) -> None:
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body)))]
    if close:
        headers.append(("connection", "close"))
    try:
        reason = HTTPStatus(response.status).phrase.encode()
        data = h.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        data += h.send(h11.Data(data=response.body)) if response.body else b""
        data += h.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return
    await conn.send(data)
