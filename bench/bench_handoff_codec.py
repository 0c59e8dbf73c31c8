"""Handoff pause between two real processes, against state size, shape and method.

    python bench/bench_handoff_codec.py            # 1 / 10 / 100 MB (several minutes)
    python bench/bench_handoff_codec.py --quick    # 1 MB smoke run

The old worker is this process; the new worker is a fresh interpreter started (and idle, with
swapd.handoff imported) *before* the clock starts, as swapd does. One fresh receiver per
trial, so its heap is as cold as a real successor's. The pause runs from the old worker
calling dump() to the new one holding the restored, committed state:

    old: dump -> send envelope + fds (SCM_RIGHTS) -> close snapshot
    new: recv -> load -> restore (from_bulk/apply_delta for pre-copy) -> commit -> timestamp

Both ends stamp CLOCK_MONOTONIC, which is system-wide. Shapes, as in
the team's reference handoff measurements (not in this repository):
  A  dict "player:%08d" -> 9-field dict (ints, str, bool, 2 floats); 1e4/1e5/1e6 entries
  B  few large buffers, 25 % each: bytes, bytearray, and two memoryviews cast to float64 and
     int64 (stand-ins for numpy arrays: out-of-band, zero-copy); or 4 such memoryviews (all
     out-of-band); or 4 SharedBuffers; or, for pre-copy, a TrackedDict of 64 KiB bytes blobs.
Pre-copy: the bulk is sent and restored outside the clock, then 1 % of the entries change
(nested change + touch() for A, replaced blobs for B), then the timed pause ships the delta.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swapd.handoff import SharedBuffer, Snapshot, TrackedDict, dump  # noqa: E402

MB = 1_000_000
DEADLINE = 120.0  # seconds for any single receive

RECEIVER = r"""
import gc, json, socket, sys, time
from swapd.handoff import TrackedDict, load

chan = socket.socket(fileno=int(sys.argv[1]))
chan.settimeout(120)
chan.send(b"ready")
td = None
while True:
    msg, fds, _, _ = socket.recv_fds(chan, 4096, 64)
    t_recv = time.monotonic_ns()
    if not msg:
        break
    kind = json.loads(msg)["kind"]
    restored = load(json.loads(msg)["envelope"], fds[0], fds[1:])
    t_load = time.monotonic_ns()
    if kind == "bulk":
        td = TrackedDict.from_bulk(restored)
    elif kind == "delta":
        td.apply_delta(restored)
        state = td
    else:
        state = restored.state  # the app's restore(state, from_version) takes it from here
    restored.commit()
    t_done = time.monotonic_ns()
    chan.send(json.dumps({"recv": t_recv, "load": t_load, "done": t_done}).encode())
"""


class Receiver:
    """A pre-started new worker, idle until the snapshot arrives."""

    def __init__(self) -> None:
        self.chan, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.chan.settimeout(DEADLINE)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(child.fileno())],
            pass_fds=[child.fileno()], env=env,
        )
        child.close()
        if self.chan.recv(16) != b"ready":
            raise RuntimeError("receiver did not start")

    def send(self, kind: str, snap: Snapshot) -> dict[str, int]:
        msg = json.dumps({"kind": kind, "envelope": snap.envelope.to_dict()}).encode()
        socket.send_fds(self.chan, [msg], snap.send_fds)
        snap.close()
        reply: dict[str, int] = json.loads(self.chan.recv(4096))
        return reply

    def close(self) -> None:
        try:
            self.chan.send(b"")
            self.proc.wait(timeout=DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE)
            self.chan.close()


# -- states ----------------------------------------------------------------------------------

def record(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"player{i}", "level": i % 100, "hp": 100, "mp": 50,
            "alive": True, "x": i * 0.5, "y": i * 0.25, "gold": i * 3}


def shape_a(size_mb: int) -> dict[str, dict[str, Any]]:
    return {f"player:{i:08d}": record(i) for i in range(size_mb * 10_000)}


def shape_b(size_mb: int) -> dict[str, Any]:
    quarter = size_mb * MB // 4 // 8 * 8
    floats = bytearray(os.urandom(quarter))
    ints = bytearray(os.urandom(quarter))
    return {
        "blob": os.urandom(quarter),
        "scratch": bytearray(os.urandom(quarter)),
        "floats": memoryview(floats).cast("d"),
        "ints": memoryview(ints).cast("q"),
    }


def shape_b_oob(size_mb: int) -> dict[str, Any]:
    """Shape B with every buffer out-of-band (as numpy arrays would be): no in-band bulk."""
    quarter = size_mb * MB // 4 // 8 * 8
    def buf() -> memoryview:
        return memoryview(bytearray(os.urandom(quarter)))

    return {"f1": buf().cast("d"), "i1": buf().cast("q"), "f2": buf().cast("d"),
            "i2": buf().cast("q")}


def shape_b_shared(size_mb: int) -> dict[str, SharedBuffer]:
    quarter = size_mb * MB // 4
    out = {}
    for name in ("blob", "scratch", "floats", "ints"):
        sb = SharedBuffer(quarter)
        sb.buf[:] = os.urandom(quarter)
        out[name] = sb
    return out


def shape_b_blobs(size_mb: int) -> TrackedDict[int, bytes]:
    chunk = 64 * 1024
    return TrackedDict({i: os.urandom(chunk) for i in range(size_mb * MB // chunk)})


# -- one trial -------------------------------------------------------------------------------

@dataclass
class Trial:
    pause: float  # ms
    dump: float
    load: float
    restore: float
    snapshot_bytes: int
    bulk: float = 0.0  # ms, outside the pause (pre-copy only)


def full_trial(state: Any, codec: str, checksum_buffers: bool | None = None) -> Trial:
    rx = Receiver()
    try:
        t0 = time.monotonic_ns()
        snap = dump(state, app_version=1, codec=codec, checksum_buffers=checksum_buffers)
        t_dumped = time.monotonic_ns()
        size = snap.envelope.size + snap.envelope.buffers_size
        reply = rx.send("full", snap)
    finally:
        rx.close()
    return Trial(ms(reply["done"] - t0), ms(t_dumped - t0), ms(reply["load"] - reply["recv"]),
                 ms(reply["done"] - reply["load"]), size)


def precopy_trial(td: TrackedDict[Any, Any], codec: str, mutate: Callable[[], None]) -> Trial:
    rx = Receiver()
    try:
        t_bulk = time.monotonic_ns()
        rx.send("bulk", td.begin_precopy(app_version=1, codec=codec))
        bulk = ms(time.monotonic_ns() - t_bulk)
        mutate()
        t0 = time.monotonic_ns()
        snap = td.delta()
        t_dumped = time.monotonic_ns()
        size = snap.envelope.size + snap.envelope.buffers_size
        reply = rx.send("delta", snap)
        td.end_precopy()
    finally:
        rx.close()
    return Trial(ms(reply["done"] - t0), ms(t_dumped - t0), ms(reply["load"] - reply["recv"]),
                 ms(reply["done"] - reply["load"]), size, bulk)


def ms(ns: int) -> float:
    return ns / 1e6


def mutate_records(td: TrackedDict[str, dict[str, Any]], fraction: float) -> Callable[[], None]:
    keys = list(td)
    rng = random.Random(1)

    def mutate() -> None:
        for key in rng.sample(keys, max(1, int(len(keys) * fraction))):
            td[key]["hp"] -= 1  # a nested, in-place change: the common case
            td.touch(key)

    return mutate


def mutate_blobs(td: TrackedDict[int, bytes], fraction: float) -> Callable[[], None]:
    keys = list(td)
    rng = random.Random(1)

    def mutate() -> None:
        for key in rng.sample(keys, max(1, int(len(keys) * fraction))):
            td[key] = os.urandom(len(td[key]))

    return mutate


# -- memcpy reference ------------------------------------------------------------------------

def memcpy(nbytes: int) -> tuple[float, float]:
    """(warm, cold) ms to copy nbytes: into a prefaulted buffer / into fresh pages."""
    src = bytearray(os.urandom(nbytes))  # not zeros: those could be read from one shared page
    dst = bytearray(nbytes)
    dst[:] = src  # prefault
    warm = []
    cold = []
    for _ in range(5):
        t = time.perf_counter()
        dst[:] = src
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        copy = bytes(src)
        cold.append(time.perf_counter() - t)
        del copy
    return statistics.median(warm) * 1e3, statistics.median(cold) * 1e3


# -- driver ----------------------------------------------------------------------------------

@dataclass
class Row:
    shape: str
    size_mb: int
    method: str
    trials: list[Trial] = field(default_factory=list)


def run(sizes: list[int], repeat: Callable[[int], int], only: str | None) -> list[Row]:
    rows: list[Row] = []

    def bench(shape: str, size: int, method: str, fn: Callable[[], Trial]) -> None:
        if only and only not in f"{shape} {method}":
            return
        row = Row(shape, size, method)
        for _ in range(repeat(size)):
            gc.collect()
            row.trials.append(fn())
        rows.append(row)
        print_row(row, memcpy_cache)

    memcpy_cache: dict[int, tuple[float, float]] = {}
    for size in sizes:
        state_a = shape_a(size)
        gc.freeze()  # as a serving worker would: the state is long-lived
        for codec in ("pickle5", "marshal"):
            bench("A", size, f"full {codec}", partial(full_trial, state_a, codec))
        td_a = TrackedDict(state_a)
        for codec in ("pickle5", "marshal"):
            bench("A", size, f"pre-copy 1% {codec}",
                  partial(precopy_trial, td_a, codec, mutate_records(td_a, 0.01)))
        del state_a, td_a
        gc.unfreeze()

        state_b = shape_b(size)
        bench("B", size, "full pickle5 (copy)", partial(full_trial, state_b, "pickle5"))
        bench("B", size, "full pickle5, checksum all",
              partial(full_trial, state_b, "pickle5", True))
        del state_b
        state_oob = shape_b_oob(size)
        bench("B", size, "full pickle5, all out-of-band",
              partial(full_trial, state_oob, "pickle5"))
        del state_oob
        shared = shape_b_shared(size)
        bench("B", size, "SharedBuffer", partial(full_trial, shared, "pickle5"))
        for sb in shared.values():
            sb.close()
        blobs = shape_b_blobs(size)
        bench("B", size, "pre-copy 1% blobs",
              partial(precopy_trial, blobs, "pickle5", mutate_blobs(blobs, 0.01)))
        del blobs
    return rows


HEAD = ("| shape | state | method | moved MB | pause ms median (min-max) | dump | load | restore "
        "| memcpy warm / cold ms | pause / cold memcpy | bulk, outside pause |")


def print_row(row: Row, memcpy_cache: dict[int, tuple[float, float]]) -> None:
    if row.size_mb not in memcpy_cache:
        memcpy_cache[row.size_mb] = memcpy(row.size_mb * MB)
    warm, cold = memcpy_cache[row.size_mb]
    pauses = [t.pause for t in row.trials]
    med = statistics.median
    bulk = med(t.bulk for t in row.trials)
    print(
        f"| {row.shape} | {row.size_mb} MB | {row.method} "
        f"| {med(t.snapshot_bytes for t in row.trials) / MB:.2f} "
        f"| **{med(pauses):.2f}** ({min(pauses):.2f}-{max(pauses):.2f}) "
        f"| {med(t.dump for t in row.trials):.2f} | {med(t.load for t in row.trials):.2f} "
        f"| {med(t.restore for t in row.trials):.2f} | {warm:.2f} / {cold:.2f} "
        f"| {med(pauses) / cold:.1f}x | {f'{bulk:.0f} ms' if bulk else '-'} |",
        flush=True,
    )


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), "?")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    return (f"{' '.join(platform.uname())}; nproc {os.cpu_count()}; CPU {cpu}; "
            f"Python {platform.python_version()}; THP {thp}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 MB only, 2 trials: a smoke run")
    parser.add_argument("--sizes", default="1,10,100", help="state sizes in MB (default 1,10,100)")
    parser.add_argument("--only", help="run only rows whose 'shape method' contains this")
    args = parser.parse_args()
    sizes = [1] if args.quick else [int(s) for s in args.sizes.split(",")]

    def repeat(size: int) -> int:
        return 2 if args.quick else (3 if size >= 100 else 5)

    print(f"# {machine()}")
    print(f"# load average at the start (1/5/15 min): {os.getloadavg()}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    run(sizes, repeat, args.only)
    # Other processes on a 2-vCPU machine move these figures a lot: say how busy it was.
    print(f"# load average at the end (1/5/15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
