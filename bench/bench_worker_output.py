"""What a worker's log output costs the supervisor: `--worker-output prefixed` (each line
read, decoded, prefixed and logged by swapd) against `passthrough` (the worker writes to
swapd's own stdout/stderr; swapd never sees the bytes).

One worker (bench/apps/chatty.py) writes bursts of JSON access-log lines (~170 bytes, one
write and flush per line, as a logging handler does) to stdout; swapd's stdout and stderr go
to a file. Per mode and run: the supervisor's CPU time over the burst (from schedstat, until
the burst's last line is in the file), per line; and the time the worker spent writing (it
grows when the reader of its pipe cannot keep up: the back-pressure an app feels).

    .venv/bin/python bench/bench_worker_output.py            # 3 runs x 100,000 lines
    .venv/bin/python bench/bench_worker_output.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    PYTHON,
    ROOT,
    BenchError,
    SwapdProcess,
    cpu_seconds,
    machine_info,
    md_table,
    median,
)

APP = [PYTHON, str(ROOT / "bench" / "apps" / "chatty.py")]


def burst(address: tuple[str, int], count: int, tag: str, timeout: float) -> float:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(f"BURST {count} {tag}\n".encode())
        reply = sock.makefile("rb").readline().decode().split()
    if len(reply) != 2 or reply[0] != "done":
        raise BenchError(f"chatty answered {reply!r}")
    return float(reply[1])


def wait_for_line(path: Path, marker: bytes, timeout: float) -> None:
    """Until `marker` is in the file (the supervisor has forwarded the whole burst)."""
    deadline = time.monotonic() + timeout
    with open(path, "rb") as f:
        tail = b""
        while True:
            chunk = f.read(1 << 20)
            if chunk:
                tail = (tail + chunk)[-len(marker) - (1 << 20):]
                if marker in tail:
                    return
                continue
            if time.monotonic() > deadline:
                raise BenchError(f"{marker!r} not in {path} within {timeout:g} s")
            time.sleep(0.005)  # a file has no readiness to wait on; bounded by the deadline


def one_run(mode: str, lines: int, workdir: Path) -> dict[str, float]:
    swapd = SwapdProcess(workdir, ["--bind", "chat=127.0.0.1:0", "--worker-output", mode,
                                   "--", *APP], ready_timeout=60, stop_timeout=30)
    try:
        swapd.start()
        assert swapd.sup is not None
        burst(swapd.address, 1000, "warm", 60)  # first-use costs out of the figure
        wait_for_line(swapd.log_path, b"burst-end warm", 60)
        before = cpu_seconds(swapd.sup.pid)
        t0 = time.perf_counter()
        writing = burst(swapd.address, lines, "run", 300)
        wait_for_line(swapd.log_path, b"burst-end run", 300)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(swapd.sup.pid) - before
    finally:
        notes = swapd.close()
    for note in notes:
        print(f"  note: {note}", file=sys.stderr)
    return {"cpu_s": cpu, "us_per_line": cpu / lines * 1e6, "writing_s": writing,
            "wall_s": wall, "lines_per_s": lines / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 run of 10,000 lines")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args()
    if args.quick:
        args.lines, args.runs = 10_000, 1
    info = machine_info()
    print(f"# worker output cost, {datetime.date.today()}, {args.runs} run(s) x "
          f"{args.lines:,} lines")
    for k, v in info.items():
        print(f"  {k}: {v}")
    results: dict[str, list[dict[str, float]]] = {"prefixed": [], "passthrough": []}
    for i in range(args.runs):
        for mode in results:
            with tempfile.TemporaryDirectory(prefix="swapd-bench-out-") as tmp:
                run = one_run(mode, args.lines, Path(tmp))
            results[mode].append(run)
            print(f"  run {i + 1} {mode:<11} supervisor {run['us_per_line']:7.2f} us/line  "
                  f"worker writing {run['writing_s'] * 1000:8.1f} ms  "
                  f"{run['lines_per_s']:10,.0f} lines/s to the file")
    rows: list[list[Any]] = []
    for mode, runs in results.items():
        rows.append([mode,
                     f"{median([r['us_per_line'] for r in runs]):.2f}",
                     f"{median([r['cpu_s'] for r in runs]) * 1000:.0f}",
                     f"{median([r['writing_s'] for r in runs]) * 1000:.0f}",
                     f"{median([r['lines_per_s'] for r in runs]):,.0f}"])
    print()
    print(md_table(["--worker-output", "supervisor CPU, us/line", "supervisor CPU, ms",
                    "worker writing, ms", "lines/s into the file"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "lines": args.lines,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
