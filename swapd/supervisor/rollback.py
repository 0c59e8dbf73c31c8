"""A rollback during a watch window: the held generation serves again, the watched one goes.

Stateless (the held workers kept only their code):

    revive every held worker (it accepts again at once) ─▶ held ACTIVE ─▶ watched DRAINING

Both generations accept for an instant, as in a stateless swap; the watched one then
finishes what it has in flight. What is lost is what a crashed worker held, nothing else.

Stateful (what was written since the commit lives in the watched generation), per slot i,
watched worker i → held worker i, the handoff of a swap run backwards:

    watched QUIESCED: stop accepting, finish in-flight requests, snapshot (with connections)
      ─▶ restore into held worker i (its code must accept the newer state version: by
         default swapd.worker accepts its own version and older ones; see `accept_versions`)
      ─▶ all restored: revive them (accept, adopt the connections) ─▶ held ACTIVE,
         watched DRAINING
      ─▶ any refused or failed: the watched workers resume (they never let their state go)
         and keep serving; `RollbackRefused` says why

A slot whose watched worker died has nothing to hand back: its held worker revives with
the state it had at the commit (lost: what was written to the dead worker since). A slot
whose held worker died, or that the held generation did not have, refuses the rollback:
its state would have nowhere to go.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

from swapd import messages as m
from swapd.supervisor.fleet import Fleet
from swapd.supervisor.generation import Answer, Generation, RequestFailed, WorkerProcess
from swapd.supervisor.journal import PatchRecord
from swapd.supervisor.lifecycle import GenEvent

log = logging.getLogger("swapd")


class RollbackRefused(Exception):
    """The rollback did not happen; the watched generation serves as before."""


@dataclass
class Rolled:
    timings_ms: dict[str, float]
    lost_slots: list[int]  # slots revived with their commit-time state (their watched
    # worker had died)


async def roll_back(fleet: Fleet, watched: Generation, held: Generation,
                    journal: list[PatchRecord]) -> Rolled:
    """Make `held` active again and drain `watched`; RollbackRefused leaves all as it was."""
    clock = _Clock()
    # A dead watched worker is not restarted meanwhile (a refusal restarts it, below).
    fleet.cancel_timers()
    stateful = watched.config.mode == "stateful"
    lost: list[int] = []
    if stateful:
        try:
            pairs, lost = _pairs(watched, held)
            snaps = await _take_back(watched, pairs, clock)
            try:
                await _give(held, pairs, snaps, watched.id)
            except RollbackRefused:
                await _resume(watched)
                raise
            finally:
                for answer in snaps:
                    answer.close_fds()
        except RollbackRefused:
            fleet.after_resume(watched)
            raise
        clock.mark("restored")
    # From here the rollback happens: the held generation becomes the active one.
    starts = await _revive(fleet, held)
    clock.mark("revived")
    held.transition(GenEvent.REVIVE)
    fleet.active = held
    fleet.crashes.clear()  # the crashes were the watched code's
    fleet.crash_loop.clear()
    fleet.journal.records[:] = journal  # the patches in force in the held generation
    watched.transition(GenEvent.SUPERSEDE)
    fleet.retire(watched)
    fleet.after_resume(held)  # a held worker that died is restarted now
    if clock.t_stop is not None and starts:
        clock.timings["pause"] = round((max(starts) - clock.t_stop) * 1000, 2)
    return Rolled(clock.timings, lost)


class _Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.t_stop: float | None = None  # CLOCK_MONOTONIC: the first watched worker stopped

    def mark(self, name: str) -> None:
        self.timings[name] = round((time.monotonic() - self.started) * 1000, 2)


def _pairs(watched: Generation, held: Generation
           ) -> tuple[list[tuple[WorkerProcess, WorkerProcess]], list[int]]:
    pairs = []
    lost = []
    for w in watched.workers:
        if w is None:
            continue
        back = held.workers[w.slot] if w.slot < len(held.workers) else None
        alive = w.child.status is None
        if back is None or back.child.status is not None:
            if alive:
                raise RollbackRefused(
                    f"gen={held.id} worker={w.slot} is gone: the state of {w.tag} "
                    "would have nowhere to go")
            continue
        if alive:
            pairs.append((w, back))
        else:
            lost.append(w.slot)
    return pairs, lost


async def _take_back(watched: Generation, pairs: list[tuple[WorkerProcess, WorkerProcess]],
                     clock: _Clock) -> list[Answer[m.QuiesceReply]]:
    """Quiesce and snapshot the watched workers; RollbackRefused (after resuming them)."""
    timeout = watched.config.timeouts.quiesce
    watched.transition(GenEvent.QUIESCE)
    results = await asyncio.gather(
        *(w.ask(m.Quiesce(deadline=timeout), m.QuiesceReply, timeout, "quiesce for a rollback")
          for w, _ in pairs),
        return_exceptions=True,
    )
    snaps = [r for r in results if isinstance(r, Answer)]
    failed = [r for r in results if not isinstance(r, Answer)]
    if failed:
        for answer in snaps:
            answer.close_fds()
        await _resume(watched)
        raise RollbackRefused(_reason(failed[0]))
    clock.mark("snapshotted")
    if snaps:
        clock.t_stop = min(a.reply.t_stop for a in snaps)
    return snaps


async def _give(held: Generation, pairs: list[tuple[WorkerProcess, WorkerProcess]],
                snaps: list[Answer[m.QuiesceReply]], from_gen: int) -> None:
    timeout = held.config.timeouts.restore
    results = await asyncio.gather(
        *(back.ask(m.Restore(snap.reply.envelope, from_gen=from_gen, conns=snap.reply.conns),
                   m.Empty, timeout, "restore for a rollback", fds=list(snap.fds))
          for (_, back), snap in zip(pairs, snaps, strict=True)),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, Answer):
            r.close_fds()
    failed = [r for r in results if not isinstance(r, Answer)]
    if failed:
        raise RollbackRefused(_reason(failed[0]))


async def _resume(watched: Generation) -> None:
    timeout = watched.config.timeouts.quiesce + watched.config.timeouts.restore
    results = await asyncio.gather(
        *(w.ask(m.Resume(), m.Empty, timeout, "resume") for w in watched.live()),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, Answer):
            r.close_fds()
        else:
            log.error("event=rollback.resume_failed gen=%d error=%r", watched.id, str(r))
    watched.transition(GenEvent.RESUME)


async def _revive(fleet: Fleet, held: Generation) -> list[float]:
    """Every live held worker accepts again; one that cannot is killed (and restarted)."""
    workers = held.live()
    timeout = held.config.timeouts.restore
    results = await asyncio.gather(
        *(w.ask(m.Revive(), m.CommitReply, timeout, "revive") for w in workers),
        return_exceptions=True,
    )
    starts = []
    for w, r in zip(workers, results, strict=True):
        if isinstance(r, Answer):
            r.close_fds()
            starts.append(r.reply.t_start)
        else:
            log.error("event=rollback.revive_failed %s error=%r action='SIGKILL and restart'",
                      w.tag, _reason(r))
            fleet.processes.signal_group(w.child, signal.SIGKILL)
    return starts


def _reason(error: BaseException) -> str:
    return error.reason if isinstance(error, RequestFailed) else repr(error)
