"""`swapd serve` with Django (ASGI and WSGI) and PEP 3333 checked by wsgiref's validator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
                "SERVER_PROTOCOL=HTTP/1.1", "HTTP_X_TWICE=a,b", "wsgi.url_scheme=http"]
        raw = RawHTTP(s.address())
        try:  # pipelined, through the thread pool, answered in order
            raw.send(get("/closed") + get("/env") + get("/nope"))
            assert [raw.response()[0] for _ in range(3)] == [200, 200, 404]
        finally:
            raw.close()


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
