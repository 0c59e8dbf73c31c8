"""`swapd serve` with Django (ASGI and WSGI) and PEP 3333 checked by wsgiref's validator."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import swapd
from swapd.loadgen import BackgroundLoad, http_get
from tests.integration.serve_client import RawHTTP, get
from tests.integration.supervised import ROOT, supervised

APPS = ROOT / "tests" / "apps"


def test_wsgi_server_side_of_pep_3333_under_the_validator(tmp_path: Path) -> None:
    """Every endpoint runs behind wsgiref.validate: a breach by the server is a 500."""
    with supervised(tmp_path, ["--root-path", "/api", "--threads", "2",
                               "--limit-concurrency", "2", "--limit-request-body", "100000"],
                    args=["--app", "serve_wsgi:app", "--cwd", str(APPS)]) as s:
        opened: list[RawHTTP] = []
        try:  # --limit-concurrency 2: requests on a third open connection get 503
            for expected in (200, 200, 503):
                opened.append(RawHTTP(s.address()))
                opened[-1].send(get("/closed"))
                assert opened[-1].response()[0] == expected
            assert opened[-1].at_eof()
        finally:
            for conn in opened:
                conn.close()
        with httpx.Client(base_url="http://{}:{}".format(*s.address()), timeout=10) as c:
            assert c.post("/read", content=b"body bytes").content == b"body bytes"

            def chunks() -> Iterator[bytes]:
                yield b"chunked "
                yield b"input"

            assert c.post("/read", content=chunks()).content == b"chunked input"

            def too_much() -> Iterator[bytes]:
                for _ in range(3):
                    yield b"z" * 50000

            mark = s.log_mark()  # a chunked body over the bound, found while the app reads
            big = c.post("/read", content=too_much())
            assert (big.status_code, big.headers["connection"]) == (413, "close")
            s.wait_log(r"event=request\.aborted status=413 reason='request body too large' "
                       r"limit=100000 raise_with=--limit-request-body", start=mark)
            lines = c.post("/lines", content=b"one\ntwo\nthree\nfour").content
            assert lines == b"one\n|two|\n|three\n|four"
            written = c.get("/write")
            assert written.text == "written then iterated"
            assert written.headers["transfer-encoding"] == "chunked"
            exc = c.get("/exc")
            assert (exc.status_code, exc.text) == (500, "recovered")
            assert c.get("/closed").text == "/write", "close() of the iterable was called"
            assert c.head("/write").content == b""
            env = c.get("/env?a=1&b=%20", headers=[("x-twice", "a"), ("x-twice", "b")]).text
            port = s.address()[1]
            assert env.splitlines() == [
                "REQUEST_METHOD=GET", "SCRIPT_NAME=/api", "PATH_INFO=/env",
                "QUERY_STRING=a=1&b=%20", "SERVER_NAME=127.0.0.1", f"SERVER_PORT={port}",
                "SERVER_PROTOCOL=HTTP/1.1", "HTTP_X_TWICE=a,b", "wsgi.url_scheme=http",
                "RAW_URI=/env?a=1&b=%20", f"SERVER_SOFTWARE=swapd/{swapd.__version__}"]
        raw = RawHTTP(s.address())
        try:  # pipelined, through the thread pool, answered in order
            raw.send(get("/closed") + get("/env") + get("/nope"))
            assert [raw.response()[0] for _ in range(3)] == [200, 200, 404]
        finally:
            raw.close()


def _fields(raw: RawHTTP, path: str, method: str = "GET") -> tuple[int, list[tuple[str, str]],
                                                                   bytes]:
    raw.send(f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    resp = http.client.HTTPResponse(raw, method=method)  # type: ignore[arg-type]
    resp.begin()
    return resp.status, [(k.lower(), v) for k, v in resp.getheaders()], resp.read()


def _one(fields: list[tuple[str, str]], name: str) -> str:
    values = [v for k, v in fields if k == name]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def test_wsgi_file_wrapper_sendfile_and_the_apps_own_date_and_server(tmp_path: Path) -> None:
    """wsgi.file_wrapper: Flask's send_file uses it, and a real file goes out with
    os.sendfile (a file that refuses read() is still sent: whole, from its position, chunked
    after a write(), and HEAD sends no byte of it); around what is no file it is iterated
    and closed. A response carries one Date and one Server: the app's, if it set them."""
    data = os.urandom(3 * 2**20 + 123)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with supervised(tmp_path, ["--threads", "2"],
                    args=["--app", "serve_wsgi:app", "--cwd", str(APPS)],
                    env={"SERVE_FILE": str(path)}) as s:
        raw = RawHTTP(s.address())
        try:
            status, fields, body = _fields(raw, "/flask/file")
            assert (status, body) == (200, data)
            assert _one(fields, "server") == "swapd"
            _one(fields, "date")  # Werkzeug's, not a second one
            assert _one(fields, "content-length") == str(len(data))
            status, fields, body = _fields(raw, "/own-headers")
            assert (status, body) == (200, b"hi")
            assert (_one(fields, "date"), _one(fields, "server")) == (
                "Mon, 01 Jan 2024 00:00:00 GMT", "myserver")
            status, _, body = _fields(raw, "/sendfile")
            assert (status, body) == (200, data), "sent by os.sendfile: read() refuses"
            status, fields, body = _fields(raw, "/sendfile?1000")
            assert (status, body) == (200, data[1000:]), "from the file's position"
            assert _one(fields, "content-length") == str(len(data) - 1000)
            status, fields, body = _fields(raw, "/sendfile-chunked")
            assert (status, body) == (200, b"head:" + data)
            assert _one(fields, "transfer-encoding") == "chunked"
            status, fields, body = _fields(raw, "/sendfile", "HEAD")
            assert (status, body) == (200, b"")
            assert _one(fields, "content-length") == str(len(data))
            status, _, body = _fields(raw, "/wrapped-iter")
            assert (status, body) == (200, b"not a file, " * 1000)
            # (still the same keep-alive connection: every response was framed right)
        finally:
            raw.close()
        with httpx.Client(base_url="http://{}:{}".format(*s.address()), timeout=10) as c:
            part = c.get("/flask/file", headers={"Range": "bytes=100-1123"})
            assert (part.status_code, part.content) == (206, data[100:1124])
            results = c.get("/flask-results").text
        # Whole files came back as the server's own file wrapper (sent with os.sendfile); a
        # range is Werkzeug's wrapper around it (iterated, after a seek).
        assert results == "True False closed=1", results


@pytest.mark.slow
@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_django_served_and_swapped_under_load(tmp_path: Path, interface: str) -> None:
    with supervised(tmp_path, [], args=["--app", f"serve_django:{interface}",
                                        "--cwd", str(APPS)]) as s:
        url = "http://{}:{}".format(*s.address())
        pid = s.active_pids()[0]
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/hello/x?q=y").text == f"django {pid} /hello/x y"
            assert c.post("/echo", content=b"posted").content == b"posted"
            assert c.get("/missing").status_code == 404
        with BackgroundLoad(s.address(), http_get("/"), clients=4, mode="keepalive",
                            duration=60, max_requests=100_000) as load:
            load.wait_for_successes(100, timeout=60)
            with load.window("swap"):
                assert s.upgrade()["ok"]
            load.wait_for_successes(100, timeout=60)
        assert load.report is not None
        assert load.report.failed == 0, load.report.format()
        new = s.active_pids()[0]
        assert new != pid and httpx.get(url, timeout=10).text == f"django {new} / "
        if interface == "asgi":
            assert "event=lifespan.unsupported" in s.log_text()
