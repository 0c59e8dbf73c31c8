"""The HTTP server of the metrics endpoint: bounded in connections, time, size and threads.

prometheus-client's `start_http_server` spends a thread and a descriptor on every
connection, with no deadline and a listen backlog of 5: any local user could hold
hundreds of idle connections and run the supervisor out of descriptors and threads, and
five slow ones kept a real scrape out. This server answers with prometheus-client's own
WSGI app (`make_wsgi_app`: the exposition, content negotiation, gzip and `name[]`
filters as before); only the serving is ours:

- One thread ("swapd-metrics") runs a private asyncio loop for accepting, reading and
  writing; answers are built in a pool of `WORKERS` threads (building one waits up to
  SNAPSHOT_WAIT for the supervisor's loop, metrics.py). The supervisor's own loop is never
  involved, so a stuck supervisor loop still gets its scrape (counters without gauges).
- At most `max_connections` connections are open. When all are taken and another is
  waiting, the oldest one that has not sent a complete request is closed to make room:
  idle connections, however many, cannot keep a scrape out. When every slot is busy
  answering, accepting stops and new connections wait in the backlog (`BACKLOG`).
- One request per connection (`Connection: close`): its line and headers, at most
  `MAX_REQUEST` bytes, within `request_timeout` of the accept (else 408 and close); the
  answer built and written within `answer_timeout` after that (else the connection is
  dropped).
- accept() failing for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
  pauses accepting for `accept_retry` seconds instead of spinning on a level-triggered
  selector; one log line when it starts, one when accepting works again.

So the endpoint holds at most max_connections + 4 descriptors (the listener, the loop's
epoll and self-pipe) and 1 + WORKERS threads, whatever its clients do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import io
import logging
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from swapd.throttle import Throttle

log = logging.getLogger("swapd")

Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0  # seconds from accept to a complete request line and headers
ANSWER_TIMEOUT = 10.0  # seconds from the request to the answer written (build + send)
MAX_REQUEST = 8192  # bytes of request line and headers
MAX_HEADERS = 64
BACKLOG = 128
ACCEPT_RETRY = 1.0  # seconds without accepting after accept() failed for want of resources
WORKERS = 2  # threads building answers
_ACCEPT_BATCH = 8  # connections accepted per wakeup: bounded work per loop turn
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 505: "HTTP Version Not Supported"}


class _Conn:
    """One accepted connection: reading its request, then answering it."""

    __slots__ = ("answer", "buf", "closed", "job", "out", "sock", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.answer = False  # the request is complete: building or writing the answer
        self.out = memoryview(b"")
        self.timer: asyncio.TimerHandle | None = None
        self.job: asyncio.Future[bytes] | None = None
        self.closed = False


class MetricsServer:
    """Serves `app` on an already bound, listening TCP socket (closed by `close`)."""

    def __init__(self, sock: socket.socket, app: Wsgi, *,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT,
                 answer_timeout: float = ANSWER_TIMEOUT,
                 accept_retry: float = ACCEPT_RETRY) -> None:
        self.socket = sock
        self._app = app
        self._max = max_connections
        self._request_timeout = request_timeout
        self._answer_timeout = answer_timeout
        self._accept_retry = accept_retry
        sock.setblocking(False)
        host, port = sock.getsockname()[:2]
        self._environ = {"SERVER_NAME": host, "SERVER_PORT": str(port)}
        # Insertion order is age: the first idle one is the one to close for room.
        self._conns: dict[_Conn, None] = {}
        self._loop = asyncio.SelectorEventLoop()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            WORKERS, thread_name_prefix="swapd-metrics-answer")
        self._thread = threading.Thread(target=self._run, name="swapd-metrics", daemon=True)
        self._accepting = False
        self._stopping = False
        self._retry: asyncio.TimerHandle | None = None
        self.accept_failures = 0  # failed accept() calls in the current episode
        self._busy = Throttle()

    # -- from the supervisor's thread ---------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, close every connection and the listener; idempotent."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop)
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.socket.close()

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._listen()
        self._loop.run_forever()

    def _stop(self) -> None:
        self._stopping = True
        self._unlisten()
        if self._retry is not None:
            self._retry.cancel()
        for conn in list(self._conns):
            self._close(conn)
        self._loop.stop()

    def _listen(self) -> None:
        if not self._accepting:
            self._loop.add_reader(self.socket.fileno(), self._on_acceptable)
            self._accepting = True

    def _unlisten(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self.socket.fileno())
            self._accepting = False

    def _on_acceptable(self) -> None:
        if len(self._conns) >= self._max:
            # Full, and a connection is waiting (the listener is readable): close the
            # oldest idle one and accept when it is gone (never more than the cap open),
            # or, if every slot is answering, leave the newcomer in the backlog.
            self._unlisten()
            self._make_room()
            return
        for _ in range(min(_ACCEPT_BATCH, self._max - len(self._conns))):
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                self._pause(e)
                return
            if self.accept_failures:
                log.info("event=metrics.accept_resumed failures=%d", self.accept_failures)
                self.accept_failures = 0
            self._admit(sock)

    def _make_room(self) -> None:
        idle = next((c for c in self._conns if not c.answer), None)
        if self._busy.allow():
            action = "closed the oldest idle one" if idle else "waiting in the backlog"
            log.warning("event=metrics.busy connections=%d limit=%d action=%r suppressed=%d",
                        len(self._conns), self._max, action, self._busy.take_suppressed())
        if idle is not None:
            self._close(idle)

    def _pause(self, error: OSError) -> None:
        """accept() failed: no new connection for a while, instead of a busy loop (the
        listener stays readable while the connection waits in its queue)."""
        self.accept_failures += 1
        if self.accept_failures == 1:
            log.warning("event=metrics.accept_failed error=%r action=%r",
                        error.strerror or str(error), f"retry every {self._accept_retry:g}s")
        self._unlisten()
        self._retry = self._loop.call_later(self._accept_retry, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self._listen()

    # -- one connection -----------------------------------------------------------------

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        conn = _Conn(sock)
        self._conns[conn] = None
        conn.timer = self._loop.call_later(self._request_timeout, self._expired, conn)
        self._loop.add_reader(sock.fileno(), self._on_readable, conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.timer is not None:
            conn.timer.cancel()
        if conn.job is not None:
            conn.job.cancel()  # not built yet: never will be
        self._loop.remove_reader(conn.sock.fileno())
        self._loop.remove_writer(conn.sock.fileno())
        conn.sock.close()
        del self._conns[conn]
        if not self._accepting and self._retry is None and not self._stopping:
            self._listen()  # a slot is free: take the next waiting connection

    def _expired(self, conn: _Conn) -> None:
        conn.timer = None
        if not conn.answer:
            self._reply_error(conn, 408, f"no complete request within "
                                         f"{self._request_timeout:g}s\n")
        else:  # a client that does not read its answer (or a stuck build)
            self._close(conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)  # gone before its request was complete
            return
        conn.buf += data
        end = _end_of_head(conn.buf)
        if end < 0:
            if len(conn.buf) > MAX_REQUEST:
                self._reply_error(conn, 431, f"request line and headers over {MAX_REQUEST} "
                                             "bytes\n")
            return
        try:
            environ = self._parse(bytes(conn.buf[:end]))
        except _BadRequest as e:
            self._reply_error(conn, e.status, f"{e}\n")
            return
        self._answering(conn)
        job = self._loop.run_in_executor(self._pool, self._build, environ)
        conn.job = job
        job.add_done_callback(functools.partial(self._built, conn))

    def _parse(self, head: bytes) -> dict[str, Any]:
        """The WSGI environ of one request head (request line and headers)."""
        try:
            lines = head.decode("latin-1").split("\n")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise _BadRequest(400, "bad request") from None
        parts = lines[0].rstrip("\r").split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
            raise _BadRequest(400, "bad request line")
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, f"{version[:20]!r} not supported; HTTP/1.0 or 1.1")
        headers = [line.rstrip("\r") for line in lines[1:] if line.rstrip("\r")]
        if len(headers) > MAX_HEADERS:
            raise _BadRequest(431, f"more than {MAX_HEADERS} headers")
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            **self._environ,
            "REQUEST_METHOD": method, "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"), "QUERY_STRING": query,
            "SERVER_PROTOCOL": version, "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for line in headers:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "bad header line")
            key = "HTTP_" + name.upper().replace("-", "_")
            value = value.strip()
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _build(self, environ: dict[str, Any]) -> bytes:
        """In a pool thread: the whole HTTP answer, from prometheus-client's app."""
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return lambda _: None

        try:
            body = b"".join(self._app(environ, start_response))
            status, headers = started
        except Exception:  # a bug: an answer, a log line, and the server goes on
            log.exception("event=metrics.error path=%r", environ.get("PATH_INFO"))
            return _response(500, "internal error\n")
        head = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        return "\r\n".join(head).encode("latin-1") + body

    def _built(self, conn: _Conn, job: asyncio.Future[bytes]) -> None:
        conn.job = None
        if conn.closed or job.cancelled():
            return
        self._send(conn, job.result())

    def _answering(self, conn: _Conn) -> None:
        """The request is read (or refused): no more reading, `answer_timeout` to answer."""
        self._loop.remove_reader(conn.sock.fileno())
        conn.answer = True
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = self._loop.call_later(self._answer_timeout, self._expired, conn)

    def _reply_error(self, conn: _Conn, status: int, text: str) -> None:
        self._answering(conn)
        self._send(conn, _response(status, text))

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.out = memoryview(data)
        self._on_writable(conn)

    def _on_writable(self, conn: _Conn) -> None:
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
        except (BlockingIOError, InterruptedError):
            self._loop.add_writer(conn.sock.fileno(), self._on_writable, conn)
            return
        except OSError:
            pass  # the client is gone: nothing more to do for it
        else:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        self._close(conn)


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _end_of_head(buf: bytearray) -> int:
    """Where the request head ends (after its blank line), or -1; bare LF is accepted."""
    crlf, lf = buf.find(b"\r\n\r\n"), buf.find(b"\n\n")
    ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
    return min(ends) if ends else -1


def _response(status: int, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: text/plain; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


def bind(host: str, port: int) -> socket.socket:
    """The endpoint's listening socket, exactly on `host` (loopback unless configured)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Bound again by the new image after `upgrade --self`: connections of the old
        # one may still be in TIME_WAIT on the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock

