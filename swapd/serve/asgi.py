"""ASGI 3 over HTTP/1.1: the scope, `receive` and `send` of one request-response cycle.

The app runs inline in the connection's task. `receive` pulls the body from the socket as
the app asks for it (100 Continue is sent then, if the client waits for it); once the body
is consumed, `receive` waits for the response to complete or the client to go
(`http.disconnect`), reading pipelined requests meanwhile. `send` holds the response head
until the first body message, so an ordinary response leaves in one write, with a
Content-Length added when the app gave none; a streaming response (`more_body`) is chunked
and pins the connection (a stateful swap does not wait for it).

Once the request body has arrived, a helper task reads the socket while the response goes
out, so a client that leaves is noticed even by an app that never calls `receive()` again.
Then `send()` raises `ClientDisconnected` (an OSError, as ASGI 2.4 asks; the scope declares
2.4): that is the only way Starlette's StreamingResponse stops an SSE generator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from swapd.serve.context import Context
from swapd.serve.h1 import (
    H1,
    HEADER_NAME_BAD,
    HEADER_VALUE_BAD,
    MAX_PIPELINED,
    RECV_SIZE,
    STATUS_LINES,
    ClientDisconnected,
    Reject,
    Request,
    _status_line,
    access_line,
    log_rejected,
)
from swapd.serve.scope import ASGI_VERSION, client_and_scheme, split_target

log = logging.getLogger("swapd.serve")

_NO_BODY_STATUS = frozenset({204, 304})

def http_scope(h: H1, req: Request) -> dict[str, Any]:
    ctx = h.ctx
    root = ctx.options.root_path
    url = req.url
    if url[:1] == b"/" and b"?" not in url and b"%" not in url and not root:
        path, raw, query = url.decode("utf-8", "replace"), url, b""  # the common case
    else:
        path, raw, query = split_target(req, root)
    if req.forwarded_for is None and req.forwarded_proto is None:
        client, scheme = h.client, "http"
    else:
        client, scheme = client_and_scheme(h, req)
    return {
        "type": "http", "asgi": ASGI_VERSION, "http_version": req.version,
        "server": h.server, "client": client, "scheme": scheme, "method": req.method,
        "root_path": root, "path": path, "raw_path": raw,
        "query_string": query, "headers": req.headers, "state": ctx.lifespan_state.copy(),
    }


_GOOD_NAMES: dict[bytes, bytes] = {}  # response header names seen valid -> lower case


def _check_name(name: bytes) -> bytes:
    if not isinstance(name, bytes) or not name or HEADER_NAME_BAD.search(name):
        raise RuntimeError(f"invalid response header name {name!r}")
    lower = name.lower()
    if len(_GOOD_NAMES) < 4096:  # bounded: names come from the app, but may vary
        _GOOD_NAMES[name] = lower
    return lower


class Cycle:
    """One request's `receive` and `send`."""

    __slots__ = ("body_done", "chunked", "complete", "continued", "disconnected", "h",
                 "head_only", "head_sent", "keep", "lock", "reader", "remaining", "req",
                 "resp_headers", "sent", "started", "status", "waiter")

    def __init__(self, h: H1, req: Request) -> None:
        self.h = h
        self.req = req
        self.started = False      # http.response.start received
        self.head_sent = False
        self.complete = False     # the last body message was sent
        self.disconnected = False
        self.body_done = False    # the last http.request message was delivered
        self.continued = False
        self.keep = False
        self.chunked = False
        self.head_only = req.method == "HEAD"
        self.remaining: int | None = None
        self.status = 0
        self.resp_headers: Any = ()
        self.sent = 0
        self.lock: asyncio.Lock | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reader: asyncio.Task[None] | None = None  # reads while the app streams

    # -- receive --------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if self.lock is None:
            self.lock = asyncio.Lock()  # two tasks may receive at once (disconnect listeners)
        async with self.lock:
            return await self._receive()

    async def _receive(self) -> dict[str, Any]:
        req, h = self.req, self.h
        while True:
            if self.disconnected or (self.body_done and self.complete):
                return {"type": "http.disconnect"}
            if req.body:
                chunk = bytes(req.body)
                req.body.clear()
                self.body_done = req.complete
                return {"type": "http.request", "body": chunk, "more_body": not req.complete}
            if req.complete:
                if not self.body_done:
                    self.body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await self._wait_disconnect()
                continue
            if req.expect_continue and not self.continued and not self.head_sent:
                self.continued = True
                await h.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            data = await h.recv_body()
            if not data:
                if h.timed_out:
                    await self._abort(h.body_timed_out())
                self.disconnected = True
                h.closed = True
                continue
            try:
                h.feed(data)
            except Reject as e:
                await self._abort(e)

    async def _abort(self, e: Reject) -> None:
        """The request cannot go on (body too large, too slow): answer if we still can."""
        log_rejected(e, self.h.client, "request.aborted")
        if not self.head_sent:
            await self.h.respond_error(e.status, e.reason)
        self.disconnected = True
        self.h.closed = True

    async def _wait_disconnect(self) -> None:
        """Until the response is complete or the client goes. A helper task reads meanwhile
        (through the Connection, which owns the socket's reader), parsing pipelined requests."""
        if self.complete or self.disconnected:
            return
        self.waiter = fut = self.h.loop.create_future()
        if self.reader is None:
            self._start_reading()
        try:
            await fut
        finally:
            self.waiter = None

    def _start_reading(self) -> None:
        """Read while the response goes out, once the request body has all arrived (before,
        the bytes are the app's, through receive()): pipelined requests are parsed, and a
        client that leaves is noticed (its FIN) even by an app that never calls receive()."""
        h = self.h
        if (self.req.complete and not self.complete and not self.disconnected
                and len(h.requests) < MAX_PIPELINED and h.broken is None):
            self.reader = h.loop.create_task(self._read_ahead())

    async def _read_ahead(self) -> None:
        h = self.h
        while not self.complete:
            data = await h.recv(idle=False, deadline=h.loop.time() + 86400.0)
            if not data:
                self.disconnected = True
                h.closed = True
                break
            try:
                h.feed(data)
            except Reject as e:
                h.broken = e  # answered after this response
                break
            if len(h.requests) >= MAX_PIPELINED or sum(
                    len(r.body) for r in h.requests if r is not self.req) > RECV_SIZE:
                # Enough queued (a pipelined request's body is read when it is served, not
                # held here): wait for the response only.
                break
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def stop_reading(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()

    async def join_reader(self) -> None:
        """Before the connection reads again: a cancelled reader must have left its wait on
        the socket (two waits at once would lose a wakeup). It never loses bytes: what it
        read is parsed in the same step."""
        if self.reader is not None:
            self.stop_reading()
            await asyncio.wait([self.reader])

    # -- send -----------------------------------------------------------------------------

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if self.disconnected:
            # ASGI 2.4 (what the scope declares): Starlette then stops a streaming response
            # only through this exception, so an SSE generator ends at its next send.
            raise ClientDisconnected("the client has gone")
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.started = True
            self.status = int(message["status"])
            self.resp_headers = message.get("headers") or ()
            return
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        if self.complete:
            raise RuntimeError("the response is already complete")
        body = message.get("body", b"")
        more = bool(message.get("more_body", False))
        h = self.h
        if not self.head_sent:
            head = self._head(None if more else body)
            self.head_sent = True
            data = head if self.head_only else head + self._frame(body, more)
            if more:
                h.conn.pinned = True  # streaming: a stateful swap does not wait for it
        else:
            data = b"" if self.head_only else self._frame(body, more)
        if not more:
            self.complete = True
            self.stop_reading()
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)
        elif self.reader is None:
            self._start_reading()  # a FIN must be seen even if the app never receive()s
        if data and not await h.write(data):
            self.disconnected = True
            self.stop_reading()
            raise ClientDisconnected("the client has gone")
        if self.complete and h.conn.pinned and not h.conn.quiescing:
            h.conn.pinned = False

    def _frame(self, body: bytes, more: bool) -> bytes:
        self.sent += len(body)
        if self.chunked:
            out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            return out if more else out + b"0\r\n\r\n"
        if self.remaining is not None:
            self.remaining -= len(body)
            if self.remaining < 0 or (not more and self.remaining):
                self.keep = False
                self.h.closed = True  # the framing is broken: the connection cannot go on
                raise RuntimeError("response body does not match its Content-Length")
        return body

    def _head(self, final: bytes | None) -> bytes:
        h, req = self.h, self.req
        status = self.status
        line = STATUS_LINES.get(status) or _status_line(status)
        parts = [line, h.ctx.default_headers()]
        length = None
        close = False
        for name, value in self.resp_headers:
            lower = _GOOD_NAMES.get(name)
            if lower is None:
                lower = _check_name(name)
            if HEADER_VALUE_BAD.search(value):
                raise RuntimeError(f"invalid response header value {name!r}: {value!r}")
            if lower == b"content-length":
                length = int(value)
            elif lower == b"connection":
                close = b"close" in value.lower()
                continue  # we decide, below
            elif lower == b"transfer-encoding":
                continue  # framing is ours
            parts += (name, b": ", value, b"\r\n")
        no_body = self.head_only or status in _NO_BODY_STATUS or status < 200
        if no_body:
            self.remaining = None
        elif length is not None:
            self.remaining = length
        elif final is not None:
            parts.append(b"content-length: %d\r\n" % len(final))
        elif req.version == "1.1":
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            close = True  # HTTP/1.0 without a length: the body ends with the connection
        # A body the client was told to hold back (Expect, no 100 sent) may never come.
        waiting = not req.complete and req.expect_continue and not self.continued
        self.keep = (req.keep_alive and not close and not waiting and not h.conn.draining
                     and h.broken is None)
        parts.append(b"\r\n" if self.keep else b"connection: close\r\n\r\n")
        return b"".join(parts)


async def dispatch(h: H1, req: Request) -> bool:
    """Run the app for one request; True if the connection may serve another."""
    ctx: Context = h.ctx
    if req.upgrade == b"websocket" and ctx.options.ws:
        from swapd.serve import ws

        await ws.upgrade(h, req)
        return False
    limit = ctx.limits.concurrency
    if limit is not None and ctx.connections > limit:
        await h.respond_error(503, "too many connections")
        return False
    if ctx.access_log:
        h.t_request = time.perf_counter()
    try:
        scope = http_scope(h, req)
    except Reject as e:
        await h.reject(e)
        return False
    cycle = Cycle(h, req)
    try:
        return await _run(ctx, h, req, scope, cycle)
    finally:
        await cycle.join_reader()
        if ctx.access_enabled():
            access_line(h.client, req.method, req.url, req.version,
                        cycle.status if cycle.head_sent else 500, cycle.sent, h.t_request)


async def _run(ctx: Context, h: H1, req: Request, scope: dict[str, Any], cycle: Cycle) -> bool:
    try:
        await ctx.app(scope, cycle.receive, cycle.send)
    except Exception as e:
        cycle.stop_reading()
        if cycle.disconnected:  # the client went (or we refused the rest): not a bug
            log.info("event=app.ended_by_disconnect method=%s target=%r error=%r", req.method,
                     req.url.decode("latin-1"), f"{type(e).__name__}: {e}")
        else:
            log.exception("event=app.error method=%s target=%r", req.method,
                          req.url.decode("latin-1"))
        if not cycle.head_sent and not cycle.disconnected:
            await h.respond_error(500, "the application raised an exception")
        elif cycle.complete and cycle.keep and not h.closed:
            return True  # it answered (Starlette sends its 500, then re-raises): go on
        h.closed = True
        return False
    if not cycle.complete:
        cycle.stop_reading()
        if cycle.disconnected:
            return False
        if not cycle.head_sent:
            log.error("event=app.error method=%s target=%r error='returned without a "
                      "response'", req.method, req.url.decode("latin-1"))
            await h.respond_error(500, "the application returned no response")
        else:
            log.error("event=app.error method=%s target=%r error='returned before the end "
                      "of its response'", req.method, req.url.decode("latin-1"))
        h.closed = True
        return False
    ctx.requests += 1
    return cycle.keep and not h.closed
