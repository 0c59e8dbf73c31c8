"""The supervisor's stop, carried out (this runs in the supervisor process, once, at the end
of its event loop): `swapd stop`, SIGTERM and SIGINT drain (graceful), `stop --fast` and
SIGQUIT kill the workers at once.

A graceful stop can be escalated while it runs, as nginx's `-s stop` after `-s quit` or
gunicorn's second SIGINT: `stop --fast`, SIGQUIT, or another SIGTERM/SIGINT
(`StopRequest`). Every worker still draining is SIGKILLed then, and what is being ended
with a grace, and each wait below ends at once; the stop goes on as a fast one.

In order: an open watch window is ended without a rollback, the swap in flight is
cancelled (it aborts, or, past its commit, ends as a commit), a stateful active generation
stores its state in systemd's fd store (graceful stop with the fd store only), every
generation is drained or killed, then every other child the workers left is ended, so
that nothing keeps the listeners (and the port) after the supervisor exits. Every wait is
bounded (`bound()`); what will not die is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from swapd.config import Config
from swapd.supervisor.deploys import Deploys
from swapd.supervisor.fleet import KILL_WAIT, Fleet
from swapd.supervisor.lifecycle import GenEvent, GenState
from swapd.supervisor.manager import ServiceManager
from swapd.supervisor.strays import STRAY_GRACE
from swapd.supervisor.swapjob import SwapJob
from swapd.supervisor.transfer import store_state

log = logging.getLogger("swapd")


def bound(config: Config) -> float:
    """The longest a stop takes: the swap in flight cancelled, the state stored, the drain
    and its SIGKILLs."""
    t = config.timeouts
    return t.quiesce + t.drain + 4 * KILL_WAIT + STRAY_GRACE


class Stopping(Protocol):
    """What the stop reads (the supervisor's attributes, read when they are needed: a swap
    cancelled past its commit changes the configuration in force)."""

    @property
    def config(self) -> Config: ...

    @property
    def swap(self) -> SwapJob | None: ...  # in flight

    @property
    def fleet(self) -> Fleet: ...

    @property
    def deploys(self) -> Deploys: ...

    @property
    def manager(self) -> ServiceManager: ...


class StopRequest:
    """The stop asked for: by whom, when, fast or graceful, escalated since."""

    def __init__(self) -> None:
        self.asked = False
        self.fast = False  # asked fast, or escalated since
        self.who: dict[str, Any] = {"via": "control"}
        self.began = 0.0
        self.escalated = asyncio.Event()  # a graceful stop became fast: every wait ends

    def ask(self, fast: bool, who: dict[str, Any], origin: str, fleet: Fleet,
            manager: ServiceManager) -> str:
        """A stop asked for (`origin`: who, as log fields). What became of it: "started";
        "escalated" (a graceful stop in progress made fast); "in progress" (nothing)."""
        if not self.asked:
            self.asked, self.fast, self.who = True, fast, who
            self.began = time.monotonic()
            log.info("event=stop.requested fast=%s %s", fast, origin)
            return "started"
        if fast and not self.fast:
            self._escalate(origin, fleet, manager)
            return "escalated"
        log.info("event=stop.requested fast=%s %s action=%r", fast, origin,
                 f"none: {self._kind()} stop is in progress")
        return "in progress"

    def _escalate(self, origin: str, fleet: Fleet, manager: ServiceManager) -> None:
        """Every worker still running is SIGKILLed now (their drains end), what is being
        ended with a grace too, and the stop's waits end."""
        self.fast = True
        killed = 0
        for gen in fleet.generations.values():
            killed += len(gen.live())
            fleet.kill_workers(gen)
        fleet.strays.hurry()
        log.warning("event=stop.escalated %s killed=%d after=%.1fs", origin, killed,
                    time.monotonic() - self.began)
        manager.status("stopping (fast: escalated)")
        self.escalated.set()

    def left(self, config: Config) -> float:
        """Seconds until the stop is over at the latest (its bound, from when it began)."""
        return max(0.0, self.began + bound(config) - time.monotonic())

    def say(self, what: str, config: Config) -> str:
        """What a `swapd stop` that did not start the stop is told."""
        if what == "escalated":
            return ("the graceful stop in progress is now a fast one: the draining workers "
                    "are killed")
        return (f"{self._kind()} stop is already in progress (asked "
                f"{time.monotonic() - self.began:.0f}s ago, over within "
                f"{self.left(config):.0f}s at most): waiting for it"
                + ("" if self.fast else "; `swapd stop --fast` kills the draining workers now"))

    def _kind(self) -> str:
        return "a fast" if self.fast else "a graceful"


async def shutdown(sup: Stopping, stop: StopRequest) -> None:
    """Stop everything the supervisor runs; the caller records the stop and closes the
    sockets."""
    log.info("event=supervisor.stopping fast=%s", stop.fast)
    sup.manager.stopping("stopping" + (" (fast)" if stop.fast else ", draining"),
                         bound(sup.config))
    fleet = sup.fleet
    await sup.deploys.stop()
    fleet.cancel_timers()
    job = sup.swap
    if job is not None and job.task is not None:
        job.task.cancel()  # it ends soon, sooner escalated (its workers killed): waited for
        await asyncio.wait([job.done], timeout=KILL_WAIT * 2)
    active = fleet.active
    if (not stop.fast and sup.manager.fdstore and active is not None
            and active.state == GenState.ACTIVE and active.config.mode == "stateful"):
        storing = asyncio.ensure_future(store_state(active, sup.manager.store_state))
        await _until(stop, [storing], None)
        if not storing.done():  # escalated: its workers are being killed
            storing.cancel()
            with contextlib.suppress(BaseException):
                await storing
    for gen in list(fleet.generations.values()):
        if gen.state in (GenState.ACTIVE, GenState.QUIESCED, GenState.HELD):
            gen.transition(GenEvent.SUPERSEDE)
            if not stop.fast:
                fleet.drain(gen, gen.config.timeouts.drain)
        if stop.fast:
            fleet.kill_workers(gen)
    waiting: list[asyncio.Future[Any]] = [t for t in fleet.tasks if not t.done()]
    waiting += [w.exited for g in fleet.generations.values() for w in g.live()]
    await _until(stop, waiting, sup.config.timeouts.drain + KILL_WAIT * 2)
    if stop.escalated.is_set():  # every worker was SIGKILLed: their exits come at once
        exits = [w.exited for g in fleet.generations.values() for w in g.live()]
        if exits:
            await asyncio.wait(exits, timeout=KILL_WAIT * 2)
    for gen in fleet.generations.values():
        for w in gen.live():
            log.error("event=worker.unkillable %s", w.tag)
    # Their process groups are being ended already; now every other child, so that
    # nothing a worker started keeps the listeners (and the port) after we exit.
    fleet.strays.scan(final=True, grace=0 if stop.fast else STRAY_GRACE)
    strays = asyncio.ensure_future(fleet.strays.wait(STRAY_GRACE + KILL_WAIT))
    await _until(stop, [strays], None)
    if not strays.done():  # escalated: they were SIGKILLed
        fleet.strays.hurry()
    for pid in await strays:
        log.error("event=stray.unkillable pid=%d", pid)


async def _until(stop: StopRequest, waiting: list[asyncio.Future[Any]],
                 timeout: float | None) -> None:
    """Wait for every one of `waiting` (at most `timeout`), or until the stop is escalated."""
    if not waiting or stop.escalated.is_set():
        return
    everything = asyncio.ensure_future(asyncio.wait(waiting, timeout=timeout))
    escalated = asyncio.ensure_future(stop.escalated.wait())
    try:
        await asyncio.wait({everything, escalated}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # (cancelling a wait leaves what it waited for alone)
        everything.cancel()
        escalated.cancel()
