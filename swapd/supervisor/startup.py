"""Start-up: what a supervisor that starts checks, and its first generation (this runs in
the supervisor process; a supervisor re-exec'd by `upgrade --self` adopts its workers
instead, selfexec.py).

Bad input found here stops the start with one line (`StartupError`, exit 2, nothing
started): a health URL on no listener, a metrics endpoint that cannot be bound, workers
that cannot start, `--mode stateful` with workers that cannot hand over state, a health
URL the first generation does not answer. Workers that start and then fail to become
ready exit 1, with their output's tail.

Under systemd's fd store, the first generation may restore the snapshots the previous
supervisor stored at its stop (LISTEN_FDS brings them with the listeners): each is used
once, then dropped from the store; a restore that fails starts fresh, the state lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from swapd.config import Config
from swapd.sockets import STATE_NAME
from swapd.supervisor.fleet import KILL_WAIT, Fleet, SpawnFailed
from swapd.supervisor.generation import Generation
from swapd.supervisor.lifecycle import GenEvent
from swapd.supervisor.listeners import Listeners
from swapd.supervisor.manager import ServiceManager, split_inherited
from swapd.supervisor.metrics import MetricsUnavailable
from swapd.supervisor.ops import Operations
from swapd.supervisor.swap import wait_ready
from swapd.supervisor.swapjob import SwapFailed, SwapJob
from swapd.supervisor.transfer import activate, restore_stored
from swapd.supervisor.watch import HealthUrlError, check_health_url

log = logging.getLogger("swapd")


class StartupError(Exception):
    """The service could not start; exit code 2 (nothing started) or 1 (workers failed)."""

    def __init__(self, message: str, code: int = 2, tail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.tail = tail


def prepare_ops(config: Config, listeners: Listeners, ops: Operations) -> None:
    """Once the listeners are bound: the health URL names one of them; the history file
    opens and the metrics endpoint binds."""
    health = config.health
    if health is not None and health[0] is not None and health[0] not in {
            lis.name for lis in listeners}:
        raise StartupError(f"health_url {config.health_url}: no listener named "
                           f"{health[0]!r}")
    try:
        ops.prepare()
    except MetricsUnavailable as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        raise StartupError(f"metrics endpoint {config.metrics}: "
                           f"{e.strerror or e}") from e


class FirstStart:
    """What LISTEN_FDS brought (listeners of a socket unit, listeners and snapshots swapd
    stored itself), and the first generation started from it."""

    def __init__(self, fleet: Fleet, listeners: Listeners, manager: ServiceManager,
                 inherited: list[tuple[str, int]], release: str | None) -> None:
        self._fleet = fleet
        self._listeners = listeners
        self._manager = manager
        self._release = release  # the first generation's label (None: derived)
        self._stored_names = [n for n, _ in inherited if STATE_NAME.match(n)]
        self.activated, self.stored_listeners, self.stored_state = split_inherited(inherited)

    async def start(self, config: Config) -> Generation:
        """The first generation, restoring a snapshot the fd store kept, if there is one."""
        t = config.timeouts
        self._manager.extend(t.ready + t.restore + KILL_WAIT)  # a slow first start is no failure
        stored = self.stored_state if config.mode == "stateful" else {}
        if self.stored_state and not stored:
            log.warning("event=state.ignored reason='stored state but mode is stateless'")
        try:
            try:
                first = self._fleet.start_generation(config, successor_of=None,
                                                     restore_slots=set(stored),
                                                     release=self._release)
            except SpawnFailed as e:
                raise StartupError(str(e), code=2) from e
            try:
                await wait_ready(first, first.config.timeouts.ready)
                first.transition(GenEvent.READY)
                _check_can_hand_over(first)
                if stored:
                    await restore_stored(first, stored, config)
            except asyncio.CancelledError:
                await self._fleet.kill_generation(first)
                raise
            except StartupError:
                await self._fleet.kill_generation(first)
                raise
            except SwapFailed as e:
                await self._fleet.kill_generation(first)
                e.report("event=start.failed")
                if not stored:
                    raise StartupError(e.reason, code=1, tail=e.tail) from e
                log.error("event=state.restore_failed reason=%r action='start fresh: the stored "
                          "state is lost'", e.reason)
                self.drop_stored_state()
                return await self.start(config)
        finally:
            self.drop_stored_state()
        self._fleet.commit(first, None)
        if first.config.mode == "stateful":
            await activate(self._fleet, first, first.config, SwapJob("start", "start"))
        return first

    async def check_health_url(self, first: Generation, config: Config) -> None:
        """Bad input refused at start: a health URL the first generation does not answer
        with HTTP 2xx (not an HTTP listener, a 404...) would roll every watched swap back.
        `config`: the one in force (the first generation's, unless a swap committed since)."""
        try:
            await check_health_url(self._listeners, config)
        except HealthUrlError as e:
            log.error("event=start.failed reason=%r", str(e))
            await self._fleet.kill_generation(first)
            raise StartupError(str(e), code=2) from e

    def drop_stored_state(self) -> None:
        """Close our copies of stored snapshot fds and remove them from the fd store."""
        self._manager.forget_names(self._stored_names)
        self._stored_names = []
        if self.stored_state:
            for fds in self.stored_state.values():
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.stored_state = {}


def _check_can_hand_over(gen: Generation) -> None:
    """Stateful mode needs workers that speak swapd's channel (swapd.worker): one that
    announced itself only through NOTIFY_SOCKET (gunicorn, uvicorn...) cannot be asked for
    a snapshot nor told to commit. Refused at start, not found out 30 s into a commit."""
    if gen.config.mode != "stateful":
        return
    for w in gen.workers:
        if w is not None and not w.speaks_channel:
            via = w.ready.result().get("via", "notify") if w.ready.done() else "notify"
            raise StartupError(
                f"--mode stateful needs workers that use swapd.worker (they hand over state "
                f"over swapd's channel); {w.tag} reported ready via {via} and never spoke the "
                f"channel: run it with --mode stateless", code=2)
