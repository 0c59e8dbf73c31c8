"""The stateful handoff pause, end to end through swapd, against state size, shape and mode.

    python bench/bench_handoff_pause.py              # 1 / 10 / 100 MB, every configuration
    python bench/bench_handoff_pause.py --quick      # 1 MB, 3 swaps each (~10 s)
    python bench/bench_handoff_pause.py --sizes 100 --only "A pre-copy" --swaps 5
    python bench/bench_handoff_pause.py --json out.json

For each configuration the benchmark starts

    python -P -m swapd run --mode stateful [--precopy] --bind ctl=127.0.0.1:0 --control PATH
        -- python bench/apps/stateful_state.py        (BENCH_* variables choose the state)

waits for READY=1 (sd_notify), has the fresh worker build its state, then runs `upgrade`
through the control socket several times. Each upgrade starts a new worker, which imports
and stands by, receives the state (pre-copy: the bulk while the old one still serves) and
takes over. Per swap it records what swapd reports, `data.timings_ms`:

    pause        t_start(new worker accepts) - t_stop(old worker stopped accepting), both
                 CLOCK_MONOTONIC stamps taken by the workers: the time nobody accepts
    phases       supervisor marks, ms from the request: spawned, ready, precopied (bulk
                 shipped and loaded), quiesce -> snapshotted (quiesce + snapshot in the old
                 worker) -> restored (load + restore() in the new) -> committed -> activated
                 (the new worker's commit ack)

plus the upgrade's total wall time as the client sees it, the bytes shipped inside the pause
and in the bulk (from the progress lines), what the successor saw (`info`: the pre-copy burst,
dirty keys at the quiesce), the time from the old worker's `on_quiesce` to the new worker's
event loop being free after the commit ("to new loop free": what a client waits at most;
swapd stamps t_start once its commit work is done), and a full check of the state the new worker
holds (`verify`: digest equal to the one the predecessor carried, changes included). It then
waits for the old worker to exit before the next swap, so the freeing of its heap does not
overlap the next pause. Before each swap it waits (bounded) for the rest of the machine to be
quiet, and records how busy it was.

memcpy of the same number of bytes (the state's pickle size) is measured in this process
after each configuration, with swapd stopped: into warm memory (a prefaulted bytearray), into
fresh memory (a new private anonymous mapping: 4 KiB page faults, as a new worker's heap
gets) and into a new memfd (shmem pages, as a snapshot gets).

Every process started here is ended by PID (`swapd stop`, then SIGTERM/SIGKILL by PID in a
`finally`); every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import re
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    ROOT,
    BenchError,
    SwapdProcess,
    machine_info,
    md_table,
    median,
    wait_quiet,
)

APP = ROOT / "bench" / "apps" / "stateful_state.py"
MB = 1_000_000
READY_TIMEOUT = 300.0  # supervisor start, fresh worker included (builds 100 MB of state)
SWAP_TIMEOUT = 600.0  # one upgrade call (a 100 MB full shape-A handoff takes seconds)
EXIT_TIMEOUT = 120.0  # the old worker's exit after commit (frees ~600 MB at 100 MB shape A)
STOP_TIMEOUT = 120.0
REQUEST_TIMEOUT = 120.0  # info / verify (the first info pickles the state once)
# swapd's own deadlines, raised so that a 100 MB full handoff is slow, not a failure.
SWAPD_TIMEOUTS = ("--ready-timeout", "120", "--quiesce-timeout", "120",
                  "--restore-timeout", "300", "--drain-timeout", "120")
QUIET_LIMIT = 0.3  # cores used by others before a swap starts
_BYTES = re.compile(r"\((\d+) bytes\)|(\d+) bytes")

TARGETS = (
    ("pause <= 15 ms at 1 MB", 15.0),
    ("pause <= 50 ms at 100 MB, buffers (memfd)", 50.0),
    ("pause <= 50 ms at 100 MB, dict with 1 % changed (pre-copy)", 50.0),
)


@dataclass(frozen=True)
class Setup:
    """One row of the report: a state shape, a handoff mode, and how the app is set up."""

    shape: str  # "A" or "B", as in the reference
    mode: str
    app_shape: str  # BENCH_SHAPE
    precopy: bool = False
    dirty: float = 0.0
    write_rate: float = 0.0
    codec: str = "pickle5"  # w.state_codec and the tracked dict's codec
    burst_at: str = "precopied"  # BENCH_BURST_AT: after the bulk, or inside the pause

    @property
    def name(self) -> str:
        return f"{self.shape} {self.mode}"


SETUPS = (
    Setup("A", "full", "dict"),
    Setup("A", "full, marshal", "dict", codec="marshal"),
    Setup("A", "pre-copy 1%", "dict", precopy=True, dirty=0.01),
    Setup("A", "pre-copy 1%, marshal", "dict", precopy=True, dirty=0.01, codec="marshal"),
    Setup("A", "pre-copy, 1% changed inside the pause", "dict", precopy=True, dirty=0.01,
          burst_at="quiesce"),
    Setup("B", "full (out-of-band copy)", "buffers"),
    Setup("B", "SharedBuffer", "shared"),
    Setup("B", "pre-copy 1% (64 KiB blobs)", "blobs", precopy=True, dirty=0.01),
)


@dataclass
class SwapResult:
    ok: bool
    error: str | None
    total_ms: float  # the upgrade call, client side
    pause_ms: float | None
    timings: dict[str, float]
    pause_bytes: int | None  # snapshot(s) taken inside the pause
    bulk_bytes: int | None  # pre-copy bulk, shipped while the old worker served
    handoff: dict[str, Any]  # the predecessor's pre-copy round, as the successor received it
    restore_app_ms: float | None  # the app's restore() in the new worker
    loop_free_ms: float | None  # old worker's on_quiesce -> new worker's loop free after commit
    verified: bool | None
    verify_detail: str
    old_exit_ms: float | None  # upgrade returned -> old worker exited
    other_load: float | None  # cores used by others just before the swap


@dataclass
class Row:
    setup: Setup
    nominal_mb: int
    pickle_size: int = 0
    entries: int = 0
    build_ms: float = 0.0
    rss_mb: float = 0.0
    memcpy_warm_ms: float = 0.0
    memcpy_fresh_ms: float = 0.0
    memcpy_memfd_ms: float = 0.0
    swaps: list[SwapResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ok_swaps(self) -> list[SwapResult]:
        return [s for s in self.swaps if s.ok and s.pause_ms is not None]

    def pauses(self) -> list[float]:
        return [s.pause_ms for s in self.ok_swaps() if s.pause_ms is not None]


# -- the service -------------------------------------------------------------------------------


class Service(SwapdProcess):
    """`swapd run --mode stateful` with the bench app, driven through its control socket."""

    def __init__(self, workdir: Path, setup: Setup, nominal_mb: int) -> None:
        app_env = {"BENCH_SHAPE": setup.app_shape, "BENCH_MB": str(nominal_mb),
                   "BENCH_TRACKED": "1" if setup.precopy else "0",
                   "BENCH_DIRTY": str(setup.dirty), "BENCH_WRITE_RATE": str(setup.write_rate),
                   "BENCH_CODEC": setup.codec, "BENCH_BURST_AT": setup.burst_at}
        super().__init__(workdir, [
            "--mode", "stateful", *(["--precopy"] if setup.precopy else []),
            "--bind", "ctl=127.0.0.1:0", *SWAPD_TIMEOUTS,
            *(a for k, v in app_env.items() for a in ("--env", f"{k}={v}")),
            "--", PYTHON, str(APP),
        ], ready_timeout=READY_TIMEOUT, stop_timeout=STOP_TIMEOUT)

    def ask(self, request: str) -> dict[str, Any]:
        """One request to the app (whichever worker accepts), one JSON line back."""
        with socket.create_connection(self.address, timeout=REQUEST_TIMEOUT) as sock:
            sock.sendall(request.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError(f"app closed the connection answering {request!r}")
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        return reply

    def worker_pids(self) -> list[int]:
        assert self.sup is not None
        return [c.pid for c in psutil.Process(self.sup.pid).children()]


@contextlib.contextmanager
def pidfds(pids: Sequence[int]) -> Iterator[dict[int, int]]:
    """pidfds opened now, so a later wait cannot mistake a reused PID for the old worker."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fds[os.pidfd_open(pid)] = pid
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def wait_exited(fds: dict[int, int], timeout: float) -> None:
    """Until every process behind `fds` has exited (pidfd readable), or BenchError."""
    deadline = time.monotonic() + timeout
    pending = set(fds)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"old worker(s) {sorted(fds[f] for f in pending)} still running "
                             f"{timeout:g} s after the swap committed")
        readable, _, _ = select.select(list(pending), [], [], remaining)
        pending -= set(readable)


def _bytes_in(progress: list[dict[str, Any]], event: str) -> int | None:
    for msg in progress:
        if msg.get("event") == event:
            m = _BYTES.search(str(msg.get("message", "")))
            if m:
                return int(m.group(1) or m.group(2))
    return None


def one_swap(svc: Service, quiet: bool) -> SwapResult:
    other = wait_quiet(QUIET_LIMIT, timeout=60.0, sample=1.0) if quiet else None
    with pidfds(svc.worker_pids()) as old:
        t0 = time.monotonic()
        result = svc.call("upgrade", SWAP_TIMEOUT)
        total_ms = (time.monotonic() - t0) * 1000
        assert svc.notify is not None
        svc.notify.drain()  # RELOADING=1 and READY=1: keep the datagram queue empty
        data = result.get("data") or {}
        timings = {k: float(v) for k, v in (data.get("timings_ms") or {}).items()}
        progress = result["progress"]
        swap = SwapResult(
            ok=bool(result.get("ok")), error=result.get("error"), total_ms=total_ms,
            pause_ms=timings.get("pause"), timings=timings,
            pause_bytes=_bytes_in(progress, "snapshot"), bulk_bytes=_bytes_in(progress, "precopy"),
            handoff={}, restore_app_ms=None, loop_free_ms=None, verified=None, verify_detail="",
            old_exit_ms=None, other_load=other,
        )
        if not swap.ok:
            swap.verify_detail = f"tail: {data.get('tail', '')[-2000:]}"
            return swap
        wait_exited(old, EXIT_TIMEOUT)
        swap.old_exit_ms = (time.monotonic() - t0) * 1000 - total_ms
    info = svc.ask("info")
    swap.handoff = info.get("last_handoff") or {}
    swap.restore_app_ms = info.get("restore_ms")
    if info.get("serving_at") is not None and swap.handoff.get("quiesce_at") is not None:
        swap.loop_free_ms = (info["serving_at"] - swap.handoff["quiesce_at"]) * 1000
    check = svc.ask("verify")
    swap.verified = bool(check.get("ok"))
    swap.verify_detail = (f"digest {check.get('actual')} (expected {check.get('expected')}), "
                          f"checked in {check.get('ms')} ms")
    return swap


# -- memcpy -------------------------------------------------------------------------------------


def memcpy(nbytes: int, repeat: int = 5) -> tuple[float, float, float]:
    """(warm, fresh, memfd) median ms to copy `nbytes` out of a bytearray, one thread.

    warm:  into a bytearray written before (pages present);
    fresh: into a new private anonymous mapping, every 4 KiB page faulted in by the copy (what
           a new worker's heap gets; a new `bytes(src)` is not used: glibc may hand back
           memory freed by the previous round);
    memfd: os.write() into a new memfd (shmem pages: what dump() writes the snapshot into).
    """
    src = bytearray(os.urandom(nbytes))  # not zeros: a zero page could be shared
    dst = bytearray(nbytes)
    dst[:] = src
    warm: list[float] = []
    fresh: list[float] = []
    shm: list[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        dst[:] = src
        warm.append(time.perf_counter() - t)
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        t = time.perf_counter()
        m[:] = src
        fresh.append(time.perf_counter() - t)
        m.close()
        fd = os.memfd_create("bench-memcpy", os.MFD_CLOEXEC)
        try:
            t = time.perf_counter()
            with memoryview(src) as view:
                done = 0
                while done < nbytes:
                    done += os.write(fd, view[done:])
            shm.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    def ms(samples: list[float]) -> float:
        return statistics.median(samples) * 1000

    return ms(warm), ms(fresh), ms(shm)


# -- the run ------------------------------------------------------------------------------------


def run_row(setup: Setup, nominal_mb: int, swaps: int, quiet: bool) -> Row:
    row = Row(setup, nominal_mb)
    workdir = Path(tempfile.mkdtemp(prefix="swapd-pause-"))
    svc = Service(workdir, setup, nominal_mb)
    try:
        svc.start()
        info = svc.ask("info")  # the first one also measures the pickle size (once)
        row.pickle_size, row.entries = int(info["pickle_size"]), int(info["entries"])
        row.build_ms, row.rss_mb = float(info["build_ms"]), float(info["rss_mb"])
        for i in range(swaps):
            swap = one_swap(svc, quiet)
            row.swaps.append(swap)
            print(f"    swap {i + 1}/{swaps}: " + describe_swap(swap), flush=True)
            if not swap.ok:
                row.notes.append(f"swap {i + 1} failed: {swap.error}")
                break
            if not swap.verified:
                row.notes.append(f"swap {i + 1}: state check FAILED: {swap.verify_detail}")
        row.notes += [f"log: {ln}" for ln in svc.log_problems()]
    except BenchError as e:
        row.notes.append(f"aborted: {e}")
        print(f"    aborted: {e}", flush=True)
    finally:
        row.notes += svc.close()
        if any(n.startswith(("aborted", "swap")) for n in row.notes):
            keep = Path(tempfile.gettempdir()) / f"swapd-pause-{setup.app_shape}-{nominal_mb}.log"
            with contextlib.suppress(OSError):
                shutil.copy(svc.log_path, keep)
                row.notes.append(f"swapd log kept in {keep}")
        shutil.rmtree(workdir, ignore_errors=True)
    if row.pickle_size:
        row.memcpy_warm_ms, row.memcpy_fresh_ms, row.memcpy_memfd_ms = memcpy(row.pickle_size)
    return row


def burst_in_window(s: SwapResult) -> bool:
    """The pre-copy burst ran after the bulk was written and before the quiesce."""
    h = s.handoff
    return (h.get("burst_at") is not None and h.get("quiesce_at") is not None
            and h["bulk_end_at"] <= h["burst_at"] < h["quiesce_at"])


def describe_swap(s: SwapResult) -> str:
    if not s.ok:
        return f"FAILED: {s.error}"
    t = s.timings
    h = s.handoff
    extra = ""
    if h.get("burst_keys"):
        extra += (f"; burst {h['burst_keys']} keys in {h.get('burst_ms', 0):.1f} ms, "
                  f"between bulk and quiesce: {burst_in_window(s)}")
    if h.get("writes"):
        extra += f"; steady writes {h['writes']}"
    if h.get("dirty_at_quiesce") is not None:
        extra += f"; dirty keys at quiesce {h['dirty_at_quiesce']}"
    free = "-" if s.loop_free_ms is None else f"{s.loop_free_ms:.2f}"
    return (f"pause {s.pause_ms:.2f} ms (loop free {free}), total {s.total_ms:.0f} ms, "
            f"snapshot {_phase(t, 'quiesce', 'snapshotted'):.1f} restore "
            f"{_phase(t, 'snapshotted', 'restored'):.1f} commit "
            f"{_phase(t, 'restored', 'committed'):.1f} activate "
            f"{_phase(t, 'committed', 'activated'):.1f}, in pause {_mb(s.pause_bytes)} MB, "
            f"bulk {_mb(s.bulk_bytes)} MB, verified={s.verified}{extra}")


def _phase(t: dict[str, float], a: str, b: str) -> float:
    return t[b] - t[a] if a in t and b in t else float("nan")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.3f}"


def _med(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return median(values) if values else float("nan")


def _f(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def pause_table(rows: list[Row]) -> str:
    body = []
    for r in rows:
        ok = r.ok_swaps()
        p = r.pauses()
        pause = f"**{_f(median(p))}** ({_f(min(p))}-{_f(max(p))})" if p else "failed"
        delta = [s.handoff.get("dirty_at_quiesce") for s in ok]
        keys = [d for d in delta if isinstance(d, int)]
        burst_ok = (r.setup.dirty == 0 or r.setup.burst_at != "precopied"
                    or all(burst_in_window(s) for s in ok))
        body.append([
            r.setup.shape, f"{r.nominal_mb} MB", r.setup.mode, f"{r.pickle_size / MB:.2f}",
            f"{len(ok)}/{len(r.swaps)}", pause,
            _f(_med([s.loop_free_ms if s.loop_free_ms is not None else float("nan")
                     for s in ok])),
            _f(_med([_phase(s.timings, "quiesce", "snapshotted") for s in ok])),
            _f(_med([_phase(s.timings, "snapshotted", "restored") for s in ok])),
            _f(_med([_phase(s.timings, "restored", "committed") for s in ok])),
            _f(_med([_phase(s.timings, "committed", "activated") for s in ok])),
            _mb(int(median([s.pause_bytes for s in ok if s.pause_bytes is not None]))
                if any(s.pause_bytes is not None for s in ok) else None),
            (f"{int(median(keys))}" + ("" if burst_ok else " (burst missed!)")) if keys else "-",
            "yes" if ok and all(s.verified for s in ok) else "NO",
        ])
    return md_table(["shape", "state", "mode", "pickle MB", "swaps", "pause ms median (min-max)",
                     "to new loop free", "quiesce+snapshot", "restore", "commit", "activate",
                     "MB in pause",
                     "dirty keys", "state verified"], body)


def cost_table(rows: list[Row]) -> str:
    body = []
    for r in rows:
        ok = r.ok_swaps()
        p = r.pauses()
        totals = [s.total_ms for s in ok]
        bulk = [_phase(s.timings, "ready", "precopied") for s in ok]
        bulk_mb = [s.bulk_bytes for s in ok if s.bulk_bytes is not None]
        start = [_phase(s.timings, "spawned", "ready") for s in ok]
        body.append([
            r.setup.shape, f"{r.nominal_mb} MB", r.setup.mode,
            f"{_f(median(totals), 0)} ({_f(max(totals), 0)})" if totals else "-",
            _f(_med(start), 0),
            f"{_f(_med(bulk), 0)} ms / {median(bulk_mb) / MB:.1f} MB" if bulk_mb else "-",
            _f(_med([s.old_exit_ms or float("nan") for s in ok]), 0),
            f"{_f(r.memcpy_warm_ms, 3)} / {_f(r.memcpy_fresh_ms, 3)} / {_f(r.memcpy_memfd_ms, 3)}",
            f"{median(p) / r.memcpy_fresh_ms:.1f}x" if p and r.memcpy_fresh_ms else "-",
            f"{r.rss_mb:.0f}",
            _f(max(loads), 2) if (loads := [s.other_load for s in r.swaps
                                            if s.other_load is not None]) else "-",
        ])
    return md_table(["shape", "state", "mode", "upgrade total ms median (max)",
                     "new worker start ms", "pre-copy bulk (outside pause)",
                     "old worker exit ms", "memcpy warm / fresh / memfd ms", "pause / fresh memcpy",
                     "worker RSS MB", "others' load before a swap, max (cores)"], body)


def target_lines(rows: list[Row]) -> list[str]:
    def best(pred: Any, limit: float) -> list[str]:
        out = []
        for r in rows:
            if pred(r) and r.pauses():
                p = r.pauses()
                verdict = "met" if median(p) <= limit else "NOT met"
                worst = " (max over)" if verdict == "met" and max(p) > limit else ""
                out.append(f"{r.setup.name} {r.nominal_mb} MB: median {median(p):.2f} ms, max "
                           f"{max(p):.2f} ms -> {verdict}{worst}")
        return out or ["not measured in this run"]

    lines = []
    for (label, limit), pred in zip(TARGETS, (
        lambda r: r.nominal_mb == 1,
        lambda r: r.nominal_mb == 100 and r.setup.shape == "B" and not r.setup.precopy,
        lambda r: r.nominal_mb == 100 and r.setup.name == "A pre-copy 1%",
    ), strict=True):
        lines.append(f"- {label}:")
        lines += [f"    - {x}" for x in best(pred, limit)]
    for r in rows:  # what 1 % costs when it cannot travel before the pause
        inside = [s for s in r.ok_swaps() if r.setup.burst_at == "quiesce"]
        if inside:
            own = [s.pause_ms - float(s.handoff.get("burst_ms") or 0.0) for s in inside
                   if s.pause_ms is not None]
            lines.append(f"- {r.setup.name} {r.nominal_mb} MB: pause median "
                         f"{median(r.pauses()):.2f} ms, of which the app's own burst "
                         f"{median([float(s.handoff.get('burst_ms') or 0) for s in inside]):.2f}"
                         f" ms; the delta's own cost (dump, send, load, merge) "
                         f"{median(own):.2f} ms")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 MB only, 3 swaps each")
    p.add_argument("--sizes", type=int, nargs="+", help="nominal MB (default 1 10 100)")
    p.add_argument("--swaps", type=int,
                   help="swaps per row (default 5; 3 for the 100 MB full shape-A handoff)")
    p.add_argument("--only", help="run rows whose '<shape> <mode>' contains this text")
    p.add_argument("--write-rate", type=float, default=3000.0,
                   help="entries/s of the 'A pre-copy, steady writes' row (0: skip the row; "
                        "default 3000, ~1 %% of the entries over a round at 10 and 100 MB)")
    p.add_argument("--no-wait-quiet", dest="quiet", action="store_false",
                   help=f"do not wait for other load below {QUIET_LIMIT} cores before a swap")
    p.add_argument("--json", help="write every swap's figures to this file")
    args = p.parse_args(argv)
    sizes = args.sizes or ([1] if args.quick else [1, 10, 100])
    quiet = args.quiet and not args.quick
    setups = list(SETUPS)
    if args.write_rate > 0:
        setups.insert(2, Setup("A", f"pre-copy, steady {args.write_rate:g} writes/s", "dict",
                            precopy=True, write_rate=args.write_rate))

    info = machine_info()
    command = " ".join(["python", "bench/bench_handoff_pause.py",
                        *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {info['uname']}\n# nproc {info['nproc']}, {info['cpu']}, "
          f"Python {info['python']}, load average {info['loadavg']}", flush=True)
    rows: list[Row] = []
    for size in sizes:
        for setup in setups:
            if args.only and args.only not in setup.name:
                continue
            slow = size >= 100 and setup.name.startswith("A full")  # seconds per swap
            swaps = args.swaps or (3 if args.quick or slow else 5)
            print(f"{setup.name}, {size} MB:", flush=True)
            rows.append(run_row(setup, size, swaps, quiet))
    print("\n## Pause (swapd's timings_ms; phases are supervisor marks, ms)\n")
    print(pause_table(rows))
    print("\n## Whole upgrade and memcpy of the same bytes\n")
    print(cost_table(rows))
    print("\n## Targets (2 cores)\n")
    print("\n".join(target_lines(rows)))
    notes = [f"- {r.setup.name} {r.nominal_mb} MB: {n}" for r in rows for n in r.notes]
    if notes:
        print("\n## Notes\n")
        print("\n".join(notes))
    print(f"\n# load average at the end: {machine_info()['loadavg']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "command": command,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    failed = any(not r.pauses() or len(r.ok_swaps()) < len(r.swaps) or
                 not all(s.verified for s in r.ok_swaps()) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
