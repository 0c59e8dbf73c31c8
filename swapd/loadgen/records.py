"""What a run records: every attempt (column by column, ~30 bytes each) and its timeline of
labelled instants and windows (the swaps), both read by summarise()."""

from __future__ import annotations

import contextlib
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from swapd.loadgen.outcomes import CODE, NO_VALUE, OUTCOMES, LoadError, Outcome


class Attempt(NamedTuple):
    client: int
    t_start: float  # time.monotonic()
    t_end: float
    outcome: Outcome
    reused: bool  # sent on a connection that had already carried a request
    value: int | None

    @property
    def latency(self) -> float:
        return self.t_end - self.t_start


class AttemptLog:
    """Every attempt, column by column in typed arrays (~30 bytes each)."""

    def __init__(self) -> None:
        self.client = array("I")
        self.t_start = array("d")
        self.t_end = array("d")
        self.outcome = array("B")
        self.reused = array("B")
        self.value = array("q")

    @classmethod
    def from_attempts(cls, attempts: Iterable[Attempt]) -> AttemptLog:
        log = cls()
        for a in attempts:
            log.append(a.client, a.t_start, a.t_end, Outcome(a.outcome), a.reused, a.value)
        return log

    def append(
        self,
        client: int,
        t_start: float,
        t_end: float,
        outcome: Outcome,
        reused: bool,
        value: int | None,
    ) -> None:
        self.client.append(client)
        self.t_start.append(t_start)
        self.t_end.append(t_end)
        self.outcome.append(CODE[outcome])
        self.reused.append(reused)
        self.value.append(NO_VALUE if value is None else value)

    def __len__(self) -> int:
        return len(self.outcome)

    def __getitem__(self, i: int) -> Attempt:
        value = self.value[i]
        return Attempt(
            self.client[i],
            self.t_start[i],
            self.t_end[i],
            OUTCOMES[self.outcome[i]],
            bool(self.reused[i]),
            None if value == NO_VALUE else value,
        )

    def __iter__(self) -> Iterator[Attempt]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class Window:
    label: str
    begin: float
    end: float | None  # None: still open


class Timeline:
    """Labelled instants and intervals (swaps) on the monotonic clock; safe from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._marks: list[tuple[str, float]] = []
        self._windows: dict[str, Window] = {}

    def mark(self, label: str, at: float | None = None) -> float:
        at = self._clock() if at is None else at
        with self._lock:
            self._marks.append((label, at))
        return at

    def begin(self, label: str, at: float | None = None) -> float:
        at = self._clock() if at is None else at
        with self._lock:
            if label in self._windows:
                raise LoadError(f"window {label!r} already exists")
            self._windows[label] = Window(label, at, None)
        return at

    def end(self, label: str, at: float | None = None) -> float:
        at = self._clock() if at is None else at
        with self._lock:
            window = self._windows.get(label)
            if window is None or window.end is not None:
                raise LoadError(f"window {label!r} is not open")
            if at < window.begin:
                raise LoadError(f"window {label!r} would end before it began")
            self._windows[label] = Window(label, window.begin, at)
        return at

    @contextlib.contextmanager
    def window(self, label: str) -> Iterator[None]:
        self.begin(label)
        try:
            yield
        finally:
            self.end(label)

    def marks(self) -> list[tuple[str, float]]:
        with self._lock:
            return list(self._marks)

    def windows(self) -> list[Window]:
        with self._lock:
            return list(self._windows.values())
