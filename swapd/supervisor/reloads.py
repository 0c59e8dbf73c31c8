"""Reloads: the configuration re-read for one, and SIGHUP, a reload coalesced.

A reload (`swapd reload`, or a SIGHUP) is a swap with the configuration file read again
first; what is bound or opened once at start (the control socket, the metrics endpoint,
the state directory, the fd store) keeps its value, and the reload says so: a warning in
its result, which `swapd reload` prints and `swapd status` keeps in its last swap.

A SIGHUP asks for one reload (re-read the configuration, then swap). While the first
generation starts, or a swap or a patch is in flight, any number of SIGHUPs make exactly
one reload after it: operators and `systemctl reload` send the signal again when nothing
seems to happen, and each must not become a swap of its own; an edit written meanwhile is
never missed. A signal has nobody to answer, so a reload that is refused (a re-exec in
flight, a watch window open: it may end in a rollback, and a reload after it would swap
away from what the window judged) says so in the log and to the service manager.

Under systemd >= 253 (Type=notify-reload) the SIGHUP comes from systemd, which then waits
for a RELOADING=1 newer than its signal, and READY=1: a deferred reload announces
RELOADING=1 at once, and the reload to come sends READY=1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from swapd.config import Config, ConfigError, load
from swapd.supervisor.swapjob import SwapFailed

log = logging.getLogger("swapd")


RESTART_KEYS = ("control", "metrics", "state_dir", "fdstore")  # bound or opened at start


def reread_config(current: Config, overrides: dict[str, Any]) -> tuple[Config, list[str]]:
    """The configuration for a reload: the file read again, the same flags on top; what
    needs a restart keeps its `current` value, and is said in the warnings returned.
    SwapFailed if the file is bad."""
    try:
        new = load(current.config_file, overrides)
    except ConfigError as e:
        raise SwapFailed(f"configuration not reloaded: {e}") from e
    warnings = []
    for key in RESTART_KEYS:
        wanted, kept = getattr(new, key), getattr(current, key)
        if wanted != kept:
            log.warning("event=reload.ignored key=%s wanted=%r kept=%r reason=%r", key,
                        str(wanted), str(kept), "needs a restart")
            warnings.append(f"{key} changed in the configuration ({_show(wanted)}): not "
                            f"applied, it needs a restart; still {_show(kept)}")
            new = replace(new, **{key: kept})
    if new.backlog != current.backlog:  # listen() is called when a listener is bound
        warnings.append(f"backlog changed in the configuration ({new.backlog}): only "
                        "listeners bound from now on get it; the others keep theirs "
                        f"({current.backlog}) until a restart")
    return new, warnings


def _show(value: object) -> str:
    return "none" if value is None else str(value)


class Announcer(Protocol):
    """What the service manager is told (supervisor/manager.py)."""

    def reloading(self, status: str, bound: float) -> None: ...

    def ready(self, status: str) -> None: ...


class ReloadSignals:
    """The SIGHUPs received and the one reload they are owed.

    `in_flight()`: the swap or patch a reload must wait for (None: none, or nothing a reload
    could follow, which then refuses it); `reload()`: start the reload and wait for it (it
    raises `refused` with the reason); `stopping()`: no more reloads; `serving()`: a
    generation serves and the supervisor is not stopping; `status_line()` and `bound()`
    for the service manager.
    """

    def __init__(self, in_flight: Callable[[], str | None],
                 reload: Callable[[], Awaitable[object]], refused: type[Exception],
                 stopping: Callable[[], bool], serving: Callable[[], bool],
                 manager: Announcer,
                 status_line: Callable[[], str], bound: Callable[[], float],
                 tasks: set[asyncio.Task[None]]) -> None:
        self._in_flight = in_flight
        self._reload = reload
        self._refused = refused
        self._stopping = stopping
        self._serving = serving
        self._manager = manager
        self._status_line = status_line
        self._bound = bound
        self._tasks = tasks  # the fleet's: cancelled and awaited at stop
        self.pending = False  # a SIGHUP asked for a reload not started yet
        self._deferred = False  # ... and it waits for a change in flight
        self._announced = False  # ... and systemd was told RELOADING=1 for it
        self._task: asyncio.Task[None] | None = None
        self._change_ended = asyncio.Event()  # set each time a swap or patch ends

    def on_sighup(self) -> None:
        log.info("event=signal name=SIGHUP action=reload")
        self.pending = True
        what = self._in_flight()
        if what is not None and not self._deferred:
            self._deferred = True
            log.info("event=signal.deferred name=SIGHUP until=%r", what)
            if self._serving():  # not before READY=1: still starting, the reload comes after
                self._announced = True
                self._manager.reloading(f"reload requested after {what}; "
                                        f"{self._status_line()}", self._bound())
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
            self._tasks.add(self._task)
            self._task.add_done_callback(self._tasks.discard)

    def change_over(self) -> None:
        """A swap or a patch ended: a deferred reload may go."""
        self._change_ended.set()

    async def _run(self) -> None:
        """A reload now, or one after the change in flight (coalesced)."""
        while self.pending and not self._stopping():
            if self._in_flight() is not None:
                self._change_ended.clear()
                await self._change_ended.wait()
                continue
            self.pending = False
            announced, self._deferred, self._announced = self._announced, False, False
            try:
                await self._reload()
            except self._refused as e:  # a signal has nobody to answer: the log must say it
                log.warning("event=signal.refused name=SIGHUP reason=%r", str(e))
                if self._serving():
                    if not announced:  # systemd >= 253 waits for both (a re-exec in flight)
                        self._manager.reloading(f"reload requested; {self._status_line()}",
                                                self._bound())
                    self._manager.ready(f"{self._status_line()}; SIGHUP reload refused: {e}")
