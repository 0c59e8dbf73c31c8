"""The stateful handoff pause against the number of idle connections, under load, beside the
same app swapped stateless; and what an upgrade's wall time is made of.

    python bench/bench_handoff_conns.py                 # every row (~10 min)
    python bench/bench_handoff_conns.py --quick         # 0 and 1,000 connections, 2 swaps
    python bench/bench_handoff_conns.py --rows 1x10000 4x16000 --swaps 5
    python bench/bench_handoff_conns.py --json out.json

Each row (W workers, N idle connections) starts

    python -P -m swapd run --mode stateful|stateless --workers W --bind http=127.0.0.1:0
        --control PATH -- python examples/counter.py

opens N keep-alive connections that each send one request (GET /count) and then stay idle,
starts a load of 8 keep-alive clients sending POST /incr (swapd.loadgen, in a thread of this
process), and runs `upgrade` several times. Per swap it records swapd's `timings_ms` (pause
= new worker accepts - old worker stopped accepting, from the workers' CLOCK_MONOTONIC
stamps; pause_cpu = the CPU time the two workers of the slowest slot used inside it, which,
unlike the pause, does not count waiting for a CPU on a busy machine; the phases are
supervisor marks from the request), the upgrade's wall time as the
client sees it, the load's failures and longest gap without a success in the swap's window
(what a client waits), and then sends one more request on every idle connection:

    stateful   every one must answer, on the same TCP connection (they were handed over)
    stateless  the old generation drained them: those that answer once (Connection: close)
               or are found closed are counted, then reopened for the next swap

Before the next swap it waits for the old workers to exit (pidfd), so their exit does not
overlap the next pause, and (bounded) for the rest of the machine to be quiet. At the end
(stateful) the acknowledged increments must equal the sum of the workers' counts.

The start-up section times, 15 runs each (median), what a new worker's "ready" is made of:
an interpreter (`python -c pass`), the imports of swapd.worker and of the example app, and
`swapd.worker`'s own share.

Every process started here is ended by PID; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    ROOT,
    BenchError,
    SwapdProcess,
    clean_env,
    machine_info,
    md_table,
    median,
    wait_quiet,
)

from swapd.loadgen import BackgroundLoad, http_post

APP = ROOT / "examples" / "counter.py"
REQUEST = b"GET /count HTTP/1.1\r\nHost: bench\r\n\r\n"
LOAD_CLIENTS = 8
QUIET_LIMIT = 0.5
SWAP_TIMEOUT = 120.0
EXIT_TIMEOUT = 120.0
ROUND_TIMEOUT = 120.0
ROUND_BATCH = 200  # idle connections sending at once after a swap
SWAPD_ARGS = ("--quiesce-timeout", "30", "--restore-timeout", "60", "--ready-timeout", "60",
              "--drain-timeout", "60")
ROWS = ("1x0", "1x1000", "1x10000", "4x0", "4x1000", "4x10000", "4x16000")
QUICK_ROWS = ("1x0", "1x1000", "4x1000")
TARGETS = {"1x10000": 20.0, "4x16000": 30.0}  # pause goals of issue 13, ms


# -- idle connections -----------------------------------------------------------------------


class IdlePool:
    """N keep-alive connections that each made one request and now wait, held here."""

    def __init__(self, address: tuple[str, int], count: int) -> None:
        self.address = address
        self.socks: list[socket.socket] = []
        self.reopened = 0
        for _ in range(count):
            self.socks.append(self._open())

    def _open(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=30)
        sock.setblocking(False)
        return sock

    def round(self) -> tuple[int, int, bool]:
        """One request on each, ROUND_BATCH at a time (10,000 at once would queue the
        load's requests behind them for seconds): (answered, closed by the server, same
        TCP connections)."""
        names = [s.getsockname() for s in self.socks]
        answered = closed = 0
        for i in range(0, len(self.socks), ROUND_BATCH):
            a, c = self._round(self.socks[i : i + ROUND_BATCH])
            answered += a
            closed += c
        return answered, closed, [s.getsockname() for s in self.socks] == names

    def _round(self, socks: list[socket.socket]) -> tuple[int, int]:
        poller = select.epoll()
        pending: dict[int, socket.socket] = {}
        data: dict[int, bytes] = {}
        closed: set[int] = set()
        for sock in socks:
            try:
                sock.send(REQUEST)
            except OSError:
                closed.add(sock.fileno())
                continue
            pending[sock.fileno()] = sock
            data[sock.fileno()] = b""
            poller.register(sock.fileno(), select.EPOLLIN)
        answered = 0
        deadline = time.monotonic() + ROUND_TIMEOUT
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{len(pending)} idle connection(s) unanswered after "
                                     f"{ROUND_TIMEOUT:g} s")
                for fd, _ in poller.poll(remaining):
                    try:
                        chunk = pending[fd].recv(65536)
                    except (ConnectionResetError, BlockingIOError):
                        chunk = b""
                    data[fd] += chunk
                    head, sep, body = data[fd].partition(b"\r\n\r\n")
                    if sep and body:
                        if not head.startswith(b"HTTP/1.1 200"):
                            raise BenchError(f"idle connection answered {head[:60]!r}")
                        answered += 1
                        if b"connection: close" in head.lower():
                            closed.add(fd)
                    elif not chunk:
                        closed.add(fd)
                    else:
                        continue
                    poller.unregister(fd)
                    del pending[fd]
        finally:
            poller.close()
        if closed:  # stateless: the drain closed them; reopen (one request each) for the next
            fresh = []
            for i, sock in enumerate(self.socks):
                if sock.fileno() in closed:
                    sock.close()
                    self.socks[i] = self._open()
                    fresh.append(self.socks[i])
                    self.reopened += 1
            self._round(fresh)
        return answered, len(closed)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


# -- one row ------------------------------------------------------------------------------------


@dataclass
class Swap:
    ok: bool
    error: str | None
    wall_ms: float
    timings: dict[str, float]
    load_failed: int
    load_gap_ms: float
    idle_answered: int
    idle_closed: int
    same_connections: bool
    other_load: float | None


@dataclass
class Row:
    mode: str
    workers: int
    conns: int
    per_worker: list[int] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    load_ok: int = 0
    load_failed: int = 0
    acknowledged: int | None = None
    final_count: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.workers}x{self.conns}"


class Service(SwapdProcess):
    def __init__(self, workdir: Path, mode: str, workers: int) -> None:
        super().__init__(workdir, ["--mode", mode, "--workers", str(workers),
                                   "--bind", "http=127.0.0.1:0", *SWAPD_ARGS,
                                   "--", PYTHON, str(APP)],
                         ready_timeout=60, stop_timeout=60)

    def worker_pids(self) -> list[int]:
        assert self.sup is not None
        return [c.pid for c in psutil.Process(self.sup.pid).children()]


def connections_per_worker(pids: list[int], port: int) -> list[int]:
    counts = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            counts.append(sum(1 for c in psutil.Process(pid).net_connections("tcp")
                              if c.status == "ESTABLISHED" and c.laddr.port == port))
    return counts


def wait_exited(pids: list[int], timeout: float) -> None:
    """Until every process of `pids` has exited (pidfd readable), or BenchError."""
    poller = select.poll()
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
            poller.register(fds[-1], select.POLLIN)
    try:
        deadline = time.monotonic() + timeout
        pending = set(fds)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"old workers still running {timeout:g} s after the swap")
            for fd, _ in poller.poll(remaining * 1000):
                pending.discard(fd)
                poller.unregister(fd)
    finally:
        for fd in fds:
            os.close(fd)


def run_row(mode: str, workers: int, conns: int, swaps: int, quiet: bool) -> Row:
    row = Row(mode, workers, conns)
    with tempfile.TemporaryDirectory(prefix="bench-conns-") as tmp:
        svc = Service(Path(tmp), mode, workers)
        pool: IdlePool | None = None
        try:
            svc.start()
            pool = IdlePool(svc.address, conns)
            pool.round()
            row.per_worker = connections_per_worker(svc.worker_pids(), svc.address[1])
            with BackgroundLoad(svc.address, http_post("/incr"), mode="keepalive",
                                clients=LOAD_CLIENTS, duration=3600,
                                max_requests=10_000_000) as load:
                for i in range(swaps):
                    load.wait_for_successes(200, timeout=60)
                    other = wait_quiet(QUIET_LIMIT, timeout=20, sample=0.5) if quiet else None
                    old = svc.worker_pids()
                    label = f"swap {i + 1}"
                    t0 = time.monotonic()
                    with load.window(label):
                        result = svc.call("upgrade", SWAP_TIMEOUT)
                    wall = (time.monotonic() - t0) * 1000
                    assert svc.notify is not None
                    svc.notify.drain()
                    data = result.get("data") or {}
                    ok = bool(result.get("ok"))
                    if ok:
                        wait_exited(old, EXIT_TIMEOUT)
                    answered, closed, same = pool.round()
                    row.swaps.append(Swap(
                        ok=ok, error=None if ok else str(data.get("error", result))[:300],
                        wall_ms=wall, timings={k: float(v) for k, v in
                                               (data.get("timings_ms") or {}).items()},
                        load_failed=0, load_gap_ms=0.0, idle_answered=answered,
                        idle_closed=closed, same_connections=same, other_load=other))
                    print(f"  {mode} {row.name} swap {i + 1}: {describe(row.swaps[-1])}",
                          flush=True)
                load.wait_for_successes(200, timeout=60)
            report = load.report
            assert report is not None
            row.load_ok, row.load_failed = report.ok, report.failed
            for swap, window in zip(row.swaps, report.windows, strict=True):
                swap.load_failed = window.failed
                swap.load_gap_ms = window.longest_gap * 1000
            if mode == "stateful":
                row.acknowledged = report.acknowledged
                row.final_count = sum(shard_counts(svc, workers))
            if report.failed:
                row.notes.append(report.format())
        except BenchError as e:
            row.notes.append(str(e))
            print(f"  {mode} {row.name}: {e}", flush=True)
        finally:
            if pool is not None:
                pool.close()
            row.notes += svc.close()
            row.notes += [f"log: {line}" for line in svc.log_problems()[:20]]
    return row


def shard_counts(svc: Service, workers: int) -> list[int]:
    """Each worker's count: GET /count on fresh connections until every worker answered
    (the worker is the one holding the connection's other end)."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while len(seen) < workers and time.monotonic() < deadline:
        with socket.create_connection(svc.address, timeout=10) as sock:
            sock.sendall(REQUEST)
            data = b""
            while b"\r\n\r\n" not in data or data.endswith(b"\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError(f"GET /count: connection closed after {data!r}")
                data += chunk
            count = int(data.partition(b"\r\n\r\n")[2])
            pid = next((p for p in svc.worker_pids() if _holds(p, sock.getsockname())), None)
        if pid is not None:
            seen[pid] = count
    return list(seen.values())


def _holds(pid: int, local: tuple[str, int]) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return any(c.raddr and c.raddr.port == local[1]
                   for c in psutil.Process(pid).net_connections("tcp"))
    return False


def describe(s: Swap) -> str:
    t = s.timings
    if not s.ok:
        return f"FAILED {s.error}"
    return (f"pause {t.get('pause', float('nan')):.2f} ms (CPU "
            f"{t.get('pause_cpu', float('nan')):.2f}), wall {s.wall_ms:.0f} ms (ready "
            f"{t.get('ready', 0):.0f}, pre-send {_phase(t, 'ready', 'present'):.1f}, "
            f"quiesce..activated {_phase(t, 'quiesce', 'activated'):.1f}), load failed "
            f"{s.load_failed}, idle answered {s.idle_answered} closed {s.idle_closed}, "
            f"same connections {s.same_connections}")


def _phase(t: dict[str, float], a: str, b: str) -> float:
    return t[b] - t[a] if a in t and b in t else float("nan")


def _f(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def _med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return median(values) if values else float("nan")


# -- start-up -----------------------------------------------------------------------------------


STARTUP = (
    ("interpreter (python -c pass)", ["-c", "pass"]),
    ("+ asyncio, uvloop", ["-c", "import asyncio, uvloop"]),
    ("+ swapd.worker", ["-c", "import swapd.worker"]),
    ("+ swapd.worker and the app's imports (h11, httpkit)",
     ["-c", f"import sys; sys.path.insert(0, {str(ROOT / 'examples')!r}); "
            "import swapd.worker, httpkit"]),
)


def startup(runs: int) -> list[tuple[str, float, float]]:
    out = []
    env = clean_env()
    for name, args in STARTUP:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([PYTHON, *args], check=True, env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, timeout=60)
            times.append((time.perf_counter() - t) * 1000)
        out.append((name, median(times), min(times)))
    return out


# -- report -------------------------------------------------------------------------------------


def headline(rows: list[Row]) -> str:
    by = {(r.mode, r.name): r for r in rows}
    names = list(dict.fromkeys(r.name for r in rows))
    body = []
    for name in names:
        sf, sl = by.get(("stateful", name)), by.get(("stateless", name))
        cells: list[object] = [name.replace("x", " x ")]
        if sf is not None:
            ok = [s for s in sf.swaps if s.ok]
            pauses = [s.timings["pause"] for s in ok if "pause" in s.timings]
            cpus = [s.timings["pause_cpu"] for s in ok if "pause_cpu" in s.timings]
            cells += [
                f"**{_f(median(pauses))}** ({_f(min(pauses))}-{_f(max(pauses))})" if pauses
                else "failed",
                f"{_f(median(cpus))} ({_f(max(cpus))})" if cpus else "-",
                _f(_med([s.wall_ms for s in ok]), 0),
                _f(max((s.load_gap_ms for s in ok), default=float("nan"))),
                f"{sum(s.load_failed for s in sf.swaps)}",
                f"{min((s.idle_answered for s in sf.swaps), default=0)}/{sf.conns}"
                + ("" if all(s.same_connections for s in sf.swaps) else " (new conns!)"),
                "/".join(str(c) for c in sf.per_worker) or "-",
                "-" if sf.acknowledged is None else
                f"{sf.acknowledged - (sf.final_count or 0)}",
            ]
        else:
            cells += ["-"] * 8
        if sl is not None:
            ok = [s for s in sl.swaps if s.ok]
            cells += [
                _f(_med([s.wall_ms for s in ok]), 0),
                _f(max((s.load_gap_ms for s in ok), default=float("nan"))),
                f"{sum(s.load_failed for s in sl.swaps)}",
                f"{max((s.idle_closed for s in sl.swaps), default=0)}/{sl.conns}",
            ]
        else:
            cells += ["-"] * 4
        body.append(cells)
    return md_table(
        ["workers x idle conns", "stateful pause ms median (min-max)",
         "CPU in the pause ms median (max)", "upgrade wall ms",
         "worst load gap ms", "load errors", "idle conns answering after", "split",
         "lost incr.", "stateless: upgrade wall ms", "worst load gap ms", "load errors",
         "idle conns closed by the drain"], body)


def phases(rows: list[Row]) -> str:
    body = []
    for r in rows:
        ok = [s for s in r.swaps if s.ok]
        if not ok:
            continue
        t = [s.timings for s in ok]
        body.append([
            r.mode, r.name, _f(_med([x.get("spawned", float("nan")) for x in t])),
            _f(_med([_phase(x, "spawned", "ready") for x in t])),
            _f(_med([_phase(x, "ready", "present") for x in t])),
            _f(_med([_phase(x, "present", "quiesce") for x in t])),
            _f(_med([_phase(x, "quiesce", "snapshotted") for x in t])),
            _f(_med([_phase(x, "snapshotted", "restored") for x in t])),
            _f(_med([_phase(x, "restored", "activated") for x in t])),
            _f(_med([x.get("activated", x.get("committed", float("nan"))) for x in t])),
            _f(_med([s.wall_ms for s in ok])),
        ])
    return md_table(["mode", "row", "spawned", "→ ready", "→ pre-sent", "→ quiesce",
                     "→ snapshotted", "→ restored", "→ activated", "activated at",
                     "wall (client)"], body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"rows {' '.join(QUICK_ROWS)}, 2 swaps")
    p.add_argument("--rows", nargs="+", help=f"WORKERSxCONNS (default {' '.join(ROWS)})")
    p.add_argument("--modes", nargs="+", default=["stateful", "stateless"])
    p.add_argument("--swaps", type=int, help="swaps per row (default 5, quick 2)")
    p.add_argument("--startup-runs", type=int, default=15)
    p.add_argument("--no-wait-quiet", dest="quiet", action="store_false")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = args.rows or list(QUICK_ROWS if args.quick else ROWS)
    swaps = args.swaps or (2 if args.quick else 5)
    info = machine_info()
    command = " ".join(["python", "bench/bench_handoff_conns.py",
                        *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {info['uname']}\n# nproc {info['nproc']}, {info['cpu']}, "
          f"Python {info['python']}, load average {info['loadavg']}, "
          f"RLIMIT_NOFILE {hard}", flush=True)
    rows: list[Row] = []
    for name in names:
        workers, conns = (int(x) for x in name.split("x"))
        if conns + 200 > hard:
            print(f"{name}: skipped, {conns} connections do not fit RLIMIT_NOFILE {hard}")
            continue
        for mode in args.modes:
            print(f"{mode} {name}:", flush=True)
            rows.append(run_row(mode, workers, conns, swaps, args.quiet and not args.quick))
    started = startup(args.startup_runs)
    print("\n## Pause and service against idle connections\n")
    print(headline(rows))
    print("\n## Where an upgrade's time goes (supervisor marks, ms from the request; medians)\n")
    print(phases(rows))
    print("\n## A new worker's start-up, before it can be ready (ms, median / min of "
          f"{args.startup_runs})\n")
    print(md_table(["what", "median", "min"], [[n, _f(m), _f(lo)] for n, m, lo in started]))
    print("\n## Targets\n")
    failed = False
    for name, goal in TARGETS.items():
        r = next((r for r in rows if r.mode == "stateful" and r.name == name), None)
        pauses = [s.timings["pause"] for s in r.swaps if s.ok] if r else []
        if pauses:
            verdict = "met" if median(pauses) <= goal else "NOT met"
            print(f"- pause <= {goal:g} ms with {name.replace('x', ' x ')}: {verdict}, median "
                  f"{median(pauses):.1f} ms, max {max(pauses):.1f} ms")
    for r in rows:
        bad = [s for s in r.swaps if not s.ok or s.load_failed]
        if r.mode == "stateful":
            bad += [s for s in r.swaps if s.idle_answered != r.conns or not s.same_connections]
            if r.acknowledged is not None and r.acknowledged != r.final_count:
                r.notes.append(f"acknowledged {r.acknowledged} != final {r.final_count}")
                failed = True
        if bad or r.load_failed:
            failed = True
    notes = [f"- {r.mode} {r.name}: {n}" for r in rows for n in r.notes]
    if notes:
        print("\n## Notes\n")
        print("\n".join(notes))
    print(f"\n# load average at the end: {machine_info()['loadavg']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "command": command, "startup": started,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
