"""The stateful swap's steps: state and connections from each old worker to its successor.

Per slot i, old worker i -> new worker i (the order `swap.run_swap` runs them in):

    check_stateful / check_headroom   refused before anything starts
    precopy    bulk state, then rounds of its changes, while old i still serves
    presend    old i passes every connection to new i over a socketpair of their own (the
               handoff link), while it still serves them; the supervisor never holds them
    handoff    the pause: quiesce old i (stop accepting, finish in-flight, the connections' delta on
               the link, snapshot), restore into new i
    activate   after the commit: new i starts accepting
    resume / tell_resume   the abort path: old i serves again with its untouched state

Also the fd store's two uses of a snapshot under systemd: `store_state` at a graceful
stop, `restore_stored` at the next start. Each step raises `SwapFailed` (or
`RequestFailed`, which the caller converts); deciding what a failure means is
`swap.run_swap`'s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from swapd import messages as m
from swapd.config import Config
from swapd.supervisor import fdbudget
from swapd.supervisor.fleet import Fleet
from swapd.supervisor.generation import Answer, Generation, RequestFailed, WorkerProcess
from swapd.supervisor.lifecycle import GenEvent
from swapd.supervisor.swapjob import SwapFailed, SwapJob

log = logging.getLogger("swapd")


def check_stateful(old: Generation, config: Config) -> None:
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


def check_headroom(old: Generation) -> None:
    shortfall = fdbudget.handoff_shortfall((w.pid for w in old.live()), f"gen={old.id}")
    if shortfall is not None:
        raise SwapFailed(shortfall)


# Further pre-copy rounds (live migration's iteration): while at least ROUND_MIN_KEYS entries
# changed during the previous round, ship them too before the pause, up to ROUND_MAX rounds,
# and stop early if a round does not halve the changes (writes faster than a round ships).
ROUND_MIN_KEYS = 1000
ROUND_MAX = 4


async def precopy(
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

    results = await asyncio.gather(*(one(s, d) for s, d in slot_pairs(old, new)))
    job.mark("precopied")
    rounds = max((r for _, r in results), default=0)
    job.emit("precopy", f"gen={new.id} bulk state loaded ({sum(s for s, _ in results)} bytes"
             + (f", {rounds} further round(s) of changes" if rounds else "")
             + f") while gen={old.id} kept serving")


def linkable(old: Generation, new: Generation) -> bool:
    """Both ends of every slot speak the handoff link (a worker of an older swapd.worker
    does not: its connections then travel in the snapshot, through us)."""
    pairs = slot_pairs(old, new)
    return bool(pairs) and all("link" in w.features() for pair in pairs for w in pair)


async def presend(old: Generation, new: Generation, config: Config, job: SwapJob) -> None:
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

    counts = await asyncio.gather(*(one(s, d) for s, d in slot_pairs(old, new)))
    job.mark("present")
    job.emit("presend", f"gen={new.id} holds {sum(counts)} connection(s) of gen={old.id}, "
             "pre-sent while it kept serving")


async def handoff(
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
    pairs = slot_pairs(old, new)
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


async def resume(fleet: Fleet, old: Generation) -> dict[int, str]:
    """Abort path: the quiesced old generation serves again, each worker with its own state;
    the slots that did not confirm it, with the reason (the caller says what happened)."""
    failed = await tell_resume(old)
    old.transition(GenEvent.RESUME)
    fleet.after_resume(old)
    return failed


async def tell_resume(old: Generation) -> dict[int, str]:
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


def slot_pairs(old: Generation, new: Generation) -> list[tuple[WorkerProcess, WorkerProcess]]:
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
