"""The one swap in flight (`SwapJob`) and how a swap fails (`SwapFailed`).

Everyone who asked for a swap (the control client that started it, a joining client, a
signal) subscribes to its job's progress and awaits its outcome, so every caller learns
what happened. Kept apart from the swap's steps (swap.py, transfer.py) so that the
modules that only report on a swap (status, reloads, shutdown) need none of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from swapd.control import DEADLINE, Emit
from swapd.supervisor.generation import RequestFailed, WorkerProcess

log = logging.getLogger("swapd")


class SwapFailed(Exception):
    """A swap that did not commit; the service is as it was before."""

    def __init__(self, reason: str, *, worker: WorkerProcess | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tail = worker.tail_text() if worker is not None else ""
        self.worker = worker.tag if worker is not None else None

    @classmethod
    def from_request(cls, e: RequestFailed) -> SwapFailed:
        failed = cls(e.reason)
        failed.tail, failed.worker = e.tail, e.worker
        return failed

    def report(self, event: str) -> None:
        """Log it: the reason, then the output tail of the worker that failed, if any, one
        line each (`<event>.output <worker> text=...`: a log line is one line)."""
        log.error("%s reason=%r", event, self.reason)
        if self.tail:
            for line in self.tail.splitlines():
                log.error("%s.output %s text=%r", event, self.worker, line)


@dataclass
class SwapJob:
    kind: str  # "upgrade", "reload", or "start" (the first generation's activation)
    origin: str
    started: float = field(default_factory=time.monotonic)
    gen: int | None = None
    subscribers: list[Emit] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)  # slot -> CPU s in the pause so far
    done: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    release: str | None = None  # the new generation's label (None: derived from its code)
    watch: float = 0.0  # > 0: hold the old generation this long after commit (watch.py)
    who: dict[str, Any] = field(default_factory=dict)  # who asked, for the history
    bound: float = 0.0  # seconds from `started` within which it ends, whatever happens

    def remaining(self) -> float:
        return max(0.0, self.started + self.bound - time.monotonic())

    def extend(self, bound: float) -> None:
        """A bound from now (a reload's new timeouts): tell the waiting clients if later."""
        elapsed = time.monotonic() - self.started
        if elapsed + bound > self.bound:
            self.bound = elapsed + bound
            self.emit(DEADLINE, "", {"seconds": self.remaining()})
    previous: int | None = None  # the generation it replaces
    committed: bool = False  # past the point of no return: the outcome is a success
    warnings: list[str] = field(default_factory=list)  # what went wrong that is no failure

    def warn(self, message: str) -> None:
        """Something the caller must hear even though the swap goes on (or committed)."""
        self.warnings.append(message)
        self.emit("warning", f"WARNING: {message}")

    def emit(self, event: str, message: str, extra: dict[str, Any] | None = None) -> None:
        for sub in list(self.subscribers):
            try:
                sub(event, message, extra)
            except Exception:  # a client that went away must not break the swap
                self.subscribers.remove(sub)

    def mark(self, name: str) -> None:
        self.timings[name] = round((time.monotonic() - self.started) * 1000, 2)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "origin": self.origin, "gen": self.gen,
                "elapsed_ms": round((time.monotonic() - self.started) * 1000, 1)}


def committed(job: SwapJob, gen: int, previous: int | None) -> dict[str, Any]:
    """The result of a swap that committed."""
    return {"gen": gen, "previous": previous, "timings_ms": dict(job.timings),
            "warnings": list(job.warnings)}
