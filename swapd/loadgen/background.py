"""BackgroundLoad: a LoadGenerator on its own thread and event loop, for synchronous callers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from swapd.loadgen.client import loop_factory
from swapd.loadgen.generator import DEFAULT_MAX_REQUESTS, LoadGenerator, Progress
from swapd.loadgen.outcomes import LoadError
from swapd.loadgen.report import LoadReport
from swapd.loadgen.request import Mode, Request
from swapd.loadgen.target import Target

_THREAD_GRACE = 3.0  # beyond the generator's own bound, for the loop to shut down
_START_TIMEOUT = 10.0


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
