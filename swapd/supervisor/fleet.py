"""The fleet: every generation and worker slot, and what happens to them on their own.

The supervisor's orchestration (swaps, control, stop) decides *when* a generation starts,
commits, drains or dies; this module does it and handles what needs no decision: a worker
that exits (pidfd readable) is logged, and restarted in its slot with backoff if its
generation is active; a draining generation is reaped, with SIGKILL at its deadline; a
`hello` is answered with the patch journal; what a worker leaves behind is ended
(`strays`). State changes go through `lifecycle`'s tables (via `Generation.transition` /
`WorkerProcess.transition`), nowhere else.

Memory stays bounded however many swaps there are: a generation that is over, all its
workers reaped, leaves `generations` for `history`, a short summary (the last `HISTORY`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from swapd import messages
from swapd.channel import ChannelError, Message
from swapd.config import Config
from swapd.supervisor import readiness
from swapd.supervisor import release as releases
from swapd.supervisor.generation import (
    Generation,
    GenerationRecord,
    WorkerProcess,
    WorkerRecord,
)
from swapd.supervisor.journal import Journal
from swapd.supervisor.lifecycle import FINAL, GenEvent, GenState, SlotEvent, SlotState
from swapd.supervisor.listeners import Listeners
from swapd.supervisor.process import ExitStatus, OsProcesses
from swapd.supervisor.spawn import WorkerSpec, spawn_worker
from swapd.supervisor.strays import Strays

log = logging.getLogger("swapd")

CRASH_WINDOW = 60.0  # seconds over which crashes of one slot are counted
CRASH_LOOP = 5  # crashes in the window that make a crash loop
BACKOFF_MAX = 30.0
KILL_WAIT = 5.0  # after SIGKILL, how long to wait for the kernel to report the exit
HISTORY = 16  # generations that are over, kept as summaries (status shows them)


class SpawnFailed(Exception):
    """A generation could not even be spawned (exec, fork or pipe failed); it is FAILED."""


class Fleet:
    def __init__(self, processes: OsProcesses, listeners: Listeners, journal: Journal,
                 base_env: Mapping[str, str], stopping: Callable[[], bool]) -> None:
        self.processes = processes
        self.listeners = listeners
        self.journal = journal
        self.base_env = dict(base_env)
        self.stopping = stopping  # the supervisor is stopping: restart nothing
        self.generations: dict[int, Generation] = {}  # live ones, and any not yet reaped
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.active: Generation | None = None
        self.next_gen = 1
        self.crashes: dict[int, deque[float]] = {}  # slot -> crash instants (monotonic)
        self.crash_loop: set[int] = set()
        self.drain_deadlines: dict[int, float] = {}  # generation id -> monotonic deadline
        self.tasks: set[asyncio.Task[None]] = set()  # drains and respawn watches
        self._timers: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Told of restarts and crash loops (metrics); the default does nothing.
        self.on_event: Callable[[str, Generation, int], None] = lambda event, gen, slot: None
        self.strays = Strays(processes, self._is_worker, self._generation_over)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.strays.attach(loop)

    def _is_worker(self, pid: int) -> bool:
        return any(w.pid == pid for g in self.generations.values() for w in g.live())

    def _generation_over(self, gen_id: int) -> bool:
        gen = self.generations.get(gen_id)
        return gen is None or gen.state in FINAL

    def settle(self, gen: Generation) -> None:
        """`gen` may just have ended: end what its workers left, and retire it to the history
        once every worker of it is reaped."""
        if gen.state not in FINAL:
            return
        self.strays.scan()
        if gen is not self.active and not gen.live() and gen.id in self.generations:
            del self.generations[gen.id]
            self.history.append(gen.summary())
            self.processes.trim_heap()

    def background(self, coro: Any) -> None:
        """Run `coro` as a task the stop waits for."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def live_generations(self) -> list[Generation]:
        return [g for g in self.generations.values()
                if g.state not in (GenState.EXITED, GenState.FAILED)]

    def adopt(self, records: list[GenerationRecord], active: int | None, next_gen: int,
              crashes: dict[int, list[float]]) -> None:
        """The new image of a re-exec takes over the generations the old one described."""
        assert self._loop is not None
        self.next_gen = next_gen
        self.crashes = {slot: deque(times) for slot, times in crashes.items()}
        now = time.monotonic()
        for g in records:
            gen = Generation(g.id, g.config, state=g.state, created=g.created,
                             committed=g.committed, restarts=list(g.restarts),
                             release=g.release, root=g.root)
            for rec in g.workers:
                w = None if rec is None else WorkerProcess.resume(gen.id, rec, self._loop)
                if w is not None:
                    w.passthrough = g.config.worker_output == "passthrough"
                    self.watch(w)
                gen.workers.append(w)
                if rec is not None and w is not None:
                    self._resume_readiness(gen, w, rec, now)
            self.generations[gen.id] = gen
            if gen.state == GenState.DRAINING:
                remaining = max(0.0, (g.drain_deadline or now) - now)
                self.drain_deadlines[gen.id] = now + remaining
                self.background(self.reap_drained(gen, remaining))
        self.active = self.generations.get(active) if active else None
        if self.active is not None:
            for slot, dead in enumerate(self.active.workers):
                if dead is None:
                    self.respawn(self.active, slot)

    def _resume_readiness(self, gen: Generation, w: WorkerProcess, rec: WorkerRecord,
                          now: float) -> None:
        """A restart the old image was waiting on: wait out the rest of its deadline (and
        go on probing), as the old image would have. (No swap crosses a re-exec: only an
        active generation's restarted workers can be starting.)"""
        probe = None if rec.probe_fd is None else socket.socket(fileno=rec.probe_fd)
        if probe is not None:
            probe.set_inheritable(False)
        if w.ready.done() or gen.state != GenState.ACTIVE:
            if probe is not None:
                probe.close()
            return
        left = max(0.0, gen.config.timeouts.ready - (now - w.started))
        if probe is not None:
            readiness.start_probe(w, gen.config, probe, bound=left)
        self.background(self._watch_respawn(gen, w, left))

    # -- starting ------------------------------------------------------------------------

    def start_generation(self, config: Config, successor_of: Generation | None,
                         restore_slots: set[int] | None = None, release: str | None = None
                         ) -> Generation:
        """Spawn a generation of `config.workers` workers; SpawnFailed if one cannot start.
        `release`: its label (derived from the code when None, see release.py)."""
        root = releases.resolve_root(config.cwd)
        gen = Generation(self.next_gen, config, release=release or releases.derive(config, root),
                         root=root)
        self.next_gen += 1
        self.generations[gen.id] = gen
        self.listeners.heal(config.backlog)
        fds, names = self.listeners.fds_for(config.binds)
        gen.restarts = [0] * config.workers
        for slot in range(config.workers):
            role = "fresh"
            if successor_of is not None and slot < len(successor_of.workers):
                role = "successor"
            if restore_slots and slot in restore_slots:
                role = "successor"
            spec = self._spec(gen, slot, fds, names, role)
            try:
                worker = self._spawn(spec)
            except OSError as e:  # exec failed (SpawnError), or fork/pipe: EAGAIN, EMFILE
                self.kill_workers(gen)
                gen.transition(GenEvent.FAIL)
                self.settle(gen)
                raise SpawnFailed(f"gen={gen.id} worker={slot}: {e.strerror or e}") from e
            gen.workers.append(worker)
        log.info("event=gen.start gen=%d workers=%d mode=%s release=%s command=%r", gen.id,
                 config.workers, config.mode, gen.release, " ".join(config.command))
        return gen

    def _spec(self, gen: Generation, slot: int, fds: list[int], names: list[str], role: str
              ) -> WorkerSpec:
        # The generation's resolved directory (a restart after a deploy flipped `current`
        # runs this generation's code), and its release label for the application to show.
        config = gen.config if gen.root is None else replace(gen.config, cwd=gen.root)
        env = {**self.base_env, "SWAPD_RELEASE": gen.release}
        return WorkerSpec(gen.id, slot, config, fds, names, role, env)

    def _spawn(self, spec: WorkerSpec) -> WorkerProcess:
        assert self._loop is not None
        worker = spawn_worker(spec, self.processes, self._loop)
        self.watch(worker)
        if spec.config.readiness == "exec":
            worker.mark_ready({"standby": False, "via": "exec"})
        log.info("event=worker.spawn %s role=%s", worker.tag, spec.role)
        return worker

    def watch(self, worker: WorkerProcess) -> None:
        """Follow a worker's exit (pidfd) and its unsolicited messages."""
        assert self._loop is not None
        worker.on_message = self._on_worker_message
        self._loop.add_reader(worker.child.pidfd, self._on_pidfd, worker)

    # -- commit and retire ---------------------------------------------------------------

    def commit(self, new: Generation, old: Generation | None, *, drain_old: bool = True,
               hold: bool = False) -> None:
        """The point of no return: `new` serves, `old` drains (now, or via `retire`), or with
        `hold` is kept for a rollback during a watch window (watch.py)."""
        new.transition(GenEvent.COMMIT)
        new.committed = time.monotonic()
        self.active = new
        if old is None:
            return
        # Crash history belongs to the code that crashed: a new generation starts clean.
        self.crashes.clear()
        self.crash_loop.clear()
        self.journal.clear_for(new.id)  # new code from disk: the old patches do not apply
        old.transition(GenEvent.HOLD if hold else GenEvent.SUPERSEDE)
        if drain_old and not hold:
            self.retire(old)

    def retire(self, old: Generation) -> None:
        """Tell a superseded generation to drain."""
        self.drain(old, old.config.timeouts.drain)

    def after_resume(self, gen: Generation) -> None:
        """A generation became active again after an aborted handoff: refill dead slots."""
        for w in gen.workers:
            if (w is not None and w.state == SlotState.BACKOFF
                    and (gen.id, w.slot) not in self._timers):
                self._schedule_respawn(gen, w.slot)

    def drain(self, gen: Generation, timeout: float) -> None:
        self.drain_deadlines[gen.id] = time.monotonic() + timeout
        for w in gen.workers:
            if w is None:
                continue
            if w.state in (SlotState.STARTING, SlotState.READY, SlotState.BACKOFF):
                w.transition(SlotEvent.DRAIN)
            if w.child.status is not None:
                continue
            self._cancel_timer(gen.id, w.slot)
            if w.channel is not None and not w.channel.closed and w.speaks_channel:
                try:
                    w.channel.send(messages.Drain(timeout).body())
                    continue
                except Exception as e:  # fall back to the signal every worker understands
                    log.warning("event=drain.channel_failed %s error=%r", w.tag, str(e))
            self.processes.send_signal(w.child, signal.SIGTERM)
        self.background(self.reap_drained(gen, timeout))

    async def reap_drained(self, gen: Generation, timeout: float) -> None:
        live = gen.live()
        if live:
            _, pending = await asyncio.wait([w.exited for w in live], timeout=timeout)
            for w in gen.live():
                log.warning("event=drain.timeout %s timeout=%gs action=SIGKILL", w.tag, timeout)
                self.kill(w)
            if pending:
                await asyncio.wait(pending, timeout=KILL_WAIT)
        if gen.state == GenState.DRAINING:
            gen.transition(GenEvent.EXITED)
        self.drain_deadlines.pop(gen.id, None)
        log.info("event=gen.exited gen=%d", gen.id)
        self.settle(gen)

    # -- killing -------------------------------------------------------------------------

    def kill_workers(self, gen: Generation) -> None:
        """SIGKILL every live worker of `gen`, marked as told to go first so that its exit
        is logged as an exit, not as a crash (and never restarted)."""
        for w in gen.workers:
            if w is None:
                continue
            self._cancel_timer(gen.id, w.slot)
            if w.state in (SlotState.STARTING, SlotState.READY, SlotState.BACKOFF):
                w.transition(SlotEvent.DRAIN)
            if w.child.status is None:
                self.kill(w)

    def kill(self, w: WorkerProcess) -> None:
        """SIGKILL a worker's process group, and the worker itself, should it have left it."""
        self.processes.signal_group(w.child, signal.SIGKILL)
        self.processes.send_signal(w.child, signal.SIGKILL)

    async def kill_generation(self, gen: Generation) -> None:
        """Abort path: SIGKILL every worker of a generation that never committed."""
        self.kill_workers(gen)
        live = [w.exited for w in gen.live()]
        if live:
            await asyncio.wait(live, timeout=KILL_WAIT)
        if gen.state in (GenState.STARTING, GenState.STANDBY):
            gen.transition(GenEvent.FAIL)
        self.settle(gen)

    def cancel_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # -- exits and restarts --------------------------------------------------------------

    def _on_pidfd(self, worker: WorkerProcess) -> None:
        assert self._loop is not None
        if worker.child.status is None:
            # Before the reap: the exited worker's zombie keeps its process group's id from
            # being reused while what it left in the group is looked up and ended.
            self.strays.worker_gone(worker.tag, worker.pid)
        status = self.processes.reap(worker.child)
        if status is None:
            return  # spurious wakeup; the pidfd stays readable until reaped
        self._loop.remove_reader(worker.child.pidfd)
        self.processes.release(worker.child)
        worker.on_exit(status)
        self._after_exit(worker, status)
        # Some servers shutdown() their listening socket on exit: it is everyone's.
        self.listeners.check(self.active.id if self.active else None)
        gen = self.generations.get(worker.gen)
        if gen is not None:
            self.settle(gen)

    def _after_exit(self, w: WorkerProcess, status: ExitStatus) -> None:
        gen = self.generations[w.gen]
        if w.state == SlotState.DRAINING:
            w.transition(SlotEvent.EXITED)
            log.info("event=worker.exit %s status=%r", w.tag, str(status))
            return
        if w.state == SlotState.EXITED:
            return
        w.transition(SlotEvent.DIED)
        level = logging.ERROR if gen.state == GenState.ACTIVE else logging.WARNING
        log.log(level, "event=worker.died %s status=%r gen_state=%s", w.tag, str(status),
                gen.state.value)
        if gen.state == GenState.ACTIVE and not self.stopping():
            self._schedule_respawn(gen, w.slot)

    def _schedule_respawn(self, gen: Generation, slot: int) -> None:
        assert self._loop is not None
        self.crashes.setdefault(slot, deque()).append(time.monotonic())
        recent = self.recent_crashes(slot)
        delay = min(0.1 * 2 ** (recent - 1), BACKOFF_MAX)
        if recent >= CRASH_LOOP and slot not in self.crash_loop:  # logged once per loop
            self.crash_loop.add(slot)
            log.error("event=worker.crash_loop gen=%d worker=%d crashes=%d window=%gs "
                      "backoff=%gs", gen.id, slot, recent, CRASH_WINDOW, delay)
            self.on_event("crash_loop", gen, slot)
        log.info("event=worker.respawn_scheduled gen=%d worker=%d delay=%gs", gen.id, slot, delay)
        self._cancel_timer(gen.id, slot)
        self._timers[(gen.id, slot)] = self._loop.call_later(delay, self.respawn, gen, slot)

    def recent_crashes(self, slot: int) -> int:
        """Crashes of a slot within the window; a crash loop ends when they age out of it."""
        history = self.crashes.get(slot, deque())
        now = time.monotonic()
        while history and now - history[0] > CRASH_WINDOW:
            history.popleft()
        if len(history) < CRASH_LOOP:
            self.crash_loop.discard(slot)
        return len(history)

    def _cancel_timer(self, gen_id: int, slot: int) -> None:
        timer = self._timers.pop((gen_id, slot), None)
        if timer is not None:
            timer.cancel()

    def respawn(self, gen: Generation, slot: int) -> None:
        self._timers.pop((gen.id, slot), None)
        old = gen.workers[slot]
        if gen.state != GenState.ACTIVE or self.stopping():
            return
        if old is not None and old.state != SlotState.BACKOFF:
            return
        self.listeners.heal(gen.config.backlog)
        fds, names = self.listeners.fds_for(gen.config.binds)
        spec = self._spec(gen, slot, fds, names, "fresh")
        try:
            worker = self._spawn(spec)
        except OSError as e:  # the slot stays in backoff and is tried again later
            log.error("event=worker.respawn_failed gen=%d worker=%d error=%r", gen.id, slot,
                      e.strerror or str(e))
            self._schedule_respawn(gen, slot)
            return
        if old is not None:
            old.transition(SlotEvent.RESPAWN)
        gen.workers[slot] = worker
        gen.restarts[slot] += 1
        self.on_event("restart", gen, slot)
        self.background(self._watch_respawn(gen, worker))

    async def _watch_respawn(self, gen: Generation, w: WorkerProcess,
                             timeout: float | None = None) -> None:
        waiting: set[asyncio.Future[Any]] = {w.ready, w.exited}
        timeout = gen.config.timeouts.ready if timeout is None else timeout
        done, _ = await asyncio.wait(waiting, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if w.ready in done and not w.exited.done():
            w.transition_ready()
            log.info("event=worker.ready %s restarts=%d", w.tag, gen.restarts[w.slot])
        elif not done:
            log.error("event=worker.ready_timeout %s timeout=%gs action=SIGKILL reason=%r", w.tag,
                      gen.config.timeouts.ready, readiness.waiting_for(w, gen.config))
            self.kill(w)

    # -- messages ------------------------------------------------------------------------

    def _on_worker_message(self, w: WorkerProcess, msg: Message) -> None:
        msg.close_fds()  # no message a worker sends unasked carries descriptors
        if msg.type != messages.Hello.T or w.channel is None:
            w.refused(f"unexpected {msg.type[:64]!r} message")  # logged, throttled
            return
        if w.hello is not None:  # once per process: a repeated one gets no second journal
            w.refused("second hello")
            self._answer(w, msg, messages.failed("hello already received"))
            return
        try:
            hello = messages.Hello.parse(msg.body)
        except messages.MessageError as e:
            w.refused(f"malformed hello: {e}")
            self._answer(w, msg, messages.failed(f"malformed hello: {e}"))
            return
        w.hello = {"proto": hello.proto, "pid": hello.pid, "features": list(hello.features),
                   "lib": hello.lib}
        self._answer(w, msg, messages.ok(messages.HelloReply(self.journal_for(w))))
        log.debug("event=worker.hello %s features=%s", w.tag, ",".join(hello.features))

    def _answer(self, w: WorkerProcess, msg: Message, body: dict[str, Any]) -> None:
        try:
            if w.channel is not None:
                w.channel.reply(msg, body)
        except ChannelError as e:  # it does not read its channel: it hears nothing more
            w.refused(f"reply not sent: {e}")

    def journal_for(self, w: WorkerProcess) -> list[dict[str, Any]]:
        """What a (re)started worker must re-apply: its generation's patches, in order."""
        if self.active is None or w.gen != self.active.id:
            return []
        return self.journal.state()
