"""Swaps: replacing the active generation, stateless (overlap) or stateful (handoff).

A `SwapJob` is the one swap in flight. Everyone who asked for it (the control
client that started it, a joining client, a signal) subscribes to its progress
and awaits its outcome, so every caller learns what happened.

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
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swapd import messages as m
from swapd.config import Config
from swapd.control import DEADLINE, Emit
from swapd.supervisor import fdbudget, readiness
from swapd.supervisor.fleet import KILL_WAIT, Fleet, SpawnFailed
from swapd.supervisor.generation import Answer, Generation, RequestFailed, WorkerProcess
from swapd.supervisor.lifecycle import GenEvent
from swapd.supervisor.watch import hold as hold_generation

log = logging.getLogger("swapd")


class SwapFailed(Exception):
    """A swap that did not commit; the service is as it was before."""

    def __init__(self, reason: str, *, worker: WorkerProcess | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tail = worker.tail_text() if worker is not None else ""
        self.worker = worker.tag if worker is not None else None

    @classmethod
    def from_request(cls, e: RequestFailed) -> SwapFailed:
        failed = cls(e.reason)
        failed.tail, failed.worker = e.tail, e.worker
        return failed

    def report(self, event: str) -> None:
        """Log it: the reason, then the output tail of the worker that failed, if any."""
        log.error("%s reason=%r", event, self.reason)
        if self.tail:
            log.error("%s output tail of %s:\n%s", event, self.worker, self.tail)


@dataclass
class SwapJob:
    kind: str  # "upgrade", "reload", or "start" (the first generation's activation)
    origin: str
    started: float = field(default_factory=time.monotonic)
    gen: int | None = None
    subscribers: list[Emit] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)  # slot -> CPU s in the pause so far
    done: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    release: str | None = None  # the new generation's label (None: derived from its code)
    watch: float = 0.0  # > 0: hold the old generation this long after commit (watch.py)
    who: dict[str, Any] = field(default_factory=dict)  # who asked, for the history
    bound: float = 0.0  # seconds from `started` within which it ends, whatever happens

    def remaining(self) -> float:
        return max(0.0, self.started + self.bound - time.monotonic())

    def extend(self, bound: float) -> None:
        """A bound from now (a reload's new timeouts): tell the waiting clients if later."""
        elapsed = time.monotonic() - self.started
        if elapsed + bound > self.bound:
            self.bound = elapsed + bound
            self.emit(DEADLINE, "", {"seconds": self.remaining()})
    previous: int | None = None  # the generation it replaces
    committed: bool = False  # past the point of no return: the outcome is a success
    warnings: list[str] = field(default_factory=list)  # what went wrong that is no failure

    def warn(self, message: str) -> None:
        """Something the caller must hear even though the swap goes on (or committed)."""
        self.warnings.append(message)
        self.emit("warning", f"WARNING: {message}")

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
        _check_stateful(old, config)
        # Before anything starts, nothing to undo; not if the old workers pre-send their
        # connections to their successors directly (checked again if the new ones do not).
        if not all("link" in w.features() for w in old.live()):
            _check_headroom(old)
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
                await _precopy(fleet, old, new, config, job)
            linking = _linkable(old, new)
            if linking:
                await _presend(old, new, config, job)
            else:  # again: connections came and went while it got ready
                _check_headroom(old)
            old.transition(GenEvent.QUIESCE)
            quiesced = True
            handed = await _handoff(fleet, old, new, config, job, precopied=precopying,
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
            resumed = await _resume(fleet, old)
        elif precopying or linking:
            await _tell_resume(old)  # ends the pre-copy round / pre-send the old ones began
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
            await activate(fleet, new, config, job)
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


def committed(job: SwapJob, gen: int, previous: int | None) -> dict[str, Any]:
    """The result of a swap that committed."""
    return {"gen": gen, "previous": previous, "timings_ms": dict(job.timings),
            "warnings": list(job.warnings)}


async def _check_alive(fleet: Fleet, new: Generation) -> None:
    """Right before commit: every new worker still runs (one that died after it was ready
    or restored would be committed dead, its slot never refilled, its handed state lost).
    Asked of the kernel (pidfd), not of our bookkeeping, which may not have run yet."""
    for w in new.workers:
        if w is not None and (w.exited.done() or fleet.processes.has_exited(w.child)):
            await asyncio.wait([w.exited], timeout=KILL_WAIT)  # for the reason: its status
            status = w.exited.result() if w.exited.done() else "exited"
            raise SwapFailed(f"{w.tag} {status} before commit", worker=w)


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


def _check_headroom(old: Generation) -> None:
    shortfall = fdbudget.handoff_shortfall((w.pid for w in old.live()), f"gen={old.id}")
    if shortfall is not None:
        raise SwapFailed(shortfall)


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


# Further pre-copy rounds (live migration's iteration): while at least ROUND_MIN_KEYS entries
# changed during the previous round, ship them too before the pause, up to ROUND_MAX rounds,
# and stop early if a round does not halve the changes (writes faster than a round ships).
ROUND_MIN_KEYS = 1000
ROUND_MAX = 4


async def _precopy(
    fleet: Fleet, old: Generation, new: Generation, config: Config, job: SwapJob
) -> None:
    """Ship bulk state, then the changes made meanwhile, while the old generation still
    serves (outside the pause); the pause then carries only the last round's changes."""
    # Bounded like the rest of a swap, but generously: a bulk is large by definition.
    bound = config.timeouts.ready + config.timeouts.restore

    async def ship(src: WorkerProcess, dst: WorkerProcess, request: m.PrecopyOut
                   ) -> m.PrecopyOutReply:
        out = await src.ask(request, m.PrecopyOutReply, bound, "pre-copy")
        try:
            if out.reply.names:
                loaded = await dst.ask(m.PrecopyIn(out.reply.names), m.Empty, bound,
                                       "pre-copy load", fds=out.fds)
                loaded.close_fds()
            return out.reply
        finally:
            out.close_fds()

    async def one(src: WorkerProcess, dst: WorkerProcess) -> tuple[int, int]:
        size = (await ship(src, dst, m.PrecopyOut())).size
        rounds, previous = 0, None
        while rounds < ROUND_MAX:
            more = await ship(src, dst, m.PrecopyOut(delta=True, min_keys=ROUND_MIN_KEYS))
            if not more.names:
                break
            rounds += 1
            size += more.size
            if previous is not None and more.keys * 2 > previous:
                break  # not converging: the pause takes what is left
            previous = more.keys
        return size, rounds

    results = await asyncio.gather(*(one(s, d) for s, d in _pairs(old, new)))
    job.mark("precopied")
    rounds = max((r for _, r in results), default=0)
    job.emit("precopy", f"gen={new.id} bulk state loaded ({sum(s for s, _ in results)} bytes"
             + (f", {rounds} further round(s) of changes" if rounds else "")
             + f") while gen={old.id} kept serving")


def _linkable(old: Generation, new: Generation) -> bool:
    """Both ends of every slot speak the handoff link (a worker of an older swapd.worker
    does not: its connections then travel in the snapshot, through us)."""
    pairs = _pairs(old, new)
    return bool(pairs) and all("link" in w.features() for pair in pairs for w in pair)


async def _presend(old: Generation, new: Generation, config: Config, job: SwapJob) -> None:
    """Outside the pause: each old worker passes its connections to its successor directly.

    A socketpair per slot; one end to each worker, then our copies are closed: the
    connections' descriptors never pass through the supervisor. The new worker checks its
    descriptor budget first and refuses with the figures (nothing was paused yet).
    """
    bound = config.timeouts.ready + config.timeouts.restore

    async def one(src: WorkerProcess, dst: WorkerProcess) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:  # the channels send duplicates; ours close when both answered
            receive = asyncio.ensure_future(dst.ask(
                m.LinkIn(), m.LinkReply, bound, "connection pre-send (receive)",
                fds=[theirs.fileno()]))
            send = asyncio.ensure_future(src.ask(
                m.LinkOut(), m.LinkReply, bound, "connection pre-send", fds=[ours.fileno()]))
            pending = {receive, send}
            while pending:
                done, pending = await asyncio.wait(pending,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        # The other end then fails on the link's EOF, once our copy of the
                        # failed end is closed too (a worker that could not even receive
                        # its end never held it): it does not wait out `bound`.
                        (ours if task is send else theirs).close()
        for task in (receive, send):
            if task.exception() is None:
                task.result().close_fds()
        received, sent = receive.exception(), send.exception()
        # The receiver's reason first (a refusal for lack of descriptors names the figures),
        # unless it only saw the link close because the sender failed.
        if received is not None and (sent is None or m.LINK_CLOSED not in str(received)):
            raise received
        if sent is not None:
            raise sent
        return receive.result().reply.conns

    counts = await asyncio.gather(*(one(s, d) for s, d in _pairs(old, new)))
    job.mark("present")
    job.emit("presend", f"gen={new.id} holds {sum(counts)} connection(s) of gen={old.id}, "
             "pre-sent while it kept serving")


async def _handoff(
    fleet: Fleet, old: Generation, new: Generation, config: Config, job: SwapJob, *,
    precopied: bool, sources: list[WorkerProcess], linked: bool = False
) -> list[Answer[m.QuiesceReply]]:
    """The pause: quiesce and snapshot each old worker, restore into its successor.

    `precopied`: the bulk of tracked state has just been shipped, so the snapshots carry
    only what changed since (without it a worker ships its whole state).

    Returns the snapshot messages still holding our copies of their fds: closing the
    last reference to a large memfd frees its memory (15 ms at 100 MB), so the caller
    closes them once the pause is over.
    """
    job.mark("quiesce")
    pairs = _pairs(old, new)
    quiesce = m.Quiesce(deadline=config.timeouts.quiesce, precopied=precopied, link=linked)
    snaps: list[Answer[m.QuiesceReply]] = []
    # A snapshot carries a descriptor per connection unless they went over the link: as
    # many as we can take. Beyond that (or if the kernel could not give us them all) the
    # reply fails, the worker resumes.
    room = fdbudget.headroom()
    cpu: dict[int, float] = {}  # slot -> CPU seconds its two workers used in the pause

    def all_snapshotted() -> None:
        job.mark("snapshotted")
        sizes = [a.reply.size for a in snaps]
        conns = sum(a.reply.conns for a in snaps)
        replayed = sum(a.reply.replayed for a in snaps)
        job.emit("snapshot", f"gen={old.id} quiesced; {len(sizes)} snapshot(s), "
                 f"{sum(sizes)} bytes; {conns} connection(s) handed over"
                 + (f", {replayed} of them mid-request" if replayed else ""))
        job.timings["t_stop_accept"] = min(a.reply.t_stop for a in snaps)

    async def one(src: WorkerProcess, dst: WorkerProcess) -> None:
        snap = await src.ask(quiesce, m.QuiesceReply, config.timeouts.quiesce,
                             "quiesce and snapshot", reply_fds=room)
        snaps.append(snap)
        sources.append(src)
        if len(snaps) == len(pairs):
            all_snapshotted()
        # Each slot restores as soon as its own snapshot is in: with several workers the
        # pause is the slowest slot's quiesce + restore, not the slowest quiesce plus the
        # slowest restore.
        ack = await dst.ask(
            m.Restore(snap.reply.envelope, from_gen=old.id, conns=snap.reply.conns,
                      link=linked),
            m.RestoreReply, config.timeouts.restore, "restore", fds=snap.fds)
        ack.close_fds()
        cpu[dst.slot] = snap.reply.cpu + ack.reply.cpu

    results = await asyncio.gather(*(one(src, dst) for src, dst in pairs),
                                   return_exceptions=True)
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        job.mark("restored")
        job.cpu = cpu
    except BaseException:
        for answer in snaps:
            answer.close_fds()
        raise
    return snaps


async def activate(fleet: Fleet, new: Generation, config: Config, job: SwapJob) -> None:
    """After commit: tell successors to start accepting. Failures here are crashes, not aborts.
    A worker that answers ok: false serves anyway (swapd.worker accepts even when finishing
    its state failed): logged. One that does not answer is killed and restarted in its slot
    like any crash (its share of the state is lost; the log says so)."""
    workers = [w for w in new.workers if w is not None and w.child.status is None]
    replies = await asyncio.gather(
        *(w.ask(m.Commit(), m.CommitReply, config.timeouts.restore, "commit")
          for w in workers),
        return_exceptions=True,
    )
    starts = [r.reply.t_start for r in replies if isinstance(r, Answer)]
    # CPU the workers of a slot spent inside the pause (quiesce, restore, commit): unlike
    # the pause itself, it does not include waiting for a CPU on a busy machine.
    busy = [job.cpu.get(w.slot, 0.0) + r.reply.cpu
            for w, r in zip(workers, replies, strict=True) if isinstance(r, Answer)]
    for w, r in zip(workers, replies, strict=True):
        if isinstance(r, Answer):
            r.close_fds()
        elif isinstance(r, RequestFailed) and r.answered:
            log.error("event=commit.failed_in_worker %s error=%r action='serving anyway'",
                      w.tag, r.reason)
            job.warn(f"{w.tag} could not finish its commit ({r.reason}); it serves anyway")
        else:
            log.error("event=commit.ack_failed %s error=%r action='SIGKILL and restart; the "
                      "state of this slot is lost'", w.tag, str(r))
            fleet.kill(w)
            job.warn(f"{w.tag} did not confirm its commit ({r}): killed and restarted in its "
                     "slot; the state handed to it is lost")
    job.mark("activated")
    t_stop = job.timings.pop("t_stop_accept", None)
    if t_stop is not None and starts:
        job.timings["pause"] = round((max(starts) - t_stop) * 1000, 2)
    if busy and job.cpu:
        job.timings["pause_cpu"] = round(max(busy) * 1000, 2)


async def _resume(fleet: Fleet, old: Generation) -> dict[int, str]:
    """Abort path: the quiesced old generation serves again, each worker with its own state;
    the slots that did not confirm it, with the reason (the caller says what happened)."""
    failed = await _tell_resume(old)
    old.transition(GenEvent.RESUME)
    fleet.after_resume(old)
    return failed


async def _tell_resume(old: Generation) -> dict[int, str]:
    """Ask every old worker to resume: serve again if quiesced, end any pre-copy round.
    Returns the slots that did not confirm, with the reason."""
    # Generous: a worker whose snapshot blocked its loop answers once the snapshot returns.
    timeout = old.config.timeouts.quiesce + old.config.timeouts.restore
    live = old.live()
    results = await asyncio.gather(
        *(w.ask(m.Resume(), m.Empty, timeout, "resume") for w in live),
        return_exceptions=True,
    )
    failed = {}
    for w, r in zip(live, results, strict=True):
        if isinstance(r, Answer):
            r.close_fds()
        else:
            log.error("event=resume.failed %s error=%r", w.tag, str(r))
            failed[w.slot] = str(r)
    return failed


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


async def restore_stored(gen: Generation, stored: dict[int, list[int]], config: Config) -> None:
    """First start under systemd: give each successor slot the snapshot the fd store kept."""
    async def one(w: WorkerProcess) -> None:
        try:
            answer = await w.ask(m.Restore(None, from_gen="fd store"), m.Empty,
                                 config.timeouts.restore, "restore of the stored state",
                                 fds=stored[w.slot])
        except RequestFailed as e:
            raise SwapFailed.from_request(e) from e
        answer.close_fds()

    await asyncio.gather(*(one(w) for w in gen.workers
                           if w is not None and w.slot in stored and w.role == "successor"))
    log.info("event=state.restored source=fdstore slots=%s", sorted(stored))


async def store_state(gen: Generation, store: Callable[[int, list[int]], None]) -> None:
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
        *(w.ask(m.Quiesce(deadline=timeout, conns=False), m.QuiesceReply, timeout,
                "snapshot for the fd store") for w in workers),
        return_exceptions=True,
    )
    for w, reply in zip(workers, replies, strict=True):
        if not isinstance(reply, Answer):
            reason = reply.reason if isinstance(reply, RequestFailed) else repr(reply)
            log.error("event=state.store_failed %s reason=%r", w.tag, reason)
            continue
        try:
            store(w.slot, reply.fds)
        finally:
            reply.close_fds()
