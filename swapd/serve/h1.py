"""HTTP/1.1 on a `swapd.worker` Connection: httptools parses, this module frames, bounds and times.

One task per connection (the worker's handler call) reads, parses and runs the app inline,
request after request: no task per request, one write per ordinary response (head and body
together). Where a read waits decides what a swap may do with the connection:

    wait                                recv       stateful swap           drain
    before a request (keep-alive)       idle=True  hand over now           close after idle_grace
    in an incomplete request head       idle=True  hand over; the partial  close after idle_grace
      (begun at a chunk boundary)                  head rides in conn.meta
    request body, app running           busy,      wait for it             answer, Connection: close
                                        dispatched
    streaming response (more_body)      pinned     stays, ends in the drain

so a slow or stalled client never holds up a swap: its partial head simply moves. A handed
connection's handler is not woken (swapd.worker): it stays parked in its wait until the
commit (HandedOff) or an abort (the wait goes on). A request is marked dispatched before
the app sees it, so it is never replayed on the successor.

Bounds (options.Limits/Timeouts): request target 414, header count and head bytes 431,
body 413, head time 408 (slowloris), silence inside a body 408; malformed input 400. Each
answer closes that connection only; its log line names the option that raises the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from swapd.serve.context import Context, access, peername
from swapd.worker import Connection

log = logging.getLogger("swapd.serve")

PARTIAL = "swapd.serve.partial"  # conn.meta key: (partial head bytes, head deadline)
RECV_SIZE = 65536
MAX_PIPELINED = 32  # requests parsed ahead of the one being answered; beyond, stop reading
QUIESCE_STALL = 1.0  # during a stateful swap, a request body silent this long gets 408
LINGER_TIME = 2.0  # closing with request bytes unread: drain them this long at most ...
LINGER_BYTES = 1 << 20  # ... and this many, so the client reads our answer, not a reset


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}
# What an app may not put in a response header (RFC 9110 token / field-value).
HEADER_NAME_BAD = re.compile(rb'[\x00-\x20\x7f()<>@,;:\\"/\[\]?={}]')
HEADER_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


class ClientDisconnected(OSError):
    """send() on a connection whose client has gone (ASGI 2.4: "a server-specific subclass
    of OSError"), or on a WebSocket that is closed or has moved to another worker."""


class Reject(Exception):
    """A request refused with `status` (the connection closes after the answer). A refusal
    by one of our bounds names the option that sets it (and its value): several differ from
    uvicorn's (which has none of them), so the operator must see at once what to raise."""

    def __init__(self, status: int, reason: str, option: str | None = None,
                 limit: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.option = option
        self.limit = limit


class Request:
    """One parsed request (head complete or not), its body as it arrives."""

    __slots__ = ("body", "body_size", "complete", "content_length", "expect_continue",
                 "forwarded_for", "forwarded_proto", "head_done", "head_size", "headers", "host",
                 "keep_alive", "method", "upgrade", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = "GET"
        self.version = "1.1"
        self.keep_alive = True
        self.head_done = False
        self.head_size = 0
        self.complete = False
        self.body = bytearray()
        self.body_size = 0
        self.content_length: int | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.host: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.forwarded_proto: bytes | None = None


Dispatch = Callable[["H1", Request], Awaitable[bool]]  # -> keep the connection open


class H1:
    """The HTTP/1.1 side of one connection (also the httptools callback object)."""

    def __init__(self, ctx: Context, conn: Connection) -> None:
        self.ctx = ctx
        self.conn = conn
        self.loop = ctx.loop
        self.parser = httptools.HttpRequestParser(self)
        self.requests: deque[Request] = deque()
        self._cur: Request | None = None
        self.partial: bytearray | None = None  # raw bytes of an incomplete head (see above)
        self.head_deadline = 0.0
        self.upgrade_tail = b""  # bytes after an Upgrade request's head
        self.closed = False  # the socket failed or we decided to close
        self.served = False  # a request was answered: idle waits get the keep-alive timeout
        self.broken: Reject | None = None  # a pipelined request to refuse after this response
        # Timeouts without a timer per request: one lazy timer per connection, re-armed when
        # it fires early; when a wait's deadline has passed it shuts the socket's read side,
        # which ends the wait as EOF (timed_out tells the two apart).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.t_request = 0.0  # perf_counter() when the request was dispatched (access log)
        self.unread = False  # the last request's body was not read to its end
        self.server = ctx.server_address(conn)
        self.client = peername(conn.sock)
        self._limits = ctx.limits

    # -- httptools callbacks (a Reject raised here ends the feed) ------------------------

    def on_message_begin(self) -> None:
        req = Request()
        self._cur = req
        self.requests.append(req)

    def on_url(self, url: bytes) -> None:
        assert self._cur is not None
        self._cur.url += url
        if len(self._cur.url) > self._limits.request_line:
            raise Reject(414, "request target too long", "--limit-request-line",
                         self._limits.request_line)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._cur
        assert req is not None
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace (RFC 9110 5.5)
        headers = req.headers
        if len(headers) >= self._limits.request_fields:
            raise Reject(431, "too many header fields", "--limit-request-fields",
                         self._limits.request_fields)
        headers.append((name, value))
        if name[0] in b"cehux":  # the few headers the server itself looks at
            if name == b"content-length":
                try:
                    req.content_length = int(value)
                except ValueError:
                    raise Reject(400, "bad Content-Length") from None
                if req.content_length > self._limits.request_body:
                    raise self._body_too_large()
            elif name == b"expect":
                req.expect_continue = value.lower() == b"100-continue"
            elif name == b"host":
                req.host = value
            elif name == b"upgrade":
                req.upgrade = value.lower()
            elif name == b"x-forwarded-for":
                req.forwarded_for = value
            elif name == b"x-forwarded-proto":
                req.forwarded_proto = value

    def on_headers_complete(self) -> None:
        req = self._cur
        assert req is not None
        # The whole head, exactly (feed() bounds a head still arriving by the bytes fed).
        if len(req.url) + sum(len(n) + len(v) + 4 for n, v in req.headers) \
                > self._limits.request_head:
            raise self._head_too_large()
        parser = self.parser
        raw = parser.get_method()
        req.method = _METHODS.get(raw) or raw.decode("ascii")
        req.version = parser.get_http_version()
        # HTTP/1.0 keep-alive is not offered (uvicorn does the same).
        req.keep_alive = req.version == "1.1" and parser.should_keep_alive()
        req.head_done = True
        if not parser.should_upgrade():
            req.upgrade = None

    def on_body(self, body: bytes) -> None:
        req = self._cur
        assert req is not None
        req.body_size += len(body)
        if req.body_size > self._limits.request_body:
            raise self._body_too_large()
        req.body += body

    def _body_too_large(self) -> Reject:
        return Reject(413, "request body too large", "--limit-request-body",
                      self._limits.request_body)

    def _head_too_large(self) -> Reject:
        return Reject(431, "request head too large", "--limit-request-head",
                      self._limits.request_head)

    def body_timed_out(self) -> Reject:
        """408 for silence inside a request body (during a swap the bound is QUIESCE_STALL,
        which no option sets)."""
        if self.conn.quiescing:
            return Reject(408, "request body timed out during a swap")
        return Reject(408, "request body timed out", "--timeout-read", self.ctx.timeouts.read)

    def on_message_complete(self) -> None:
        assert self._cur is not None
        self._cur.complete = True

    # -- reading ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse received bytes; raises Reject for a request to refuse."""
        cur = self._cur
        clean = not self.requests
        continuing = cur is not None and not cur.head_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, Reject):
                raise e.__context__ from None
            raise
        except httptools.HttpParserUpgrade as e:
            self.upgrade_tail = data[int(e.args[0]):]
        except httptools.HttpParserError as e:
            raise Reject(400, f"malformed request: {e}") from None
        cur = self._cur
        if cur is None or cur.head_done:
            self.partial = None
            return
        # The head is incomplete: bound its size (a header value httptools accumulates
        # internally counts too) and its time.
        if continuing:
            cur.head_size += len(data)
            if self.partial is not None:
                self.partial += data
        else:
            cur.head_size = len(data)
            self.head_deadline = self.loop.time() + self.ctx.timeouts.request_head
            # Only a head that began with this chunk has its raw bytes known: it can move.
            self.partial = bytearray(data) if clean and len(self.requests) == 1 else None
        if cur.head_size > self._limits.request_head:
            raise self._head_too_large()

    async def recv(self, *, idle: bool, deadline: float) -> bytes:
        """One chunk; b"" at EOF, on a socket error, or once `deadline` (loop time) passed
        (then `timed_out` is set)."""
        conn = self.conn
        if not self.served and not conn.buffer:
            # A new connection's first request is nearly always there already: read it
            # without arming a timer (conn.recv would try the same read first: same
            # semantics). Between keep-alive requests it rarely is: conn.recv tries once.
            try:
                return conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return b""
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
        try:
            return await conn.recv(RECV_SIZE, idle=idle)
        except OSError:
            return b""
        finally:
            self._deadline = 0.0

    async def recv_body(self) -> bytes:
        """recv() inside a request body: --timeout-read of silence at most, and only
        QUIESCE_STALL while a stateful swap waits for this request (a slow client must not
        make the swap miss its deadline)."""
        self.ctx.body_readers.add(self)
        try:
            limit = self.ctx.timeouts.read
            if self.conn.quiescing:
                limit = min(limit, QUIESCE_STALL)
            return await self.recv(idle=False, deadline=self.loop.time() + limit)
        finally:
            self.ctx.body_readers.discard(self)

    def hurry(self) -> None:
        """A quiesce began: the body read in progress may stall QUIESCE_STALL more at most."""
        deadline = self.loop.time() + QUIESCE_STALL
        if self._deadline > deadline:
            self._deadline = deadline
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not deadline or self.conn.closed:
            return  # no wait in progress (the next one arms again), or not ours any more
        if self.conn.handed:
            # The socket is the successor's too now: shutting it would end the connection
            # there. Look again later: after an abort, the timeout applies as before.
            self._timer = self.loop.call_later(QUIESCE_STALL, self._on_timer)
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self.timed_out = True
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RD)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next_head(self) -> bool:
        """Read until the first queued request has its head; False: the connection ends."""
        while not self.requests or not self.requests[0].head_done:
            queued = bool(self.requests)
            if not queued:
                # Nothing of a request yet: a boundary. A new connection gets the head
                # timeout (it must start talking), one that already served requests the
                # keep-alive timeout.
                idle = True
                deadline = self.loop.time() + (self.ctx.timeouts.keep_alive if self.served
                                               else self.ctx.timeouts.request_head)
            else:
                idle = self.partial is not None
                deadline = self.head_deadline
                if idle:
                    assert self.partial is not None
                    self.conn.meta[PARTIAL] = (bytes(self.partial), self.head_deadline)
            data = await self.recv(idle=idle, deadline=deadline)
            # Not in a `finally`: when the wait ends with HandedOff the partial head must
            # stay in conn.meta, which the snapshot may read only after this task has run.
            if queued and idle:
                self.conn.meta.pop(PARTIAL, None)
            if not data:
                if queued and self.timed_out:
                    await self.reject(Reject(408, "request head timed out",
                                             "--timeout-request-head",
                                             self.ctx.timeouts.request_head))
                return False
            try:
                self.feed(data)
            except Reject as e:
                await self.reject(e)
                return False
        return True

    async def finish_body(self, req: Request) -> bool:
        """After the response: read and drop what is left of the request body."""
        while not req.complete:
            if self.closed:
                return False
            req.body.clear()
            data = await self.recv_body()
            if not data:
                return False
            try:
                self.feed(data)
            except Reject:
                return False
        req.body.clear()
        return True

    # -- writing ----------------------------------------------------------------------

    async def write(self, data: bytes) -> bool:
        """Send all of `data`; False (and the connection marked closed) if the peer is gone."""
        if self.closed:
            return False
        sock = self.conn.sock
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.closed = True
            return False
        if sent == len(data):
            return True
        try:
            await self.loop.sock_sendall(sock, memoryview(data)[sent:])
        except OSError:
            self.closed = True
            return False
        return True

    async def linger(self) -> None:
        await linger(self.conn)
        self.closed = True

    def input_pending(self) -> bool:
        """The client may still be sending bytes we will not read."""
        return self.unread or any(not r.complete for r in self.requests) or bool(self.partial)

    async def respond_error(self, status: int, text: str) -> None:
        """A complete plain-text answer from the server itself, then close."""
        body = f"{http.HTTPStatus(status).phrase}: {text}\n".encode("latin-1", "replace")
        await self.write(b"".join([
            STATUS_LINES[status], self.ctx.default_headers(),
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: ",
            str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body]))
        self.closed = True

    async def reject(self, e: Reject) -> None:
        log_rejected(e, self.client)
        await self.respond_error(e.status, e.reason)

    # -- the connection ---------------------------------------------------------------

    async def run(self, dispatch: Dispatch) -> None:
        try:
            await self._run(dispatch)
            if self.closed and self.input_pending() and not self.timed_out:
                await self.linger()
        finally:
            if self._timer is not None:
                self.stop_timer()

    async def _run(self, dispatch: Dispatch) -> None:
        conn = self.conn
        if conn.meta or conn.buffer:  # handed over by a predecessor
            partial = conn.meta.pop(PARTIAL, None)
            pending = bytes(conn.buffer)
            conn.buffer.clear()
            try:
                if partial is not None:
                    # Handed over inside a request head: parse it again, keep its deadline.
                    log.debug("event=http.partial_resumed bytes=%d", len(partial[0]))
                    self.feed(partial[0])
                    self.head_deadline = float(partial[1])
                if pending:
                    self.feed(pending)
            except Reject as e:
                await self.reject(e)
                return
        while True:
            if not await self.next_head():
                return
            req = self.requests[0]
            conn.dispatched()  # the app acts on it: a swap never replays its bytes
            keep = await dispatch(self, req)
            self.served = True
            self.unread = not req.complete
            self.requests.popleft()
            if self.broken is not None and not self.closed:
                await self.reject(self.broken)
                return
            if not keep or self.closed:
                return
            if not req.complete and not await self.finish_body(req):
                return


async def linger(conn: Connection) -> None:
    """Close while the client may still be sending: closing a socket with unread bytes sends
    a reset, which can destroy our last answer before the client reads it. So: end our
    side, drop what still arrives (bounded in time and bytes), then let the caller close
    (nginx's lingering close)."""
    with contextlib.suppress(OSError):
        conn.sock.shutdown(socket.SHUT_WR)
    budget = LINGER_BYTES
    try:
        async with asyncio.timeout(LINGER_TIME):
            while budget > 0:
                data = await conn.recv(RECV_SIZE)
                if not data:
                    return
                budget -= len(data)
    except (TimeoutError, OSError):
        pass


def log_rejected(e: Reject, client: tuple[str, int] | None, event: str = "request.rejected"
                 ) -> None:
    """One line; a refusal by one of our bounds says which option raises it."""
    if e.option is None:
        log.info("event=%s status=%d reason=%r client=%s", event, e.status, e.reason,
                 _fmt_client(client))
        return
    limit = e.limit
    shown = int(limit) if limit is not None and float(limit).is_integer() else limit
    log.info("event=%s status=%d reason=%r limit=%s raise_with=%s client=%s", event, e.status,
             e.reason, shown, e.option, _fmt_client(client))


def _fmt_client(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unix"


def access_line(client: tuple[str, int] | None, method: str, target: bytes, version: str,
                status: int, size: int, started: float) -> None:
    access.info("event=access client=%s method=%s target=%r http=%s status=%d bytes=%d ms=%.2f",
                _fmt_client(client), method, target.decode("latin-1"), version, status, size,
                (time.perf_counter() - started) * 1000)



