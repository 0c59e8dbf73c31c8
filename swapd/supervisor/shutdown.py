"""The supervisor's stop, carried out (this runs in the supervisor process, once, at the end
of its event loop): `swapd stop`, SIGTERM and SIGINT drain (graceful), `stop --fast` and
SIGQUIT kill the workers at once.

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


async def shutdown(sup: Stopping, fast: bool) -> None:
    """Stop everything the supervisor runs; the caller records the stop and closes the
    sockets."""
    log.info("event=supervisor.stopping fast=%s", fast)
    sup.manager.stopping("stopping" + (" (fast)" if fast else ", draining"), bound(sup.config))
    fleet = sup.fleet
    await sup.deploys.stop()
    fleet.cancel_timers()
    job = sup.swap
    if job is not None and job.task is not None:
        job.task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(job.done), KILL_WAIT * 2)
    active = fleet.active
    if (not fast and sup.manager.fdstore and active is not None
            and active.state == GenState.ACTIVE and active.config.mode == "stateful"):
        await store_state(active, sup.manager.store_state)
    for gen in list(fleet.generations.values()):
        if gen.state in (GenState.ACTIVE, GenState.QUIESCED, GenState.HELD):
            gen.transition(GenEvent.SUPERSEDE)
            if not fast:
                fleet.drain(gen, gen.config.timeouts.drain)
        if fast:
            fleet.kill_workers(gen)
    waiting: list[asyncio.Future[Any]] = [t for t in fleet.tasks if not t.done()]
    waiting += [w.exited for g in fleet.generations.values() for w in g.live()]
    if waiting:
        await asyncio.wait(waiting,
                           timeout=sup.config.timeouts.drain + KILL_WAIT * 2)
    for gen in fleet.generations.values():
        for w in gen.live():
            log.error("event=worker.unkillable %s", w.tag)
    # Their process groups are being ended already; now every other child, so that
    # nothing a worker started keeps the listeners (and the port) after we exit.
    fleet.strays.scan(final=True, grace=0 if fast else STRAY_GRACE)
    for pid in await fleet.strays.wait(STRAY_GRACE + KILL_WAIT):
        log.error("event=stray.unkillable pid=%d", pid)
