"""counter: an HTTP counter whose count lives only in process memory and survives swaps.

    swapd run --mode stateful --bind http=127.0.0.1:8000 -- python examples/counter.py
    curl -X POST http://127.0.0.1:8000/incr      # -> 1
    swapd upgrade                                 # new process, same count
    curl http://127.0.0.1:8000/count             # -> 1

POST /incr increments and answers the new value; GET /count answers the value.
In stateful mode every swap hands the count to the successor (snapshot/restore);
keep-alive connections are handed over too, between two requests, so clients see
no error and no lost increment. Each worker of a multi-worker generation has its
own count (worker i hands it to worker i): see docs/state-handoff.md on sharding.
"""

from __future__ import annotations

from typing import Any

from httpkit import Request, Response, serve_http

from swapd import worker


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.value}

    def restore(self, state: dict[str, Any], from_version: int) -> None:
        self.value = int(state["count"])


counter = Counter()


async def app(request: Request) -> Response:
    if request.method == "POST" and request.target == "/incr":
        counter.value += 1
        return Response(200, str(counter.value).encode())
    if request.method == "GET" and request.target == "/count":
        return Response(200, str(counter.value).encode())
    return Response(404, b"not found\n")


async def main(w: worker.Worker) -> None:
    w.state_version = 1
    w.on_snapshot(counter.snapshot)
    w.on_restore(counter.restore)
    await w.serve("http", lambda conn: serve_http(conn, app))
    await w.ready()


if __name__ == "__main__":
    worker.run(main, default_binds={"http": "127.0.0.1:8000"})
