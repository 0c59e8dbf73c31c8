"""WSGI endpoints behind wsgiref.validate's validator: any breach of PEP 3333 by the server
(environ, wsgi.input, start_response, write, close) fails the request with a 500.

Outside the validator (which wraps every response iterable, so the server never gets its own
wsgi.file_wrapper back): files served with the file wrapper. $SERVE_FILE is the file; a Flask
app under /flask/ (send_file), and raw endpoints whose file refuses read(), so that only
os.sendfile can send it.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.validate import validator

from flask import Flask, send_file

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
                "SERVER_PORT", "SERVER_PROTOCOL", "HTTP_X_TWICE", "wsgi.url_scheme",
                "RAW_URI", "SERVER_SOFTWARE")
        return ["\n".join(f"{k}={environ.get(k)}" for k in keys).encode()]
    if path == "/own-headers":  # the app's Date and Server replace the server's
        start_response("200 OK", [("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                                  ("Server", "myserver"), ("Content-Type", "text/plain")])
        return [b"hi"]
    if path == "/wrapped-iter":  # the file wrapper around what is no file: iterated, closed
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](Closing(b"not a file, " * 1000), 1000)
    if path == "/flask-results":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [" ".join(flask_results).encode(), b" closed=%d" % len(wrapped_closes)]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


wrapped_closes: list[str] = []  # close() calls that reached a file-wrapped object


class Closing(io.BytesIO):
    def close(self) -> None:
        wrapped_closes.append("closed")
        super().close()


class NoRead(io.FileIO):
    """A real file that refuses to be read in Python: only os.sendfile can send it."""

    def read(self, size: int = -1) -> bytes:
        raise AssertionError("read() called: the server did not use os.sendfile")

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("readinto() called: the server did not use os.sendfile")

    def readall(self) -> bytes:
        raise AssertionError("readall() called: the server did not use os.sendfile")


flask_app = Flask(__name__)
flask_results: list[str] = []  # per /flask/ response: was it the server's file wrapper?


@flask_app.get("/flask/file")
def flask_file() -> Any:
    return send_file(os.environ["SERVE_FILE"], mimetype="application/octet-stream")


def _flask(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    result = flask_app(environ, start_response)
    flask_results.append(str(type(result) is environ.get("wsgi.file_wrapper")))
    return result


def _sendfile_only(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    f = NoRead(os.environ["SERVE_FILE"])
    f.seek(int(environ["QUERY_STRING"] or 0))  # sent from the file's position
    if environ["PATH_INFO"] == "/sendfile-chunked":  # after a write(): chunked framing
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        write(b"head:")
    else:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](f)


_validated = validator(_app)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    if path.startswith("/flask/"):
        return _flask(environ, start_response)
    if path in ("/sendfile", "/sendfile-chunked"):
        return _sendfile_only(environ, start_response)
    return _validated(environ, start_response)
