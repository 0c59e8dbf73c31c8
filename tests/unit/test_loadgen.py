"""swapd.loadgen against small in-test servers on 127.0.0.1 (and a Unix socket), plus its pure
analysis functions on synthetic records with exact expected values."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import random
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from swapd import loadgen
from swapd.loadgen import (
    Attempt,
    AttemptLog,
    BackgroundLoad,
    ConnectionClosed,
    Endpoint,
    Gap,
    LoadConfigError,
    LoadError,
    LoadGenerator,
    Outcome,
    Request,
    RequestFailed,
    ResponseError,
    RunInfo,
    Timeline,
    Window,
    classify,
    fetch,
    fetch_sync,
    http_get,
    http_get_int,
    http_post,
    line,
    longest_gap,
    parse_target,
    percentile,
    read_http_response,
    summarise,
    window_span,
)

T = TypeVar("T")
DEADLINE = 30.0  # generous: only a hang trips it


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run a scenario (its servers and clients share one loop) under a deadline."""

    async def bounded() -> T:
        async with asyncio.timeout(DEADLINE):
            return await coro

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    """The event loop a scenario runs on: swapd runs on uvloop, asyncio is the fallback."""
    return str(request.param)


# --- in-test servers ----------------------------------------------------------------------


class Server:
    """A tiny asyncio server; subclasses answer requests. Counts accepted connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.requests = 0
        self.counter = 0
        self.request_heads: list[bytes] = []
        self.received = threading.Event()  # set once `expect` requests have arrived
        self.expect = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._hold: asyncio.Event | None = None

    async def start_tcp(self, host: str = "127.0.0.1") -> int:
        self._hold = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        self._hold = asyncio.Event()
        self._server = await asyncio.start_unix_server(self._accept, path)

    async def stop(self) -> None:
        assert self._server is not None and self._hold is not None
        self._server.close()
        self._hold.set()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()

    async def hold(self) -> None:
        """Never answer (until the server stops)."""
        assert self._hold is not None
        await self._hold.wait()

    def _count_request(self, head: bytes) -> None:
        self.requests += 1
        self.request_heads.append(head)
        if self.expect and self.requests >= self.expect:
            self.received.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: normal for a load generator's connections
        finally:
            self._handlers.discard(task)
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def send_then_fin(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send data and a FIN with two syscalls in one step (on either loop), so that a client
    on the same loop cannot resume before both have arrived."""
    fd = writer.get_extra_info("socket").fileno()
    with socket.socket(fileno=os.dup(fd)) as raw:  # the transport's socket allows no shutdown
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)


class HttpServer(Server):
    """HTTP/1.1: / -> "hello", POST /incr -> new counter, GET /count -> counter.

    behaviour: normal | close-header (answers with Connection: close) | shutdown-after (closes
    after each complete response, without saying so) | drop-second / rst-second (reads the
    second request on a connection, then closes / resets it unanswered) | silent
    """

    def __init__(self, behaviour: str = "normal", status: int = 200, body: bytes | None = None):
        super().__init__()
        self.behaviour = behaviour
        self.status = status
        self.body = body

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        on_this_connection = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            on_this_connection += 1
            self._count_request(head)
            method, path, _ = head.split(b"\r\n", 1)[0].split(b" ")
            if self.behaviour == "silent":
                await self.hold()
                return
            if on_this_connection == 2 and self.behaviour == "drop-second":
                return  # _accept closes: a FIN with the request read and unanswered
            if on_this_connection == 2 and self.behaviour == "rst-second":
                rst(writer)
                return
            if method == b"POST" and path == b"/incr":
                self.counter += 1
                body = str(self.counter).encode()
            elif path == b"/count":
                body = str(self.counter).encode()
            else:
                body = b"hello"
            if self.body is not None:
                body = self.body
            client_close = b"connection: close" in head.lower()
            close = client_close or self.behaviour == "close-header"
            response = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (
                self.status,
                len(body),
                b"Connection: close\r\n" if close else b"",
                body,
            )
            if self.behaviour == "shutdown-after":
                send_then_fin(writer, response)
                return
            writer.write(response)
            if close:
                return


class LineServer(Server):
    """Line protocol: INCR -> new value, GET -> value."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                command = (await reader.readuntil(b"\n")).strip()
            except asyncio.IncompleteReadError:
                return
            self._count_request(command)
            if command == b"INCR":
                self.counter += 1
            writer.write(b"%d\n" % self.counter)


@contextlib.asynccontextmanager
async def serving(server: Server, host: str = "127.0.0.1") -> Any:
    port = await server.start_tcp(host)
    try:
        yield port
    finally:
        await server.stop()


class ServerThread:
    """A Server in its own thread and loop, for BackgroundLoad and the synchronous helpers."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.port = await self.server.start_tcp()
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(DEADLINE), "test server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "test server did not stop"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def load(port: int, request: Request, **options: Any) -> loadgen.LoadReport:
    options.setdefault("duration", DEADLINE)
    gen = LoadGenerator(("127.0.0.1", port), request, **options)
    report = await gen.run()
    assert len(gen.attempts) == report.attempts
    return report


async def load_with_attempts(
    port: int, request: Request, **options: Any
) -> tuple[loadgen.LoadReport, list[Attempt]]:
    options.setdefault("duration", DEADLINE)
    gen = LoadGenerator(("127.0.0.1", port), request, **options)
    report = await gen.run()
    return report, list(gen.attempts)


# --- against servers ----------------------------------------------------------------------


def test_keepalive_reuses_one_connection_per_client(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer()
        async with serving(server) as port:
            report, attempts = await load_with_attempts(
                port, http_get(), clients=4, mode="keepalive", max_requests=200
            )
        assert (report.ok, report.failed, report.stop_reason) == (200, 0, "max_requests")
        assert server.accepted == 4 == report.connections_opened
        assert server.requests == 200
        assert sum(a.reused for a in attempts) == 196
        assert all(b"connection: keep-alive" in h.lower() for h in server.request_heads)

    run(scenario(), loop)


def test_close_mode_opens_a_connection_per_request(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer()
        async with serving(server) as port:
            report, attempts = await load_with_attempts(
                port, http_get(), clients=4, mode="close", max_requests=100
            )
        assert (report.ok, report.failed) == (100, 0)
        assert server.accepted == 100 == report.connections_opened
        assert not any(a.reused for a in attempts)
        assert all(b"connection: close" in h.lower() for h in server.request_heads)

    run(scenario(), loop)


@pytest.mark.parametrize("mode", ["close", "keepalive"])
def test_post_counts_acknowledged_increments(mode: str, loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer()
        async with serving(server) as port:
            report = await load(port, http_post(), clients=8, mode=mode, max_requests=300)
            final = await fetch(("127.0.0.1", port), http_get_int())
        assert (report.ok, report.failed) == (300, 0)
        assert report.acknowledged == 300 == server.counter == final
        assert report.max_acknowledged == 300
        assert (report.duplicate_values, report.value_regressions) == (0, 0)

    run(scenario(), loop)


def test_get_reports_no_counter(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer()
        async with serving(server) as port:
            report = await load(port, http_get_int(), clients=2, max_requests=10)
        assert report.ok == 10
        assert report.acknowledged is None and report.max_acknowledged is None

    run(scenario(), loop)


def test_connection_close_header_reconnects_without_errors(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer("close-header")
        async with serving(server) as port:
            report, attempts = await load_with_attempts(
                port, http_post(), clients=3, mode="keepalive", max_requests=60
            )
        assert (report.ok, report.failed) == (60, 0)
        assert server.accepted == 60 == report.server_ended
        assert not any(a.reused for a in attempts)

    run(scenario(), loop)


def test_close_after_a_complete_response_is_a_reconnect_not_an_error(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer("shutdown-after")
        async with serving(server) as port:
            report, attempts = await load_with_attempts(
                port, http_get(), clients=1, mode="keepalive", max_requests=20
            )
        assert (report.ok, report.failed) == (20, 0)
        assert server.accepted == 20
        assert report.closed_while_idle == 19  # detected before each reuse but the last
        assert not any(a.reused for a in attempts)

    run(scenario(), loop)


def test_idle_close_after_reading_a_request_is_eof_on_a_reused_connection(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer("drop-second")
        async with serving(server) as port:
            report, attempts = await load_with_attempts(
                port, http_post(), clients=1, mode="keepalive", max_requests=20
            )
        assert report.ok == 10
        assert report.failures == {"eof": 10}
        assert report.failures_on_reused == {"eof": 10}
        assert all(a.reused for a in attempts if a.outcome is Outcome.EOF)
        assert not any(a.reused for a in attempts if a.outcome is Outcome.OK)
        # Not retried: the server saw exactly one request per attempt.
        assert server.requests == 20
        assert report.acknowledged == 10 and server.counter == 10
        assert ("eof", "closed before any response byte", 10) in report.details

    run(scenario(), loop)


def test_reset_of_a_reused_connection_is_reset(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer("rst-second")
        async with serving(server) as port:
            report = await load(port, http_get(), clients=1, mode="keepalive", max_requests=10)
        assert report.ok == 5
        assert report.failures == {"reset": 5} == report.failures_on_reused

    run(scenario(), loop)


def test_refused_port_counts_refused(closed_port: int, loop: str) -> None:
    async def scenario() -> None:
        report = await load(closed_port, http_get(), clients=2, max_requests=6)
        assert report.ok == 0
        assert report.failures == {"refused": 6}
        assert report.failed_on_reused == 0
        assert report.longest_gap == report.duration  # nothing ever succeeded
        assert report.connections_opened == 0

    run(scenario(), loop)


def test_server_that_never_answers_counts_timeout(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer("silent")
        async with serving(server) as port:
            report = await load(port, http_get(), clients=2, max_requests=4, timeout=0.2)
        assert report.failures == {"timeout": 4}
        assert report.details == (("timeout", "awaiting the reply", 4),)
        assert server.requests == 4

    run(scenario(), loop)


@pytest.mark.parametrize(
    ("options", "request_", "detail"),
    [
        ({"status": 503}, http_get(), "status 503"),
        ({"body": b"many"}, http_post(), "not an integer: b'many'"),
    ],
)
def test_bad_responses(options: dict[str, Any], request_: Request, detail: str, loop: str) -> None:
    async def scenario() -> None:
        async with serving(HttpServer(**options)) as port:
            report = await load(port, request_, clients=1, max_requests=3, failure_pause=0)
        assert report.failures == {"bad-response": 3}
        assert report.details == (("bad-response", detail, 3),)

    run(scenario(), loop)


@pytest.mark.parametrize("mode", ["close", "keepalive"])
def test_line_protocol_over_tcp(mode: str, loop: str) -> None:
    async def scenario() -> None:
        server = LineServer()
        async with serving(server) as port:
            report = await load(port, line("INCR"), clients=4, mode=mode, max_requests=100)
            value = await fetch(("127.0.0.1", port), line("GET"))
        assert (report.ok, report.acknowledged, report.max_acknowledged) == (100, 100, 100)
        assert value == 100 == server.counter
        assert server.accepted == (100 if mode == "close" else 4) + 1

    run(scenario(), loop)


def test_line_protocol_over_a_unix_socket(tmp_path: Path, loop: str) -> None:
    async def scenario() -> None:
        server = LineServer()
        path = str(tmp_path / "line.sock")
        await server.start_unix(path)
        try:
            gen = LoadGenerator(path, line(), clients=2, max_requests=40, duration=DEADLINE)
            report = await gen.run()
            value = await fetch(path, line("GET"))
        finally:
            await server.stop()
        assert report.target == f"unix:{path}"
        assert (report.ok, report.acknowledged, value) == (40, 40, 40)
        assert server.accepted == 3

    run(scenario(), loop)


def test_ipv6_literal(loop: str) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")

    async def scenario() -> None:
        server = HttpServer()
        async with serving(server, "::1") as port:
            gen = LoadGenerator(("::1", port), http_get(), clients=2, max_requests=10)
            report = await gen.run()
        assert report.ok == 10 and report.target == f"[::1]:{port}"
        assert all(f"host: [::1]:{port}".encode() in h.lower() for h in server.request_heads)

    run(scenario(), loop)


def test_max_requests_is_respected_exactly(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer()
        async with serving(server) as port:
            report = await load(port, http_get(), clients=16, max_requests=1000)
        assert report.attempts == 1000 == server.requests
        assert report.stop_reason == "max_requests"

    run(scenario(), loop)


def test_duration_is_respected(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer()
        async with serving(server) as port:
            gen = LoadGenerator(("127.0.0.1", port), http_get(), clients=2, duration=0.3)
            report = await gen.run()
        assert report.stop_reason == "duration"
        assert report.stopped_at == report.started_at + 0.3
        assert report.attempts > 0
        assert all(a.t_start < report.started_at + 0.3 for a in gen.attempts)

    run(scenario(), loop)


def test_async_stop_windows_and_marks(loop: str) -> None:
    async def scenario() -> None:
        server = HttpServer()
        async with serving(server) as port:
            gen = LoadGenerator(("127.0.0.1", port), http_post(), clients=4, duration=DEADLINE)
            async with gen:
                await gen.wait_for_successes(10, timeout=DEADLINE)
                gen.mark("warm")
                with gen.window("swap 1"):
                    await gen.wait_for_successes(10, timeout=DEADLINE)
                gen.begin("swap 2")
                await gen.wait_for_successes(10, timeout=DEADLINE)
            report = gen.report()
        assert report.stop_reason == "stopped"
        assert report.failed == 0 and report.ok >= 30
        assert report.acknowledged == server.counter
        assert [m[0] for m in report.marks] == ["warm"]
        swap1, swap2 = report.windows
        assert (swap1.label, swap1.ended) == ("swap 1", True)
        assert (swap2.label, swap2.ended) == ("swap 2", False)
        assert swap1.ok >= 10 and swap2.end == report.duration
        with pytest.raises(LoadError, match="ended before"):
            await gen.wait_for_successes(1, timeout=DEADLINE)

    run(scenario(), loop)


def test_background_load_stop_and_windows() -> None:
    with ServerThread(HttpServer()) as srv:
        with BackgroundLoad(("127.0.0.1", srv.port), http_post(), clients=4, duration=60) as bg:
            bg.wait_for_successes(20, timeout=DEADLINE)
            bg.mark("warm")
            with bg.window("swap 1"):
                bg.wait_for_successes(20, timeout=DEADLINE)
            report = bg.stop()
        assert bg.stop() is report  # idempotent
        assert bg.report is report
        final = fetch_sync(("127.0.0.1", srv.port), http_get_int())
    assert report.stop_reason == "stopped"
    assert report.failed == 0 and report.ok >= 40
    assert report.acknowledged == final == srv.server.counter
    assert report.windows[0].label == "swap 1" and report.windows[0].ended
    assert report.marks[0][0] == "warm"


def test_background_stop_is_bounded_with_requests_in_flight() -> None:
    server = HttpServer("silent")
    server.expect = 3
    with ServerThread(server) as srv:
        bg = BackgroundLoad(("127.0.0.1", srv.port), http_get(), clients=3, timeout=2.0)
        with bg:
            assert server.received.wait(DEADLINE)
            report = bg.stop()
    # Each client finished the request it had in flight (timing out), and issued no other.
    assert report.failures == {"timeout": 3}
    assert report.stop_reason == "stopped"


def test_background_load_reraises_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_record(self: LoadGenerator, *args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(LoadGenerator, "_record", broken_record)
    with ServerThread(HttpServer()) as srv:
        bg = BackgroundLoad(("127.0.0.1", srv.port), http_get(), clients=2, duration=DEADLINE)
        bg.start()
        with pytest.raises(LoadError, match="load generator failed") as caught:
            bg.wait()
    causes: list[BaseException] = []
    exc: BaseException | None = caught.value
    while exc is not None:
        causes.append(exc)
        if isinstance(exc, BaseExceptionGroup):
            causes.extend(exc.exceptions)
        exc = exc.__cause__
    assert any(isinstance(e, RuntimeError) and str(e) == "boom" for e in causes)


def test_background_exit_keeps_the_body_exception() -> None:
    with ServerThread(HttpServer()) as srv:
        with pytest.raises(KeyError), BackgroundLoad(("127.0.0.1", srv.port), http_get()) as bg:
            bg.wait_for_successes(1, timeout=DEADLINE)
            raise KeyError("body")
        assert bg.report is not None and bg.report.stop_reason == "stopped"


def test_fetch_failures_are_typed(closed_port: int) -> None:
    with pytest.raises(RequestFailed) as caught:
        fetch_sync(("127.0.0.1", closed_port), http_get_int())
    assert caught.value.outcome is Outcome.REFUSED
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_cli_prints_a_report(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread(HttpServer()) as srv:
        target = f"127.0.0.1:{srv.port}"
        common = ["--connect", target, "--clients", "2", "--max-requests", "20"]
        assert loadgen.main([*common, "--kind", "http-post", "--mode", "close"]) == 0
        text = capsys.readouterr().out
        assert loadgen.main([*common, "--json", "--duration", "30"]) == 0
        data = json.loads(capsys.readouterr().out)
    assert "ok 20 (" in text and "acknowledged 20" in text
    assert (data["attempts"], data["ok"], data["mode"]) == (20, 20, "keepalive")


def test_cli_fail_on_error(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--connect", f"127.0.0.1:{closed_port}", "--max-requests", "2", "--fail-on-error"]
    assert loadgen.main(argv) == 1
    assert "refused 2" in capsys.readouterr().out
    assert loadgen.main(["--connect", "localhost:1"]) == 2


# --- the HTTP reader ----------------------------------------------------------------------


def read(data: bytes, eof: bool = True) -> loadgen.HttpResponse:
    async def go() -> loadgen.HttpResponse:
        reader = asyncio.StreamReader(limit=1024)
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await read_http_response(reader)

    return run(go())


def test_reader_content_length_and_reuse() -> None:
    assert read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n42") == (200, b"42", True)
    closing = b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n"
    assert read(closing).reusable is False
    assert read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").reusable is False
    http10_ka = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    assert read(http10_ka).reusable is True


def test_reader_chunked_eof_framed_and_interim() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2;x=1\r\n12\r\n1\r\n3\r\n0\r\nT: 1\r\n\r\n"
    )
    assert read(chunked) == (200, b"123", True)
    assert read(b"HTTP/1.1 200 OK\r\n\r\nuntil eof") == (200, b"until eof", False)
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    assert read(interim, eof=False) == (204, b"", True)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n12",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 2000 + b"\r\n\r\n",
    ],
)
def test_reader_rejects_malformed_responses(data: bytes) -> None:
    with pytest.raises(ResponseError):
        read(data)


def test_reader_eof_before_and_during_a_response() -> None:
    with pytest.raises(ConnectionClosed, match="before any response byte"):
        read(b"")
    with pytest.raises(ConnectionClosed, match="mid-response"):
        read(b"HTTP/1.1 200 OK\r\nContent-")
    with pytest.raises(ConnectionClosed, match="mid-response"):
        read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n12")


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (TimeoutError(), Outcome.TIMEOUT),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Outcome.REFUSED),
        (OSError(errno.ECONNREFUSED, "refused"), Outcome.REFUSED),
        (ConnectionResetError(errno.ECONNRESET, "reset"), Outcome.RESET),
        (BrokenPipeError(errno.EPIPE, "pipe"), Outcome.RESET),
        (OSError(errno.ECONNABORTED, "aborted"), Outcome.RESET),
        (ConnectionClosed("closed before any response byte"), Outcome.EOF),
        (asyncio.IncompleteReadError(b"x", 3), Outcome.EOF),
        (ResponseError("status 500"), Outcome.BAD_RESPONSE),
        (FileNotFoundError(errno.ENOENT, "gone"), Outcome.OTHER),
        (RuntimeError("odd"), Outcome.OTHER),
    ],
)
def test_classify(exc: BaseException, outcome: Outcome) -> None:
    assert classify(exc)[0] is outcome


def test_classify_keeps_text_for_other() -> None:
    assert classify(RuntimeError("odd")) == (Outcome.OTHER, "RuntimeError: odd")
    assert classify(ConnectionResetError(errno.ECONNRESET, "x")) == (Outcome.RESET, "ECONNRESET")


# --- targets, requests, options -----------------------------------------------------------


def test_parse_target() -> None:
    assert parse_target("127.0.0.1:8000") == Endpoint(host="127.0.0.1", port=8000)
    assert parse_target("[::1]:8000") == Endpoint(host="::1", port=8000)
    assert parse_target("unix:/run/a.sock") == Endpoint(path="/run/a.sock")
    assert parse_target("/run/a.sock") == Endpoint(path="/run/a.sock")
    assert str(parse_target("[::1]:80")) == "[::1]:80"
    for bad in ["localhost:80", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "::1:80"]:
        with pytest.raises(LoadConfigError):
            parse_target(bad)
    with pytest.raises(LoadConfigError, match="must contain '/'"):
        Endpoint.of("127.0.0.1:8000")


def test_request_encoding_and_validation() -> None:
    ep = Endpoint(host="::1", port=81)
    post = http_post("/incr").encode(ep, loadgen.Mode.KEEPALIVE)
    assert post.startswith(b"POST /incr HTTP/1.1\r\nHost: [::1]:81\r\n")
    assert b"Content-Length: 0\r\n" in post and post.endswith(b"\r\n\r\n")
    assert b"Connection: close\r\n" in http_get().encode(ep, loadgen.Mode.CLOSE)
    assert line("GET").encode(ep, loadgen.Mode.CLOSE) == b"GET\n"
    assert line("INCR").counts and not line("GET").counts
    for bad_path in ["no-slash", "/a b", "/a\r\nX: y"]:
        with pytest.raises(LoadConfigError):
            http_get(bad_path)
    with pytest.raises(LoadConfigError):
        line("A\nB")


@pytest.mark.parametrize(
    "options",
    [
        {"clients": 0},
        {"duration": 0},
        {"duration": float("inf")},
        {"max_requests": 0},
        {"timeout": 0},
        {"failure_pause": -1},
        {"mode": "pipelined"},
    ],
)
def test_invalid_options(options: dict[str, Any]) -> None:
    with pytest.raises(LoadConfigError):
        LoadGenerator(("127.0.0.1", 80), http_get(), **options)


# --- pure analysis ------------------------------------------------------------------------


def test_longest_gap_exact() -> None:
    assert longest_gap([1.5, 2.0, 4.0, 4.25], 1.0, 5.0) == Gap(2.0, 2.0, 4.0)
    assert longest_gap([4.25, 1.5, 2.0, 4.0], 1.0, 5.0) == Gap(2.0, 2.0, 4.0)  # unsorted
    assert longest_gap([], 1.0, 3.5) == Gap(2.5, 1.0, 3.5)  # no success: the whole span
    assert longest_gap([1.25], 1.0, 2.0) == Gap(0.75, 1.25, 2.0)  # trailing edge
    assert longest_gap([1.75], 1.0, 2.0) == Gap(0.75, 1.0, 1.75)  # leading edge
    assert longest_gap([0.5, 9.0], 1.0, 2.0) == Gap(1.0, 1.0, 2.0)  # outside points ignored
    assert longest_gap([1.5], 1.0, 2.0) == Gap(0.5, 1.0, 1.5)  # ties: the earliest
    assert longest_gap([1.0], 2.0, 2.0) == Gap(0.0, 2.0, 2.0)


def test_window_span_arithmetic() -> None:
    assert window_span(5.0, 6.0, 0.0, 20.0) == (4.0, 7.0)
    assert window_span(0.5, 6.0, 0.0, 20.0) == (0.0, 7.0)  # clipped at the start
    assert window_span(5.0, 19.5, 0.0, 20.0) == (4.0, 20.0)  # clipped at the end
    assert window_span(5.0, 6.0, 0.0, 20.0, margin=0.25) == (4.75, 6.25)
    assert window_span(30.0, 31.0, 0.0, 20.0) == (20.0, 20.0)  # after the run: empty
    assert window_span(-5.0, -3.0, 0.0, 20.0) == (0.0, 0.0)  # before the run: empty


def test_percentile_nearest_rank() -> None:
    values = [0.0625, 0.125, 0.25, 0.375, 0.5, 1.0]
    assert percentile(values, 50) == 0.25
    assert percentile(values, 99) == 1.0
    assert percentile(values, 0) == 0.0625
    assert percentile([], 50) is None


def synthetic_report(shuffle: bool = False) -> loadgen.LoadReport:
    ok = [  # (t_end, latency, client, value)
        (100.5, 0.25, 0, 1),
        (101.0, 0.5, 1, 2),
        (103.0, 0.125, 0, 3),
        (103.25, 0.375, 1, 3),  # duplicate of 3
        (106.0, 0.0625, 0, 2),  # duplicate of 2, and client 0 went back from 3
        (109.5, 1.0, 1, 6),
    ]
    attempts = [Attempt(c, t - lat, t, Outcome.OK, False, v) for t, lat, c, v in ok]
    attempts += [
        Attempt(2, 103.75, 104.0, Outcome.EOF, True, None),
        Attempt(3, 104.25, 104.5, Outcome.REFUSED, False, None),
        Attempt(2, 109.0, 111.0, Outcome.TIMEOUT, False, None),  # ends after the stop
    ]
    if shuffle:
        random.Random(7).shuffle(attempts)
    info = RunInfo(started_at=100.0, stopped_at=110.0, stop_reason="stopped", counts=True)
    windows = [
        Window("early", 99.0, 99.5),
        Window("swap 1", 103.5, 104.25),
        Window("swap 2", 109.5, None),
    ]
    return summarise(AttemptLog.from_attempts(attempts), info, [("warm", 101.0)], windows)


@pytest.mark.parametrize("shuffle", [False, True])
def test_summarise_synthetic_records(shuffle: bool) -> None:
    r = synthetic_report(shuffle)
    assert (r.attempts, r.ok, r.failed, r.duration) == (9, 6, 3, 10.0)
    assert r.failures == {"refused": 1, "eof": 1, "timeout": 1}
    assert (r.failed_on_reused, r.failures_on_reused) == (1, {"eof": 1})
    assert (r.latency_p50, r.latency_p99, r.latency_max) == (0.25, 1.0, 1.0)
    assert (r.longest_gap, r.longest_gap_at) == (3.5, 6.0)
    assert r.marks == (("warm", 1.0),)
    assert (r.acknowledged, r.max_acknowledged) == (6, 6)
    assert (r.duplicate_values, r.value_regressions) == (2, 1)

    early, swap1, swap2 = r.windows
    assert (early.span_start, early.span_end, early.ok, early.longest_gap) == (0.0, 0.5, 1, 0.5)
    assert (swap1.begin, swap1.end, swap1.span_start, swap1.span_end) == (3.5, 4.25, 2.5, 5.25)
    assert (swap1.ok, swap1.failed, swap1.failed_on_reused) == (2, 2, 1)
    assert swap1.failures == {"refused": 1, "eof": 1}
    assert swap1.longest_gap == 2.0  # 103.25 -> the span's end at 105.25
    assert swap1.latency_p99 == 0.375
    assert swap1.ok_per_s == pytest.approx(2 / 2.75)
    assert (swap2.ended, swap2.end, swap2.span_start, swap2.span_end) == (False, 10.0, 8.5, 10.0)
    assert (swap2.ok, swap2.failed, swap2.longest_gap) == (1, 0, 1.0)
    assert r.failed_in_windows == 2  # the timeout ended after the run

    # Outside the merged spans (4.75 s of 10): the successes at 101.0 and 106.0.
    assert r.ok_per_s_outside == pytest.approx(2 / 5.25)
    assert r.latency_p99_outside == 0.5
    assert r.inside_outside_ratio == pytest.approx((4 / 4.75) / (2 / 5.25))
    assert "swap 1" in r.format() and json.loads(json.dumps(r.to_dict()))["ok"] == 6


def test_summarise_empty_run() -> None:
    r = summarise(AttemptLog(), RunInfo(started_at=5.0, stopped_at=7.0, stop_reason="stopped"))
    assert (r.attempts, r.longest_gap, r.latency_p50, r.acknowledged) == (0, 2.0, None, None)
    assert "ended by stopped" in r.format()


def test_attempt_log_round_trip() -> None:
    attempts = [
        Attempt(0, 1.0, 1.5, Outcome.OK, False, 2**62),
        Attempt(65535, 2.0, 2.5, Outcome.OTHER, True, None),
    ]
    log = AttemptLog.from_attempts(attempts)
    assert list(log) == attempts and len(log) == 2 and log[1].latency == 0.5


def test_timeline_rules() -> None:
    tl = Timeline(itertools.count(1.0).__next__)  # 1.0, 2.0, ... one tick per call
    tl.begin("swap 1")
    with pytest.raises(LoadError, match="already exists"):
        tl.begin("swap 1")
    tl.end("swap 1")
    with pytest.raises(LoadError, match="not open"):
        tl.end("swap 1")
    with pytest.raises(LoadError, match="not open"):
        tl.end("never")
    with pytest.raises(ValueError), tl.window("swap 2"):
        raise ValueError("the body failed; the window still closes")
    assert tl.windows() == [Window("swap 1", 1.0, 3.0), Window("swap 2", 6.0, 7.0)]
    tl.begin("swap 3", at=10.0)
    with pytest.raises(LoadError, match="before it began"):
        tl.end("swap 3", at=9.0)
