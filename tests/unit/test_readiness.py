"""Probe readiness and the ready_timeout message, against real loopback sockets in-process.

The probe listener here plays the part of a worker's private probe socket: the test accepts
on it (or does not) the way the worker would.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from swapd.config import build
from swapd.supervisor import readiness
from swapd.supervisor.readiness import Probe

CMD = {"command": ["app"], "control": "/tmp/x.sock"}


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def serve_once(sock: socket.socket, answer: bytes | None) -> None:
    """Accept one connection; read the request head; send `answer` (None: close at once)."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(sock)
    with conn:
        if answer is None:
            return
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await loop.sock_recv(conn, 4096)
            if not chunk:
                return
            data += chunk
        assert data.startswith(b"GET /healthz HTTP/1.1\r\n")
        assert b"\r\nConnection: close\r\n" in data
        await loop.sock_sendall(conn, answer)


@pytest.mark.parametrize(
    ("answer", "ok", "note"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True, "GET /healthz answered 200"),
        (b"HTTP/1.0 302 Found\r\n\r\n", True, "GET /healthz answered 302"),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", False, "GET /healthz answered 503"),
        (b"SSH-2.0-OpenSSH\r\n", False, "not an HTTP/1.x status line: 'SSH-2.0-OpenSSH\\r\\n'"),
        (None, False, "connection closed before an answer"),
        (b"HTTP/1.1 200", False, "answer cut short: 'HTTP/1.1 200'"),
        (b"HTTP/1.1 200 " + b"x" * 5000, False, "status line longer than 4096 bytes"),
    ],
)
def test_http_attempt(answer: bytes | None, ok: bool, note: str) -> None:
    async def main() -> tuple[bool, str]:
        sock = listener()
        with sock:
            server = asyncio.ensure_future(serve_once(sock, answer))
            result = await asyncio.wait_for(
                readiness._attempt(Probe(sock, "http:/healthz", 5.0)), 10)
            await asyncio.wait_for(server, 10)
            return result

    assert asyncio.run(main()) == (ok, note)


def test_http_attempt_waits_in_the_backlog_until_the_worker_accepts() -> None:
    """A probe sent before the server accepts is answered once it does: no polling."""
    async def main() -> None:
        sock = listener()
        with sock:
            attempt = asyncio.ensure_future(readiness._attempt(Probe(sock, "http:/healthz", 5)))
            done, _ = await asyncio.wait({attempt}, timeout=0.3)
            assert not done, "ready before anyone accepted"
            await serve_once(sock, b"HTTP/1.1 204 No Content\r\n\r\n")
            assert await asyncio.wait_for(attempt, 10) == (True, "GET /healthz answered 204")

    asyncio.run(main())


def test_tcp_attempt_is_ready_only_once_accepted() -> None:
    async def main() -> None:
        sock = listener()
        with sock:
            attempt = asyncio.ensure_future(readiness._attempt(Probe(sock, "tcp", 5)))
            done, _ = await asyncio.wait({attempt}, timeout=0.3)
            assert not done, "a queued connection was taken for an accepted one"
            conn, _ = await asyncio.get_running_loop().sock_accept(sock)
            with conn:
                assert await asyncio.wait_for(attempt, 10) == (True, "connection accepted")

    asyncio.run(main())


class FakeWorker:
    """What readiness reads of a WorkerProcess."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tag = "gen=2 worker=0 pid=4242"
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[object] = loop.create_future()
        self.ready_via: str | None = None
        self.speaks_channel = False
        self.status_text = ""
        self.tail: deque[str] = deque()

    def mark_ready(self, info: dict[str, Any]) -> None:
        if not self.ready.done():
            self.ready.set_result(info)


def run_probe(spec: str, server: Callable[[socket.socket], Awaitable[None]] | None,
              ready_timeout: float) -> tuple[FakeWorker, str]:
    cfg = build({**CMD, "readiness": "probe", "probe": spec,
                 "timeouts": {"ready": ready_timeout, "probe": 0.2}}, {})

    async def main() -> tuple[FakeWorker, str]:
        w = FakeWorker(asyncio.get_running_loop())
        sock = readiness.open_probe(cfg)
        assert sock is not None
        sock.setblocking(False)
        serving = asyncio.ensure_future(server(sock)) if server else None
        readiness.start_probe(w, cfg, sock)  # type: ignore[arg-type]
        probe = readiness._probes[w]  # type: ignore[index]
        assert probe.task is not None
        await asyncio.wait_for(probe.task, ready_timeout + 5)
        reason = readiness.not_ready_reason(w, cfg, ready_timeout)  # type: ignore[arg-type]
        if serving is not None:
            serving.cancel()
        assert sock.fileno() == -1, "the probe closes its listener when it is done"
        return w, reason

    return asyncio.run(main())


def test_probe_retries_until_the_app_is_healthy() -> None:
    async def server(sock: socket.socket) -> None:
        await serve_once(sock, b"HTTP/1.1 503 Starting\r\n\r\n")
        await serve_once(sock, b"HTTP/1.1 200 OK\r\n\r\n")

    w, _ = run_probe("http:/healthz", server, 10)
    assert w.ready.result() == {"standby": False, "via": "probe"}
    assert w.ready_via == "probe"


def test_probe_gives_up_at_ready_timeout_and_says_why() -> None:
    async def server(sock: socket.socket) -> None:
        while True:
            await serve_once(sock, b"HTTP/1.1 500 Broken\r\n\r\n")

    w, reason = run_probe("http:/healthz", server, 0.8)
    assert not w.ready.done()
    assert reason.startswith("gen=2 worker=0 pid=4242 not ready within 0.8s (ready_timeout): "
                             "waiting for GET /healthz to answer 2xx or 3xx on its private "
                             "probe socket 127.0.0.1:")
    assert "last: GET /healthz answered 500; it printed nothing" in reason


def test_a_probe_nobody_accepts_times_out_per_attempt() -> None:
    w, reason = run_probe("tcp", None, 0.7)
    assert not w.ready.done()
    assert "waiting for the worker to accept a connection" in reason
    assert "last: no answer within 0.2s (probe timeout)" in reason


def test_probe_stops_when_the_worker_exits() -> None:
    cfg = build({**CMD, "readiness": "probe", "probe": "tcp"}, {})

    async def main() -> None:
        w = FakeWorker(asyncio.get_running_loop())
        sock = readiness.open_probe(cfg)
        assert sock is not None
        readiness.start_probe(w, cfg, sock)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        w.exited.set_result("exited with status 1")
        task = readiness._probes[w].task  # type: ignore[index]
        assert task is not None
        await asyncio.wait_for(task, 5)  # well before ready_timeout (30 s)
        assert not w.ready.done()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("channel", "status", "tail", "expected"),
    [
        (False, "", [], "it sent nothing: a server that never sends READY=1 (uvicorn, "
                        "hypercorn, aiohttp) needs `python -m swapd.servers.NAME` or "
                        "--readiness probe, see docs/servers.md; it printed nothing"),
        (False, "loading models", ["booting", "loaded 3 of 9", ""],
         "it sent STATUS='loading models' but not READY=1; last output: 'loaded 3 of 9'"),
        (True, "", ["x"], "it opened the channel (swapd.worker) but has not called ready(); "
                          "last output: 'x'"),
    ],
)
def test_notify_timeout_message(channel: bool, status: str, tail: list[str],
                                expected: str) -> None:
    cfg = build(CMD, {})
    w = FakeWorker(asyncio.new_event_loop())
    w.speaks_channel, w.status_text = channel, status
    w.tail.extend(tail)
    reason = readiness.not_ready_reason(w, cfg, 2)  # type: ignore[arg-type]
    assert reason == ("gen=2 worker=0 pid=4242 not ready within 2s (ready_timeout): waiting for "
                      "READY=1 on its NOTIFY_SOCKET or `ready` on the swapd channel "
                      "(readiness=notify); " + expected)


def test_an_exit_before_ready_says_the_last_thing_the_worker_printed() -> None:
    """Operator review L5: the one-line reason carries the error, not only the status."""
    loop = asyncio.new_event_loop()
    try:
        w = FakeWorker(loop)
        w.exited.set_result("exited with status 1")
        w.tail.extend(["Traceback (most recent call last):", '  File "app.py", line 3',
                       "\x1b[31mRuntimeError: db url\tmissing\x1b[0m\r", "   ", ""])
        assert readiness.exited_reason(w, "before it was ready") == (  # type: ignore[arg-type]
            "gen=2 worker=0 pid=4242 exited with status 1 before it was ready: "
            "RuntimeError: db url missing")
        w.tail.append("E" * 5000)  # bounded, one line
        last = readiness.last_words(w)  # type: ignore[arg-type]
        assert last is not None and len(last) == readiness.LAST_WORDS_MAX
        assert last.endswith("…") and "\n" not in last
        w.tail.clear()  # nothing printed (or --worker-output passthrough): the status alone
        assert readiness.exited_reason(w, "before it was ready") == (  # type: ignore[arg-type]
            "gen=2 worker=0 pid=4242 exited with status 1 before it was ready")
    finally:
        loop.close()
