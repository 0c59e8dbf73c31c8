"""A FastAPI app whose in-memory store survives swaps: run it under swapd with one command.

    pip install '.[serve]' fastapi
    cd examples/asgi
    swapd run --mode stateful --bind http=127.0.0.1:8000 --app app:app
    curl -X PUT -d 'hello' http://127.0.0.1:8000/items/greeting
    curl -X POST http://127.0.0.1:8000/incr           # -> 1
    swapd upgrade                                      # a new process, the same store
    curl http://127.0.0.1:8000/items/greeting          # -> hello
    curl http://127.0.0.1:8000/count                   # -> 1

Nothing here depends on swapd at run time: `uvicorn app:app` serves it too (the decorators
then only record the functions). Under `swapd run --mode stateful ... --app app:app` (as
above), every swap calls `save()` in the old worker once its requests in flight have
finished, and `load()` in the new one before it serves; keep-alive connections move between
requests.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse

import swapd

app = FastAPI(title="store")
store: dict[str, bytes] = {}
counter = {"value": 0}

swapd.state_version(1)


@swapd.on_snapshot
def save() -> dict[str, Any]:
    return {"store": store, "count": counter["value"]}


@swapd.on_restore
def load(state: dict[str, Any], from_version: int) -> None:
    store.update(state["store"])
    counter["value"] = state["count"]


@app.get("/", response_class=PlainTextResponse)
def hello() -> str:
    return f"hello from pid {os.getpid()} ({len(store)} items)\n"


@app.put("/items/{key}")
async def put_item(key: str, request: Request) -> dict[str, Any]:
    store[key] = await request.body()
    return {"key": key, "size": len(store[key])}


@app.get("/items/{key}")
def get_item(key: str) -> Response:
    if key not in store:
        return PlainTextResponse("not found\n", status_code=404)
    return Response(store[key], media_type="application/octet-stream")


@app.post("/incr", response_class=PlainTextResponse)
def incr() -> str:
    counter["value"] += 1
    return str(counter["value"])


@app.get("/count", response_class=PlainTextResponse)
def count() -> str:
    return str(counter["value"])
