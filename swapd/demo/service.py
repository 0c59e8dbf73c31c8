"""The service `swapd demo` supervises: a counter on a line protocol, stdlib only.

    INCR  -> the new value of this worker's counter
    GET   -> the value
    WHO   -> "slot <i> gen <g> pid <p>"

Each worker keeps its own counter (a shard); a stateful swap hands worker i's count
to its successor i, together with the open connections, so a client keeps talking
to the same shard on the same TCP connection across swaps.
"""

from __future__ import annotations

import os
from typing import Any

from swapd import worker
from swapd.worker import Connection

count = 0


async def handle(conn: Connection) -> None:
    global count
    w = worker.current()
    while True:
        line = await conn.readline(idle=True)
        if not line.endswith(b"\n"):
            return
        cmd = line.strip().upper()
        if cmd == b"INCR":
            count += 1
            reply = str(count)
        elif cmd == b"GET":
            reply = str(count)
        elif cmd == b"WHO":
            reply = f"slot {w.slot} gen {w.generation} pid {os.getpid()}"
        else:
            reply = "ERR unknown command"
        await conn.send(reply.encode() + b"\n")
        if conn.draining:  # stateless swap: finish this reply, then let the client reconnect
            return


def restore(state: dict[str, Any], from_version: int) -> None:
    global count
    count = int(state["count"])


async def main(w: worker.Worker) -> None:
    w.on_snapshot(lambda: {"count": count})
    w.on_restore(restore)
    await w.serve("demo", handle)
    await w.ready()


if __name__ == "__main__":
    worker.run(main, default_binds={"demo": "127.0.0.1:0"})
