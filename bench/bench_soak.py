"""Soak: N upgrades in a row under load, in each mode; does anything fail, leak or grow?

    python bench/bench_soak.py                      # 500 swaps per mode (~15 min)
    python bench/bench_soak.py --swaps 20           # smoke run
    python bench/bench_soak.py --modes stateful --swaps 200 --json out.json

Per mode, one `swapd run` (everything on 127.0.0.1, the port from the kernel) and
`swapd.loadgen` clients on keep-alive connections for the whole run; one `swapd upgrade`
after every --between successful requests, until --swaps swaps:

    stateless   examples/hello.py, 2 workers, GET /
    stateful    examples/counter.py, 1 worker, POST /incr: the count must equal the
                acknowledged increments at the end (lost = acknowledged - final count)

Workers are chatty (--chatty lines of 1000 characters at start-up, through a shell
wrapper that then execs the app): their output is what the supervisor keeps a tail of, so a
supervisor that kept every generation grew by megabytes per hundred swaps.

Recorded every --sample-every swaps, once the previous generation has exited: the
supervisor's RSS and open fds (from /proc), the generations it holds in memory and its
bounded history. Reported: failed requests (all,
and inside swap windows), failed swaps, lost increments, RSS growth from the first sample
after --warmup swaps (lazily built caches: psutil, logging) to the last, and the fd range.
Goal: 0 failed, 0 lost, RSS growth < 2 MB over 500 swaps, fds flat.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from _common import PYTHON, ROOT, BenchError, SwapdProcess, machine_info, md_table

from swapd.loadgen import (
    BackgroundLoad,
    LoadError,
    fetch_sync,
    http_get,
    http_get_int,
    http_post,
)

MODES = {
    "stateless": ("hello.py", 2, http_get("/")),
    "stateful": ("counter.py", 1, http_post("/incr")),
}
SWAP_TIMEOUT = 120.0


@dataclass
class Sample:
    swaps: int
    rss_kib: int
    fds: int
    held: int  # generation records in memory
    history: int


@dataclass
class Soak:
    mode: str
    swaps: int
    failed_swaps: int
    requests_ok: int
    requests_failed: int
    failed_in_windows: int
    failures: dict[str, int]
    acknowledged: int | None
    final_count: int | None
    lost: int | None
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    swap_errors: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)

    def growth_kib(self, warmup: int) -> int:
        base = next((s for s in self.samples if s.swaps >= warmup), self.samples[0])
        return self.samples[-1].rss_kib - base.rss_kib


def chatty(lines: int, app: str) -> list[str]:
    """The app's command, behind a shell that first prints `lines` long lines."""
    if lines <= 0:
        return [PYTHON, str(ROOT / "examples" / app)]
    script = (f"{PYTHON} -c 'for i in range({lines}): print(i, \"x\" * 1000)'; "
              f"exec {PYTHON} {ROOT / 'examples' / app}")
    return ["sh", "-c", script]


def sample(sup: SwapdProcess, swaps: int) -> Sample:
    """Once the previous generation is gone (memory is compared between like moments: one
    generation held, its predecessor's memory handed back), the supervisor's figures."""
    assert sup.sup is not None
    pid = sup.sup.pid
    deadline = time.monotonic() + 60
    while sup.call("status", 10.0)["data"].get("generations_held", 1) > 1:
        if time.monotonic() > deadline:
            raise BenchError("the previous generation did not exit within 60 s")
        time.sleep(0.05)  # a benchmark's sampling point, not a test's synchronisation
    rss = psutil.Process(pid).memory_info().rss // 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    data = sup.call("status", 10.0)["data"]
    return Sample(swaps, rss, fds, data.get("generations_held", -1), len(data.get("ended", [])))


def soak(mode: str, args: argparse.Namespace, workdir: Path) -> Soak:
    app, workers, request = MODES[mode]
    sup = SwapdProcess(workdir, ["--bind", "http=127.0.0.1:0", "--workers", str(workers),
                                 "--mode", mode, "--", *chatty(args.chatty, app)],
                       ready_timeout=60.0, stop_timeout=60.0)
    sup.start()
    result: Soak | None = None
    try:
        samples = [sample(sup, 0)]
        errors: list[str] = []
        t0 = time.monotonic()
        with BackgroundLoad(sup.address, request, clients=args.clients, mode="keepalive",
                            duration=args.swaps * 30.0, max_requests=10**8) as load:
            for i in range(1, args.swaps + 1):
                load.wait_for_successes(args.between, timeout=60)
                with load.window(f"swap {i}"):
                    res = sup.call("upgrade", SWAP_TIMEOUT)
                assert sup.notify is not None
                sup.notify.drain()  # RELOADING=1, READY=1: keep the datagram queue empty
                if not res.get("ok"):
                    errors.append(f"swap {i}: {res.get('error')}")
                if i % args.sample_every == 0 or i == args.swaps:
                    samples.append(sample(sup, i))
                    s = samples[-1]
                    print(f"  {mode}: {i} swaps, rss {s.rss_kib} KiB, fds {s.fds}, "
                          f"held {s.held}, history {s.history}", file=sys.stderr, flush=True)
            load.wait_for_successes(args.between, timeout=60)
            try:
                report = load.stop()
            except LoadError:  # summing up millions of attempts outlasted stop()'s bound
                report = load.wait()
        final = None
        if mode == "stateful":
            final = fetch_sync(sup.address, http_get_int("/count"))
        acknowledged = report.acknowledged
        result = Soak(
            mode=mode, swaps=args.swaps, failed_swaps=len(errors), requests_ok=report.ok,
            requests_failed=report.failed, failed_in_windows=report.failed_in_windows,
            failures=dict(report.failures), acknowledged=acknowledged, final_count=final,
            lost=None if final is None or acknowledged is None else acknowledged - final,
            seconds=round(time.monotonic() - t0, 1), samples=samples, swap_errors=errors[:20],
        )
    finally:
        notes = sup.close()
        if result is not None:
            result.log_problems = (sup.log_problems() + notes)[:20]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--swaps", type=int, default=500)
    p.add_argument("--modes", default="stateless,stateful")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--between", type=int, default=100, help="successful requests per swap")
    p.add_argument("--sample-every", type=int, default=25)
    p.add_argument("--warmup", type=int, default=25,
                   help="RSS growth is measured from the first sample at or after this swap")
    p.add_argument("--chatty", type=int, default=40, help="lines each worker prints at start")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (stateless, stateful)")
    info = machine_info()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = []
    with tempfile.TemporaryDirectory(prefix="swapd-soak-") as tmp:
        for mode in modes:
            workdir = Path(tmp) / mode
            workdir.mkdir()
            try:
                results.append(soak(mode, args, workdir))
            except BenchError as e:
                print(f"{mode}: {e}", file=sys.stderr)
                return 1
    print(f"# soak: {args.swaps} swaps per mode, {args.clients} keep-alive clients, "
          f"{args.chatty} chatty lines per worker\n")
    print(f"started {started}; " + "; ".join(f"{k} {v}" for k, v in info.items()))
    print("command: python bench/bench_soak.py " + " ".join(sys.argv[1:]) + "\n")
    rows = []
    for r in results:
        fds = [s.fds for s in r.samples]
        rows.append([
            r.mode, r.swaps, r.failed_swaps, f"{r.requests_ok:,}", r.requests_failed,
            "-" if r.lost is None else f"{r.lost} of {r.acknowledged:,}",
            f"{r.samples[0].rss_kib / 1024:.1f} → {r.samples[-1].rss_kib / 1024:.1f}",
            f"{r.growth_kib(args.warmup) / 1024:+.2f}",
            f"{min(fds)}-{max(fds)}", max(s.held for s in r.samples), f"{r.seconds:.0f} s",
        ])
    print(md_table(["mode", "swaps", "failed swaps", "ok requests", "failed requests", "lost",
                    "RSS MiB start → end", f"RSS growth after swap {args.warmup}, MiB",
                    "fds", "generations held (max)", "time"], rows))
    for r in results:
        print(f"\n{r.mode}: samples (swaps: RSS KiB / fds)")
        print("  " + ", ".join(f"{s.swaps}: {s.rss_kib}/{s.fds}" for s in r.samples))
        for line in r.swap_errors + r.log_problems:
            print(f"  {line}")
        if r.failures:
            print(f"  failures: {r.failures}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"started": started, "machine": info, "argv": sys.argv[1:],
             "results": [asdict(r) for r in results]}, indent=1))
    ok = all(r.failed_swaps == 0 and r.requests_failed == 0 and not r.lost for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())



