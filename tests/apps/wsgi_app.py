"""A plain WSGI app for gunicorn: swapd runs third-party socket-activation servers too."""

import os


def app(environ: dict[str, object], start_response):  # type: ignore[no-untyped-def]
    body = f"wsgi {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
