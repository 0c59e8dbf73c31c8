"""WebSocket upgrade requests answered with HTTP instead of being accepted.

A handshake ends this way when it is malformed (the error wsproto names), when the app
closes before accepting (403) or fails before answering (500), both with a plain answer as
uvicorn gives, or when the app sends a denial response (ASGI extension
websocket.http.response: a start message, then body messages). Every such answer is a
complete HTTP response with its reason phrase and `connection: close`: the connection ends
with it. The session (ws.py) owns one `HandshakeAnswer` per handshake it has to answer.
"""

from __future__ import annotations

import contextlib
import http
import logging
from collections.abc import Callable
from typing import Any

import wsproto.events as ev

from swapd.serve.context import Context
from swapd.serve.h1 import H1, HEADER_NAME_BAD, HEADER_VALUE_BAD, STATUS_LINES, ClientDisconnected
from swapd.worker import Connection

log = logging.getLogger("swapd.serve")

_PLAIN = [(b"content-type", b"text/plain; charset=utf-8")]


def http_head(ctx: Context, status: int, headers: list[tuple[bytes, bytes]],
              length: int | None, *, chunked: bool = False) -> bytes:
    """The head of an HTTP answer to an upgrade request (a denial response, or a refused
    handshake): the status line with its reason phrase, the server's headers, the app's
    (framing and connection are ours), `connection: close` (the connection ends with it)."""
    parts = [STATUS_LINES[status], ctx.default_headers()]
    for name, value in headers:
        if name.lower() in (b"connection", b"transfer-encoding"):
            continue
        parts += (name, b": ", value, b"\r\n")
    if length is not None:
        parts.append(b"content-length: %d\r\n" % length)
    elif chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"connection: close\r\n\r\n")
    return b"".join(parts)


async def bad_handshake(h: H1, error: Exception) -> None:
    """A malformed upgrade request (wsproto's error): its status, and its extra headers
    (426 says which version we speak), before the app sees anything."""
    hint = getattr(error, "event_hint", None)
    status = hint.status_code if isinstance(hint, ev.RejectConnection) else 400
    extra = list(hint.headers) if isinstance(hint, ev.RejectConnection) else []
    log.info("event=ws.bad_handshake status=%d error=%r", status, str(error))
    body = f"{http.HTTPStatus(status).phrase}: {error or 'bad WebSocket handshake'}\n".encode(
        "latin-1", "replace")
    await h.write(http_head(h.ctx, status, [*extra, *_PLAIN], len(body)) + body)
    h.closed = True


class HandshakeAnswer:
    """The HTTP answer the app gives one upgrade request instead of accepting it.

    `ended(linger)` tells the session that the connection is over: after the answer's last
    byte (linger True: early bytes from the client must not reset our answer), when the
    client has gone (False), or when the app ended without completing its answer (True)."""

    def __init__(self, ctx: Context, conn: Connection, ended: Callable[[bool], None]) -> None:
        self.ctx = ctx
        self.conn = conn
        self._ended = ended
        # The denial response (websocket.http.response.start, then its body messages).
        self.denial: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.head_sent = False
        self.chunked = False

    async def refuse(self, status: int) -> None:
        """The handshake refused (close before accept: 403; the app failed: 500), with a
        plain answer as uvicorn gives."""
        body = f"{http.HTTPStatus(status).phrase}\n".encode()
        await self._send(http_head(self.ctx, status, _PLAIN, len(body)) + body, final=True)

    async def end_unanswered(self, status: int) -> None:
        """The app is gone before its handshake answer was complete: answer `status` if
        nothing went out yet, else end the connection (the answer is cut short)."""
        if not self.head_sent:
            with contextlib.suppress(OSError):
                await self.refuse(status)
        self._ended(True)

    # -- the denial response (ASGI extension websocket.http.response) ----------------------

    def deny_start(self, message: dict[str, Any]) -> None:
        status = message.get("status")
        if type(status) is not int or not 100 <= status <= 599:
            raise RuntimeError(f"invalid HTTP status {status!r} in websocket.http.response.start")
        headers = [(bytes(n), bytes(v)) for n, v in message.get("headers") or ()]
        for name, value in headers:
            if not name or HEADER_NAME_BAD.search(name) or HEADER_VALUE_BAD.search(value):
                raise RuntimeError(f"invalid response header {name!r}: {value!r}")
        self.denial = (status, headers)

    async def deny_body(self, message: dict[str, Any]) -> None:
        assert self.denial is not None
        body = bytes(message.get("body") or b"")
        more = bool(message.get("more_body", False))
        data = b""
        if not self.head_sent:
            status, headers = self.denial
            given = any(n.lower() == b"content-length" for n, _ in headers)
            self.chunked = more and not given
            data = http_head(self.ctx, status, headers, None if more or given else len(body),
                             chunked=self.chunked)
            self.head_sent = True
        if self.chunked:
            data += b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            data += body
        await self._send(data, final=not more)

    async def _send(self, data: bytes, *, final: bool) -> None:
        """Write (part of) the answer, awaiting the socket as an HTTP response does; the
        final part ends the connection."""
        try:
            await self.ctx.loop.sock_sendall(self.conn.sock, data)
        except OSError:
            self._ended(False)
            raise ClientDisconnected("the client has gone") from None
        if final:
            self._ended(True)  # linger: early bytes from the client must not reset our answer
