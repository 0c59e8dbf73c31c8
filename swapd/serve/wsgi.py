"""WSGI (PEP 3333) on a bounded thread pool (--threads).

The event loop parses request heads; each request then runs on a pool thread, which calls
the app, reads the body from the socket as `wsgi.input` is read (100 Continue first, if the
client waits for it) and writes the response itself, as gunicorn's gthread workers do: one
hand-over to the thread and one back per request. While a thread owns the connection the
loop does not touch its socket; the request is in flight, so a stateful swap waits for it.

Headers are sent with the first non-empty body chunk (or when the iterable ends); a list or
tuple result without Content-Length gets one, anything else is chunked (HTTP/1.1); our
wsgi.file_wrapper around a regular file goes out with os.sendfile (filewrapper.py).
"""

from __future__ import annotations

import contextlib
import http
import logging
import re
import select
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

import swapd
from swapd.serve import proxy
from swapd.serve.filewrapper import FileWrapper, regular_file, sendfile_all
from swapd.serve.h1 import (
    H1,
    QUIESCE_STALL,
    RECV_SIZE,
    STATUS_LINES,
    Reject,
    Request,
    access_line,
    log_rejected,
)

log = logging.getLogger("swapd.serve")

_STATUS = re.compile(r"[1-5]\d\d [^\x00-\x1f\x7f]*")
_BAD_NAME = re.compile(r'[\x00-\x20\x7f()<>@,;:\\"/\[\]?={}]')
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
SERVER_SOFTWARE = f"swapd/{swapd.__version__}"
_HOP = frozenset({"connection", "transfer-encoding", "keep-alive", "upgrade", "te",
                  "trailer", "proxy-connection"})


def _wait_fd(fd: int, write: bool, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class Input:
    """`wsgi.input`: the request body, read from the socket on demand (blocking, in the
    request's thread). Ends at the end of the body (wsgi.input_terminated)."""

    def __init__(self, h: H1, req: Request) -> None:
        self.h = h
        self.req = req
        self.continued = False
        self.rejected: Reject | None = None  # the body broke a bound: answered in run()

    def _fill(self) -> bool:
        h, req = self.h, self.req
        if self.rejected is not None:
            raise OSError(f"bad request body: {self.rejected.reason}")
        if req.complete or h.closed:
            return False
        sock = h.conn.sock
        if req.expect_continue and not self.continued:
            self.continued = True
            _send_all(h, b"HTTP/1.1 100 Continue\r\n\r\n")
        silent = 0.0
        while True:
            try:
                data = sock.recv(RECV_SIZE)
                break
            except (BlockingIOError, InterruptedError):
                # In slices, to notice a stateful swap waiting for this request: then the
                # client may stall QUIESCE_STALL at most (as for ASGI, h1.recv_body).
                limit = QUIESCE_STALL if h.conn.quiescing else h.ctx.timeouts.read
                if silent >= limit:
                    h.closed = True
                    self.rejected = h.body_timed_out()
                    raise OSError("request body timed out") from None
                step = min(0.25, limit - silent)
                if not _wait_fd(sock.fileno(), False, step):
                    silent += step
            except OSError:
                data = b""
                break
        if not data:
            h.closed = True
            raise OSError("the client closed the connection inside the request body")
        try:
            h.feed(data)
        except Reject as e:
            h.closed = True
            self.rejected = e
            raise OSError(f"bad request body: {e.reason}") from None
        return True

    def read(self, size: int | None = -1) -> bytes:
        body = self.req.body
        if size is None or size < 0:
            while self._fill():
                pass
            data = bytes(body)
            body.clear()
            return data
        while len(body) < size and self._fill():
            pass
        data = bytes(body[:size])
        del body[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        body = self.req.body
        while True:
            end = body.find(b"\n")
            limit = size if size is not None and size >= 0 else None
            if end >= 0 and (limit is None or end < limit):
                return self.read(end + 1)
            if limit is not None and len(body) >= limit:
                return self.read(limit)
            if not self._fill():
                return self.read(len(body) if limit is None else min(limit, len(body)))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


def _send_all(h: H1, data: bytes, *, last: bool = False) -> None:
    """Blocking send from a pool thread (the socket stays non-blocking for the loop).
    `last`: our final answer on a connection already marked to close."""
    if h.closed and not last:
        raise OSError("the connection is closed")
    sock = h.conn.sock
    view = memoryview(data)
    timeout = h.ctx.timeouts.read
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            if not _wait_fd(sock.fileno(), True, timeout):
                h.closed = True
                raise OSError("the client stopped reading the response") from None
        except OSError:
            h.closed = True
            raise


class Responder:
    """start_response, write() and the framing of one response."""

    def __init__(self, h: H1, req: Request) -> None:
        self.h = h
        self.req = req
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.wrote = False  # a byte of the response went out
        self.chunked = False
        self.remaining: int | None = None
        self.keep = False
        self.sent = 0
        self.input: Input | None = None

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if not isinstance(status, str) or not _STATUS.fullmatch(status):
            raise ValueError(f"invalid WSGI status {status!r}")
        for item in headers:
            if (not isinstance(item, tuple) or len(item) != 2
                    or not all(isinstance(x, str) for x in item)):
                raise TypeError(f"WSGI headers must be (str, str) tuples, not {item!r}")
            name, value = item
            if _BAD_NAME.search(name) or _BAD_VALUE.search(value):
                raise ValueError(f"invalid response header {name!r}: {value!r}")
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable: unbuffered."""
        if self.status is None:
            raise AssertionError("write() before start_response()")
        self.send(data, None, final=False)

    def _head(self, total: int | None, *, sized: bool = False) -> bytes:
        """`sized`: `total` is the body's true length even for HEAD (a file's size)."""
        h, req = self.h, self.req
        assert self.status is not None
        code = int(self.status[:3])
        parts = [b"HTTP/1.1 ", self.status.encode("latin-1"), b"\r\n", b""]
        length = None
        close = False
        own_date = own_server = False
        for name, value in self.headers:
            lower = name.lower()
            if lower in _HOP:
                close = close or (lower == "connection" and "close" in value.lower())
                continue  # framing and connection management are the server's (PEP 3333)
            if lower == "content-length":
                length = int(value)
            elif lower == "date":
                own_date = True
            elif lower == "server":
                own_server = True
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        # One Date and one Server (singletons, RFC 9110): the app's, if it sent them.
        parts[3] = h.ctx.default_headers_without(date=own_date, server=own_server)
        no_body = req.method == "HEAD" or code in (204, 304) or code < 200
        if length is not None:
            self.remaining = length
        elif no_body:
            if sized and total is not None and req.method == "HEAD" and code >= 200 \
                    and code not in (204, 304):
                parts.append(b"content-length: %d\r\n" % total)
        elif total is not None:
            parts.append(b"content-length: %d\r\n" % total)
            self.remaining = total
        elif req.version == "1.1":
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            close = True
        continued = self.input is not None and self.input.continued
        waiting = not req.complete and req.expect_continue and not continued
        self.keep = (req.keep_alive and not close and not waiting and not h.conn.draining
                     and not h.closed)
        parts.append(b"\r\n" if self.keep else b"connection: close\r\n\r\n")
        return b"".join(parts)

    def send(self, data: bytes, total: int | None, *, final: bool) -> None:
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"WSGI body chunks must be bytes, not {type(data).__name__}")
        out = b""
        if not self.head_sent:
            if not data and not final:
                return  # headers wait for the first non-empty chunk (PEP 3333)
            out = self._head(total)
            self.head_sent = True
        if self.req.method != "HEAD":
            self.sent += len(data)
            if self.chunked:
                if data:
                    out += b"%x\r\n%s\r\n" % (len(data), data)
                if final:
                    out += b"0\r\n\r\n"
            else:
                out += data
                if self.remaining is not None and self.sent > self.remaining:
                    self.keep = False
                    self.h.closed = True
                    raise ValueError("response body longer than its Content-Length")
        if final and self.remaining is not None and self.sent < self.remaining \
                and self.req.method != "HEAD":
            self.keep = False
            self.h.closed = True  # the client waits for bytes that will never come
        if out:
            _send_all(self.h, out)
            self.wrote = True

    def send_file(self, wrapper: FileWrapper) -> bool:
        """The app returned our wsgi.file_wrapper around a regular file: os.sendfile the rest
        of it (the whole response, or up to its Content-Length). False: not a file we can
        send that way; nothing was sent, and the caller iterates it instead."""
        found = regular_file(wrapper) if self.status is not None else None
        if found is None:
            return False
        fd, offset, available = found
        h = self.h
        if not self.head_sent:
            _send_all(h, self._head(available, sized=True))  # the app's Content-Length wins
            self.head_sent = self.wrote = True
        code = int(self.status[:3]) if self.status else 200
        count = available
        if self.remaining is not None:
            count = min(count, self.remaining - self.sent)
        if self.req.method != "HEAD" and code not in (204, 304) and code >= 200 and count > 0:
            if self.chunked:
                _send_all(h, b"%x\r\n" % count)
            sent = sendfile_all(h.conn.sock, fd, offset, count, h.ctx.timeouts.read)
            self.sent += sent
            if sent < count and self.chunked:  # the file shrank: the chunk cannot be ended
                self.keep = False
                h.closed = True
                raise OSError("the file shrank while it was sent")
            if self.chunked:
                _send_all(h, b"\r\n")
        self.send(b"", None, final=True)
        return True


def environ(h: H1, req: Request, responder: Responder) -> dict[str, Any]:
    ctx = h.ctx
    opts = ctx.options
    url = req.url
    if url[:1] == b"/" and b"?" not in url and b"%" not in url:
        raw, query = url, b""
    else:
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise Reject(400, "invalid request target") from None
        raw, query = parsed.path or b"/", parsed.query or b""
    client = h.client
    scheme = "http"
    if opts.proxy_headers and (req.forwarded_for is not None or req.forwarded_proto is not None):
        client, proto = proxy.resolve(client, req.forwarded_for, req.forwarded_proto,
                                      opts.forwarded_allow_ips, unix_trusted=opts.trust_unix_peers)
        scheme = proto or scheme
    server_name, server_port = _server_name(req.host, h.server, scheme)
    inp = Input(h, req)
    responder.input = inp
    env: dict[str, Any] = {
        "REQUEST_METHOD": req.method,
        "SCRIPT_NAME": opts.root_path,
        "PATH_INFO": unquote_to_bytes(raw).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "SERVER_PROTOCOL": f"HTTP/{req.version}",
        "REMOTE_ADDR": client[0] if client else "",
        "REMOTE_PORT": str(client[1]) if client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": inp,
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": ctx.worker.workers > 1,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "RAW_URI": url.decode("latin-1"),  # the target as sent (gunicorn's key)
    }
    for name, value in req.headers:
        if name == b"content-type":
            env["CONTENT_TYPE"] = value.decode("latin-1")
        elif name == b"content-length":
            env["CONTENT_LENGTH"] = value.decode("latin-1")
        elif b"_" not in name:  # X_Foo would pose as X-Foo: dropped (gunicorn, nginx do too)
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            env[key] = f"{env[key]},{text}" if key in env else text
    return env


def _server_name(host: bytes | None, server: tuple[str, int | None], scheme: str
                 ) -> tuple[str, str]:
    """SERVER_NAME and SERVER_PORT: from the Host header, else the listening socket."""
    default = str(server[1] or (443 if scheme == "https" else 80))
    if not host:
        return server[0], default
    text = host.decode("latin-1")
    if text.startswith("["):  # [v6]:port
        end = text.find("]")
        name, rest = text[1:end], text[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = text.partition(":")
    return name, port if port.isdigit() else default


def run(h: H1, req: Request) -> bool:
    """One request on a pool thread; True if the connection may serve another."""
    ctx = h.ctx
    started = time.perf_counter()
    responder = Responder(h, req)
    try:
        env = environ(h, req, responder)
    except Reject as e:
        _error(h, e.status, e.reason)
        return False
    result: Iterable[bytes] | None = None
    try:
        result = ctx.app(env, responder.start_response)
        assert result is not None
        if isinstance(result, list | tuple):
            if responder.status is None:
                raise RuntimeError("the app returned without calling start_response()")
            total = sum(len(chunk) for chunk in result)
            responder.send(b"".join(result), total, final=True)
        elif type(result) is FileWrapper and responder.send_file(result):
            pass
        else:
            for chunk in result:
                if chunk:
                    responder.send(chunk, None, final=False)
            if responder.status is None:
                raise RuntimeError("the app returned without calling start_response()")
            responder.send(b"", 0 if not responder.head_sent else None, final=True)
    except Exception as e:
        rejected = responder.input.rejected if responder.input is not None else None
        if rejected is not None:  # the request body broke a bound: say so, if we still can
            log_rejected(rejected, h.client, "request.aborted")
            if not responder.wrote:
                _error(h, rejected.status, rejected.reason, last=True)
        elif isinstance(e, OSError):
            log.info("event=wsgi.connection_lost error=%r", str(e))
        else:
            log.exception("event=app.error method=%s target=%r", req.method,
                          req.url.decode("latin-1"))
            if not responder.head_sent:
                _error(h, 500, "the application raised an exception")
        h.closed = True
        return False
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("event=app.error error='close() of the response iterable'")
    if ctx.access_enabled():
        assert responder.status is not None
        access_line(h.client, req.method, req.url, req.version, int(responder.status[:3]),
                    responder.sent, started)
    ctx.requests += 1
    return responder.keep and not h.closed


def _error(h: H1, status: int, text: str, *, last: bool = False) -> None:
    body = f"{http.HTTPStatus(status).phrase}: {text}\n".encode("latin-1", "replace")
    with contextlib.suppress(OSError):
        _send_all(h, b"%s%scontent-type: text/plain; charset=utf-8\r\n"
                  b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                  % (STATUS_LINES[status], h.ctx.default_headers(), len(body), body),
                  last=last)
    h.closed = True


async def dispatch(h: H1, req: Request) -> bool:
    ctx = h.ctx
    limit = ctx.limits.concurrency
    if limit is not None and ctx.connections > limit:
        await h.respond_error(503, "too many connections")
        return False
    assert ctx.pool is not None
    keep = await h.loop.run_in_executor(ctx.pool, run, h, req)
    if req.upgrade is not None:
        return False  # an upgrade this server does not do: answered as HTTP, then closed
    return keep
