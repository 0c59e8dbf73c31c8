"""WebSockets with wsproto: the ASGI websocket protocol, and connections that move at a swap.

Two tasks per connection: the worker's handler task reads (frames are fed to wsproto whole,
so nothing half-parsed ever sits inside it; a partial frame waits in our buffer), and the app
runs in its own task. Messages go to the app through a bounded inbox (the reader pauses when
it is full); writes go out in order through one buffer, never interleaved. Before accepting,
the app may answer the handshake with HTTP instead (ASGI extension websocket.http.response),
or refuse it: wsanswer.py writes those answers.

A connection is at a boundary when the app waits in `receive()`, nothing is queued for it,
no message is half received or half sent, and the app opted in
(`swapd.connection(scope).save`).
Only then may a stateful swap take it; until the app opts in, or with compression (whose
zlib context cannot travel), it is pinned: it stays with the old worker and is closed with
1012 at the drain deadline.

    old worker                                      new worker (or the old one, on abort)
    quiesce: handed over at the boundary (the       commit: the connection is adopted; the app
      reader stays parked, the app still waits        is called again: websocket.connect, its
      in receive())                                   accept is a no-op (no handshake), the
    snapshot (state.py): conn.meta <- scope, the      extension says resumed + state. Incoming
      app's save(), partial frame bytes; the          messages wait until every resumed
      reader ends (conn.detach()); the app gets       connection's app is back in receive().
      websocket.disconnect 1012 with
      handed_off = True
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from typing import Any

import wsproto.events as ev
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from swapd.serve.context import Context
from swapd.serve.h1 import H1, RECV_SIZE, ClientDisconnected, Reject, Request, linger
from swapd.serve.scope import ASGI_VERSION, client_and_scheme, split_target
from swapd.serve.wsanswer import HandshakeAnswer, bad_handshake
from swapd.worker import Connection, HandedOff

log = logging.getLogger("swapd.serve")

META = "swapd.serve.ws"  # conn.meta key of a handed-over WebSocket
EXT = "swapd.handoff"    # the ASGI scope extension
DENIAL = "websocket.http.response"  # ASGI extension: an HTTP answer instead of accepting
HIGH_WATER = 256 * 1024  # bytes queued for sending before the app's send() waits
MAX_QUEUED = 4 * HIGH_WATER  # queued by the server itself (pongs...) for a peer not reading
BARRIER_TIMEOUT = 5.0    # resumed connections wait this long for their siblings at most
CONNECTING, OPEN, CLOSING, CLOSED, HANDED_OFF = range(5)
_SCOPE_KEYS = ("type", "asgi", "http_version", "scheme", "server", "client", "root_path",
               "path", "raw_path", "query_string", "headers", "subprotocols")


class TooLarge(Exception):
    pass


def whole_frames(buf: bytearray, max_size: int) -> int:
    """Length of the complete frames at the start of `buf` (RFC 6455 5.2 framing only;
    wsproto validates everything else). TooLarge for a frame longer than `max_size`."""
    pos, size = 0, len(buf)
    while size - pos >= 2:
        b1 = buf[pos + 1]
        n = b1 & 0x7F
        head = 2
        if n == 126:
            if size - pos < 4:
                break
            n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif n == 127:
            if size - pos < 10:
                break
            n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
        if b1 & 0x80:
            head += 4
        if n > max_size:
            raise TooLarge(f"frame of {n} bytes")
        if size - pos < head + n:
            break
        pos += head + n
    return pos


class Barrier:
    """Resumed connections of one handoff: incoming messages wait until each app is back in
    receive(), so a message one of them broadcasts reaches all the others."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.arrived = 0
        self.event = asyncio.Event()
        if size <= 0:
            self.event.set()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.size:
            self.event.set()

    async def wait(self) -> None:
        if self.event.is_set():
            return
        try:
            await asyncio.wait_for(self.event.wait(), BARRIER_TIMEOUT)
        except TimeoutError:
            log.warning("event=ws.barrier_timeout arrived=%d of=%d", self.arrived, self.size)
            self.event.set()


class Session:
    """One WebSocket connection and its app task."""

    def __init__(self, ctx: Context, conn: Connection, scope: dict[str, Any], *,
                 handshake: H11Handshake | None = None, pending: bytes = b"",
                 barrier: Barrier | None = None, compress: bool = False) -> None:
        self.ctx = ctx
        self.conn = conn
        self.loop = ctx.loop
        self.scope = scope
        self.ext: dict[str, Any] = scope["extensions"][EXT]
        self.handshake = handshake
        self.ws: WsConnection | None = None
        self.state = CONNECTING
        self.compress = compress
        if handshake is None:  # resumed: the handshake happened in another life
            self.ws = WsConnection(ConnectionType.SERVER)
        self.buf = bytearray(pending)   # received, not yet a whole frame
        self.frag: list[Any] = []       # fragments of a message in progress
        self.frag_size = 0
        self.inbox: deque[dict[str, Any]] = deque()
        self.out = bytearray()          # to send, once the flush in flight is done
        self.flushing = False
        self.connect_delivered = False
        self.barrier = barrier
        self.arrived = barrier is None
        self.app_task: asyncio.Task[None] | None = None
        self._app_waiter: asyncio.Future[None] | None = None
        self._reader_waiter: asyncio.Future[None] | None = None  # accept / inbox space
        self._drained: asyncio.Future[None] | None = None
        self._ping: asyncio.TimerHandle | None = None
        self._pong: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self.close_code: int | None = None
        self.close_timeout = ctx.timeouts.ws_close  # for the peer's answer to our close
        # An HTTP answer instead of accepting: only while there is a handshake to answer.
        self.answer = (HandshakeAnswer(ctx, conn, self._answered) if handshake is not None
                       else None)
        self.failed = False  # ended without a closing handshake: linger before closing
        self._before_export = b""  # conn.buffer before export() (unexport() puts it back)
        conn.pinned = True  # until the app opts in

    # -- the reader (the worker's handler task) -----------------------------------------

    async def run(self, *, start_app: bool = True) -> None:
        """Read until the connection ends (or moves: HandedOff). `start_app=False`: the same
        session again after an aborted handoff; its app never noticed."""
        ctx = self.ctx
        ctx.ws_sessions.add(self)
        if start_app:
            self.app_task = self.loop.create_task(self._run_app())
            ctx.app_tasks.add(self.app_task)
            self.app_task.add_done_callback(ctx.task_done)
        if self.state == OPEN and self._ping is None and self._pong is None:
            self._schedule_ping()
        try:
            await self._read()
            if self.failed:
                await linger(self.conn)
        except HandedOff:
            self._stop_pings()
            if self.state == OPEN:  # not snapshotted yet: an abort gives it back as it is
                ctx.ws_handed[self.conn] = self
            raise
        finally:
            if self.state != OPEN or not self.conn.handed:
                ctx.ws_sessions.discard(self)
                self._stop_pings()

    async def _read(self) -> None:
        conn = self.conn
        while self.state == CONNECTING:
            await self._wait_reader()
        if self.barrier is not None:
            await self.barrier.wait()
        if self.buf and self.state == OPEN:
            self._feed(b"")
        while self.state in (OPEN, CLOSING):
            if len(self.inbox) >= self.ctx.limits.ws_queue and self.state == OPEN:
                await self._wait_reader()
                continue
            self._update_boundary()
            try:
                if self.state == CLOSING:
                    async with asyncio.timeout(self.close_timeout):
                        data = await conn.recv(RECV_SIZE)
                else:
                    data = await conn.recv(RECV_SIZE)
            except TimeoutError:
                break
            except OSError:
                data = b""
            if not data:
                self._gone(1006)
                break
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        self.buf += data
        try:
            n = whole_frames(self.buf, self.ctx.limits.ws_max_size)
        except TooLarge:
            self._fail(1009, "message too big")
            return
        if not n:
            return
        chunk = bytes(self.buf[:n])
        del self.buf[:n]
        assert self.ws is not None
        try:
            self.ws.receive_data(chunk)
        except LocalProtocolError:  # data after the closing handshake
            self.state = CLOSED
            return
        for event in self.ws.events():
            self._event(event)

    def _event(self, event: ev.Event) -> None:
        ws = self.ws
        assert ws is not None
        if isinstance(event, ev.TextMessage | ev.BytesMessage):
            if self.state != OPEN:
                return
            self.frag.append(event.data)
            self.frag_size += len(event.data)
            if self.frag_size > self.ctx.limits.ws_max_size:
                self._fail(1009, "message too big")
                return
            if event.message_finished:
                msg: dict[str, Any] = {"type": "websocket.receive"}
                if isinstance(event, ev.TextMessage):
                    msg["text"] = "".join(self.frag)
                else:
                    msg["bytes"] = b"".join(self.frag)
                self.frag.clear()
                self.frag_size = 0
                self._push(msg)
        elif isinstance(event, ev.Ping):
            if ws.state == ConnectionState.OPEN:
                self._write_now(ws.send(event.response()))
        elif isinstance(event, ev.Pong):
            if self._pong is not None and bytes(event.payload) == self._ping_payload:
                self._pong.cancel()
                self._pong = None
                self._schedule_ping()
        elif isinstance(event, ev.CloseConnection):
            if self.state == CLOSING:  # the peer answered our close
                self.state = CLOSED
                return
            if ws.state == ConnectionState.REMOTE_CLOSING:
                reply = event.response()
            else:  # a protocol error wsproto reports as a close it wants us to send
                reply = ev.CloseConnection(code=event.code, reason=event.reason)
                log.info("event=ws.protocol_error code=%d reason=%r", event.code, event.reason)
                self.failed = True
            self._write_now(ws.send(reply))
            self.state = CLOSED
            self._push({"type": "websocket.disconnect", "code": event.code,
                        "reason": event.reason or ""})

    def _push(self, msg: dict[str, Any]) -> None:
        self.inbox.append(msg)
        _wake(self._app_waiter)

    def _wait_reader(self) -> asyncio.Future[None]:
        self._reader_waiter = self.loop.create_future()
        return self._reader_waiter

    def _gone(self, code: int) -> None:
        """The peer vanished (EOF, reset) or a deadline passed: no closing handshake."""
        if self.state in (OPEN, CONNECTING):
            self._push({"type": "websocket.disconnect", "code": code, "reason": ""})
        self.state = CLOSED
        self._stop_pings()

    # -- boundaries -------------------------------------------------------------------------

    def _update_boundary(self) -> None:
        conn = self.conn
        movable = self.ext.get("save") is not None and not self.compress
        if conn.pinned and movable and not conn.quiescing:
            conn.pinned = False
        conn.set_boundary(self.state == OPEN and movable and self._app_waiter is not None
                          and not self.inbox and not self.frag and not self.flushing
                          and not conn.handed)

    # -- the app's side ---------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if not self.connect_delivered:
            self.connect_delivered = True
            return {"type": "websocket.connect"}
        if not self.arrived:
            self.arrived = True
            assert self.barrier is not None
            self.barrier.arrive()
        while not self.inbox:
            if self.state in (CLOSED, HANDED_OFF) or (self.state == CLOSING and
                                                       self.close_code is not None):
                code = self.close_code or 1006
                return {"type": "websocket.disconnect", "code": code, "reason": ""}
            self._app_waiter = fut = self.loop.create_future()
            self._update_boundary()
            try:
                await fut
            finally:
                self._app_waiter = None
                self._update_boundary()
        msg = self.inbox.popleft()
        _wake(self._reader_waiter)
        return msg

    async def send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        answer = self.answer
        if self.state == CONNECTING and answer is not None and answer.denial is not None:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"expected 'websocket.http.response.body', got {kind!r}")
            await answer.deny_body(message)
            return
        if self.state == CONNECTING:
            if kind == "websocket.http.response.start" and answer is not None:
                answer.deny_start(message)
            elif kind == "websocket.accept":
                await self._accept(message)
            elif kind == "websocket.close":
                await self._reject(int(message.get("code") or 1000),
                                   str(message.get("reason") or ""))
            else:
                raise RuntimeError(f"expected 'websocket.accept', 'websocket.close' or "
                                   f"'websocket.http.response.start', got {kind!r}")
            return
        if kind == "websocket.accept" and self.handshake is None and self.state == OPEN:
            return  # resumed: the client accepted long ago, in the previous worker
        if kind == "websocket.send":
            if self.state != OPEN:
                raise ClientDisconnected(f"the WebSocket is {_STATE_NAMES[self.state]}")
            assert self.ws is not None
            text = message.get("text")
            event = (ev.TextMessage(data=text) if text is not None
                     else ev.BytesMessage(data=message.get("bytes") or b""))
            self._write_now(self.ws.send(event))
            if len(self.out) > HIGH_WATER:
                self._drained = self.loop.create_future()
                await self._drained
        elif kind == "websocket.close":
            if self.state == OPEN:
                self._close(int(message.get("code") or 1000), str(message.get("reason") or ""))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket")

    async def _accept(self, message: dict[str, Any]) -> None:
        if self.handshake is None:  # resumed
            self.state = OPEN
        else:
            extensions: list[Extension] = []
            if self.compress:
                extensions.append(PerMessageDeflate())
            headers = [(bytes(n), bytes(v)) for n, v in message.get("headers") or ()]
            data = self.handshake.send(ev.AcceptConnection(
                subprotocol=message.get("subprotocol"), extensions=extensions,
                extra_headers=headers))
            self.ws = self.handshake.connection
            self.state = OPEN
            self._write_now(data)
        self._schedule_ping()
        _wake(self._reader_waiter)

    async def _reject(self, code: int, reason: str) -> None:
        if self.answer is None:  # resumed: the app refuses to go on
            self.state = OPEN
            self._close(code, reason)
            _wake(self._reader_waiter)
        else:
            await self.answer.refuse(403)

    async def _end_unanswered(self, status: int) -> None:
        """The app is gone before it accepted or completed its answer."""
        if self.answer is not None:
            await self.answer.end_unanswered(status)
        else:
            self._answered(True)

    def _answered(self, linger: bool) -> None:
        """The HTTP answer to the upgrade request ended the connection (`linger`: it went
        out whole, or the app ended without completing it)."""
        self.state = CLOSED
        if linger:
            self.failed = True
        _wake(self._reader_waiter)

    async def _run_app(self) -> None:
        try:
            await self.ctx.app(self.scope, self.receive, self.send)
        except Exception:
            if self.state == HANDED_OFF:
                return
            log.exception("event=app.error websocket=%r", self.scope.get("path"))
            if self.state == CONNECTING:
                await self._end_unanswered(500)
            elif self.state == OPEN:
                self._close(1011, "internal error")
        else:
            answer = self.answer
            if self.state == CONNECTING and answer is not None and answer.denial is not None:
                log.error("event=app.error websocket=%r error='returned before the end of its "
                          "denial response'", self.scope.get("path"))
                await self._end_unanswered(500)
            elif self.state == CONNECTING:  # ended before accepting: 403 (ASGI)
                with contextlib.suppress(OSError):
                    await self._reject(1000, "")
            elif self.state == OPEN:
                self._close(1000, "")
        finally:
            if not self.arrived and self.barrier is not None:
                self.arrived = True
                self.barrier.arrive()
            _wake(self._reader_waiter)

    # -- writing and closing ------------------------------------------------------------

    def _write_now(self, data: bytes) -> None:
        """Queue bytes in order; what the socket takes now goes at once."""
        if not data:
            return
        if self.flushing:
            self.out += data
            if len(self.out) > MAX_QUEUED:  # the peer does not read (but pings, say): drop it
                log.info("event=ws.not_reading queued=%d action=close", len(self.out))
                self.out.clear()
                self._gone(1006)
                with contextlib.suppress(OSError):
                    self.conn.sock.shutdown(socket.SHUT_RDWR)
            return
        sock = self.conn.sock
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._gone(1006)
            return
        if sent < len(data):
            self.out += data[sent:]
            self.flushing = True
            self.conn.set_boundary(False)
            task = self.loop.create_task(self._flush())
            self.ctx.app_tasks.add(task)
            task.add_done_callback(self.ctx.task_done)

    async def _flush(self) -> None:
        sock = self.conn.sock
        try:
            while self.out:
                chunk = bytes(self.out)
                self.out.clear()
                await self.loop.sock_sendall(sock, chunk)
        except OSError:
            self.out.clear()
            self._gone(1006)
        finally:
            self.flushing = False
            _wake(self._drained)
            self._update_boundary()

    async def flushed(self) -> None:
        while self.flushing:
            self._drained = self.loop.create_future()
            await self._drained

    def _close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the reader waits (ws_close s) for the answer."""
        if self.state != OPEN or self.ws is None:
            return
        self.close_code = code
        self._write_now(self.ws.send(ev.CloseConnection(code=code, reason=reason)))
        self.state = CLOSING
        self._stop_pings()
        self._push({"type": "websocket.disconnect", "code": code, "reason": reason})
        _wake(self._reader_waiter)

    def _fail(self, code: int, reason: str) -> None:
        """_Fail the WebSocket Connection_ (RFC 6455 7.1.7): send a close frame and end the
        connection at once, without waiting for the peer (it is still sending junk)."""
        if self.state != OPEN or self.ws is None:
            return
        log.info("event=ws.failed code=%d reason=%r", code, reason)
        self.failed = True
        self._write_now(self.ws.send(ev.CloseConnection(code=code, reason=reason)))
        self.close_code = code
        self.state = CLOSED
        self._stop_pings()
        self._push({"type": "websocket.disconnect", "code": code, "reason": reason})
        _wake(self._reader_waiter)

    def pin_if_stuck(self) -> None:
        """A quiesce has waited QUIESCE_STALL for this connection to finish receiving a
        message: it stays with this worker (it cannot hold the swap up)."""
        if self.frag and not self.conn.handed and not self.conn.pinned:
            log.info("event=ws.pinned reason='a message still arriving'")
            self.conn.pinned = True

    def close_for_drain(self, wait: float) -> None:
        """The drain deadline is near: 1012 (service restart), the client reconnects."""
        self.close_timeout = min(self.close_timeout, wait)
        if self.state == OPEN:
            self._close(1012, "service restart")
        elif self.state == CONNECTING:
            self.state = CLOSED
            _wake(self._reader_waiter)

    # -- keep-alive pings -----------------------------------------------------------------

    def _schedule_ping(self) -> None:
        interval = self.ctx.timeouts.ws_ping_interval
        if interval is not None and self.state == OPEN:
            self._ping = self.loop.call_later(interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping = None
        if self.state != OPEN or self.conn.handed or self.ws is None:
            return
        self._ping_payload = os.urandom(4)
        self._write_now(self.ws.send(ev.Ping(payload=self._ping_payload)))
        timeout = self.ctx.timeouts.ws_ping_timeout
        if timeout is None:
            self._schedule_ping()
        else:
            self._pong = self.loop.call_later(timeout, self._pong_missing)

    def _pong_missing(self) -> None:
        self._pong = None
        log.info("event=ws.ping_timeout path=%r", self.scope.get("path"))
        self._close(1011, "keepalive ping timeout")

    def _stop_pings(self) -> None:
        for timer in (self._ping, self._pong):
            if timer is not None:
                timer.cancel()
        self._ping = self._pong = None

    # -- handoff (driven by state.py) -----------------------------------------------------------

    def export(self, batch: tuple[str, int]) -> None:
        """Into conn.meta: what the next worker needs to resume; calls the app's save()."""
        save = self.ext.get("save")
        assert save is not None
        scope = {k: self.scope[k] for k in _SCOPE_KEYS if k in self.scope}
        meta = {"scope": scope, "state": save(), "batch": batch}
        self._before_export = bytes(self.conn.buffer)
        self.conn.meta[META] = meta
        self.conn.buffer[:] = self.buf

    def unexport(self) -> None:
        """The snapshot failed before hand_off(): the connection is as it was, its app never
        noticed (the partial frame is ours again, not to be read twice)."""
        self.conn.meta.pop(META, None)
        self.conn.buffer[:] = self._before_export

    def hand_off(self) -> None:
        """After the snapshot: the app's coroutine ends, told it was a handoff."""
        self.state = HANDED_OFF
        self.ext["handed_off"] = True
        self.close_code = 1012
        self._push({"type": "websocket.disconnect", "code": 1012, "reason": "handoff"})


_STATE_NAMES = {CONNECTING: "connecting", OPEN: "open", CLOSING: "closing", CLOSED: "closed",
                HANDED_OFF: "handed off"}


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def ws_scope(h: H1, req: Request, subprotocols: list[str]) -> dict[str, Any]:
    ctx = h.ctx
    path, raw, query = split_target(req, ctx.options.root_path)
    client, scheme = client_and_scheme(h, req, websocket=True)
    return {
        "type": "websocket", "asgi": ASGI_VERSION, "http_version": req.version,
        "scheme": scheme, "server": h.server, "client": client,
        "root_path": ctx.options.root_path, "path": path, "raw_path": raw,
        "query_string": query, "headers": req.headers, "subprotocols": subprotocols,
        "state": ctx.lifespan_state.copy(),
        "extensions": {EXT: {"resumed": False, "state": None, "save": None,
                             "handed_off": False}, DENIAL: {}},
    }


async def upgrade(h: H1, req: Request) -> None:
    """A WebSocket upgrade request: handshake with wsproto, then the session."""
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        if req.method != "GET":
            raise RemoteProtocolError("WebSocket upgrade must be a GET",
                                      event_hint=ev.RejectConnection(status_code=400))
        handshake.initiate_upgrade_connection(req.headers, req.url)
        request = next(e for e in handshake.events() if isinstance(e, ev.Request))
    except (RemoteProtocolError, LocalProtocolError, StopIteration) as e:
        await bad_handshake(h, e)
        return
    try:
        scope = ws_scope(h, req, list(request.subprotocols))
    except Reject as e:
        await h.reject(e)
        return
    compress = h.ctx.options.ws_per_message_deflate and any(
        x.split(";")[0].strip() == "permessage-deflate" for x in request.extensions
        if isinstance(x, str))
    session = Session(h.ctx, h.conn, scope, handshake=handshake, pending=h.upgrade_tail,
                      compress=compress)
    await session.run()


async def resume(ctx: Context, conn: Connection, data: dict[str, Any]) -> None:
    """A WebSocket handed over by a predecessor (or given back after an aborted swap)."""
    scope = dict(data["scope"])
    scope["state"] = ctx.lifespan_state.copy()
    scope["extensions"] = {EXT: {"resumed": True, "state": data["state"], "save": None,
                                 "handed_off": False}}
    batch_id, size = data["batch"]
    barrier = ctx.barriers.get(batch_id)
    if barrier is None:
        barrier = ctx.barriers[batch_id] = Barrier(int(size))
    pending = bytes(conn.buffer)
    conn.buffer.clear()
    session = Session(ctx, conn, scope, pending=pending, barrier=barrier)
    session.state = OPEN
    log.debug("event=ws.resumed path=%r", scope.get("path"))
    await session.run()
