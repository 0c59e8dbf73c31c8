"""A stateful counter with a hook at every step of a swap, for fault injection.

Line protocol: `INCR` -> "<slot> <count>" (the count after the increment; each slot has its
own counter, handed to its successor by stateful swaps), `COUNT` -> "<slot> <count>".

Hooks: a test arms one by writing `$HOOKS/<step>` = {"slot": S, "min_gen": G}. The first
worker of a generation >= G in slot S that reaches <step> claims it (renames the file:
exactly one process does), prints "HOOK <step> gen=<g> slot=<s> pid=<pid>" and blocks its
event loop until something is written to the FIFO `$HOOKS/<step>.go` (the test may kill or
stop it meanwhile). Steps:

    start        a new worker, before it reports ready          (spawn)
    quiesce      an old worker asked to quiesce, before its snapshot
    restore      a new worker restoring its predecessor's state
    precopied    an old worker right after it handed its pre-copy bulk over
    precopy-in   a new worker loading the pre-copy bulk (unpickling a marker value)

Every worker also prints "MARK ready gen=<g> slot=<s> pid=<pid>" once ready() returns (for
a successor: once committed), and a successor "MARK restored ..." once restore() is done.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from swapd import worker

HOOKS = os.environ["HOOKS"]
GEN = int(os.environ.get("SWAPD_GENERATION", "0"))
SLOT = int(os.environ.get("SWAPD_SLOT", "0"))
count = 0


def hook(step: str) -> None:
    path = os.path.join(HOOKS, step)
    try:
        with open(path) as f:
            armed = json.load(f)
    except (FileNotFoundError, ValueError):
        return
    if armed.get("slot", SLOT) != SLOT or armed.get("min_gen", 0) > GEN:
        return
    try:
        os.rename(path, f"{path}.claimed-{os.getpid()}")
    except FileNotFoundError:
        return  # claimed by another process
    # Open (read-write: never blocks) before saying so, so that a test that saw the line
    # can always write to it, even while this process is stopped.
    fifo = os.open(f"{path}.go", os.O_RDWR)
    try:
        print(f"HOOK {step} gen={GEN} slot={SLOT} pid={os.getpid()}", flush=True)
        os.read(fifo, 64)  # blocks until the test writes
    finally:
        os.close(fifo)


class Marker:
    """A value in the tracked dict whose unpickling is the `precopy-in` hook."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle_marker, ())


def _unpickle_marker() -> Marker:
    hook("precopy-in")
    return Marker()


def restore(state: dict[str, int], from_version: int) -> None:
    global count
    hook("restore")
    count = state["count"]
    # Said in the next loop step: the worker sends its reply to the supervisor in this one,
    # so a test that saw this line knows the reply is out and the worker waits for its
    # commit (printed here, a test could stop the worker between the line and the reply).
    line = f"MARK restored gen={GEN} slot={SLOT} pid={os.getpid()}"
    asyncio.get_running_loop().call_soon(lambda: print(line, flush=True))


async def main(w: worker.Worker) -> None:
    bulk = w.tracked_dict("bulk")
    if w.role == "fresh":
        bulk["marker"] = Marker()
    w.on_snapshot(lambda: {"count": count})
    w.on_restore(restore)
    w.on_quiesce(lambda: hook("quiesce"))
    w.on_precopied(lambda: hook("precopied"))

    async def handle(conn: worker.Connection) -> None:
        global count
        while True:
            line = await conn.readline(idle=True)
            if not line.endswith(b"\n"):
                return
            if line.strip() == b"INCR":
                count += 1
            await conn.send(f"{SLOT} {count}\n".encode())

    await w.serve("app", handle)
    hook("start")
    await w.ready()
    print(f"MARK ready gen={GEN} slot={SLOT} pid={os.getpid()}", flush=True)


if __name__ == "__main__":
    worker.run(main)
