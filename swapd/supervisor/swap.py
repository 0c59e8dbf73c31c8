"""Swaps: replacing the active generation, stateless (overlap) or stateful (handoff).

A `SwapJob` is the one swap in flight. Everyone who asked for it (the control
client that started it, a joining client, a signal) subscribes to its progress
and awaits its outcome, so every caller learns what happened.

Stateless (overlap):
    spawn N ─▶ all ready ─▶ commit (new ACTIVE) ─▶ old DRAINING
Stateful (handoff), per slot i, old worker i → new worker i:
    spawn N (role=successor) ─▶ all standing by (imported, not accepting)
      ─▶ [pre-copy: bulk state old i → new i while old still serves]
      ─▶ PAUSE: quiesce old i (stop accepting, finish in-flight, snapshot)
      ─▶ restore new i ─▶ all acknowledged ─▶ commit (new starts accepting)
      ─▶ old DRAINING (it holds nothing any more and exits)

Before commit every failure aborts: the new generation is killed and the old
one, if quiesced, is told to resume with its untouched state (failure rule 1:
the old generation never exits before commit).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swapd.channel import ChannelError, Message
from swapd.config import Config
from swapd.control import Emit
from swapd.supervisor import readiness
from swapd.supervisor.generation import Generation, WorkerProcess
from swapd.supervisor.lifecycle import GenEvent

if TYPE_CHECKING:
    from swapd.supervisor.core import Supervisor

log = logging.getLogger("swapd")

_EXIT_GRACE = 1.0  # seconds to wait for a pidfd after the channel of a dying worker closed


class SwapFailed(Exception):
    """A swap that did not commit; the service is as it was before."""

    def __init__(self, reason: str, *, worker: WorkerProcess | None = None,
                 answered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answered = answered  # the worker replied, with ok: false
        self.tail = worker.tail_text() if worker is not None else ""
        self.worker = worker.tag if worker is not None else None


@dataclass
class SwapJob:
    kind: str  # "upgrade", "reload", or "start" (the first generation's activation)
    origin: str
    started: float = field(default_factory=time.monotonic)
    gen: int | None = None
    subscribers: list[Emit] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    done: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None

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


async def run_swap(sup: Supervisor, job: SwapJob, config: Config) -> dict[str, Any]:
    """Bring up a new generation from `config` and make it active, or leave all as it was."""
    old = sup.active
    if old is None:
        raise SwapFailed("no active generation to replace")
    stateful = config.mode == "stateful"
    if stateful:
        _check_stateful(old, config)
    new = sup.start_generation(config, successor_of=old if stateful else None)
    job.gen = new.id
    job.mark("spawned")
    job.emit("spawned", f"gen={new.id} started {len(new.workers)} worker(s): "
             + " ".join(f"pid={w.pid}" for w in new.workers if w is not None))
    precopying = quiesced = False
    handed: list[Message] = []
    try:
        await wait_ready(new, config.timeouts.ready)
        new.transition(GenEvent.READY)
        job.mark("ready")
        job.emit("ready", f"gen={new.id} all {len(new.workers)} worker(s) ready"
                 + (" and standing by for state" if stateful else ""))
        if stateful:
            if config.precopy:
                precopying = True
                await _precopy(sup, old, new, config, job)
            old.transition(GenEvent.QUIESCE)
            quiesced = True
            handed = await _handoff(sup, old, new, config, job, precopied=precopying)
    except BaseException as e:
        reason = e.reason if isinstance(e, SwapFailed) else f"swap aborted: {e!r}"
        if isinstance(e, asyncio.CancelledError):
            reason = "swap cancelled (supervisor stopping)"
        log.warning("event=swap.abort gen=%d reason=%r", new.id, reason)
        job.emit("aborting", f"gen={new.id} failed: {reason}")
        await sup.kill_generation(new)
        if quiesced:
            await _resume(sup, old, job)
        elif precopying:
            await _tell_resume(old)  # ends the pre-copy round the old workers had begun
        if isinstance(e, SwapFailed):
            raise
        if isinstance(e, asyncio.CancelledError):
            raise
        raise SwapFailed(reason) from e
    # Committed: from here on nothing is undone; a failure is a crash of a worker. In a
    # handoff the old generation is told to go only once the new one accepts: its exit
    # (freeing a large heap) must not compete with the end of the pause.
    sup.commit(new, old, drain_old=not stateful)
    job.mark("committed")
    try:
        if stateful:
            await activate(sup, new, config, job)
    finally:
        if stateful:
            sup.retire(old)
        for msg in handed:
            msg.close_fds()
    job.emit("committed", f"gen={new.id} active; gen={old.id} draining")
    return {"gen": new.id, "previous": old.id, "timings_ms": dict(job.timings)}


def _check_stateful(old: Generation, config: Config) -> None:
    live = old.live()
    for w in live:
        if "state" not in w.features():
            raise SwapFailed(
                f"{w.tag} cannot hand over state: it does not use swapd.worker's state API"
            )
    highest = max((w.slot for w in live), default=-1)
    if highest >= config.workers:
        raise SwapFailed(
            f"stateful swap cannot shrink from {len(old.workers)} to {config.workers} workers: "
            f"the state of slot {highest} would be lost (shard it first, see docs/state-handoff.md)"
        )


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
                raise SwapFailed(f"{w.tag} {w.exited.result()} before it was ready", worker=w)
            if w.exited.done():
                raise SwapFailed(f"{w.tag} {w.exited.result()} right after it was ready",
                                 worker=w)
    for w in workers:
        w.transition_ready()
        if gen.config.mode == "stateful" and w.role == "successor" and not w.standby:
            raise SwapFailed(f"{w.tag} started serving without waiting for state "
                             "(is it using swapd.worker?)", worker=w)


async def _precopy(
    sup: Supervisor, old: Generation, new: Generation, config: Config, job: SwapJob
) -> None:
    """Ship bulk state while the old generation still serves (outside the pause)."""
    async def one(src: WorkerProcess, dst: WorkerProcess) -> int:
        # Bounded like the rest of a swap, but generously: a bulk is large by definition.
        bound = config.timeouts.ready + config.timeouts.restore
        bulk = await _ask(src, {"t": "precopy"}, bound, "pre-copy")
        try:
            reply = await _ask(dst, {"t": "precopy", "names": bulk.body.get("names", [])},
                               bound, "pre-copy load", fds=bulk.fds)
            reply.close_fds()
            return int(bulk.body.get("size", 0))
        finally:
            bulk.close_fds()

    sizes = await asyncio.gather(*(one(s, d) for s, d in _pairs(old, new)))
    job.mark("precopied")
    job.emit("precopy", f"gen={new.id} bulk state loaded ({sum(sizes)} bytes) while "
             f"gen={old.id} kept serving")


async def _handoff(
    sup: Supervisor, old: Generation, new: Generation, config: Config, job: SwapJob, *,
    precopied: bool
) -> list[Message]:
    """The pause: quiesce and snapshot each old worker, restore into its successor.

    `precopied`: the bulk of tracked state has just been shipped, so the snapshots carry
    only what changed since (without it a worker ships its whole state).

    Returns the snapshot messages still holding our copies of their fds: closing the
    last reference to a large memfd frees its memory (15 ms at 100 MB), so the caller
    closes them once the pause is over.
    """
    job.mark("quiesce")
    pairs = _pairs(old, new)
    snaps = await asyncio.gather(
        *(_ask(src, {"t": "quiesce", "deadline": config.timeouts.quiesce,
                     "precopied": precopied},
               config.timeouts.quiesce, "quiesce and snapshot") for src, _ in pairs),
        return_exceptions=True,
    )
    try:
        for result in snaps:
            if isinstance(result, BaseException):
                raise result
        job.mark("snapshotted")
        sizes = [int(m.body.get("size", 0)) for m in _msgs(snaps)]
        job.emit("snapshot", f"gen={old.id} quiesced; {len(sizes)} snapshot(s), "
                 f"{sum(sizes)} bytes")
        stops = [float(m.body.get("t_stop", 0)) for m in _msgs(snaps)]
        if stops:
            job.timings["t_stop_accept"] = min(stops)
        await asyncio.gather(*(
            _ask(dst, {"t": "restore", "envelope": snap.body.get("envelope"),
                       "from_gen": old.id, "conns": snap.body.get("conns", 0)},
                 config.timeouts.restore, "restore", fds=snap.fds)
            for (_, dst), snap in zip(pairs, _msgs(snaps), strict=True)
        ))
        job.mark("restored")
    except BaseException:
        for m in _msgs(snaps):
            m.close_fds()
        raise
    return _msgs(snaps)


async def activate(sup: Supervisor, new: Generation, config: Config, job: SwapJob) -> None:
    """After commit: tell successors to start accepting. Failures here are crashes, not aborts.
    A worker that answers ok: false serves anyway (swapd.worker accepts even when finishing
    its state failed): logged. One that does not answer is killed and restarted in its slot
    like any crash (its share of the state is lost; the log says so)."""
    workers = [w for w in new.workers if w is not None and w.child.status is None]
    replies = await asyncio.gather(
        *(_ask(w, {"t": "commit"}, config.timeouts.restore, "commit") for w in workers),
        return_exceptions=True,
    )
    starts = [float(r.body.get("t_start", 0)) for r in replies if isinstance(r, Message)]
    for w, r in zip(workers, replies, strict=True):
        if isinstance(r, Message):
            r.close_fds()
        elif isinstance(r, SwapFailed) and r.answered:
            log.error("event=commit.failed_in_worker %s error=%r action='serving anyway'",
                      w.tag, r.reason)
        else:
            log.error("event=commit.ack_failed %s error=%r action='SIGKILL and restart; the "
                      "state of this slot is lost'", w.tag, str(r))
            sup.processes.signal_group(w.child, signal.SIGKILL)
    job.mark("activated")
    t_stop = job.timings.pop("t_stop_accept", None)
    if t_stop is not None and starts:
        job.timings["pause"] = round((max(starts) - t_stop) * 1000, 2)


async def _resume(sup: Supervisor, old: Generation, job: SwapJob) -> None:
    """Abort path: the quiesced old generation serves again with its own state."""
    await _tell_resume(old)
    old.transition(GenEvent.RESUME)
    sup.after_resume(old)
    job.emit("resumed", f"gen={old.id} serving again with its state")


async def _tell_resume(old: Generation) -> None:
    """Ask every old worker to resume: serve again if quiesced, end any pre-copy round."""
    # Generous: a worker whose snapshot blocked its loop answers once the snapshot returns.
    timeout = old.config.timeouts.quiesce + old.config.timeouts.restore
    results = await asyncio.gather(
        *(_ask(w, {"t": "resume"}, timeout, "resume") for w in old.live()),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, Message):
            r.close_fds()
        else:
            log.error("event=resume.failed gen=%d error=%r", old.id, str(r))


def _pairs(old: Generation, new: Generation) -> list[tuple[WorkerProcess, WorkerProcess]]:
    pairs = []
    for w in new.workers:
        if w is None or w.role != "successor":
            continue
        src = old.workers[w.slot] if w.slot < len(old.workers) else None
        if src is None or src.child.status is not None:
            raise SwapFailed(f"gen={old.id} worker={w.slot} is not running: its state is gone")
        pairs.append((src, w))
    return pairs


def _msgs(results: list[Message | BaseException]) -> list[Message]:
    return [r for r in results if isinstance(r, Message)]


async def _ask(
    w: WorkerProcess, body: dict[str, Any], timeout: float, what: str, fds: list[int] | None = None
) -> Message:
    """A request to a worker that fails the swap with a clear reason on any problem."""
    if w.channel is None or w.channel.closed:
        raise SwapFailed(f"{w.tag} has no open channel for {what}", worker=w)
    req = asyncio.ensure_future(w.channel.request(body, fds or [], timeout=timeout))
    waiting: set[asyncio.Future[Any]] = {req, w.exited}
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if req not in done:
        req.cancel()
        raise SwapFailed(f"{w.tag} {w.exited.result()} during {what}", worker=w)
    try:
        reply = req.result()
    except ChannelError as e:
        # EOF on the channel usually means the process died; its pidfd reports that a
        # moment later. Wait for it briefly so the reason names the exit, not the symptom.
        await asyncio.wait([w.exited], timeout=_EXIT_GRACE)
        if w.exited.done():
            raise SwapFailed(f"{w.tag} {w.exited.result()} during {what}", worker=w) from e
        raise SwapFailed(f"{w.tag} {what} failed: {e}", worker=w) from e
    if not reply.body.get("ok", False):
        reply.close_fds()
        raise SwapFailed(f"{w.tag} {what} failed: {reply.body.get('error', 'no reason given')}",
                         worker=w, answered=True)
    return reply


async def restore_stored(gen: Generation, stored: dict[int, list[int]], config: Config) -> None:
    """First start under systemd: give each successor slot the snapshot the fd store kept."""
    async def one(w: WorkerProcess) -> None:
        reply = await _ask(w, {"t": "restore", "envelope": None, "from_gen": "fd store"},
                           config.timeouts.restore, "restore of the stored state",
                           fds=stored[w.slot])
        reply.close_fds()

    await asyncio.gather(*(one(w) for w in gen.workers
                           if w is not None and w.slot in stored and w.role == "successor"))
    log.info("event=state.restored source=fdstore slots=%s", sorted(stored))


async def store_state(sup: Supervisor, gen: Generation) -> None:
    """Graceful stop in stateful mode: snapshot every worker into the fd store.

    Connections are not included (the fd store cannot keep thousands of them in order);
    after the snapshot the workers drain and close them at request boundaries.
    """
    gen.transition(GenEvent.QUIESCE)
    timeout = gen.config.timeouts.quiesce
    workers = gen.live()
    # All at once, as in a swap: the stop then takes one quiesce timeout at most, which is
    # what the supervisor promised systemd (EXTEND_TIMEOUT_USEC), whatever the worker count.
    replies = await asyncio.gather(
        *(_ask(w, {"t": "quiesce", "deadline": timeout, "conns": False}, timeout,
               "snapshot for the fd store") for w in workers),
        return_exceptions=True,
    )
    for w, reply in zip(workers, replies, strict=True):
        if not isinstance(reply, Message):
            reason = reply.reason if isinstance(reply, SwapFailed) else repr(reply)
            log.error("event=state.store_failed %s reason=%r", w.tag, reason)
            continue
        try:
            sup.manager.store_state(w.slot, reply.fds)
        finally:
            reply.close_fds()
