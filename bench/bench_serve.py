"""`swapd serve` against uvicorn (ASGI) and gunicorn gthread (WSGI): the same hello-world app,
the same load generator, side by side in one run.

    python bench/bench_serve.py                  # full run (~15 minutes)
    python bench/bench_serve.py --quick          # smoke run: every cell once, 2 s
    python bench/bench_serve.py --json out.json --markdown out.md

Servers, each with 1 and 2 worker processes, access logs off:

    swapd      swapd run --workers N --app hello_asgi:app -- --no-access-log
               (the real deployment: supervisor, listeners passed to the workers)
    uvicorn    uvicorn hello_asgi:app --http httptools --loop uvloop [--workers N]
    swapd-wsgi swapd run --workers N --app hello_wsgi:app -- --threads 4
    gunicorn   gunicorn -k gthread --threads 4 --workers N hello_wsgi:app

Load: swapd.loadgen, 32 closed-loop clients (uvloop, in this process), connection modes
`keepalive` and `close`. The servers of one (interface, workers) group run together; each
round measures every (mode, server) cell once, in an order that alternates between rounds, so
slow drifts of this shared machine hit every server alike. A cell's figure is the median over
rounds. Besides ok/s and latency: the server's CPU time per 1,000 responses (its whole
process tree, from /proc), which the load generator's share of the cores does not blur, and
how evenly the clients were served (the least-served client's share of the best-served's).
Other processes' CPU use during each run is printed too: on a busy machine read ratios, not
absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from _common import (
    PYTHON,
    BenchError,
    CpuMeter,
    ProcessGroup,
    SwapdProcess,
    clean_env,
    listening_port,
    machine_info,
    md_table,
    median,
)

from swapd.loadgen import LoadGenerator, RequestFailed, fetch, http_get

APPS = Path(__file__).resolve().parent / "apps"
CLIENTS = 32
THREADS = 4
MODES = ("keepalive", "close")
BIN = Path(PYTHON).parent


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Server:
    """One server under test: started once per group, measured many times."""

    name = ""

    def __init__(self, workers: int, workdir: Path) -> None:
        self.workers = workers
        self.workdir = workdir
        self.address = ("127.0.0.1", 0)

    def start(self) -> None:
        raise NotImplementedError

    def root_pid(self) -> int:
        raise NotImplementedError

    def close(self) -> list[str]:
        raise NotImplementedError

    def cpu(self) -> float:
        """CPU seconds of the whole process tree so far, every thread counted (from
        /proc/<pid>/stat via psutil, 10 ms ticks: fine over seconds). Not _common's
        cpu_seconds(): its schedstat figure is the main thread's only, which misses the
        thread pools of the WSGI servers."""
        try:
            root = psutil.Process(self.root_pid())
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total


class Swapd(Server):
    def __init__(self, workers: int, workdir: Path, app: str, extra: Sequence[str]) -> None:
        super().__init__(workers, workdir)
        self.app = app
        self.name = "swapd serve" if app.startswith("hello_asgi") else "swapd serve (WSGI)"
        self.proc = SwapdProcess(workdir, [
            "--bind", "http=127.0.0.1:0", "--workers", str(workers), "--cwd", str(APPS),
            "--log-level", "warning", "--app", app, "--", "--no-access-log",
            "--log-level", "warning", *extra], ready_timeout=60, stop_timeout=30)

    def start(self) -> None:
        self.proc.start()
        self.address = self.proc.address

    def root_pid(self) -> int:
        assert self.proc.sup is not None
        return self.proc.sup.pid

    def close(self) -> list[str]:
        notes = self.proc.close()
        return notes + [f"{self.name}: {line}" for line in self.proc.log_problems()]


class Plain(Server):
    """A server binding port 0 itself (uvicorn, gunicorn); ready once it answers."""

    def __init__(self, workers: int, workdir: Path, name: str, argv: list[str]) -> None:
        super().__init__(workers, workdir)
        self.name = name
        self.argv = argv
        self.group = ProcessGroup()
        self.proc: Any = None

    def start(self) -> None:
        log = open(self.workdir / f"{self.name.split()[0]}.log", "wb")  # noqa: SIM115
        self.proc = self.group.spawn(self.argv, cwd=APPS, env=clean_env(HOME=str(self.workdir)),
                                     stdin=None, stdout=log, stderr=log)
        port = listening_port(self.proc.pid, timeout=30)
        self.address = ("127.0.0.1", port)
        deadline = time.monotonic() + 30
        while True:  # every worker forked and answering: one request must succeed
            try:
                asyncio.run(fetch(self.address, http_get("/"), timeout=2))
                return
            except RequestFailed as e:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} does not answer: {e}") from e

    def root_pid(self) -> int:
        return int(self.proc.pid)

    def close(self) -> list[str]:
        return self.group.end()


def uvicorn(workers: int, workdir: Path) -> Server:
    argv = [str(BIN / "uvicorn"), "hello_asgi:app", "--host", "127.0.0.1", "--port", "0",
            "--http", "httptools", "--loop", "uvloop", "--no-access-log",
            "--log-level", "warning", "--lifespan", "off"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return Plain(workers, workdir, "uvicorn", argv)


def gunicorn(workers: int, workdir: Path) -> Server:
    argv = [str(BIN / "gunicorn"), "-k", "gthread", "--threads", str(THREADS), "--workers",
            str(workers), "--bind", "127.0.0.1:0", "--no-control-socket",
            "--log-level", "warning", "hello_wsgi:app"]
    return Plain(workers, workdir, "gunicorn gthread", argv)


@dataclass
class Run:
    server: str
    interface: str
    workers: int
    mode: str
    round: int
    ok_per_s: float
    failed: int
    p50_ms: float
    p99_ms: float
    cpu_ms_per_1k: float
    client_spread: float  # least-served client's ok count / best-served's
    others_cores: float  # CPU used meanwhile by processes outside this benchmark, in cores


def measure(server: Server, interface: str, mode: str, duration: float, rnd: int) -> Run:
    gen_holder: list[LoadGenerator] = []

    async def go() -> Any:
        gen = LoadGenerator(server.address, http_get("/"), clients=CLIENTS, mode=mode,
                            duration=duration, timeout=2.0)
        gen_holder.append(gen)
        return await gen.run()

    # One second of warm-up (connections, caches), not measured.
    asyncio.run(LoadGenerator(server.address, http_get("/"), clients=CLIENTS, mode=mode,
                              duration=1.0).run())
    meter = CpuMeter()
    cpu0 = server.cpu()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(go())
    cpu1 = server.cpu()
    use = meter.stop()
    gen = gen_holder[0]
    per_client = [0] * CLIENTS
    for client, outcome in zip(gen.attempts.client, gen.attempts.outcome, strict=True):
        if outcome == 0:  # Outcome.OK
            per_client[client] += 1
    spread = min(per_client) / max(per_client) if max(per_client) else 0.0
    # Ours = this process (the load) + reaped children: none; the servers are not reaped yet,
    # so "others" counts them: subtract the servers' own CPU to get the rest of the machine.
    others = max(0.0, use.other_s - (cpu1 - cpu0)) / use.wall_s
    return Run(server.name, interface, server.workers, mode, rnd, report.ok_per_s or 0.0,
               report.failed, (report.latency_p50 or 0) * 1000, (report.latency_p99 or 0) * 1000,
               (cpu1 - cpu0) * 1e6 / max(1, report.ok), spread, others)


def group(interface: str, workers: int, rounds: int, duration: float, modes: Sequence[str],
          tmp: Path) -> list[Run]:
    d1, d2 = tmp / f"{interface}-{workers}-a", tmp / f"{interface}-{workers}-b"
    d1.mkdir()
    d2.mkdir()
    servers: list[Server]
    if interface == "asgi":
        servers = [Swapd(workers, d1, "hello_asgi:app", []), uvicorn(workers, d2)]
    else:
        servers = [Swapd(workers, d1, "hello_wsgi:app", ["--threads", str(THREADS)]),
                   gunicorn(workers, d2)]
    runs: list[Run] = []
    try:
        for s in servers:
            s.start()
        for rnd in range(rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for mode in modes:
                for s in order:
                    run = measure(s, interface, mode, duration, rnd)
                    runs.append(run)
                    _say(f"  {interface} w{workers} {mode:<9} {s.name:<20} round {rnd + 1}: "
                         f"{run.ok_per_s:8.0f} ok/s  p99 {run.p99_ms:6.1f} ms  "
                         f"cpu {run.cpu_ms_per_1k:6.1f} ms/1k  spread {run.client_spread:.2f}"
                         f"  failed {run.failed}  others {run.others_cores:.2f} cores")
    finally:
        for s in servers:
            for note in s.close():
                _say(f"  note: {note}")
    return runs


def summarise(runs: list[Run]) -> list[list[str]]:
    rows = []
    keys = sorted({(r.interface, r.workers, r.mode) for r in runs},
                  key=lambda k: (k[0], k[1], MODES.index(k[2])))
    for interface, workers, mode in keys:
        cell = [r for r in runs if (r.interface, r.workers, r.mode) == (interface, workers, mode)]
        names = list(dict.fromkeys(r.server for r in cell))
        ours, theirs = names[0], names[1]

        def med(name: str, attr: str, cell: list[Run] = cell) -> float:
            return median([getattr(r, attr) for r in cell if r.server == name])

        rows.append([
            f"{interface} {workers}w {mode}", f"{ours} / {theirs}",
            f"{med(ours, 'ok_per_s'):,.0f} / {med(theirs, 'ok_per_s'):,.0f}",
            f"**{med(ours, 'ok_per_s') / med(theirs, 'ok_per_s'):.2f}**",
            f"{med(ours, 'p99_ms'):.1f} / {med(theirs, 'p99_ms'):.1f}",
            f"{med(ours, 'cpu_ms_per_1k'):.0f} / {med(theirs, 'cpu_ms_per_1k'):.0f}",
            f"{med(ours, 'client_spread'):.2f} / {med(theirs, 'client_spread'):.2f}",
            f"{sum(r.failed for r in cell if r.server == ours)} / "
            f"{sum(r.failed for r in cell if r.server == theirs)}",
            f"{statistics.mean(r.others_cores for r in cell):.2f}",
        ])
    return rows


HEADERS = ["cell", "servers (ours / theirs)", "ok/s", "ratio", "p99 ms",
           "CPU ms per 1k responses", "client spread", "failed (ours / theirs)",
           "others (cores)"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every cell once, 2 s")
    p.add_argument("--rounds", type=int, help="rounds per group (default 5; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per run (default 8; quick 2)")
    p.add_argument("--interfaces", nargs="+", choices=["asgi", "wsgi"], default=["asgi", "wsgi"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", help="write every run here")
    p.add_argument("--markdown", help="write the summary table here")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (2.0 if args.quick else 8.0)
    info = machine_info()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    _say(f"machine: {info}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for interface in args.interfaces:
            for workers in args.workers:
                runs += group(interface, workers, rounds, duration, args.modes, Path(tmp))
    rows = summarise(runs)
    table = md_table(HEADERS, rows)
    command = "python bench/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"{started}, {info['nproc']} CPUs ({info['cpu']}), {info['uname']}, Python "
            f"{info['python']}; load average at the end {machine_info()['loadavg']}\n"
            f"command: {command.strip()}\n{CLIENTS} clients, {duration:g} s per run, {rounds} "
            f"round(s), medians; WSGI servers with {THREADS} threads per worker")
    print(head)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(head + "\n\n" + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "started": started,
                                               "runs": [asdict(r) for r in runs]}, indent=1))
    return 1 if any(r.failed for r in runs if r.server.startswith("swapd")) else 0


if __name__ == "__main__":
    sys.exit(main())
