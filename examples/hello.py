"""hello: the smallest stateless HTTP/1.1 service on swapd.worker.

    swapd run --bind http=127.0.0.1:8000 --workers 2 -- python examples/hello.py
    curl http://127.0.0.1:8000/

Standalone (no swapd): `python examples/hello.py` listens on $SWAPD_BIND or
127.0.0.1:8000.
"""

from __future__ import annotations

import os

from httpkit import Request, Response, serve_http

from swapd import worker

VERSION = os.environ.get("HELLO_VERSION", "1")


async def app(request: Request) -> Response:
    if request.method == "GET" and request.target == "/":
        return Response(200, f"hello from pid {os.getpid()} (v{VERSION})\n".encode())
    return Response(404, b"not found\n")


async def main(w: worker.Worker) -> None:
    await w.serve("http", lambda conn: serve_http(conn, app))
    await w.ready()


if __name__ == "__main__":
    worker.run(main, default_binds={"http": "127.0.0.1:8000"})
