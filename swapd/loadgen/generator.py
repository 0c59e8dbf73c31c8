"""The load generator: closed-loop clients on one event loop, each attempt timed, classified
and recorded, the run bounded by its duration and max_requests, and every wait bounded."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple

from swapd.loadgen.client import Connection, exchange
from swapd.loadgen.outcomes import LoadConfigError, LoadError, Outcome, classify
from swapd.loadgen.records import AttemptLog, Timeline
from swapd.loadgen.report import LoadReport, RunInfo
from swapd.loadgen.request import Mode, Request
from swapd.loadgen.summary import summarise
from swapd.loadgen.target import Endpoint, Target

# ~30 bytes per attempt in the log, so the default cap keeps a run under ~60 MB.
DEFAULT_MAX_REQUESTS = 2_000_000
_MAX_DETAILS = 32  # distinct failure texts kept; the rest are counted together
_STOP_GRACE = 2.0  # beyond the per-request timeout, for clients to notice a stop


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
