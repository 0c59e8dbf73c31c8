"""Throttle: at most one log line per interval for an event that a peer can repeat at will."""

from __future__ import annotations

import time


class Throttle:
    """`allow()` is True at most once per `interval`; `suppressed` counts the refusals since."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.suppressed = 0
        self._next = 0.0

    def allow(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        return True

    def take_suppressed(self) -> int:
        """How many were suppressed before this allowed one (and reset the count)."""
        n, self.suppressed = self.suppressed, 0
        return n
