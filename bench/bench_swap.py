"""What clients see while a service is swapped: swapd against a plain restart, under load.

    python bench/bench_swap.py                 # full run (~25 minutes on a quiet machine)
    python bench/bench_swap.py --quick         # smoke run: every scenario, short and once
    python bench/bench_swap.py --markdown out.md --json out.json
    python bench/bench_swap.py --only swapd-stateful throughput --modes keepalive

Other people's jobs skew every figure, so a full run measures the CPU time used outside its own
process tree: before each run it waits for a quiet machine (--quiet-timeout), and a run during
which others used more than --max-others of a core is redone (--retries), then flagged.
Results are in bench/notes/swap.md.

The method is that of docs/benchmarks.md#method, so the figures sit beside the
peers' (quoted from there, not re-measured): 32 closed-loop clients (swapd.loadgen), a request
times out after 2 s, a client pauses 10 ms after a failure, runs of 20 s with swaps at
t = 2, 5.5, 9, 12.5, 16 s, connection modes `close` and `keepalive`, each configuration run
twice ("median" = midpoint of the two runs, "worst" = the worse). A swap window is
[command start - 1 s, command end + 1 s]; the gap is the longest interval in it in which no
client completed a successful response.

Scenarios (a fresh service for every run; everything on 127.0.0.1, ports chosen by the kernel):

    swapd-upgrade    swapd run --workers 2 -- examples/hello.py; swap = `upgrade` (control
                     socket), which returns once the new generation is committed
    restart          hello.py alone, binding the port itself (SO_REUSEADDR); swap = SIGTERM,
                     wait for the exit, start it again on the same port, wait for READY=1
    restart-held     2 hello.py processes sharing a listener the benchmark holds (as systemd
                     socket activation would: LISTEN_FDS); swap = SIGTERM both, wait, start 2
                     new ones, wait for READY=1. The listener never closes, so this separates
                     what holding the socket gives from what swapd adds on top
    swapd-stateful   swapd run --mode stateful -- examples/counter.py (1 worker), clients
                     POST /incr; also the handoff pause (timings_ms.pause) and lost increments
                     (acknowledged - final count)
    throughput       no swaps: swapd with 1 and 2 workers against the bare app (1 process
                     binding its port; 2 processes sharing a held listener), ok/s and
                     latency, and the supervisor's own CPU time meanwhile

The load generator runs in this process and shares the machine's cores with the servers, as
in the peers' measurements: absolute rates mean little; errors, gaps and ratios count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    ROOT,
    CpuMeter,
    CpuUse,
    NotifySocket,
    ProcessGroup,
    SwapdProcess,
    clean_env,
    cpu_seconds,
    listening_port,
    machine_info,
    md_table,
    median,
    wait_or_kill,
    wait_quiet,
)

from swapd.loadgen import (
    AttemptLog,
    BackgroundLoad,
    Gap,
    LoadError,
    LoadReport,
    Request,
    fetch_sync,
    http_get,
    http_get_int,
    http_post,
    longest_gap,
)
from swapd.sockets import bind, parse_address

CLIENTS = 32
TIMEOUT = 2.0  # per request
FAILURE_PAUSE = 0.010
MARGIN = 1.0  # window edges
READY_TIMEOUT = 30.0  # a service (or a restarted process) must be ready within this
STOP_TIMEOUT = 30.0  # for a drain after SIGTERM or `swapd stop`
SWAP_TIMEOUT = 120.0  # for one `upgrade` call
MODES = ("close", "keepalive")

# Starts an app as systemd socket activation would: the listener at fd 3, LISTEN_PID = the
# app's own pid (hence exec), LISTEN_FDS/LISTEN_FDNAMES naming it. No supervisor remains.
LAUNCHER = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="http")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@dataclass(frozen=True)
class Profile:
    duration: float  # of one swap run
    offsets: tuple[float, ...]  # swap start times, from the start of the load
    runs: int  # per configuration
    tput_duration: float
    tput_reps: int


FULL = Profile(20.0, (2.0, 5.5, 9.0, 12.5, 16.0), 2, 10.0, 5)
QUICK = Profile(7.0, (2.0, 4.5), 1, 3.0, 1)


# --- services ------------------------------------------------------------------------------


@dataclass
class SwapOutcome:
    ok: bool
    seconds: float  # the swap command, start to return
    pause_ms: float | None = None  # stateful swapd: nobody accepting
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class Service(Protocol):
    address: tuple[str, int]

    def start(self) -> None: ...
    def swap(self) -> SwapOutcome: ...
    def supervisor_pid(self) -> int | None: ...
    def server_pids(self) -> list[int]: ...
    def summary(self) -> dict[str, Any]: ...
    def close(self) -> list[str]: ...


class SwapdService(SwapdProcess):
    """``swapd run`` with one listener on a kernel-chosen port; swaps via the control socket."""

    def __init__(self, workdir: Path, app: str, workers: int, mode: str) -> None:
        super().__init__(workdir, [
            "--bind", "http=127.0.0.1:0", "--workers", str(workers), "--mode", mode,
            "--", PYTHON, str(ROOT / "examples" / app),
        ], ready_timeout=READY_TIMEOUT, stop_timeout=STOP_TIMEOUT)
        self._cpu0 = 0.0

    def start(self) -> None:
        super().start()
        assert self.sup is not None
        self._cpu0 = cpu_seconds(self.sup.pid)

    def swap(self) -> SwapOutcome:
        assert self.notify is not None
        t0 = time.monotonic()
        result = self.call("upgrade", SWAP_TIMEOUT)
        seconds = time.monotonic() - t0
        self.notify.drain()  # RELOADING=1 and READY=1: keep the datagram queue empty
        data = result.get("data") or {}
        timings = {k: float(v) for k, v in (data.get("timings_ms") or {}).items()}
        return SwapOutcome(
            ok=bool(result.get("ok")), seconds=seconds, pause_ms=timings.get("pause"),
            error=result.get("error"), timings_ms=timings,
        )

    def supervisor_pid(self) -> int | None:
        return None if self.sup is None else self.sup.pid

    def server_pids(self) -> list[int]:
        if self.sup is None:
            return []
        return [c.pid for c in psutil.Process(self.sup.pid).children(recursive=True)]

    def summary(self) -> dict[str, Any]:
        """Swap counts and worker restarts from `status`; warnings and errors from the log."""
        data = self.call("status", 10.0)["data"]
        restarts = sum(sum(g.get("restarts", [])) for g in data.get("generations", []))
        assert self.sup is not None
        cpu_ms = (cpu_seconds(self.sup.pid) - self._cpu0) * 1000
        return {"swaps": data.get("swaps"), "worker_restarts": restarts,
                "supervisor_cpu_ms": round(cpu_ms, 1), "log_problems": self.log_problems()}


class BareService:
    """The app without swapd: ``workers`` processes; a swap is a plain stop-then-start.

    held=False: one process binding its own port (port 0 the first time, then the same port).
    held=True:  the benchmark binds the listener (as swapd would: swapd.sockets.bind, same
                backlog) and hands it to every process by socket activation.
    """

    def __init__(self, workdir: Path, app: str, workers: int, held: bool) -> None:
        if workers != 1 and not held:
            raise ValueError("processes binding the port themselves cannot share it")
        self.workdir = workdir
        self.app = str(ROOT / "examples" / app)
        self.workers = workers
        self.held = held
        self.group = ProcessGroup()
        self.notify: NotifySocket | None = None
        self.listener: socket.socket | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.address = ("127.0.0.1", 0)
        self.starts = 0

    def _spawn(self) -> None:
        assert self.notify is not None
        self.starts += 1
        with open(self.workdir / f"app-{self.starts}.log", "wb") as log:
            if self.listener is not None:
                fd = self.listener.fileno()
                procs = [
                    self.group.spawn(
                        [PYTHON, "-c", LAUNCHER, str(fd), self.app], cwd=ROOT, pass_fds=(fd,),
                        env=clean_env(NOTIFY_SOCKET=str(self.notify.path)),
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    )
                    for _ in range(self.workers)
                ]
            else:
                bind_to = f"http=127.0.0.1:{self.address[1]}"
                procs = [
                    self.group.spawn(
                        [PYTHON, self.app], cwd=ROOT,
                        env=clean_env(NOTIFY_SOCKET=str(self.notify.path), SWAPD_BIND=bind_to),
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    )
                ]
        self.procs = procs
        self.notify.wait_ready(self.workers, READY_TIMEOUT, procs, f"start #{self.starts}")

    def start(self) -> None:
        self.notify = NotifySocket(self.workdir / "notify")
        if self.held:
            self.listener = bind(parse_address("127.0.0.1:0"))
            self.address = ("127.0.0.1", self.listener.getsockname()[1])
        self._spawn()
        if not self.held:
            self.address = ("127.0.0.1", listening_port(self.procs[0].pid))

    def swap(self) -> SwapOutcome:
        t0 = time.monotonic()
        for proc in self.procs:  # all at once, as stopping a process group would
            os.kill(proc.pid, signal.SIGTERM)
        deadline = t0 + STOP_TIMEOUT
        killed = [p.pid for p in self.procs
                  if wait_or_kill(p, max(0.0, deadline - time.monotonic())) is None]
        t_stopped = time.monotonic()
        self._spawn()
        t1 = time.monotonic()
        return SwapOutcome(
            ok=not killed, seconds=t1 - t0,
            error=f"SIGKILLed after {STOP_TIMEOUT:g} s: {killed}" if killed else None,
            timings_ms={"stopped": round((t_stopped - t0) * 1000, 2),
                        "ready": round((t1 - t0) * 1000, 2)},
        )

    def supervisor_pid(self) -> int | None:
        return None

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def summary(self) -> dict[str, Any]:
        return {"starts": self.starts}

    def close(self) -> list[str]:
        notes: list[str] = []
        try:
            for proc in self.procs:  # the normal way to stop it: SIGTERM (drain), then exit
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
            for proc in self.procs:
                if wait_or_kill(proc, STOP_TIMEOUT) is None:
                    notes.append(f"pid {proc.pid} ignored SIGTERM for {STOP_TIMEOUT:g} s: SIGKILL")
        finally:
            notes += self.group.end(STOP_TIMEOUT)
            if self.listener is not None:
                self.listener.close()
            if self.notify is not None:
                self.notify.close()
        return notes


# --- swap scenarios -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str  # as in the tables
    make: Callable[[Path], Service]
    request: Callable[[], Request]
    stateful: bool = False


SCENARIOS = (
    Scenario("swapd-upgrade", "swapd upgrade, hello.py, 2 workers",
             lambda d: SwapdService(d, "hello.py", 2, "stateless"), http_get),
    Scenario("restart", "plain restart, hello.py alone (binds its port)",
             lambda d: BareService(d, "hello.py", 1, held=False), http_get),
    Scenario("restart-held", "plain restart, 2 hello.py, listener held (socket activation)",
             lambda d: BareService(d, "hello.py", 2, held=True), http_get),
    Scenario("swapd-stateful", "swapd stateful upgrade, counter.py, 1 worker",
             lambda d: SwapdService(d, "counter.py", 1, "stateful"), http_post, stateful=True),
)


@dataclass
class SwapRun:
    scenario: str
    mode: str
    run: int
    report: LoadReport
    swaps: list[SwapOutcome]
    failed_outside: int  # failures outside every swap window
    gap_outside: float  # longest no-success gap outside the windows: the run's noise floor
    final_count: int | None
    service: dict[str, Any]
    cpu: CpuUse
    cleanup: list[str]
    disturbed: bool = False  # other processes were busy during it (kept after retries)


def outside_windows(log: AttemptLog, report: LoadReport) -> tuple[int, Gap]:
    """Failures completing outside every window span, and the longest gap there.

    Overlapping windows count once. The gap outside shows what the machine does to the
    figures without any swap (a busy neighbour, a GC pause in the load generator).
    """
    start = report.started_at
    spans = sorted((start + w.span_start, start + w.span_end) for w in report.windows)
    quiet: list[tuple[float, float]] = []
    edge = start
    for lo, hi in spans:
        if lo > edge:
            quiet.append((edge, lo))
        edge = max(edge, hi)
    if report.stopped_at > edge:
        quiet.append((edge, report.stopped_at))
    failed = 0
    ok_times: list[float] = []
    for i in range(len(log)):
        t = log.t_end[i]
        if log.outcome[i] == 0:  # ok: the first Outcome
            ok_times.append(t)
        else:
            failed += not any(lo <= t <= hi for lo, hi in spans)
    gaps = [longest_gap(ok_times, lo, hi) for lo, hi in quiet]
    return failed, max(gaps, default=Gap(0.0, start, start))


def run_swaps(scenario: Scenario, mode: str, run: int, profile: Profile, workdir: Path) -> SwapRun:
    svc = scenario.make(workdir)
    meter = CpuMeter()
    try:
        svc.start()
        load = BackgroundLoad(
            svc.address, scenario.request(), clients=CLIENTS, mode=mode,
            duration=profile.duration, timeout=TIMEOUT, failure_pause=FAILURE_PAUSE,
            window_margin=MARGIN,
        )
        load.start()
        t0 = time.monotonic()
        swaps: list[SwapOutcome] = []
        try:
            load.wait_for_successes(50, timeout=profile.offsets[0])
            for i, offset in enumerate(profile.offsets, 1):
                # The swaps run on a fixed schedule (the method's offsets), not on an event:
                # sleeping until the next offset is the point here.
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                with load.window(f"swap {i}"):
                    swaps.append(svc.swap())
            report = load.wait()
        except BaseException:
            with contextlib.suppress(LoadError):
                load.stop()
            raise
        final = None
        if scenario.stateful:
            final = fetch_sync(svc.address, http_get_int("/count"), timeout=TIMEOUT)
        service = svc.summary()
        failed_outside, gap_outside = outside_windows(load.generator.attempts, report)
    finally:
        cleanup = svc.close()
    cpu = meter.stop()
    return SwapRun(scenario.key, mode, run, report, swaps, failed_outside, gap_outside.length,
                   final, service, cpu, cleanup)


# --- throughput -----------------------------------------------------------------------------


@dataclass
class Throughput:
    kind: str  # swapd | bare
    workers: int
    mode: str
    rep: int
    ok_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int
    supervisor_cpu_s: float | None
    server_cpu_s: float
    client_cpu_s: float
    conns: list[int]  # established connections per server process, sampled early in the run
    cpu: CpuUse  # start to close of the service
    cleanup: list[str]
    disturbed: bool = False


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_throughput(kind: str, workers: int, mode: str, rep: int, duration: float,
                   workdir: Path) -> Throughput:
    svc: Service
    if kind == "swapd":
        svc = SwapdService(workdir, "hello.py", workers, "stateless")
    else:
        svc = BareService(workdir, "hello.py", workers, held=workers > 1)
    meter = CpuMeter()
    try:
        svc.start()
        sup = svc.supervisor_pid()
        servers = svc.server_pids()
        sup0 = cpu_seconds(sup) if sup is not None else None
        srv0 = sum(cpu_seconds(p) for p in servers)
        own0 = _own_cpu()
        load = BackgroundLoad(svc.address, http_get(), clients=CLIENTS, mode=mode,
                              duration=duration, timeout=TIMEOUT, failure_pause=FAILURE_PAUSE)
        load.start()
        try:
            load.wait_for_successes(500, timeout=10.0)
            conns = connections_per_process(servers, svc.address[1])
            report = load.wait()
        except BaseException:
            with contextlib.suppress(LoadError):
                load.stop()
            raise
        own = _own_cpu() - own0
        srv = sum(cpu_seconds(p) for p in servers) - srv0
        sup_cpu = cpu_seconds(sup) - sup0 if sup is not None and sup0 is not None else None
    finally:
        cleanup = svc.close()
    return Throughput(
        kind, workers, mode, rep, report.ok_per_s or 0.0,
        (report.latency_p50 or 0.0) * 1000, (report.latency_p99 or 0.0) * 1000,
        report.failed, sup_cpu, srv, own, conns, meter.stop(), cleanup,
    )


def connections_per_process(pids: Sequence[int], port: int) -> list[int]:
    """Established connections to ``port`` that each process holds.

    With keep-alive clients, which worker accepted which of the 32 connections at the start
    decides the run: one worker holding most of them leaves a core idle.
    """
    counts = []
    for pid in pids:
        conns = psutil.Process(pid).net_connections("tcp")
        counts.append(sum(1 for c in conns if c.status == "ESTABLISHED" and c.laddr.port == port))
    return counts


# --- tables ---------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _error_types(runs: Sequence[SwapRun]) -> str:
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r.report.failures)
    if not kinds:
        return "-"
    total = sum(kinds.values())
    reused = sum(r.report.failed_on_reused for r in runs)
    text = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    where = ("all on reused conns" if reused == total else
             "none on reused" if reused == 0 else f"{reused} on reused")
    return f"{text} ({where})"


def _gap(run: SwapRun) -> float:
    return max((w.longest_gap for w in run.report.windows), default=0.0)


def _errors_per_swap(run: SwapRun) -> float:
    return run.report.failed / max(1, len(run.swaps))


def swap_row(title: str, mode: str, runs: Sequence[SwapRun]) -> list[str]:
    gaps = [_gap(r) for r in runs]
    in_p99 = [w.latency_p99 for r in runs for w in r.report.windows if w.latency_p99 is not None]
    out_p99 = [r.report.latency_p99_outside for r in runs if r.report.latency_p99_outside]
    ratios = [r.report.inside_outside_ratio for r in runs if r.report.inside_outside_ratio]
    seconds = [s.seconds for r in runs for s in r.swaps]
    return [
        title, mode,
        _num(median([_errors_per_swap(r) for r in runs])),
        _error_types(runs),
        f"{_ms(median(gaps))} / {_ms(max(gaps))}",
        _ms(max(in_p99) if in_p99 else None),
        _ms(median(out_p99) if out_p99 else None),
        _ms(max((r.report.latency_max or 0.0) for r in runs)),
        _num(median(ratios) if ratios else None, 2),
        f"{_ms(median(seconds))} / {_ms(max(seconds))}",
        _ms(max(r.gap_outside for r in runs)),
        str(sum(r.failed_outside for r in runs)),
    ]


SWAP_HEADERS = [
    "scenario", "mode", "errors/swap (median)", "error types (sum of runs)",
    "longest gap ms (median / worst)", "p99 ms in windows (worst swap)", "p99 ms outside",
    "max ok latency ms", "ok/s in ÷ out", "swap command ms (median / max)",
    "longest gap ms outside windows (worst)", "failures outside windows",
]

STATEFUL_HEADERS = [
    "mode", "handoff pause ms (median / max)", "acknowledged", "final count", "lost",
    "applied but unacknowledged", "duplicate values", "per-client regressions",
]


def stateful_row(mode: str, runs: Sequence[SwapRun]) -> list[str]:
    pauses = [s.pause_ms for r in runs for s in r.swaps if s.pause_ms is not None]
    acked = [r.report.acknowledged or 0 for r in runs]
    finals = [r.final_count or 0 for r in runs]
    lost = sum(max(0, a - f) for a, f in zip(acked, finals, strict=True))
    extra = sum(max(0, f - a) for a, f in zip(acked, finals, strict=True))
    pause = f"{median(pauses):.2f} / {max(pauses):.2f}" if pauses else "-"
    return [
        mode, pause, " + ".join(f"{a:,}" for a in acked), " + ".join(f"{f:,}" for f in finals),
        str(lost), str(extra),
        str(sum(r.report.duplicate_values or 0 for r in runs)),
        str(sum(r.report.value_regressions or 0 for r in runs)),
    ]


DETAIL_HEADERS = ["scenario", "mode", "run", "ok", "failed", "gap ms per swap",
                  "gap ms outside", "swap ms per swap", "CPU s ours / others / steal",
                  "service"]


def detail_row(r: SwapRun) -> list[str]:
    gaps = "/".join(f"{w.longest_gap * 1000:.0f}" for w in r.report.windows)
    swaps = "/".join(f"{s.seconds * 1000:.0f}" + ("" if s.ok else "!") for s in r.swaps)
    service = dict(r.service)
    problems = service.pop("log_problems", None)
    text = ", ".join(f"{k} {v}" for k, v in service.items())
    if problems is not None:
        text += f", log warnings/errors {len(problems)}"
    cpu = f"{r.cpu.ours_s:.1f} / {r.cpu.other_s:.1f} / {r.cpu.steal_s:.1f}"
    cpu += " (busy machine)" if r.disturbed else ""
    return [r.scenario, r.mode, str(r.run), f"{r.report.ok:,}", f"{r.report.failed:,}", gaps,
            f"{r.gap_outside * 1000:.0f}", swaps, cpu, text]


# Quoted from the peers' reference measurements (docs/benchmarks.md#method), "Per swap,
# in short" (errors per swap, median; worst no-success gap). Not re-measured here.
PEERS_PER_SWAP = [
    ("gunicorn sync, HUP", "0, 245 ms", "0, 35 ms"),
    ("gunicorn sync, USR2+WINCH+QUIT (fg or daemon)", "0, 37 ms", "0, 35 ms"),
    ("gunicorn sync, plain restart", "~530, 570 ms", "~490, 470 ms"),
    ("gunicorn gthread, HUP", "0, 79 ms", "0, 35 ms"),
    ("gunicorn gthread, USR2+WINCH+QUIT foreground", "0.1, 33 ms",
     "26 (all RST on reused conns), 147 ms"),
    ("gunicorn gthread, USR2+WINCH+QUIT --daemon", "0, 22 ms", "0, 24 ms"),
    ("gunicorn gthread, plain restart", "~500, 375 ms", "~550, 347 ms"),
    ("uvicorn --workers 2, HUP", "6 (eof/reset on fresh conns), 17 ms",
     "51 (eof on reused), 44 ms"),
    ("uvicorn --workers 2, plain restart", "~600, 783 ms", "~730, 885 ms"),
    ("nginx -s reload", "0, 67 ms", "32 (one per client, eof on reused), 102 ms"),
    ("nginx USR2+WINCH+QUIT, daemon on", "0, 51 ms", "21 (eof on reused), 70 ms"),
    ("nginx USR2+WINCH+QUIT, daemon off", "USR2 ignored: 16 s outage", "same"),
    ("HAProxy 2.6 -W, USR2", "0, 12 ms", "6.5 (eof on reused), 57 ms"),
]


def per_swap_cell(runs: Sequence[SwapRun]) -> str:
    if not runs:
        return "-"
    errors = median([_errors_per_swap(r) for r in runs])
    text = f"{errors:.1f}".removesuffix(".0")
    if errors:
        text += f" ({_error_types(runs)})"
    return f"{text}, {max(_gap(r) for r in runs) * 1000:.0f} ms"


THROUGHPUT_HEADERS = [
    "workers", "mode", "swapd ok/s median (min-max)", "bare ok/s median (min-max)",
    "swapd / bare", "p50 ms swapd / bare", "p99 ms swapd / bare",
    "supervisor CPU ms per run (max)", "server CPU s per run swapd / bare",
    "client CPU s per run", "others' CPU s per run (max)", "failed",
]


def throughput_row(workers: int, mode: str, results: Sequence[Throughput]) -> list[str]:
    sw = [t for t in results if t.kind == "swapd"]
    bare = [t for t in results if t.kind == "bare"]

    def rate(ts: Sequence[Throughput]) -> str:
        rates = [t.ok_per_s for t in ts]
        return f"{median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"

    def med(ts: Sequence[Throughput], attr: str) -> float:
        return median([float(getattr(t, attr)) for t in ts])

    sup = [t.supervisor_cpu_s for t in sw if t.supervisor_cpu_s is not None]
    return [
        str(workers), mode, rate(sw), rate(bare),
        f"{med(sw, 'ok_per_s') / med(bare, 'ok_per_s'):.3f}",
        f"{med(sw, 'p50_ms'):.2f} / {med(bare, 'p50_ms'):.2f}",
        f"{med(sw, 'p99_ms'):.2f} / {med(bare, 'p99_ms'):.2f}",
        f"{median(sup) * 1000:.1f} ({max(sup) * 1000:.1f})" if sup else "-",
        f"{med(sw, 'server_cpu_s'):.1f} / {med(bare, 'server_cpu_s'):.1f}",
        f"{median([t.client_cpu_s for t in results]):.1f}",
        f"{median([t.cpu.other_s for t in results]):.1f} "
        f"({max(t.cpu.other_s for t in results):.1f})"
        + ("; busy machine" if any(t.disturbed for t in results) else ""),
        str(sum(t.failed for t in results)),
    ]


TPUT_DETAIL_HEADERS = ["workers", "mode", "rep", "kind", "ok/s", "p50 ms", "p99 ms",
                       "connections per process (sampled once)", "supervisor CPU ms",
                       "others' CPU s"]


def throughput_detail_row(t: Throughput) -> list[str]:
    sup = "-" if t.supervisor_cpu_s is None else f"{t.supervisor_cpu_s * 1000:.1f}"
    return [str(t.workers), t.mode, str(t.rep), t.kind, f"{t.ok_per_s:,.0f}", f"{t.p50_ms:.2f}",
            f"{t.p99_ms:.2f}", "+".join(map(str, t.conns)), sup,
            f"{t.cpu.other_s:.1f}" + (" (busy machine)" if t.disturbed else "")]


# --- main -----------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    return obj


@dataclass
class Guard:
    """Keeps other people's jobs out of the figures.

    Before each run it waits (bounded) until a 5 s sample shows other processes using at most
    ``limit`` of one core; a run during which they used more is discarded and redone, at most
    ``retries`` times (the last attempt is then kept, and flagged in the tables).
    """

    limit: float | None  # None: no check (quick runs)
    retries: int
    quiet_timeout: float
    discarded: list[str] = field(default_factory=list)

    def run(self, label: str, attempt: Callable[[int], Any]) -> tuple[Any, bool]:
        for n in range(self.retries + 1):
            if self.limit is not None:
                # 5 s, not a blink: test suites leave short quiet gaps between their tests.
                share = wait_quiet(self.limit, self.quiet_timeout, sample=5.0)
                if share > self.limit:
                    _say(f"{label}: machine still busy after {self.quiet_timeout:g} s "
                         f"(others {share:.0%} of a core); measuring anyway")
            result = attempt(n)
            cpu: CpuUse = result.cpu
            share = cpu.other_s / cpu.wall_s if cpu.wall_s else 0.0
            if self.limit is None or share <= self.limit:
                return result, False
            if n == self.retries:
                return result, True
            self.discarded.append(f"{label} attempt {n + 1}: others used {share:.0%} of a core")
            _say(f"{label}: others used {share:.0%} of a core during the run: discarded")
        raise AssertionError("unreachable")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run of every scenario")
    p.add_argument("--runs", type=int, help="runs per swap configuration (default 2; quick 1)")
    p.add_argument("--only", nargs="+", choices=[s.key for s in SCENARIOS] + ["throughput"],
                   help="run only these scenarios")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--max-others", type=float, metavar="CORES",
                   help="redo a run if other processes used more than this share of one core "
                        "during it (default 0.15; quick: no check)")
    p.add_argument("--retries", type=int, default=5, help="redone runs at most (default 5)")
    p.add_argument("--quiet-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="wait at most this long for a quiet machine before a run")
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    p.add_argument("--json", type=Path, help="write every run's raw figures to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the services' logs")
    args = p.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.runs:
        profile = Profile(profile.duration, profile.offsets, args.runs, profile.tput_duration,
                          max(profile.tput_reps, args.runs))
    limit = args.max_others if args.max_others is not None else (None if args.quick else 0.15)
    guard = Guard(limit, args.retries, args.quiet_timeout)
    wanted = set(args.only or [s.key for s in SCENARIOS] + ["throughput"])
    info = machine_info()
    before = wait_quiet(0.0, 0.0)  # one 2 s sample of what the others do
    command = shlex.join([os.path.relpath(PYTHON, ROOT), "bench/bench_swap.py",
                          *(argv if argv is not None else sys.argv[1:])])
    header = [
        f"machine: {info['uname']}; nproc {info['nproc']}; {info['cpu']}; "
        f"Python {info['python']}; load average at start {info['loadavg']}; other processes "
        f"used {before:.0%} of a core in the 2 s before the start",
        f"date: {time.strftime('%Y-%m-%d %H:%M')}; command: `{command}`",
        f"load: {CLIENTS} closed-loop clients (swapd.loadgen, uvloop, in this process, sharing "
        f"the {info['nproc']} cores with the servers), timeout {TIMEOUT:g} s, "
        f"{FAILURE_PAUSE * 1000:g} ms pause after a failure; swap runs of "
        f"{profile.duration:g} s, swaps at t = {', '.join(f'{o:g}' for o in profile.offsets)} s, "
        f"{profile.runs} run(s) per configuration; windows ±{MARGIN:g} s",
        "quiet machine: " + (f"runs during which other processes used more than {limit:.0%} "
                             f"of a core were redone (at most {args.retries} times)"
                             if limit is not None else "not checked"),
    ]
    for line in header:
        print(line)
    workroot = Path(tempfile.mkdtemp(prefix="swapd-bench-"))
    _say(f"work directory {workroot}")
    keep = args.keep_logs
    runs: dict[tuple[str, str], list[SwapRun]] = {}
    tput: list[Throughput] = []
    try:
        for scenario in SCENARIOS:
            if scenario.key not in wanted:
                continue
            for mode in args.modes:
                for n in range(1, profile.runs + 1):
                    label = f"{scenario.key} {mode} run {n}"

                    def attempt(k: int, sc: Scenario = scenario, m: str = mode,
                                n: int = n) -> SwapRun:
                        workdir = workroot / f"{sc.key}-{m}-{n}-{k}"
                        workdir.mkdir()
                        return run_swaps(sc, m, n, profile, workdir)

                    r, disturbed = guard.run(label, attempt)
                    r.disturbed = disturbed
                    runs.setdefault((scenario.key, mode), []).append(r)
                    bad = [s for s in r.swaps if not s.ok]
                    if scenario.key.startswith("swapd") and (
                        r.report.failed or r.service.get("log_problems") or bad
                    ):
                        keep = True  # evidence for a bug report
                    _say(f"{label}: ok {r.report.ok:,} failed {r.report.failed:,} "
                         f"{r.report.failures or ''} gap {_gap(r) * 1000:.1f} ms, swaps "
                         f"{[round(s.seconds * 1000) for s in r.swaps]} ms, others' CPU "
                         f"{r.cpu.other_s:.1f} s"
                         + (f" FAILED SWAPS {[s.error for s in bad]}" if bad else "")
                         + (f" cleanup: {r.cleanup}" if r.cleanup else ""))
        if "throughput" in wanted:
            for rep in range(1, profile.tput_reps + 1):
                for workers in (1, 2):
                    for mode in args.modes:
                        # Alternate the order so drift (other load, thermal) hits both alike.
                        for kind in ("swapd", "bare") if rep % 2 else ("bare", "swapd"):
                            label = f"throughput {kind} w{workers} {mode} rep {rep}"

                            def measure(k: int, kind: str = kind, w: int = workers,
                                        m: str = mode, rep: int = rep) -> Throughput:
                                workdir = workroot / f"tput-{kind}-{w}-{m}-{rep}-{k}"
                                workdir.mkdir()
                                return run_throughput(kind, w, m, rep, profile.tput_duration,
                                                      workdir)

                            t, disturbed = guard.run(label, measure)
                            t.disturbed = disturbed
                            tput.append(t)
                            _say(f"{label}: {t.ok_per_s:,.0f} ok/s p99 {t.p99_ms:.2f} ms, "
                                 f"supervisor CPU {t.supervisor_cpu_s}, others' CPU "
                                 f"{t.cpu.other_s:.1f} s")
    finally:
        if keep:
            _say(f"logs kept in {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)

    text = render(runs, tput, profile, args.modes, guard)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text("\n".join(f"- {ln}" for ln in header) + "\n\n" + text + "\n")
    if args.json:
        raw = {"machine": info, "command": command, "profile": asdict(profile),
               "swap_runs": [_jsonable(r) for rs in runs.values() for r in rs],
               "throughput": [_jsonable(t) for t in tput], "discarded": guard.discarded}
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    return 0


def render(runs: dict[tuple[str, str], list[SwapRun]], tput: Sequence[Throughput],
           profile: Profile, modes: Sequence[str], guard: Guard) -> str:
    sections: list[str] = []
    swap_rows = [swap_row(s.title, m, runs[(s.key, m)]) for s in SCENARIOS for m in modes
                 if (s.key, m) in runs]
    if swap_rows:
        sections.append("### Swaps under load\n\n" + md_table(SWAP_HEADERS, swap_rows))
    stateful = [stateful_row(m, runs[("swapd-stateful", m)]) for m in modes
                if ("swapd-stateful", m) in runs]
    if stateful:
        sections.append("### Stateful swap: handoff pause and increments\n\n"
                        + md_table(STATEFUL_HEADERS, stateful))
    if runs:
        sections.append("### Every run\n\n" + md_table(
            DETAIL_HEADERS, [detail_row(r) for rs in runs.values() for r in rs]))
        short = [[s.title] + [per_swap_cell(runs.get((s.key, m), [])) for m in MODES]
                 for s in SCENARIOS if any((s.key, m) in runs for m in MODES)]
        short += [[f"{name} (quoted, not re-measured)", c, k] for name, c, k in PEERS_PER_SWAP]
        sections.append("### Per swap, in short (errors per swap, median; worst no-success gap)"
                        "\n\n" + md_table(["configuration", "close", "keepalive"], short))
    if tput:
        rows = [throughput_row(w, m, [t for t in tput if t.workers == w and t.mode == m])
                for w in (1, 2) for m in modes]
        sections.append(
            f"### Throughput without swaps ({profile.tput_duration:g} s runs, "
            f"{profile.tput_reps} repetition(s) each)\n\n" + md_table(THROUGHPUT_HEADERS, rows))
        order = sorted(tput, key=lambda t: (t.workers, t.mode, t.rep, t.kind))
        sections.append("### Every throughput run\n\n" + md_table(
            TPUT_DETAIL_HEADERS, [throughput_detail_row(t) for t in order]))
    if guard.discarded:
        sections.append("### Runs discarded (machine busy)\n\n"
                        + "\n".join(f"- {d}" for d in guard.discarded))
    return "\n\n".join(sections)


if __name__ == "__main__":
    sys.exit(main())
