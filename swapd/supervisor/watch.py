"""The watch window: after a swap commits, the old generation is held for a rollback.

With `--watch SECONDS` (run flag, or per `upgrade`/`reload`), the commit holds the old
generation (HELD: it accepts nothing and lets its connections go at their next request
boundary, but keeps its processes, code and state) instead of draining it, and watches
the new one. Any of these during the window rolls back (rollback.py):

    trigger         what happened
    worker-exited   a worker of the watched generation exited (crash, kill, exit 0)
    unhealthy       one reported itself unhealthy: `w.report_health(False, reason)` over
                    the channel, or WATCHDOG=trigger on its notify socket
    health-probe    `health_url` failed `health_failures` probes in a row (probe.py)
    manual          `swapd rollback`

When the window ends quietly the held generation drains, as after any swap. While a
window is open nothing else changes the service (swap, patch, re-exec are refused with
the remaining time), so the generation to go back to is always the held one.

Rollback needs old workers that can be held (swapd.worker, "hold" in its hello); a swap
with a window over workers that cannot is refused before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swapd import messages as m
from swapd.config import Config
from swapd.supervisor import probe
from swapd.supervisor.fleet import Fleet
from swapd.supervisor.generation import Generation
from swapd.supervisor.journal import PatchRecord
from swapd.supervisor.lifecycle import GenEvent, GenState
from swapd.supervisor.listeners import Listeners
from swapd.supervisor.rollback import RollbackRefused, roll_back

log = logging.getLogger("swapd")

START_PROBE_TIMEOUT = 5.0


@dataclass
class SwapOptions:
    """What one `upgrade`/`reload` request asks besides the configuration."""

    release: str | None = None  # the new generation's label; None: derived
    watch: float | None = None  # None: the configuration's `watch`
    wait_watch: bool = False  # answer once the window is over, not at the commit
    who: dict[str, Any] = field(default_factory=dict)


def unholdable(gen: Generation) -> str | None:
    """Why `gen` cannot be held for a watch window, or None if it can."""
    for w in gen.live():
        if "hold" not in w.features():
            return (f"{w.tag} cannot be held for a watch window: it does not use swapd.worker "
                    "(or an older one); swap with --watch 0")
    return None


def hold(fleet: Fleet, gen: Generation) -> None:
    """Tell a generation just superseded under a watch window to hold (no reply)."""
    for w in gen.live():
        try:
            if "hold" not in w.features():  # e.g. restarted since the check, not yet said hello
                raise RuntimeError("it cannot be held (no 'hold' in its hello)")
            assert w.channel is not None
            w.channel.send(m.Hold().body())
        except Exception as e:  # it must not keep serving old code: it goes
            log.error("event=hold.failed %s error=%r action=SIGKILL", w.tag, str(e))
            fleet.processes.signal_group(w.child, signal.SIGKILL)
    log.info("event=gen.held gen=%d workers=%d", gen.id, len(gen.live()))


class HealthUrlError(Exception):
    """`health_url` does not name an HTTP endpoint that answers 2xx."""


async def check_health_url(listeners: Listeners, config: Config) -> None:
    """At start: the first generation must answer the health URL with HTTP 2xx."""
    spec = config.health
    if spec is None:
        return
    name, path = spec
    try:
        lis = probe.pick(listeners, name)
    except KeyError:
        raise HealthUrlError(f"health_url {config.health_url}: no listener named "
                             f"{name!r}") from None
    where = f"health_url {config.health_url}: listener {lis.name}"
    try:
        reason = await probe.probe(lis, path, max(START_PROBE_TIMEOUT, config.health_interval))
    except probe.NotHttp as e:
        raise HealthUrlError(f"{where} is not an HTTP listener: it {e}") from None
    if reason is not None:
        raise HealthUrlError(f"{where}: {reason} from the first generation")


class Watch:
    """One open window: `watched` serves, `held` waits for a rollback."""

    def __init__(self, fleet: Fleet, watched: Generation, held: Generation, seconds: float,
                 journal: list[PatchRecord], listeners: Listeners,
                 on_rollback_start: Callable[[Watch], None]) -> None:
        self.fleet = fleet
        self.watched = watched
        self.held = held
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.journal = journal  # the held generation's patches, back in force on rollback
        self.listeners = listeners
        self.phase = "watching"  # rolling-back, passed, rolled-back, refused, failed, cancelled
        self.probe_failures = 0
        self._on_rollback_start = on_rollback_start
        loop = asyncio.get_running_loop()
        # (trigger, reason, who) of the rollback, once something asks for one
        self.trigger: asyncio.Future[tuple[str, str, dict[str, Any]]] = loop.create_future()
        self.done: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    def start(self) -> None:
        log.info("event=watch.start gen=%d release=%s held=%d held_release=%s seconds=%g "
                 "health_url=%s", self.watched.id, self.watched.release, self.held.id,
                 self.held.release, self.seconds, self.watched.config.health_url)
        self.task = asyncio.ensure_future(self._run())

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def describe(self) -> dict[str, Any]:
        return {"gen": self.watched.id, "release": self.watched.release, "held": self.held.id,
                "held_release": self.held.release, "phase": self.phase,
                "seconds": self.seconds, "remaining": round(self.remaining, 3),
                "health_url": self.watched.config.health_url,
                "probe_failures": self.probe_failures}

    def busy_message(self) -> str:
        return (f"a watch window is open on gen={self.watched.id} ({self.remaining:.0f}s left, "
                f"gen={self.held.id} held for a rollback); wait for it, or `swapd rollback`")

    async def request_rollback(self, who: dict[str, Any]) -> dict[str, Any]:
        """`swapd rollback`: roll back now (or join the rollback already under way)."""
        if not self.trigger.done():
            self.trigger.set_result(("manual", "asked by the operator", who))
        return await asyncio.shield(self.done)

    async def cancel(self) -> None:
        """The supervisor stops: end the window without a rollback (both drain)."""
        for task in (self._probe, self.task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._finish("cancelled", reason="supervisor stopping")

    # -- the window ---------------------------------------------------------------------

    async def _run(self) -> None:
        if self.watched.config.health is not None:
            self._probe = asyncio.ensure_future(self._probe_loop())
        try:
            trigger, reason, who = await self._wait()
        finally:
            if self._probe is not None:
                self._probe.cancel()
        if not trigger:
            self.held.transition(GenEvent.SUPERSEDE)
            self.fleet.retire(self.held)
            log.info("event=watch.passed gen=%d release=%s held=%d action=drain",
                     self.watched.id, self.watched.release, self.held.id)
            self._finish("passed")
            return
        await self._roll_back(trigger, reason, who)

    async def _wait(self) -> tuple[str, str, dict[str, Any]]:
        """What asks for a rollback, or ("", "", {}) when the window passes."""
        workers = self.watched.live()
        if len(workers) < len([w for w in self.watched.workers if w is not None]):
            dead = next(w for w in self.watched.workers if w is not None
                        and w.child.status is not None)
            return "worker-exited", f"{dead.tag} {dead.child.status} at the commit", _auto(
                "worker-exited")
        waits: set[asyncio.Future[Any]] = {self.trigger}
        for w in workers:
            waits |= {w.exited, w.unhealthy}
        done, _ = await asyncio.wait(waits, timeout=self.remaining,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self.trigger in done:
            return self.trigger.result()
        for w in workers:
            if w.exited in done:
                return ("worker-exited", f"{w.tag} {w.exited.result()} during the watch window",
                        _auto("worker-exited"))
            if w.unhealthy in done:
                return ("unhealthy", f"{w.tag} reported unhealthy: {w.unhealthy.result()}",
                        _auto("unhealthy"))
        return "", "", {}

    async def _probe_loop(self) -> None:
        spec = self.watched.config.health
        assert spec is not None
        name, path = spec
        config = self.watched.config
        try:
            lis = probe.pick(self.listeners, name)
        except KeyError:
            log.error("event=health.no_listener gen=%d name=%s", self.watched.id, name)
            return
        while not self.trigger.done():
            await asyncio.sleep(config.health_interval)
            try:
                reason = await probe.probe(lis, path, config.health_interval)
            except probe.NotHttp as e:
                reason = f"GET {path}: {e}"
            if reason is None:
                self.probe_failures = 0
                continue
            self.probe_failures += 1
            log.warning("event=health.failed gen=%d failures=%d of=%d reason=%r",
                        self.watched.id, self.probe_failures, config.health_failures, reason)
            if self.probe_failures >= config.health_failures and not self.trigger.done():
                self.trigger.set_result((
                    "health-probe",
                    f"health probe failed {self.probe_failures} times in a row: {reason}",
                    _auto("health-probe")))

    async def _roll_back(self, trigger: str, reason: str, who: dict[str, Any]) -> None:
        self.phase = "rolling-back"
        watched, held = self.watched, self.held
        started = time.monotonic()
        log.warning("event=rollback.start trigger=%s gen=%d release=%s to_gen=%d "
                    "to_release=%s reason=%r", trigger, watched.id, watched.release, held.id,
                    held.release, reason)
        self._on_rollback_start(self)
        info = {"trigger": trigger, "who": who, "reason": reason}
        try:
            rolled = await roll_back(self.fleet, watched, held, self.journal)
        except RollbackRefused as e:
            if held.state == GenState.HELD:
                held.transition(GenEvent.SUPERSEDE)
                self.fleet.retire(held)
            log.error("event=rollback.refused trigger=%s gen=%d to_gen=%d reason=%r "
                      "action='gen=%d keeps serving; gen=%d drains'", trigger, watched.id,
                      held.id, str(e), watched.id, held.id)
            self._finish("refused", refused=str(e), started=started, **info)
            return
        except Exception as e:
            log.exception("event=rollback.crashed gen=%d", watched.id)
            if held.state == GenState.HELD:
                held.transition(GenEvent.SUPERSEDE)
                self.fleet.retire(held)
            self._finish("failed", refused=f"internal error: {e!r}", started=started, **info)
            return
        log.warning("event=rollback.done trigger=%s gen=%d release=%s from_gen=%d "
                    "timings_ms=%s lost_slots=%s", trigger, held.id, held.release, watched.id,
                    rolled.timings_ms, rolled.lost_slots)
        self._finish("rolled-back", timings_ms=rolled.timings_ms, lost_slots=rolled.lost_slots,
                     started=started, **info)

    def _finish(self, outcome: str, *, started: float | None = None, **extra: Any) -> None:
        if self.done.done():
            return
        self.phase = outcome
        result = {"outcome": outcome, "gen": self.watched.id, "release": self.watched.release,
                  "held": self.held.id, "held_release": self.held.release, **extra}
        if started is not None:
            result["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        self.done.set_result(result)


def _auto(trigger: str) -> dict[str, Any]:
    return {"via": "watch", "trigger": trigger}
