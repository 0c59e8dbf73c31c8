"""A Starlette app exercising the ASGI details `swapd serve` must get right (tests).

$SERVE_FAIL_STARTUP: a path; if it exists at startup, the lifespan startup fails.
$SERVE_EVENTS: a path; lifespan events are appended to it ("startup <pid>", "shutdown <pid>").
$SERVE_FAIL_SAVE: a path; while it exists, `@swapd.on_snapshot` raises, or returns what
cannot be pickled if the file says "unpicklable" (stateful swaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import swapd

disconnects: list[str] = []


def greeting() -> str:
    return "hello"


def _event(text: str) -> None:
    path = os.environ.get("SERVE_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{text} {os.getpid()}\n")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    fail = os.environ.get("SERVE_FAIL_STARTUP")
    if fail and os.path.exists(fail):
        raise RuntimeError("startup refused: the database is unreachable (simulated)")
    _event("startup")
    yield {"answer": 42}
    _event("shutdown")


async def hello(request: Request) -> Response:
    return PlainTextResponse(f"{greeting()} {os.getpid()}")


async def echo(request: Request) -> Response:
    body = b""
    async for chunk in request.stream():
        body += chunk
    return Response(body, media_type="application/octet-stream")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(0.01)
    return StreamingResponse(chunks(), media_type="text/plain")


async def state(request: Request) -> Response:
    return PlainTextResponse(str(request.state.answer))


async def boom(request: Request) -> Response:
    raise ValueError("boom: a bug in the app")


async def scope_view(request: Request) -> Response:
    s = request.scope
    return PlainTextResponse(f"{s['scheme']} {s['client'][0]} {s['root_path']} {s['path']} "
                             f"{s['query_string'].decode()} {s['http_version']}")


class WaitDisconnect:
    """Raw ASGI: start a streaming response, then wait for http.disconnect."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"waiting\n", "more_body": True})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnects.append(scope["path"])
                return


async def disconnect_count(request: Request) -> Response:
    return PlainTextResponse(str(len(disconnects)))


sse_closed: list[int] = []  # how many events each ended SSE stream had sent


async def sse(request: Request) -> Response:
    """An endless (bounded: 100 000 events) server-sent event stream, as users write them:
    it relies on the server to stop it when the client goes (Starlette, ASGI 2.4: send()
    raises OSError)."""
    async def events() -> AsyncIterator[str]:
        sent = 0
        try:
            for i in range(100_000):
                yield f"data: {i}\n\n"
                sent += 1
                await asyncio.sleep(0.05)
        finally:
            sse_closed.append(sent)
    return StreamingResponse(events(), media_type="text/event-stream")


async def sse_closed_view(request: Request) -> Response:
    return PlainTextResponse(" ".join(map(str, sse_closed)))


class AfterFin:
    """Raw ASGI: stream one chunk, wait for /go, then send one more and record what send()
    did: the client closed in between, and the app never called receive()."""

    go: ClassVar[asyncio.Event | None] = None
    results: ClassVar[list[str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        AfterFin.go = go = asyncio.Event()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        await go.wait()
        try:
            await send({"type": "http.response.body", "body": b"second\n", "more_body": True})
        except OSError as e:
            AfterFin.results.append(type(e).__name__)
            raise
        AfterFin.results.append("sent")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def after_fin_go(request: Request) -> Response:
    if AfterFin.go is not None:
        AfterFin.go.set()
    return PlainTextResponse("go")


async def after_fin_results(request: Request) -> Response:
    return PlainTextResponse(" ".join(AfterFin.results))


async def ws_echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            await ws.send_text("echo " + await ws.receive_text())
    except WebSocketDisconnect:
        pass


async def ws_deny(ws: WebSocket) -> None:
    """ASGI extension websocket.http.response: an HTTP answer instead of accepting."""
    await ws.send_denial_response(PlainTextResponse("nope", status_code=401,
                                                    headers={"www-authenticate": "Bearer"}))


async def ws_deny_streamed(ws: WebSocket) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"streamed "
        yield b"denial"
    await ws.send_denial_response(StreamingResponse(parts(), status_code=403))


async def ws_refuse(ws: WebSocket) -> None:
    await ws.close()  # before accept: the handshake is refused (403)


async def ws_crash(ws: WebSocket) -> None:
    raise ValueError("boom before accept")


live_events: list[str] = []  # what the /ws-live coroutines saw, in this process


@swapd.on_snapshot
def save() -> dict[str, Any]:
    fail = os.environ.get("SERVE_FAIL_SAVE")
    if fail and os.path.exists(fail):
        with open(fail) as f:
            if f.read() == "unpicklable":
                return {"live_events": live_events, "lock": threading.Lock()}
        raise RuntimeError("save refused (simulated)")
    return {"live_events": live_events}


@swapd.on_restore
def load(state: dict[str, Any], from_version: int) -> None:
    live_events[:0] = state["live_events"]


async def ws_live(ws: WebSocket) -> None:
    """A WebSocket that moves at a stateful swap: a counter in the coroutine, saved."""
    live = swapd.connection(ws.scope)
    await ws.accept()
    count = live.state["count"] if live.resumed else 0
    live_events.append(f"start pid={os.getpid()} resumed={live.resumed}")
    live.save(lambda: {"count": count})
    try:
        while True:
            text = await ws.receive_text()
            count += 1
            await ws.send_text(f"{count} {text} pid={os.getpid()} resumed={live.resumed}")
    except WebSocketDisconnect:
        live_events.append(f"disconnect pid={os.getpid()} handed_off={live.handed_off}")


async def live_events_view(request: Request) -> Response:
    return PlainTextResponse("\n".join(live_events))


starlette_app = Starlette(lifespan=lifespan, routes=[
    Route("/", hello),
    Route("/echo", echo, methods=["POST"]),
    Route("/stream", stream),
    Route("/state", state),
    Route("/boom", boom),
    Route("/scope/{rest:path}", scope_view),
    Route("/wait-disconnect", WaitDisconnect()),
    Route("/disconnects", disconnect_count),
    Route("/sse", sse),
    Route("/sse-closed", sse_closed_view),
    Route("/after-fin", AfterFin()),
    Route("/after-fin/go", after_fin_go),
    Route("/after-fin/results", after_fin_results),
    WebSocketRoute("/ws", ws_echo),
    WebSocketRoute("/ws-live", ws_live),
    Route("/live-events", live_events_view),
    WebSocketRoute("/ws-deny", ws_deny),
    WebSocketRoute("/ws-deny-streamed", ws_deny_streamed),
    WebSocketRoute("/ws-refuse", ws_refuse),
    WebSocketRoute("/ws-crash", ws_crash),
])


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Outside Starlette's error middleware, /raw-boom raises before any response."""
    if scope["type"] == "http" and scope["path"] == "/raw-boom":
        raise ValueError("boom before any response")
    await starlette_app(scope, receive, send)
