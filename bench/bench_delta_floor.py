"""Where the time of a pre-copy delta goes inside the pause, against CPython's own floor.

    python bench/bench_delta_floor.py                 # 1e6 records, 10,000 changed, 7 rounds
    python bench/bench_delta_floor.py --records 100000 --changed 1000

A delta of a TrackedDict of small records (shape A of bench/notes/handoff-pause.md: a
9-field dict per key) has three costs inside the pause: the old worker encodes the changed
records (`td.delta()`: pickle into a sealed memfd), the new worker decodes them
(`swapd.handoff.load`) and merges them into its copy (`td.apply_delta`: a `dict.update`
of 10,000 keys into a 1e6-entry dict, freeing the 10,000 records replaced). Each is timed
here in its own process (the receiver holds its copy as a successor does: loaded from a
bulk), in CPU time (`time.process_time`, so other jobs on the machine count less), and set
beside the bare CPython operations it cannot avoid:

    encode   floor: pickle.dumps({k: td[k] for k in changed}, protocol=5)
    decode   floor: pickle.loads(those bytes)
    merge    floor: dict.update(decoded) on the receiver's dict (the lookups of 10,000 keys
             spread over a ~600 MB heap, the frees of the replaced records)

Median of the rounds; each round changes a fresh random 1 % (nested change + touch()).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import pickle
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapd import handoff
from swapd.handoff import TrackedDict


def record(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"player{i}", "level": i % 100, "hp": 100, "mp": 50,
            "alive": True, "x": i * 0.5, "y": i * 0.25, "gold": i * 3}


def cpu_ms(fn: Any) -> tuple[float, Any]:
    t = time.process_time()
    out = fn()
    return (time.process_time() - t) * 1000, out


def receiver(conn: Any, fds: socket.socket) -> None:
    """The successor: bulk in, then per round a delta (swapd) and the bare bytes (floor)."""
    td: TrackedDict[Any, Any] = TrackedDict()
    conn.recv()
    fd = socket.recv_fds(fds, 1, 1)[1][0]
    td.load_bulk(handoff.load(None, fd, []))
    gc.freeze()
    plain = dict(td.items())  # the floor's own copy, built the same way (same heap shape)
    gc.freeze()
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        raw = msg
        fd = socket.recv_fds(fds, 1, 1)[1][0]
        gc.disable()
        decode, part = cpu_ms(lambda fd=fd: handoff.load(None, fd, []))
        merge, _ = cpu_ms(lambda part=part: td.apply_delta(part))
        del part
        floor_decode, sets = cpu_ms(lambda raw=raw: pickle.loads(raw))
        floor_merge, _ = cpu_ms(lambda sets=sets: plain.update(sets))
        del sets
        gc.enable()
        conn.send((decode, merge, floor_decode, floor_merge))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--changed", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    ctx = mp.get_context("fork")
    td: TrackedDict[str, dict[str, Any]] = TrackedDict(
        {f"player:{i:08d}": record(i) for i in range(args.records)})
    gc.freeze()
    keys = list(td)
    parent, child = ctx.Pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc = ctx.Process(target=receiver, args=(child, theirs))
    proc.start()
    rows: list[tuple[float, ...]] = []
    try:
        bulk = td.begin_precopy(app_version=1)
        parent.send("bulk")
        socket.send_fds(ours, [b"f"], [bulk.memfd])
        bulk.close()
        assert parent.recv() == "ready"
        rng = random.Random(1)
        for _ in range(args.rounds):
            changed = rng.sample(keys, args.changed)
            for k in changed:
                td[k]["hp"] -= 1
                td.touch(k)
            gc.disable()
            encode, snap = cpu_ms(td.delta)
            floor_encode, raw = cpu_ms(
                lambda changed=changed: pickle.dumps({k: td[k] for k in changed}, protocol=5))
            gc.enable()
            parent.send(raw)
            socket.send_fds(ours, [b"f"], [snap.memfd])
            snap.close()
            decode, merge, floor_decode, floor_merge = parent.recv()
            rows.append((encode, decode, merge, floor_encode, floor_decode, floor_merge))
        parent.send(None)
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"# {args.records:,} records, {args.changed:,} changed, {args.rounds} rounds; "
          f"CPU ms, median; load average {os.getloadavg()[0]:.2f}")
    print("| step | swapd | CPython floor |\n|---|---|---|")
    for name, i in (("encode (old worker)", 0), ("decode (new worker)", 1),
                    ("merge (new worker)", 2)):
        print(f"| {name} | {med[i]:.1f} | {med[i + 3]:.1f} |")
    print(f"| **total** | **{sum(med[:3]):.1f}** | **{sum(med[3:]):.1f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
