"""One application for every third-party server test: WSGI, ASGI (with a lifespan) and aiohttp.

Each process reads the behaviour of its release from the JSON file in $BEHAVIOR when it
imports this module (a test writes the file, then asks for a swap):

    {"version": "v2"}          text served: "<version> <pid>"
    {"import_error": true}     raise ImportError while importing (a broken release)
    {"startup_error": true}    raise in the startup: the ASGI lifespan startup, aiohttp's
                               on_startup, or the WSGI app factory `make_wsgi()`
    {"status": 500}            answer every request with this status (a release that imports
                               and starts but cannot serve: only a probe notices)
    {"import_sleep": 0.3}      spend this long importing (benchmarks: a known import time)

Every process appends "<pid> imported <seconds>" to $IMPORT_LOG when set (flask_app and
django_app add their whole import, framework included), so a benchmark can compare the
swap's ready time with the app's own import time.

    wsgi            a WSGI app (gunicorn sync, gthread; Flask/Django have their own modules)
    make_wsgi()     a WSGI app factory (gunicorn's `module:make_wsgi()`)
    asgi            an ASGI app with a lifespan (uvicorn, hypercorn, gunicorn's uvicorn worker)
    make_aiohttp    an aiohttp app factory taking argv (swapd.servers.aiohttp, aiohttp.web)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

_T0 = time.perf_counter()
_BEHAVIOR: dict[str, Any] = {}
if os.environ.get("BEHAVIOR"):
    with open(os.environ["BEHAVIOR"]) as _f:
        _BEHAVIOR = json.load(_f)

if _BEHAVIOR.get("import_error"):
    raise ImportError("simulated import failure in the new release")
if _BEHAVIOR.get("import_sleep"):
    time.sleep(float(_BEHAVIOR["import_sleep"]))

VERSION = str(_BEHAVIOR.get("version", "v1"))
STARTUP_ERROR = bool(_BEHAVIOR.get("startup_error"))
STATUS = int(_BEHAVIOR.get("status", 200))



def log_import(t0: float) -> None:
    """Append "<pid> imported <seconds since t0>" to $IMPORT_LOG (benchmarks)."""
    if os.environ.get("IMPORT_LOG"):
        with open(os.environ["IMPORT_LOG"], "a") as f:
            f.write(f"{os.getpid()} imported {time.perf_counter() - t0:.6f}\n")


log_import(_T0)


def body() -> bytes:
    return f"{VERSION} {os.getpid()}".encode()


def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    data = body()
    start_response(f"{STATUS} X", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(data)))])
    return [data]


def make_wsgi() -> Any:
    if STARTUP_ERROR:
        raise RuntimeError("simulated failure in the app factory")
    return wsgi


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if STARTUP_ERROR:
                    await send({"type": "lifespan.startup.failed",
                                "message": "simulated failure in lifespan startup"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    data = body()
    await send({"type": "http.response.start", "status": STATUS,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def make_aiohttp(argv: list[str]) -> Any:
    from aiohttp import web

    async def index(request: web.Request) -> web.Response:
        return web.Response(status=STATUS, body=body(), content_type="text/plain")

    async def startup(app: web.Application) -> None:
        if STARTUP_ERROR:
            raise RuntimeError("simulated failure in on_startup")

    app = web.Application()
    app.router.add_get("/", index)
    app.on_startup.append(startup)
    return app
