"""The ASGI lifespan protocol: startup before the worker is ready, shutdown at the drain.

A startup that fails (or misses --timeout-lifespan) means the worker never reports ready:
the swap that started it fails and the old generation keeps serving. With --lifespan auto an
app that does not speak lifespan (it raises or returns at once: Django) runs without it.

The reason of a failure is one line, the exception's (`RuntimeError: db unreachable`):
Starlette's `lifespan.startup.failed` message is the whole formatted traceback, which is
logged as such, once (the app re-raises: logged with the exception), never squeezed into a
field.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from swapd.serve.scope import ASGI_VERSION

log = logging.getLogger("swapd.serve")

REASON_MAX = 500  # characters of a one-line failure reason
RAISE_GRACE = 1.0  # an app that reports a failure usually raises right after: wait that long


def summary(message: str) -> str:
    """One line for a failure message: a traceback's last line (the exception), else the
    message's last non-empty line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    line = lines[-1] if lines else message.strip()
    return line if len(line) <= REASON_MAX else line[:REASON_MAX - 3] + "..."


class LifespanError(Exception):
    """Startup failed: the worker must not become ready."""


class Lifespan:
    def __init__(self, app: Any, mode: str, state: dict[str, Any], timeout: float) -> None:
        self.app = app
        self.mode = mode
        self.state = state
        self.timeout = timeout
        self.supported = mode != "off"
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._error: str | None = None
        self._detail: str | None = None  # a multi-line failure message, not yet logged
        self._task: asyncio.Task[None] | None = None
        self._phase = "startup"

    async def startup(self) -> None:
        if not self.supported:
            return
        self._task = asyncio.get_running_loop().create_task(self._main())
        await self._inbox.put({"type": "lifespan.startup"})
        waiter = asyncio.ensure_future(self._started.wait())
        try:
            done, _ = await asyncio.wait([waiter, self._task], timeout=self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not done:
            raise LifespanError(f"lifespan startup did not complete within {self.timeout:g}s")
        if self._error is not None:
            await self._settle()
            raise LifespanError(f"lifespan startup failed: {self._error}")
        if not self._started.is_set():
            if self.mode == "on":
                raise LifespanError("the app ended the lifespan protocol without starting up")
            log.info("event=lifespan.unsupported action='serving without lifespan'")
            self.supported = False
            return
        log.info("event=lifespan.started")

    async def shutdown(self) -> None:
        if not self.supported or self._task is None or self._task.done():
            return
        self._phase = "shutdown"
        await self._inbox.put({"type": "lifespan.shutdown"})
        waiter = asyncio.ensure_future(self._stopped.wait())
        try:
            done, _ = await asyncio.wait([waiter, self._task], timeout=self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not done:
            log.error("event=lifespan.shutdown_timeout timeout=%gs", self.timeout)
            self._task.cancel()
        elif self._error is not None:
            await self._settle()
            log.error("event=lifespan.shutdown_failed error=%r", self._error)
        else:
            log.info("event=lifespan.stopped")

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except Exception as e:
            if self._phase == "startup" and not self._started.is_set() and self.mode == "auto":
                log.info("event=lifespan.unsupported error=%r", f"{type(e).__name__}: {e}")
                return
            log.exception("event=lifespan.error phase=%s", self._phase)
            self._detail = None  # the traceback just logged says it all
            self._error = self._error or summary(f"{type(e).__name__}: {e}")
        finally:
            if self._phase == "shutdown":
                self._stopped.set()

    async def _settle(self) -> None:
        """After a failure message: let the app raise (its traceback is then logged before
        the one-line reason), else log a multi-line message as it is."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=RAISE_GRACE)
        if self._detail is not None:
            log.error("event=lifespan.failure_message phase=%s\n%s", self._phase,
                      self._detail.rstrip())
            self._detail = None

    def _failed(self, message: Any, default: str) -> None:
        text = str(message or default)
        self._error = summary(text)
        if "\n" in text.strip():
            self._detail = text

    async def _receive(self) -> dict[str, Any]:
        return await self._inbox.get()

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "lifespan.startup.complete":
            self._started.set()
        elif kind == "lifespan.startup.failed":
            self._failed(message.get("message"), "lifespan.startup.failed")
            self._started.set()
        elif kind == "lifespan.shutdown.complete":
            self._stopped.set()
        elif kind == "lifespan.shutdown.failed":
            self._failed(message.get("message"), "lifespan.shutdown.failed")
            self._stopped.set()
        else:
            raise RuntimeError(f"unexpected lifespan message {kind!r}")
