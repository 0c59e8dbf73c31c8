"""WSGI endpoints behind wsgiref.validate's validator: any breach of PEP 3333 by the server
(environ, wsgi.input, start_response, write, close) fails the request with a 500."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.validate import validator

closed: list[str] = []


class Body:
    """An iterable with close(), which the server must call."""

    def __init__(self, chunks: list[bytes], path: str) -> None:
        self.chunks = chunks
        self.path = path

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        closed.append(self.path)


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    inp = environ["wsgi.input"]
    if path == "/read":  # to the end: wsgi.input_terminated (also for a chunked body)
        assert environ["wsgi.input_terminated"] is True
        data = b""
        while chunk := inp.read(4):
            data += chunk
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [data]
    if path == "/lines":
        lines = [inp.readline(), inp.readline(3)]
        lines += list(inp)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"|".join(lines)]
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return Body([b"then ", b"iterated"], path)
    if path == "/exc":
        try:
            raise RuntimeError("handled by the app")
        except RuntimeError:
            start_response("200 OK", [("Content-Type", "text/plain")])
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                           sys.exc_info())
        return [b"recovered"]
    if path == "/closed":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [",".join(closed).encode()]
    if path == "/env":
        start_response("200 OK", [("Content-Type", "text/plain")])
        keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
                "SERVER_PORT", "SERVER_PROTOCOL", "HTTP_X_TWICE", "wsgi.url_scheme")
        return ["\n".join(f"{k}={environ.get(k)}" for k in keys).encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


app = validator(_app)
