"""`swapd serve` with a Starlette app under a real `swapd run`: ASGI details, bad input, patches,
lifespan, drain. One supervisor for the module (tests run in file order; the last ones swap).
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.integration.serve_client import RawHTTP, RawWebSocket, frame, get
from tests.integration.supervised import ROOT, Supervised, wait_pid_gone

APPS = ROOT / "tests" / "apps"
SERVE_ARGS = ["--timeout-request-head", "1", "--timeout-read", "1", "--limit-request-body",
              "100000", "--ws-max-size", "65536", "--timeout-keep-alive", "60"]


class Served:
    def __init__(self, sup: Supervised, events: Path, fail: Path) -> None:
        self.sup = sup
        self.events = events
        self.fail = fail
        self.address = sup.address()
        self.url = f"http://{self.address[0]}:{self.address[1]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    events, fail = tmp / "events", tmp / "fail-startup"
    sup = Supervised(tmp, SERVE_ARGS, args=["--app", "serve_app:app", "--cwd", str(APPS),
                                            "--drain-timeout", "4", "--idle-grace", "1.5"],
                     env={"SERVE_EVENTS": str(events), "SERVE_FAIL_STARTUP": str(fail)})
    try:
        sup.start()
        yield Served(sup, events, fail)
    finally:
        sup.stop()


def test_http_basics_with_httpx(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        first = client.get("/")
        assert first.status_code == 200 and first.text.startswith("hello ")
        assert first.headers["server"] == "swapd" and "date" in first.headers
        again = client.get("/")
        assert again.text == first.text, "the same worker"
        assert client.post("/echo", content=b"x" * 5000).content == b"x" * 5000
        head = client.head("/")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(first.content))
        stream = client.get("/stream")
        assert stream.headers["transfer-encoding"] == "chunked"
        assert stream.text == "chunk 0\nchunk 1\nchunk 2\n"
        assert client.get("/state").text == "42", "lifespan state reaches every request"
        view = client.get("/scope/a%20b?x=1&y=%20", headers={"x-forwarded-proto": "https",
                                                              "x-forwarded-for": "203.0.113.9"})
        # Proxy headers are believed from 127.0.0.1 (the default --forwarded-allow-ips).
        assert view.text == "https 203.0.113.9  /scope/a b x=1&y=%20 1.1", view.text


def test_chunked_request_body_and_expect_100_continue(served: Served) -> None:
    def parts() -> Iterator[bytes]:
        yield b"first,"
        yield b"second"

    with httpx.Client(base_url=served.url, timeout=10) as client:
        assert client.post("/echo", content=parts()).content == b"first,second"
    raw = RawHTTP(served.address)
    try:
        raw.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
        # (http.client skips interim responses: read this one by hand)
        assert raw.file.readline() == b"HTTP/1.1 100 Continue\r\n", "asked for the body"
        assert raw.file.readline() == b"\r\n"
        raw.send(b"hello")
        status, _, body = raw.response("POST")
        assert (status, body) == (200, b"hello")
    finally:
        raw.close()


def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    raw = RawHTTP(served.address)
    try:
        raw.send(get("/state") + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                 + get("/stream") + get("/state", "Connection: close"))
        assert raw.response()[2] == b"42"
        assert raw.response("POST")[2] == b"abc"
        assert raw.response()[2] == b"chunk 0\nchunk 1\nchunk 2\n"
        status, headers, body = raw.response()
        assert (status, body, headers["connection"]) == (200, b"42", "close")
        assert raw.at_eof()
    finally:
        raw.close()


def test_http_1_0_gets_its_answer_and_the_connection_closes(served: Served) -> None:
    raw = RawHTTP(served.address)
    try:
        raw.send(b"GET /state HTTP/1.0\r\n\r\n")
        status, headers, body = raw.response()
        assert (status, body, headers["connection"]) == (200, b"42", "close")
        assert raw.at_eof()
    finally:
        raw.close()


def _disconnects(served: Served) -> int:
    return int(httpx.get(served.url + "/disconnects", timeout=10).text)


def test_app_sees_http_disconnect_when_the_client_goes(served: Served) -> None:
    before = _disconnects(served)
    raw = RawHTTP(served.address)
    raw.send(get("/wait-disconnect"))
    assert b"waiting" in raw.sock.recv(4096)
    raw.close()
    deadline = time.monotonic() + 10
    while _disconnects(served) == before:  # each poll is a request: an event, not a sleep
        assert time.monotonic() < deadline, "the app never received http.disconnect"


def _poll(served: Served, path: str, until: Callable[[str], bool], what: str) -> str:
    """GET `path` until `until(body)`; each poll is a request (an event), not a sleep."""
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=served.url, timeout=10) as client:
        for _ in range(100_000):  # bounded; the deadline ends it much earlier
            text = client.get(path).text
            if until(text):
                return text
            assert time.monotonic() < deadline, what
    raise AssertionError(what)


def test_streaming_generator_ends_when_the_client_goes(served: Served) -> None:
    """An endless SSE generator (Starlette StreamingResponse): the client reads one event
    and closes; send() then raises OSError (ASGI 2.4), so the generator's `finally` runs."""
    before = httpx.get(served.url + "/sse-closed", timeout=10).text.split()
    raw = RawHTTP(served.address)
    try:
        raw.send(get("/sse"))
        assert b"data: 0" in raw.sock.recv(4096)
    finally:
        raw.close()
    text = _poll(served, "/sse-closed", lambda t: len(t.split()) > len(before),
                 "the SSE generator still runs after its client left")
    assert int(text.split()[-1]) < 1000, "it ended soon after, not at its natural end"


def test_a_fin_is_seen_while_the_app_streams_without_receiving(served: Served) -> None:
    """The client of a streaming response closes; the app, which never calls receive(),
    sends once more: that very send raises OSError (the server read the FIN), instead of
    succeeding into a dead socket."""
    raw = RawHTTP(served.address)
    try:
        raw.send(get("/after-fin"))
        assert b"first" in raw.sock.recv(4096)
    finally:
        raw.close()
    assert httpx.get(served.url + "/after-fin/go", timeout=10).text == "go"
    text = _poll(served, "/after-fin/results", lambda t: bool(t), "the app never sent again")
    assert text == "ClientDisconnected"


@pytest.mark.parametrize(("request_bytes", "status", "option"), [
    (b"GARBAGE\r\n\r\n", 400, None),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n", 400, None),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414,
     "limit=8190 raise_with=--limit-request-line"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101))
     + b"\r\n", 431, "limit=100 raise_with=--limit-request-fields"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n", 431,
     "limit=65536 raise_with=--limit-request-head"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n", 413,
     "limit=100000 raise_with=--limit-request-body"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"".join(b"%x\r\n%s\r\n" % (50000, b"z" * 50000) for _ in range(3)) + b"0\r\n\r\n", 413,
     "limit=100000 raise_with=--limit-request-body"),
], ids=["malformed", "bad-content-length", "uri-too-long", "too-many-headers", "huge-header",
        "body-too-large", "chunked-body-too-large"])
def test_bad_input_is_answered_and_closes_only_that_connection(
        served: Served, request_bytes: bytes, status: int, option: str | None) -> None:
    """...and a refusal by one of the bounds (which uvicorn does not have) names, in its
    log line, the option that raises it."""
    bystander = httpx.Client(base_url=served.url, timeout=10)
    mark = served.sup.log_mark()
    try:
        assert bystander.get("/state").status_code == 200
        raw = RawHTTP(served.address)
        try:
            raw.send(request_bytes)
            got, headers, _ = raw.response("GET")
            assert got == status
            assert headers["connection"] == "close"
            assert raw.at_eof()
        finally:
            raw.close()
        assert bystander.get("/state").status_code == 200, "another connection is untouched"
    finally:
        bystander.close()
    line = served.sup.wait_log(rf"event=request\.(rejected|aborted) status={status} .*",
                               start=mark).group(0)
    if option is not None:
        assert option in line, line


@pytest.mark.parametrize("path", ["/boom", "/raw-boom"])
def test_app_exception_gives_500_and_its_traceback_in_the_log(served: Served,
                                                             path: str) -> None:
    """Starlette answers 500 itself and re-raises (the connection stays usable); a raw app
    that raises before answering gets the server's 500 and the connection closes."""
    mark = served.sup.log_mark()
    raw = RawHTTP(served.address)
    try:
        raw.send(get(path))
        status, headers, _ = raw.response()
        assert status == 500
        if path == "/boom":
            raw.send(get("/state"))
            assert raw.response()[2] == b"42"
        else:
            assert headers["connection"] == "close" and raw.at_eof()
    finally:
        raw.close()
    served.sup.wait_log(rf"event=app.error method=GET target='{path}'", start=mark)
    served.sup.wait_log(r"ValueError: boom", start=mark)


def test_slow_request_head_times_out_without_hurting_others(served: Served) -> None:
    mark = served.sup.log_mark()
    slow = RawHTTP(served.address)
    try:
        slow.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # ... and never the blank line
        assert httpx.get(served.url + "/state", timeout=10).text == "42"
        status, headers, _ = slow.response()
        assert (status, headers["connection"]) == (408, "close")
        assert slow.at_eof()
    finally:
        slow.close()
    served.sup.wait_log(r"event=request\.rejected status=408 reason='request head timed out' "
                        r"limit=1 raise_with=--timeout-request-head", start=mark)


def test_slow_request_body_times_out(served: Served) -> None:
    slow = RawHTTP(served.address)
    try:
        slow.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        status, _, _ = slow.response("POST")
        assert status == 408
        assert slow.at_eof()
    finally:
        slow.close()


def test_websocket_echo_with_the_websockets_client(served: Served) -> None:
    async def talk() -> list[str]:
        uri = f"ws://{served.address[0]}:{served.address[1]}/ws"
        async with websockets.connect(uri) as ws:
            replies = []
            for text in ("one", "two"):
                await ws.send(text)
                replies.append(str(await ws.recv()))
            return replies

    assert asyncio.run(talk()) == ["echo one", "echo two"]


def test_websocket_frames_sent_with_the_handshake_are_not_lost(served: Served) -> None:
    ws = RawWebSocket(served.address, early=frame(0x1, b"early"))
    try:
        assert ws.read_frame() == (0x1, b"echo early")
    finally:
        ws.close()


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade",
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")


@pytest.mark.parametrize(("path", "extra", "status", "reason", "body", "header"), [
    ("/ws-deny", ("Sec-WebSocket-Version: 13",), 401, "Unauthorized", b"nope",
     ("www-authenticate", "Bearer")),
    ("/ws-deny-streamed", ("Sec-WebSocket-Version: 13",), 403, "Forbidden",
     b"streamed denial", ("transfer-encoding", "chunked")),
    ("/ws-refuse", ("Sec-WebSocket-Version: 13",), 403, "Forbidden", b"Forbidden\n", None),
    ("/ws-crash", ("Sec-WebSocket-Version: 13",), 500, "Internal Server Error",
     b"Internal Server Error\n", None),
    ("/ws", ("Sec-WebSocket-Version: 8",), 426, "Upgrade Required", None,
     ("sec-websocket-version", "13")),
], ids=["denial", "streamed-denial", "close-before-accept", "crash-before-accept",
        "bad-version"])
def test_websocket_handshake_answers(served: Served, path: str, extra: tuple[str, ...],
                                     status: int, reason: str, body: bytes | None,
                                     header: tuple[str, str] | None) -> None:
    """The denial response (Starlette's send_denial_response, ASGI extension
    websocket.http.response) reaches the client as the app wrote it; every refused handshake
    is a proper HTTP answer: reason phrase, date and server, `connection: close`."""
    raw = RawHTTP(served.address)
    try:
        raw.send(get(path, *UPGRADE, *extra))
        resp = http.client.HTTPResponse(raw)  # type: ignore[arg-type]
        resp.begin()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        got = resp.read()
        assert (resp.status, resp.reason) == (status, reason)
        assert headers["connection"] == "close" and "date" in headers
        assert headers["server"] == "swapd"
        if body is not None:
            assert got == body
        if header is not None:
            assert headers[header[0]] == header[1]
        assert raw.at_eof()
    finally:
        raw.close()
    assert httpx.get(served.url + "/state", timeout=10).text == "42"


@pytest.mark.parametrize(("kind", "code"), [
    ("unmasked", 1002),
    ("too-big", 1009),
    ("bad-utf8", 1007),
])
def test_websocket_protocol_errors_close_with_the_right_code(served: Served, kind: str,
                                                             code: int) -> None:
    ws = RawWebSocket(served.address)
    try:
        if kind == "unmasked":
            ws.send_frame(0x1, b"hi", masked=False)
        elif kind == "too-big":
            ws.send_frame(0x2, b"x" * 70000)
        else:
            ws.send_frame(0x1, b"\xff\xfe")
        assert ws.close_code() == code
        assert ws.http.at_eof()
    finally:
        ws.close()
    assert httpx.get(served.url + "/state", timeout=10).text == "42"


def test_swapd_patch_changes_a_served_function(served: Served, tmp_path: Path) -> None:
    source = (APPS / "serve_app.py").read_text()
    fix = tmp_path / "serve_app.py"
    fix.write_text(source.replace('return "hello"', 'return "patched"'))
    proc = served.sup.cli("patch", str(fix), "--module", "serve_app")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        assert httpx.get(served.url + "/", timeout=10).text.startswith("patched ")
    finally:
        proc = served.sup.cli("patch", "--rollback")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert httpx.get(served.url + "/", timeout=10).text.startswith("hello ")


def test_failed_lifespan_startup_fails_the_swap(served: Served) -> None:
    old = served.sup.active_pids()
    served.fail.write_text("x")
    try:
        proc = served.sup.cli("upgrade")
    finally:
        served.fail.unlink()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # The worker's last word is the one-line reason (the exception's line, not Starlette's
    # traceback text in a field); the traceback was logged as lines of its own before it.
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith("event=serve.start_failed error='lifespan startup failed: "
                              "RuntimeError: startup refused: the database is unreachable "
                              "(simulated)'"), proc.stderr
    assert "RuntimeError: startup refused: the database is unreachable (simulated)" in lines
    assert "\\n" not in proc.stderr, "a multi-line text squeezed into one log field"
    assert served.sup.active_pids() == old
    assert httpx.get(served.url + "/", timeout=10).text == f"hello {old[0]}"


@pytest.mark.slow
def test_drain_answers_with_connection_close_closes_silent_ones_and_1012s_websockets(
        served: Served) -> None:
    """Stateless upgrade: a keep-alive request during the drain is answered (Connection:
    close) by the old worker, a silent one is closed after idle_grace (1.5 s), an open
    WebSocket gets 1012 shortly before the drain deadline (4 s); lifespan shutdown runs."""
    old_pid = served.sup.active_pids()[0]
    talker, silent = RawHTTP(served.address), RawHTTP(served.address)
    ws = RawWebSocket(served.address)
    try:
        for conn in (talker, silent):
            conn.send(get("/"))
            assert conn.response()[2] == f"hello {old_pid}".encode()
        ws.send_frame(0x1, b"ping")
        assert ws.read_frame() == (0x1, b"echo ping")
        res = served.sup.upgrade()
        assert res["ok"], res
        new_pid = served.sup.active_pids()[0]
        assert new_pid != old_pid
        talker.send(get("/"))
        status, headers, body = talker.response()
        assert (status, body, headers["connection"]) == (200, f"hello {old_pid}".encode(),
                                                          "close")
        assert talker.at_eof()
        t0 = time.monotonic()
        assert silent.at_eof(), "closed by the old worker after idle_grace"
        assert ws.close_code() == 1012
        assert time.monotonic() - t0 < 4, "before the drain deadline"
        assert httpx.get(served.url + "/", timeout=10).text == f"hello {new_pid}"
        assert wait_pid_gone(old_pid, 15)
        events = served.events.read_text()
        assert f"shutdown {old_pid}" in events and f"startup {new_pid}" in events
    finally:
        for c in (talker, silent):
            c.close()
        ws.close()
    with socket.create_connection(served.address, timeout=10) as s:
        assert s.getpeername()[1] == served.address[1]
    assert re.search(r"event=ws.close_for_drain connections=1 code=1012", served.sup.log_text())
