r"""Bounded closed-loop load generator: the instrument that measures a swap.

It reproduces the method of reference/peers.md §10 so that swapd's figures sit next to the
peers': N closed-loop clients (each sends its next request only when the previous one has
finished), one of two connection modes, every attempt timed and classified, and swap windows
in which failures, the longest no-success gap, p99 and throughput are reported.

    mode       close      a new connection per request (HTTP sends ``Connection: close``)
               keepalive  one connection per client, reused until the server ends it
    outcome    ok | refused | reset | eof | timeout | bad-response | other
    window     [begin - 1 s, end + 1 s], clipped to the run (one per swap: "swap 3")
    gap        longest interval in which no client completed a successful response

Percentiles of closed-loop clients hide outages (coordinated omission: a stalled client stops
sending), which is why failures per window and the no-success gap are the headline figures.

The wire formats (HTTP/1.1 and the line protocol, client side) are drawn in wire.py.

Keep-alive rules. A connection is reused until the server sends ``Connection: close``, frames
its body by EOF, or closes it while it is idle; each of those is a reconnect, not an error. A
request sent on a reused connection that then gets EOF or a reset is a failure (``eof`` or
``reset`` with ``reused=True``) and is never retried: that is the stale keep-alive race the
peers lose requests to, and a POST must not be silently replayed. Before reusing a connection
the client polls it, as urllib3 does, so a close that already arrived is not counted; a close
still in flight when the request leaves is indistinguishable from the race and counts as one.

Use ``LoadGenerator`` inside an event loop, ``BackgroundLoad`` from synchronous code (pytest),
``fetch`` to read one value (e.g. the final count), or the CLI:

    python -m swapd.loadgen --connect 127.0.0.1:8000 --kind http-get --mode keepalive \
        --clients 32 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NamedTuple

from swapd.loadgen.analysis import Gap, longest_gap, percentile, window_span
from swapd.loadgen.client import Connection, exchange, fetch, fetch_sync, loop_factory
from swapd.loadgen.outcomes import (
    ConnectionClosed,
    LoadConfigError,
    LoadError,
    Outcome,
    RequestFailed,
    ResponseError,
    classify,
)
from swapd.loadgen.records import Attempt, AttemptLog, Timeline, Window
from swapd.loadgen.report import LoadReport, RunInfo, WindowReport
from swapd.loadgen.request import Mode, Request, http_get, http_get_int, http_post, line
from swapd.loadgen.summary import summarise
from swapd.loadgen.target import Endpoint, Target, parse_target
from swapd.loadgen.wire import (
    HttpResponse,
    parse_int,
    read_http_response,
    read_line_reply,
)

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "Attempt",
    "AttemptLog",
    "BackgroundLoad",
    "ConnectionClosed",
    "Endpoint",
    "Gap",
    "HttpResponse",
    "LoadConfigError",
    "LoadError",
    "LoadGenerator",
    "LoadReport",
    "Mode",
    "Outcome",
    "Progress",
    "Request",
    "RequestFailed",
    "ResponseError",
    "RunInfo",
    "Target",
    "Timeline",
    "Window",
    "WindowReport",
    "classify",
    "fetch",
    "fetch_sync",
    "http_get",
    "http_get_int",
    "http_post",
    "line",
    "longest_gap",
    "main",
    "parse_int",
    "parse_target",
    "percentile",
    "read_http_response",
    "read_line_reply",
    "summarise",
    "window_span",
]

# ~30 bytes per attempt in the log, so the default cap keeps a run under ~60 MB.
DEFAULT_MAX_REQUESTS = 2_000_000
_MAX_DETAILS = 32  # distinct failure texts kept; the rest are counted together
_STOP_GRACE = 2.0  # beyond the per-request timeout, for clients to notice a stop
_THREAD_GRACE = 3.0  # beyond the generator's own bound, for the loop to shut down
_START_TIMEOUT = 10.0


# --- the generator ------------------------------------------------------------------------


class Progress(NamedTuple):
    elapsed: float
    attempts: int
    ok: int
    failed: int
    running: bool


class LoadGenerator:
    """Closed-loop clients against one endpoint, bounded by duration and max_requests.

    Use it inside a running event loop::

        gen = LoadGenerator(("127.0.0.1", port), http_post(), clients=32, duration=20)
        gen.start()
        await gen.wait_for_successes(100, timeout=5)
        with gen.window("swap 1"):
            await do_swap()
        report = await gen.stop()

    or ``report = await gen.run()`` to run until a bound, or ``async with gen: ...`` and then
    ``gen.report()``. Every wait is bounded: after a stop, clients finish their request in
    flight (at most ``timeout``) and exit; ``stop_bound`` is the most that can take.
    """

    def __init__(
        self,
        target: Target,
        request: Request,
        *,
        clients: int = 16,
        mode: Mode | str = Mode.KEEPALIVE,
        duration: float = 30.0,
        max_requests: int | None = DEFAULT_MAX_REQUESTS,
        timeout: float = 2.0,
        failure_pause: float = 0.010,
        window_margin: float = 1.0,
    ) -> None:
        if not 1 <= clients <= 65535:
            raise LoadConfigError(f"clients must be in 1..65535, not {clients}")
        if not 0 < duration < math.inf:
            raise LoadConfigError(f"duration must be positive and finite, not {duration}")
        if max_requests is not None and max_requests < 1:
            raise LoadConfigError(f"max_requests must be at least 1, not {max_requests}")
        if not 0 < timeout < math.inf or not 0 <= failure_pause < math.inf:
            raise LoadConfigError("timeout must be positive and failure_pause not negative")
        if not 0 <= window_margin < math.inf:
            raise LoadConfigError(f"window_margin must not be negative, not {window_margin}")
        try:
            self.mode = Mode(mode)
        except ValueError as exc:
            raise LoadConfigError(f"mode must be 'close' or 'keepalive', not {mode!r}") from exc
        self.endpoint = Endpoint.of(target)
        self.request = request
        self.clients = clients
        self.duration = duration
        self.max_requests = max_requests
        self.timeout = timeout
        self.failure_pause = failure_pause
        self.window_margin = window_margin
        self.stop_bound = timeout + failure_pause + _STOP_GRACE
        self.timeline = Timeline()
        self.attempts = AttemptLog()

        self._payload = request.encode(self.endpoint, self.mode)
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop_event = asyncio.Event()
        self._stop_reason: str | None = None
        self._started_at = 0.0
        self._stopped_at = 0.0
        self._deadline = 0.0
        self._issued = 0
        self._ok = 0
        self._failed = 0
        self._connections = 0
        self._server_ended = 0
        self._closed_while_idle = 0
        self._details: Counter[tuple[str, str]] = Counter()
        self._waiters: list[tuple[int, int, Callable[[bool], None]]] = []
        self._waiter_seq = 0

    # Timeline, usable from any thread.
    def mark(self, label: str) -> float:
        return self.timeline.mark(label)

    def begin(self, label: str) -> float:
        return self.timeline.begin(label)

    def end(self, label: str) -> float:
        return self.timeline.end(label)

    def window(self, label: str) -> contextlib.AbstractContextManager[None]:
        return self.timeline.window(label)

    # Life cycle; all on the event loop's thread.
    def start(self) -> None:
        if self._task is not None:
            raise LoadError("a LoadGenerator runs once")
        loop = asyncio.get_running_loop()
        self._started_at = time.monotonic()
        self._deadline = self._started_at + self.duration
        if self._stop_reason is not None:  # stopped before it started
            self._stopped_at = self._started_at
        self._timer = loop.call_later(self.duration, self._begin_stop, "duration", self._deadline)
        self._task = loop.create_task(self._run(), name="swapd-loadgen")

    def request_stop(self, at: float | None = None) -> None:
        """Stop issuing requests (``at``: when the stop was decided, default now)."""
        self._begin_stop("stopped", time.monotonic() if at is None else at)

    async def wait(self) -> LoadReport:
        """Wait until the run ends by itself (duration or max_requests) or is stopped."""
        remaining = max(0.0, self._deadline - time.monotonic())
        return await self._finish_within(remaining + self.stop_bound)

    async def stop(self) -> LoadReport:
        self.request_stop()
        return await self._finish_within(self.stop_bound)

    async def run(self) -> LoadReport:
        self.start()
        return await self.wait()

    async def __aenter__(self) -> LoadGenerator:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.stop()
            return
        try:
            await self.stop()
        except LoadError as err:
            exc.add_note(f"the load generator failed too: {err!r}")

    async def wait_for_successes(self, count: int, timeout: float) -> None:
        """Wait until ``count`` more requests have succeeded (LoadError on timeout or end)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def done(reached: bool) -> None:
            if not future.done():
                future.set_result(reached)

        self._add_success_waiter(count, done)
        try:
            async with asyncio.timeout(timeout):
                reached = await future
        except TimeoutError as exc:
            raise LoadError(f"{count} successes did not come within {timeout} s") from exc
        if not reached:
            raise LoadError(f"the run ended before {count} more successes")

    def progress(self) -> Progress:
        running = self._task is not None and not self._task.done()
        elapsed = time.monotonic() - self._started_at if self._task is not None else 0.0
        return Progress(elapsed, self._ok + self._failed, self._ok, self._failed, running)

    def report(self) -> LoadReport:
        """The report so far (a running generator reports up to now, as ``running``).

        It costs O(attempts) on the loop's thread: for a live display, poll progress().
        """
        if self._task is None:
            raise LoadError("the load generator has not been started")
        running = not self._task.done()
        info = RunInfo(
            started_at=self._started_at,
            stopped_at=time.monotonic() if self._stop_reason is None else self._stopped_at,
            stop_reason="running" if running else (self._stop_reason or "running"),
            target=str(self.endpoint),
            request=self.request.describe(),
            counts=self.request.counts,
            mode=self.mode.value,
            clients=self.clients,
            window_margin=self.window_margin,
            connections_opened=self._connections,
            server_ended=self._server_ended,
            closed_while_idle=self._closed_while_idle,
            details=tuple((o, text, n) for (o, text), n in self._details.most_common()),
        )
        return summarise(self.attempts, info, self.timeline.marks(), self.timeline.windows())

    # Internals.
    def _begin_stop(self, reason: str, at: float) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stopped_at = max(at, self._started_at)
            self._stop_event.set()

    async def _finish_within(self, bound: float) -> LoadReport:
        task = self._task
        if task is None:
            raise LoadError("the load generator has not been started")
        done, _ = await asyncio.wait({task}, timeout=bound)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_GRACE)
            raise LoadError(f"the load clients did not finish within {bound:.1f} s")
        if task.cancelled():
            raise LoadError("the load generator was cancelled")
        task.result()  # a crashed client's error
        return self.report()

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for cid in range(self.clients):
                    group.create_task(self._client(cid), name=f"swapd-loadgen-{cid}")
        except ExceptionGroup as errors:
            self._begin_stop("error", time.monotonic())
            raise LoadError(f"a load client crashed: {errors.exceptions[0]!r}") from errors
        finally:
            if self._timer is not None:
                self._timer.cancel()
            waiters, self._waiters = self._waiters, []
            for _, _, callback in waiters:
                callback(False)

    def _next_start(self) -> float | None:
        """The start time of this client's next request, or None when the run is over."""
        if self._stop_reason is not None:
            return None
        now = time.monotonic()
        if now >= self._deadline:  # the timer may not have fired yet
            self._begin_stop("duration", self._deadline)
            return None
        self._issued += 1
        if self._issued == self.max_requests:
            self._begin_stop("max_requests", now)
        return now

    async def _client(self, cid: int) -> None:
        conn: Connection | None = None
        try:
            while (t0 := self._next_start()) is not None:
                reused = conn is not None
                if conn is not None and conn.closed_while_idle():
                    self._closed_while_idle += 1
                    conn.abort()
                    conn, reused = None, False
                try:
                    async with asyncio.timeout(self.timeout):
                        if conn is None:
                            conn = Connection(*await self.endpoint.open())
                            self._connections += 1
                        value, reusable = await exchange(conn, self.request, self._payload)
                except Exception as exc:  # every failure is an outcome, recorded with its text
                    outcome, detail = classify(exc)
                    if outcome is Outcome.TIMEOUT:
                        detail = "while connecting" if conn is None else "awaiting the reply"
                    self._record(cid, t0, outcome, reused, None, detail)
                    if conn is not None:
                        conn.abort()
                        conn = None
                    await self._pause()
                    continue
                self._record(cid, t0, Outcome.OK, reused, value, None)
                if not reusable and self.mode is Mode.KEEPALIVE:
                    self._server_ended += 1
                if not reusable or self.mode is Mode.CLOSE:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.failure_pause):
                await self._stop_event.wait()

    def _record(
        self,
        cid: int,
        t0: float,
        outcome: Outcome,
        reused: bool,
        value: int | None,
        detail: str | None,
    ) -> None:
        self.attempts.append(cid, t0, time.monotonic(), outcome, reused, value)
        if outcome is not Outcome.OK:
            self._failed += 1
            if detail is not None:
                key = (outcome.value, detail)
                if key not in self._details and len(self._details) >= _MAX_DETAILS:
                    key = (outcome.value, "(further distinct texts not kept)")
                self._details[key] += 1
            return
        self._ok += 1
        while self._waiters and self._waiters[0][0] <= self._ok:
            heapq.heappop(self._waiters)[2](True)

    def _add_success_waiter(self, count: int, callback: Callable[[bool], None]) -> None:
        """Call ``callback(True)`` after ``count`` more successes, (False) at the end."""
        if self._task is not None and self._task.done():
            callback(False)
        elif count <= 0:
            callback(True)
        else:
            self._waiter_seq += 1
            heapq.heappush(self._waiters, (self._ok + count, self._waiter_seq, callback))


class BackgroundLoad:
    """A LoadGenerator running in its own thread and event loop (uvloop when available).

    For synchronous code such as pytest::

        with BackgroundLoad(("127.0.0.1", port), http_post(), clients=16, duration=30) as load:
            load.wait_for_successes(100, timeout=10)
            with load.window("swap 1"):
                do_swap()
            report = load.stop()

    ``stop()`` is bounded and re-raises (chained in a LoadError) any error of the load thread.
    Once it has returned, ``generator.attempts`` holds every attempt for closer analysis.
    """

    def __init__(
        self,
        target: Target,
        request: Request,
        *,
        clients: int = 16,
        mode: Mode | str = Mode.KEEPALIVE,
        duration: float = 30.0,
        max_requests: int | None = DEFAULT_MAX_REQUESTS,
        timeout: float = 2.0,
        failure_pause: float = 0.010,
        window_margin: float = 1.0,
        use_uvloop: bool = True,
    ) -> None:
        self.generator = LoadGenerator(
            target,
            request,
            clients=clients,
            mode=mode,
            duration=duration,
            max_requests=max_requests,
            timeout=timeout,
            failure_pause=failure_pause,
            window_margin=window_margin,
        )
        self._use_uvloop = use_uvloop
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # set while the loop runs
        self._started = threading.Event()
        self._report: LoadReport | None = None
        self._error: BaseException | None = None

    def start(self) -> BackgroundLoad:
        if self._thread is not None:
            raise LoadError("a BackgroundLoad runs once")
        self._thread = threading.Thread(target=self._thread_main, name="swapd-loadgen", daemon=True)
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT):
            raise LoadError(f"the load thread did not start within {_START_TIMEOUT} s")
        if self.generator._task is None:  # the loop never came up; later errors go to stop()
            raise LoadError(f"the load thread failed to start: {self._error!r}") from self._error
        return self

    def stop(self) -> LoadReport:
        """Stop issuing requests, wait (bounded) for the clients, and return the report."""
        at = time.monotonic()
        self._call_in_loop(self.generator.request_stop, at)
        return self._join(self.generator.stop_bound + _THREAD_GRACE)

    def wait(self) -> LoadReport:
        """Wait (bounded) for the run to end by duration or max_requests; return the report."""
        remaining = max(0.0, self.generator._deadline - time.monotonic())
        return self._join(remaining + self.generator.stop_bound + _THREAD_GRACE)

    def wait_for_successes(self, count: int, timeout: float) -> None:
        """Block until ``count`` more requests succeed (LoadError on timeout or end of run)."""
        reached = threading.Event()
        result: list[bool] = []

        def done(ok: bool) -> None:
            result.append(ok)
            reached.set()

        if not self._call_in_loop(self.generator._add_success_waiter, count, done):
            raise LoadError("the load is not running")
        if not reached.wait(timeout):
            raise LoadError(f"{count} successes did not come within {timeout} s")
        if not result[0]:
            raise LoadError(f"the run ended before {count} more successes")

    def progress(self) -> Progress:
        return self.generator.progress()

    def mark(self, label: str) -> float:
        return self.generator.mark(label)

    def begin(self, label: str) -> float:
        return self.generator.begin(label)

    def end(self, label: str) -> float:
        return self.generator.end(label)

    def window(self, label: str) -> contextlib.AbstractContextManager[None]:
        return self.generator.window(label)

    @property
    def report(self) -> LoadReport | None:
        """The final report, once stop() or wait() has returned it."""
        return self._report

    def __enter__(self) -> BackgroundLoad:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
            return
        try:
            self.stop()
        except LoadError as err:  # keep the body's exception primary, but say what else broke
            exc.add_note(f"the load generator failed too: {err!r}")

    def _thread_main(self) -> None:
        try:
            with asyncio.Runner(loop_factory=loop_factory(self._use_uvloop)) as runner:
                self._report = runner.run(self._main())
        except BaseException as exc:  # handed to the caller's thread by stop() and wait()
            self._error = exc
        finally:
            self._started.set()  # unblocks start() if the loop never came up

    async def _main(self) -> LoadReport:
        with self._lock:
            self._loop = asyncio.get_running_loop()
        try:
            self.generator.start()
            self._started.set()
            return await self.generator.wait()
        finally:
            # Cleared while the loop still runs, so _call_in_loop never targets a closed loop.
            with self._lock:
                self._loop = None

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> bool:
        with self._lock:
            if self._loop is None:
                return False
            self._loop.call_soon_threadsafe(fn, *args)
            return True

    def _join(self, bound: float) -> LoadReport:
        if self._thread is None:
            raise LoadError("the load has not been started")
        self._thread.join(bound)
        if self._thread.is_alive():
            raise LoadError(f"the load thread did not finish within {bound:.1f} s")
        if self._error is not None:
            raise LoadError(f"the load generator failed: {self._error!r}") from self._error
        if self._report is None:
            raise LoadError("the load thread ended without a report")
        return self._report


# --- command line -------------------------------------------------------------------------

_KINDS: dict[str, Callable[[argparse.Namespace], Request]] = {
    "http-get": lambda a: http_get(a.path or "/"),
    "http-post": lambda a: http_post(a.path or "/incr"),
    "http-get-int": lambda a: http_get_int(a.path or "/count"),
    "line": lambda a: line(a.command),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m swapd.loadgen",
        description="Closed-loop load against one endpoint; prints a report (peers.md §10).",
    )
    p.add_argument("--connect", required=True, help="HOST:PORT, [V6]:PORT, unix:PATH or /PATH")
    p.add_argument("--kind", choices=sorted(_KINDS), default="http-get")
    p.add_argument("--path", help="HTTP path (default: / for GET, /incr, /count)")
    p.add_argument("--command", default="INCR", help="line-protocol command (default INCR)")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.KEEPALIVE.value)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    p.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    p.add_argument("--failure-pause", type=float, default=0.010, help="seconds after a failure")
    p.add_argument("--progress", action="store_true", help="a progress line per second")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    return p


async def _cli_run(gen: LoadGenerator, show_progress: bool) -> LoadReport:
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C ends the run early but still prints the report of what was measured.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, gen.request_stop)
    gen.start()
    if show_progress:
        while gen.progress().running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await gen._stop_event.wait()
            p = gen.progress()
            print(
                f"+{p.elapsed:6.1f} s  attempts {p.attempts:,}  ok {p.ok:,}  failed {p.failed:,}",
                file=sys.stderr,
            )
            if gen._stop_event.is_set():
                break
    return await gen.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        gen = LoadGenerator(
            parse_target(args.connect),
            _KINDS[args.kind](args),
            clients=args.clients,
            mode=args.mode,
            duration=args.duration,
            max_requests=args.max_requests,
            timeout=args.timeout,
            failure_pause=args.failure_pause,
        )
    except LoadConfigError as exc:
        print(f"swapd.loadgen: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory(not args.no_uvloop)) as runner:
        report = runner.run(_cli_run(gen, args.progress))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 1 if args.fail_on_error and report.failed else 0
