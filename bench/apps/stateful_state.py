"""A stateful worker holding a chosen shape and size of state, for bench/bench_handoff_pause.py.

    swapd run --mode stateful [--precopy] --bind ctl=127.0.0.1:0 --control PATH \\
        -- python bench/apps/stateful_state.py          # configured by the variables below

A fresh worker builds its state once; every successor gets it through the handoff and checks
it (`verify`). Shapes, as in the team's reference handoff measurements (not in this repository):

    dict     "player:%08d" -> 9-field dict record; BENCH_MB * 10,000 records (~0.9 MB of
             pickle per 10,000)
    buffers  4 buffers of BENCH_MB/4 MB each, all out-of-band for pickle protocol 5 and so
             copied into the snapshot's buffers memfd: two memoryviews cast to float64 and
             int64 (stand-ins for numpy arrays) and two PickleBuffer(bytearray)
    shared   the same bytes in 4 SharedBuffers: the memfds themselves travel, nothing is copied
    blobs    BENCH_MB * 1e6 / 64 KiB `bytes` blobs of 64 KiB in a dict (pre-copy of buffers)

Environment:

    BENCH_SHAPE       dict | buffers | shared | blobs                       (default dict)
    BENCH_MB          nominal size, MB of 1e6 bytes                          (default 1)
    BENCH_TRACKED     1: keep dict/blobs in w.tracked_dict("state"), handed over by pre-copy
                      under `swapd run --precopy`; 0: return it from the snapshot (default 0)
    BENCH_CODEC       codec of the state and of the tracked dict (pickle5, marshal)
    BENCH_DIRTY       fraction of the entries changed once per pre-copy round, in one burst
                      after the bulk has been written and before the quiesce   (default 0)
    BENCH_WRITE_RATE  entries/s changed steadily while a pre-copy round is open (default 0)
    BENCH_BURST_AT    precopied: the burst follows the bulk (default; a further pre-copy round
                      ships it before the pause); quiesce: it runs in `on_quiesce`, inside the
                      pause, so the pause carries all of it (the in-pause cost of a 1 % delta)
    BENCH_GC_FREEZE   1: gc.freeze() after building or restoring the state    (default 1)

Why the burst is placed as it is. Pre-copy ships every entry changed after its round began
(TrackedDict tracks writes from before the first bulk chunk on), so what must be controlled is
*how many* entries change between the bulk and the quiesce, and that none changes inside the
pause. A request from the benchmark cannot be timed into that window: the supervisor sends the
quiesce as soon as the new worker has loaded the bulk, and an `on_quiesce` hook runs inside the
pause. So the burst is scheduled by `w.on_precopied`, which swapd.worker calls right after the
bulk was handed over: the quiesce, which needs the new worker to load that bulk first, always
finds the burst done, and the delta holds exactly the burst's keys. Event-driven, no polling,
exact count. The successor
reports what happened (`info`: burst size and time, dirty keys at the quiesce), and `verify`
proves the changes arrived (the digest includes them).

`BENCH_WRITE_RATE` is the other, steadier model: a 1 ms tick writes at a constant rate while a
round is open (paused by `on_quiesce`), so the delta grows with the time the bulk takes.

Protocol on listener `ctl`: one request line per connection, one JSON line back.

    info     shape, sizes, digest, the last handoff's pre-copy figures, pid, generation
    verify   recompute the digest from the live state and compare with the expected one
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pickle
import random
import time
import zlib
from collections.abc import Iterator
from typing import Any

from swapd import worker
from swapd.handoff import SharedBuffer, TrackedDict

SHAPE = os.environ.get("BENCH_SHAPE", "dict")
NOMINAL_MB = float(os.environ.get("BENCH_MB", "1"))
TRACKED = os.environ.get("BENCH_TRACKED", "0") == "1"
DIRTY = float(os.environ.get("BENCH_DIRTY", "0"))
WRITE_RATE = float(os.environ.get("BENCH_WRITE_RATE", "0"))
GC_FREEZE = os.environ.get("BENCH_GC_FREEZE", "1") == "1"
CODEC = os.environ.get("BENCH_CODEC", "pickle5")
BURST_AT = os.environ.get("BENCH_BURST_AT", "precopied")

MB = 1_000_000
BLOB = 64 * 1024
TICK = 0.001  # s
SHAPES = ("dict", "buffers", "shared", "blobs")


class BenchAppError(RuntimeError):
    """A configuration this app cannot run."""




def record(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"player{i}", "level": i % 100, "hp": 100, "mp": 50,
            "alive": True, "x": i * 0.5, "y": i * 0.25, "gold": i * 3}


def build(shape: str, nominal_mb: float) -> Any:
    """The state of a fresh worker: a dict for dict/blobs, a dict of 4 buffers otherwise."""
    if shape == "dict":
        return {f"player:{i:08d}": record(i) for i in range(round(nominal_mb * 10_000))}
    if shape == "blobs":
        rng = random.Random(1)
        return {f"blob:{i:06d}": rng.randbytes(BLOB)
                for i in range(max(1, round(nominal_mb * MB / BLOB)))}
    quarter = round(nominal_mb * MB / 4) // 8 * 8
    rng = random.Random(2)
    if shape == "buffers":
        # Random bytes, not zeros: zero pages could be shared or skipped by the kernel.
        return {
            "floats": memoryview(bytearray(rng.randbytes(quarter))).cast("d"),
            "ints": memoryview(bytearray(rng.randbytes(quarter))).cast("q"),
            "raw1": pickle.PickleBuffer(bytearray(rng.randbytes(quarter))),
            "raw2": pickle.PickleBuffer(bytearray(rng.randbytes(quarter))),
        }
    if shape == "shared":
        out = {}
        for name in ("floats", "ints", "raw1", "raw2"):
            sb = SharedBuffer(quarter, name=f"bench-{name}")
            sb.buf[:] = rng.randbytes(quarter)
            out[name] = sb
        return out
    raise BenchAppError(f"BENCH_SHAPE={shape!r}: expected one of {', '.join(SHAPES)}")


def _view(buf: Any) -> memoryview:
    return buf.buf if isinstance(buf, SharedBuffer) else memoryview(buf)


def entries(data: Any) -> Iterator[Any]:
    """The state's values."""
    return iter(data.values())


def digest(shape: str, data: Any) -> str:
    """What must be equal on both sides of a handoff (changes included)."""
    if shape == "dict":
        hp = sum(rec["hp"] for rec in entries(data))
        return f"{len(data)}:{hp}"
    if shape == "blobs":
        return f"{len(data)}:{sum(zlib.crc32(b) for b in entries(data)) % 2**64}"
    crcs = []
    for name in sorted(data):
        with _view(data[name]) as view:
            crcs.append(f"{name}={zlib.crc32(view):08x}")
    return ",".join(crcs)


def pickle_size(shape: str, data: Any) -> int:
    """The state's size as pickle protocol 5 writes it (buffers: their bytes, ±100 bytes)."""
    if shape in ("dict", "blobs"):
        return len(pickle.dumps(dict(data), protocol=5))
    total = 0
    for buf in data.values():
        with _view(buf) as view:
            total += view.nbytes
    return total


class App:
    def __init__(self, w: worker.Worker) -> None:
        self.w = w
        self.loop = asyncio.get_running_loop()
        self.td: TrackedDict[Any, Any] | None = (
            w.tracked_dict("state", codec=CODEC) if TRACKED and SHAPE in ("dict", "blobs") else None
        )
        if TRACKED and self.td is None:
            raise BenchAppError(f"BENCH_TRACKED=1 needs shape dict or blobs, not {SHAPE!r}")
        self.data: Any = self.td
        self.expected = ""
        self.pickle_size: int | None = None
        self.build_ms = 0.0
        self.restore_ms = 0.0
        self.serving_at: float | None = None  # successor: its loop is free after the commit
        self.last_handoff: dict[str, Any] = {}  # the predecessor's last round, as it saw it
        self.round = self._fresh_round()
        self.keys: list[Any] = []
        self.rng = random.Random(w.generation)

    @staticmethod
    def _fresh_round() -> dict[str, Any]:
        return {"opened_at": None, "bulk_end_at": None, "burst_at": None, "burst_keys": 0,
                "burst_ms": 0.0, "writes": 0, "quiesce_at": None, "dirty_at_quiesce": None,
                "quiesced": False}

    # -- fresh worker --------------------------------------------------------------------

    def build(self) -> None:
        t0 = time.perf_counter()
        data = build(SHAPE, NOMINAL_MB)
        if self.td is not None:
            self.td.update(data)
            data = self.td
        self.data = data
        self.expected = digest(SHAPE, data)
        self.build_ms = (time.perf_counter() - t0) * 1000
        if GC_FREEZE:
            gc.freeze()  # long-lived state: keep it out of every future collection

    # -- handoff ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        meta = {"expected": self.expected, "pickle_size": self.pickle_size,
                "build_ms": self.build_ms, "handoff": dict(self.round), "gen": self.w.generation,
                "pid": os.getpid()}
        # A tracked dict travels by itself (bulk before the pause, changed keys inside it).
        return {"meta": meta, "data": None if self.td is not None else self.data}

    def restore(self, state: dict[str, Any], from_version: int) -> None:
        t0 = time.perf_counter()
        meta = state["meta"]
        self.expected = meta["expected"]
        self.pickle_size = meta["pickle_size"]
        self.build_ms = meta["build_ms"]
        self.last_handoff = meta["handoff"]
        self.data = self.td if self.td is not None else state["data"]
        if GC_FREEZE:
            gc.freeze()
        self.restore_ms = (time.perf_counter() - t0) * 1000

    def on_quiesce(self) -> None:
        r = self.round
        if (BURST_AT == "quiesce" and DIRTY > 0 and self.td is not None and self.td.tracking
                and not r["burst_keys"]):
            self._burst(max(1, round(len(self.keys) * DIRTY)))
        r["quiesced"] = True
        r["quiesce_at"] = time.monotonic()
        r["dirty_at_quiesce"] = self.td.dirty_count if self.td is not None else None

    def on_resume(self) -> None:
        self.round = self._fresh_round()

    def after_commit(self) -> None:
        """The successor serves: prove shared buffers became writable, prepare the next round."""
        # ready() returns on the first loop turn after the commit handler finished: swapd
        # stamps its t_start after its commit work, when it starts accepting.
        self.serving_at = time.monotonic()
        if SHAPE == "shared":
            for sb in self.data.values():
                with sb.buf as view:
                    view[0] = view[0]  # TypeError if the mapping were still read-only
        if self.td is not None:
            self.keys = list(self.td)

    # -- changes during a pre-copy round ----------------------------------------------------

    def bulk_written(self) -> None:
        """w.on_precopied: the bulk was handed over; the pause comes next."""
        td = self.td
        r = self.round
        if td is None or not td.tracking or r["quiesced"] or r["bulk_end_at"] is not None:
            return  # not a pre-copy bulk (a pickle_size measure, a snapshot in the pause)
        r["bulk_end_at"] = time.monotonic()
        if DIRTY > 0 and BURST_AT == "precopied":
            self.loop.call_soon(self._burst, max(1, round(len(self.keys) * DIRTY)))

    def _burst(self, count: int) -> None:
        r = self.round
        if r["quiesced"]:
            return
        t0 = time.monotonic()
        self._change(self.rng.sample(self.keys, min(count, len(self.keys))))
        r["burst_at"] = t0
        r["burst_keys"] = count
        r["burst_ms"] = (time.monotonic() - t0) * 1000

    async def steady_writes(self) -> None:
        """WRITE_RATE entries/s while a pre-copy round is open (a 1 ms tick)."""
        td = self.td
        assert td is not None
        while True:
            await asyncio.sleep(TICK)
            r = self.round
            if not td.tracking or r["quiesced"]:
                continue
            now = time.monotonic()
            if r["opened_at"] is None:
                r["opened_at"] = now
            due = int((now - r["opened_at"]) * WRITE_RATE) - r["writes"]
            if due > 0:
                self._change(self.rng.choices(self.keys, k=due))
                r["writes"] += due

    def _change(self, keys: list[Any]) -> None:
        """Change entries as an app would, keeping the expected digest in step."""
        td = self.td
        assert td is not None
        count, total = self.expected.split(":")
        acc = int(total)
        if SHAPE == "dict":
            for key in keys:
                td[key]["hp"] -= 1  # a nested in-place change: must be marked
                td.touch(key)
            acc -= len(keys)
        else:
            for key in keys:
                new = self.rng.randbytes(BLOB)
                acc += zlib.crc32(new) - zlib.crc32(td[key])
                td[key] = new
            acc %= 2**64
        self.expected = f"{count}:{acc}"

    # -- requests --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        if self.pickle_size is None:  # once, by the fresh worker; successors inherit it
            self.pickle_size = pickle_size(SHAPE, self.data)
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        count = len(self.data)
        return {"pid": os.getpid(), "gen": self.w.generation, "role": self.w.role,
                "shape": SHAPE, "nominal_mb": NOMINAL_MB, "tracked": self.td is not None,
                "entries": count, "pickle_size": self.pickle_size,
                "expected": self.expected, "build_ms": round(self.build_ms, 2),
                "restore_ms": round(self.restore_ms, 3), "last_handoff": self.last_handoff,
                "serving_at": self.serving_at,
                "rss_mb": round(rss_pages * os.sysconf("SC_PAGE_SIZE") / MB, 1)}

    def verify(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        actual = digest(SHAPE, self.data)
        return {"ok": actual == self.expected, "expected": self.expected, "actual": actual,
                "ms": round((time.perf_counter() - t0) * 1000, 2)}

    async def handle(self, conn: worker.Connection) -> None:
        line = await conn.readline(idle=True)
        command = line.strip().decode("ascii", "replace")
        if command == "info":
            reply = self.info()
        elif command == "verify":
            reply = self.verify()
        else:
            reply = {"error": f"unknown request {command!r} (info, verify)"}
        await conn.send(json.dumps(reply).encode() + b"\n")


async def main(w: worker.Worker) -> None:
    app = App(w)
    w.state_version = 1
    w.state_codec = CODEC
    w.on_snapshot(app.snapshot)
    w.on_restore(app.restore)
    w.on_quiesce(app.on_quiesce)
    w.on_precopied(app.bulk_written)
    w.on_resume(app.on_resume)
    if w.role != "successor":
        app.build()
    await w.serve("ctl", app.handle)
    await w.ready()  # a successor returns from here once its state is restored and committed
    app.after_commit()
    if app.td is not None and WRITE_RATE > 0:
        tick = asyncio.ensure_future(app.steady_writes())
        w.on_drain(tick.cancel)


if __name__ == "__main__":
    worker.run(main)
