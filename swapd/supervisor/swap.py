"""Swaps: replacing the active generation, stateless (overlap) or stateful (handoff).

`run_swap` runs one swap (a `SwapJob`, swapjob.py) and decides, at each step, what a
failure means: before the commit an abort, after it a crash. The stateful steps
themselves are in transfer.py.

Stateless (overlap):
    spawn N ─▶ all ready ─▶ commit (new ACTIVE) ─▶ old DRAINING
Stateful (handoff), per slot i, old worker i → new worker i:
    spawn N (role=successor) ─▶ all standing by (imported, not accepting)
      ─▶ [pre-copy: bulk state old i → new i while old still serves]
      ─▶ pre-send: old i passes every connection to new i over a socketpair of their
         own (the handoff link), while it still serves them; we never hold them
      ─▶ PAUSE: quiesce old i (stop accepting, finish in-flight, the connections' delta
         on the link, snapshot)
      ─▶ restore new i ─▶ all acknowledged ─▶ commit (new starts accepting)
      ─▶ old DRAINING (it holds nothing any more and exits)

Before commit every failure aborts: the new generation is killed and the old
one, if quiesced, is told to resume with its untouched state (failure rule 1:
the old generation never exits before commit).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from swapd import messages as m
from swapd.config import Config
from swapd.supervisor import readiness, transfer
from swapd.supervisor.fleet import KILL_WAIT, Fleet, SpawnFailed
from swapd.supervisor.generation import Answer, Generation, RequestFailed, WorkerProcess
from swapd.supervisor.lifecycle import GenEvent
from swapd.supervisor.swapjob import SwapFailed, SwapJob, committed
from swapd.supervisor.watch import hold as hold_generation

log = logging.getLogger("swapd")


def swap_bound(config: Config) -> float:
    """The longest a swap can take with every deadline run out: what systemd is promised."""
    t = config.timeouts
    bound = t.ready + KILL_WAIT  # all ready, or the new generation killed
    if config.mode == "stateful":
        if config.precopy:
            bound += t.ready + t.restore  # the bulk, shipped and loaded
        bound += t.quiesce + t.restore  # the pause
        bound += max(t.restore, t.quiesce + t.restore)  # commit acks, or the old one resumed
    return bound


async def run_swap(fleet: Fleet, job: SwapJob, config: Config) -> dict[str, Any]:
    """Bring up a new generation from `config` and make it active, or leave all as it was."""
    old = fleet.active
    if old is None:
        raise SwapFailed("no active generation to replace")
    stateful = config.mode == "stateful"
    if stateful:
        transfer.check_stateful(old, config)
        # Before anything starts, nothing to undo; not if the old workers pre-send their
        # connections to their successors directly (checked again if the new ones do not).
        if not all("link" in w.features() for w in old.live()):
            transfer.check_headroom(old)
    try:
        new = fleet.start_generation(config, successor_of=old if stateful else None,
                                     release=job.release)
    except SpawnFailed as e:
        raise SwapFailed(str(e)) from e
    job.gen = new.id
    job.previous = old.id
    job.mark("spawned")
    job.emit("spawned", f"gen={new.id} started {len(new.workers)} worker(s): "
             + " ".join(f"pid={w.pid}" for w in new.workers if w is not None))
    precopying = linking = quiesced = False
    handed: list[Answer[m.QuiesceReply]] = []
    serving = [w for w in old.workers if w is not None and w.child.status is None]
    sources: list[WorkerProcess] = []  # old workers whose snapshot the new ones received
    try:
        await wait_ready(new, config.timeouts.ready)
        new.transition(GenEvent.READY)
        job.mark("ready")
        job.emit("ready", f"gen={new.id} all {len(new.workers)} worker(s) ready"
                 + (" and standing by for state" if stateful else ""))
        if stateful:
            if config.precopy:
                precopying = True
                await transfer.precopy(fleet, old, new, config, job)
            linking = transfer.linkable(old, new)
            if linking:
                await transfer.presend(old, new, config, job)
            else:  # again: connections came and went while it got ready
                transfer.check_headroom(old)
            old.transition(GenEvent.QUIESCE)
            quiesced = True
            handed = await transfer.handoff(fleet, old, new, config, job, precopied=precopying,
                                    sources=sources, linked=linking)
        await _check_alive(fleet, new)
    except BaseException as e:
        if isinstance(e, RequestFailed):
            e = SwapFailed.from_request(e)
        if linking and isinstance(e, SwapFailed) and not any(
                w is not None and w.tag == e.worker for w in new.workers):
            # Over the handoff link a successor's death shows first as its predecessor's
            # broken link (the quiesce fails): name the death, which is what happened.
            try:
                await _check_alive(fleet, new)
            except SwapFailed as dead:
                e = dead
        reason = e.reason if isinstance(e, SwapFailed) else f"swap aborted: {e!r}"
        if isinstance(e, asyncio.CancelledError):
            reason = "swap cancelled (supervisor stopping)"
        log.warning("event=swap.abort gen=%d reason=%r", new.id, reason)
        job.emit("aborting", f"gen={new.id} failed: {reason}")
        for answer in handed:
            answer.close_fds()
        await fleet.kill_generation(new)
        resumed: dict[int, str] | None = None
        if quiesced:
            resumed = await transfer.resume(fleet, old)
        elif precopying or linking:
            await transfer.tell_resume(old)  # ends the pre-copy round / pre-send the old ones began
        _say_what_became(old, serving, resumed, job, [])
        if isinstance(e, SwapFailed | asyncio.CancelledError):
            raise e
        raise SwapFailed(reason) from e
    # Committed: from here on nothing is undone; a failure is a crash of a worker, and the
    # swap is reported as what it is, a success (with warnings). In a handoff the old
    # generation is told to go only once the new one accepts: its exit (freeing a large
    # heap) must not compete with the end of the pause.
    held = job.watch > 0
    fleet.commit(new, old, drain_old=not stateful, hold=held)
    job.committed = True
    if held and not stateful:
        hold_generation(fleet, old)
    job.mark("committed")
    _say_what_became(old, serving, None, job, sources)
    try:
        if stateful:
            await transfer.activate(fleet, new, config, job)
    except Exception as e:  # a bug: logged, and said, but the swap did commit
        log.exception("event=swap.activate_crashed gen=%d", new.id)
        job.warn(f"gen={new.id} committed, but starting it failed: {e!r}")
    finally:
        if stateful and held:
            hold_generation(fleet, old)
        elif stateful:
            fleet.retire(old)
        for answer in handed:
            answer.close_fds()
    job.emit("committed", f"gen={new.id} active; gen={old.id} "
             + (f"held for a {job.watch:g}s watch window" if held else "draining"))
    return committed(job, new.id, old.id)


async def _check_alive(fleet: Fleet, new: Generation) -> None:
    """Right before commit: every new worker still runs (one that died after it was ready
    or restored would be committed dead, its slot never refilled, its handed state lost).
    Asked of the kernel (pidfd), not of our bookkeeping, which may not have run yet."""
    for w in new.workers:
        if w is not None and (w.exited.done() or fleet.processes.has_exited(w.child)):
            await asyncio.wait([w.exited], timeout=KILL_WAIT)  # for the reason: its status
            if w.exited.done():
                raise SwapFailed(readiness.exited_reason(w, "before commit"), worker=w)
            raise SwapFailed(f"{w.tag} exited before commit", worker=w)


def _say_what_became(old: Generation, serving: list[WorkerProcess],
                     resumed: dict[int, str] | None, job: SwapJob,
                     handed: list[WorkerProcess]) -> None:
    """What the caller is told about the old generation: a worker that died during the swap
    was a crash (restarted in its slot; in stateful mode its state went with it, unless it
    had handed it over: `handed`), and after an aborted handoff each worker either resumed
    with its state or did not confirm."""
    stateful = old.config.mode == "stateful"
    told = []
    for w in serving:
        if w.exited.done() and w not in handed:
            # Aborted: the generation serves on and the slot is refilled. Committed: it is
            # retired, the slot refilled or not meanwhile, so nothing is said of that.
            fate = [] if job.committed else ["restarted in its slot"]
            if stateful:
                fate.append("its state is lost")
            told.append(f"worker {w.slot} (pid={w.pid}) {w.exited.result()} during the swap"
                        + (": " + ", ".join(fate) if fate else ""))
    if resumed is not None:
        for w in old.live():
            if w.slot in resumed:
                told.append(f"worker {w.slot} (pid={w.pid}) did not confirm the resume "
                            f"({resumed[w.slot]})")
    if told:
        job.warn(f"gen={old.id}: " + "; ".join(told))
    elif resumed is not None:
        job.emit("resumed", f"gen={old.id} serving again with its state")


async def wait_ready(gen: Generation, timeout: float) -> None:
    """Every worker ready, or the first failure: exit before ready, or the deadline."""
    workers = [w for w in gen.workers if w is not None]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending: set[asyncio.Future[Any]] = set()
    for w in workers:
        pending.add(w.ready)
        pending.add(w.exited)
    while not all(w.ready.done() for w in workers):
        remaining = deadline - loop.time()
        if remaining <= 0:
            late = next(w for w in workers if not w.ready.done())
            raise SwapFailed(readiness.not_ready_reason(late, gen.config, timeout), worker=late)
        _, pending = await asyncio.wait(
            pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        for w in workers:
            if w.exited.done() and not w.ready.done():
                raise SwapFailed(readiness.exited_reason(w, "before it was ready"), worker=w)
            if w.exited.done():
                raise SwapFailed(readiness.exited_reason(w, "right after it was ready"),
                                 worker=w)
    for w in workers:
        w.transition_ready()
        if gen.config.mode == "stateful" and w.role == "successor" and not w.standby:
            raise SwapFailed(f"{w.tag} started serving without waiting for state "
                             "(is it using swapd.worker?)", worker=w)
