"""A worker that writes log lines on demand (bench/bench_worker_output.py).

Line protocol on the listener `chat`: "BURST <n> <tag>\n" -> the worker writes n JSON lines
shaped like access-log entries to stdout (one write per line, as a logging handler does),
then one "burst-end <tag>" line, flushes, and answers "done <seconds>\n" (the time it spent
writing: it grows when whoever reads the other end of stdout cannot keep up).
"""

from __future__ import annotations

import json
import sys
import time

from swapd import worker

LINE = json.dumps({"time": "2026-11-22T10:00:00.000Z", "level": "info", "method": "GET",
                   "path": "/api/items/12345", "status": 200, "ms": 1.25,
                   "peer": "127.0.0.1:54321"}) + "\n"


async def handle(conn: worker.Connection) -> None:
    while True:
        line = await conn.readline(idle=True)
        if not line.endswith(b"\n"):
            return
        words = line.decode().split()
        if len(words) != 3 or words[0] != "BURST":
            await conn.send(b"ERR\n")
            continue
        count, tag = int(words[1]), words[2]
        out = sys.stdout
        t0 = time.perf_counter()
        for _ in range(count):
            out.write(LINE)
            out.flush()
        out.write(f"burst-end {tag}\n")
        out.flush()
        await conn.send(f"done {time.perf_counter() - t0:.6f}\n".encode())


async def main(w: worker.Worker) -> None:
    await w.serve("chat", handle)
    await w.ready()


if __name__ == "__main__":
    worker.run(main)
