"""The supervisor: owns listeners, the control socket and generations; runs swaps.

It is never in the data path: workers accept straight from the shared listen
queues. Its event loop sleeps until something happens (a pidfd becomes readable,
a channel or notify datagram arrives, a control request, a signal, a deadline);
nothing polls.

Signals only record an intent that the loop acts on (asyncio's signal handlers
already run inside the loop): HUP = reload, TERM/INT = graceful stop (drain, exit
0), QUIT = fast stop (workers killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from dataclasses import asdict, replace
from typing import Any

import psutil

from swapd import __version__
from swapd.channel import Message
from swapd.config import Config, ConfigError, load
from swapd.control import ControlError, ControlServer, Emit, Peer, bind_control
from swapd.sockets import (
    STATE_NAME,
    AddressError,
    describe,
    parse_address,
)
from swapd.supervisor import patching, reexec
from swapd.supervisor.generation import Generation, WorkerProcess, WorkerSpec, spawn_worker
from swapd.supervisor.lifecycle import GenEvent, GenState, SlotEvent, SlotState
from swapd.supervisor.listeners import Listener, ListenerError, Listeners
from swapd.supervisor.manager import ServiceManager, split_inherited
from swapd.supervisor.patching import PatchRecord
from swapd.supervisor.process import ExitStatus, OsProcesses
from swapd.supervisor.swap import (
    SwapFailed,
    SwapJob,
    activate,
    restore_stored,
    run_swap,
    store_state,
    wait_ready,
)
from swapd.systemd import LISTEN_ENV

log = logging.getLogger("swapd")

COMMANDS = frozenset({"status", "upgrade", "reload", "stop", "patch"})
CRASH_WINDOW = 60.0  # seconds over which crashes of one slot are counted
CRASH_LOOP = 5  # crashes in the window that make a crash loop
BACKOFF_MAX = 30.0
KILL_WAIT = 5.0  # after SIGKILL, how long to wait for the kernel to report the exit


class StartupError(Exception):
    """The service could not start; exit code 2 (nothing started) or 1 (workers failed)."""

    def __init__(self, message: str, code: int = 2, tail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.tail = tail


class Supervisor:
    def __init__(
        self,
        config: Config,
        overrides: dict[str, Any],
        processes: OsProcesses | None = None,
        inherited: list[tuple[str, int]] | None = None,
    ) -> None:
        self.config = config
        self.overrides = overrides
        self.processes = processes or OsProcesses()
        self.generations: dict[int, Generation] = {}
        self.active: Generation | None = None
        self.swap: SwapJob | None = None
        self.last_swap: dict[str, Any] | None = None
        self.swap_counts = {"ok": 0, "failed": 0}
        self.journal: list[PatchRecord] = []  # patches in force in the active generation
        self.patch_in_flight: int | None = None
        self.reexec_in_flight = False
        self._patch_serial = 0
        self.started = time.monotonic()
        self.crashes: dict[int, deque[float]] = {}
        self.crash_loop: set[int] = set()
        self.next_gen = 1
        self._control_sock: socket.socket | None = None
        self._control: ControlServer | None = None
        self._stop_requested: asyncio.Future[bool] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self.drain_deadlines: dict[int, float] = {}  # generation id -> monotonic deadline
        self._resumed: dict[str, Any] | None = None  # re-exec state, when we are the new image
        self._timers: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self.base_env = _base_env(os.environ)
        self.manager = ServiceManager(fdstore=config.fdstore)
        self.listeners = Listeners(self.manager)
        # LISTEN_FDS may carry, besides listeners, snapshots a previous supervisor stored.
        inherited = inherited or []
        self._stored_names = [n for n, _ in inherited if STATE_NAME.match(n)]
        self.activated, self.stored_listeners, self.stored_state = split_inherited(inherited)

    # -- start-up (synchronous: errors here mean exit 2, nothing started) --------

    def prepare(self) -> None:
        """Bind listeners and the control socket; raise StartupError with one line."""
        try:
            self.listeners.adopt_inherited(self.activated, self.stored_listeners,
                                           dict(self.config.binds))
            self.listeners.bind_missing(self.config.binds, self.config.backlog)
            if not self.listeners:
                raise StartupError("no listeners: give --bind NAME=ADDR (or use socket activation)")
            self._control_sock = bind_control(self.config.control)
            self.listeners.store_all()
        except OSError as e:
            self._close_listeners()
            raise StartupError(e.strerror or str(e)) from e
        except AddressError as e:  # an inherited fd that is not a listening stream socket
            self._close_listeners()
            raise StartupError(f"socket activation: {e}") from e
        except StartupError:
            self._close_listeners()
            raise

    # -- main loop --------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_requested = loop.create_future()
        self._stopped = loop.create_future()
        assert self._control_sock is not None
        self._control = ControlServer(self._control_sock, self._handle, COMMANDS)
        await self._control.start()
        self._install_signals()
        self.manager.start_watchdog(loop)
        log.info("event=supervisor.start pid=%d version=%s control=%s listeners=%s",
                 os.getpid(), __version__, self.config.control,
                 ",".join(f"{lis.name}={describe(lis.sock)}" for lis in self.listeners))
        code = 0
        try:
            if self._resumed is not None:
                self._resume(self._resumed)
            else:
                first = await self._start_first()
                log.info("event=supervisor.ready gen=%d workers=%d", first.id, len(first.workers))
                self.manager.ready(self._status_line())
            fast = await self._stop_requested
            await self._shutdown(fast)
        except StartupError as e:
            code = e.code
            raise
        except BaseException:
            code = 1
            raise
        finally:
            self._remove_signals()
            self.manager.stop_watchdog()
            if not self._stopped.done():
                self._stopped.set_result(None)  # lets a waiting `swapd stop` get its answer
            await self._control.close()
            self._close_control()
            self._close_listeners()
            log.info("event=supervisor.exit code=%d", code)
        return code

    async def _start_first(self) -> Generation:
        """The first generation, restoring a snapshot the fd store kept, if there is one."""
        t = self.config.timeouts
        self.manager.extend(t.ready + t.restore + KILL_WAIT)  # a slow first start is no failure
        stored = self.stored_state if self.config.mode == "stateful" else {}
        if self.stored_state and not stored:
            log.warning("event=state.ignored reason='stored state but mode is stateless'")
        try:
            try:
                first = self.start_generation(self.config, successor_of=None,
                                              restore_slots=set(stored))
            except SwapFailed as e:
                raise StartupError(e.reason, code=2) from e
            try:
                await wait_ready(first, first.config.timeouts.ready)
                first.transition(GenEvent.READY)
                if stored:
                    await restore_stored(first, stored, self.config)
            except SwapFailed as e:
                await self.kill_generation(first)
                _report_failure("event=start.failed", e)
                if not stored:
                    raise StartupError(e.reason, code=1, tail=e.tail) from e
                log.error("event=state.restore_failed reason=%r action='start fresh: the stored "
                          "state is lost'", e.reason)
                self._drop_stored_state()
                return await self._start_first()
        finally:
            self._drop_stored_state()
        self.commit(first, None)
        if first.config.mode == "stateful":
            await activate(self, first, self.config, SwapJob("start", "start"))
        return first

    def _drop_stored_state(self) -> None:
        """Close our copies of stored snapshot fds and remove them from the fd store."""
        self.manager.forget_names(self._stored_names)
        self._stored_names = []
        if self.stored_state:
            for fds in self.stored_state.values():
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.stored_state = {}

    def _install_signals(self) -> None:
        assert self._loop is not None
        self._loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._loop.add_signal_handler(signal.SIGTERM, self.request_stop, False)
        self._loop.add_signal_handler(signal.SIGINT, self.request_stop, False)
        self._loop.add_signal_handler(signal.SIGQUIT, self.request_stop, True)

    def _remove_signals(self) -> None:
        if self._loop is None:
            return
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self._loop.remove_signal_handler(sig)

    def _on_sighup(self) -> None:
        log.info("event=signal name=SIGHUP action=reload")
        task = asyncio.ensure_future(self._signal_swap())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _signal_swap(self) -> None:
        # Under Type=notify-reload (systemd >= 253) the SIGHUP comes from systemd, which then
        # waits for a RELOADING=1 newer than its signal, and READY=1. A SIGHUP that joins the
        # swap in flight, or is refused, would otherwise leave `systemctl reload` hanging.
        busy = self.active is not None and not self._stopping() and (
            self.swap is not None or self.patch_in_flight is not None or self.reexec_in_flight)
        if busy:
            self.manager.reloading(f"reload requested; {self._status_line()}",
                                   _swap_bound(self.config))
        try:
            await self.request_swap("reload", "SIGHUP", None)
        except ControlError as e:  # a signal has nobody to answer: the log must say it
            log.warning("event=signal.refused name=SIGHUP reason=%r", str(e))
            if busy and not self._stopping():
                self.manager.ready(f"{self._status_line()}; SIGHUP reload refused: {e}")

    def request_stop(self, fast: bool = False) -> None:
        if self._stop_requested is not None and not self._stop_requested.done():
            log.info("event=stop.requested fast=%s", fast)
            self._stop_requested.set_result(fast)

    # -- generations -------------------------------------------------------------

    def start_generation(self, config: Config, successor_of: Generation | None,
                         restore_slots: set[int] | None = None) -> Generation:
        assert self._loop is not None
        gen = Generation(self.next_gen, config)
        self.next_gen += 1
        self.generations[gen.id] = gen
        fds, names = self.listeners.fds_for(config.binds)
        gen.restarts = [0] * config.workers
        for slot in range(config.workers):
            role = "fresh"
            if successor_of is not None and slot < len(successor_of.workers):
                role = "successor"
            if restore_slots and slot in restore_slots:
                role = "successor"
            spec = WorkerSpec(gen.id, slot, config, fds, names, role, self.base_env)
            try:
                worker = self._spawn(spec)
            except OSError as e:  # exec failed (SpawnError), or fork/pipe: EAGAIN, EMFILE
                self._abandon(gen)
                raise SwapFailed(f"gen={gen.id} worker={slot}: {e.strerror or e}") from e
            gen.workers.append(worker)
        log.info("event=gen.start gen=%d workers=%d mode=%s command=%r", gen.id, config.workers,
                 config.mode, " ".join(config.command))
        return gen

    def _abandon(self, gen: Generation) -> None:
        """A generation that could not even be spawned: kill what started, mark it failed."""
        self._kill_workers(gen)
        gen.transition(GenEvent.FAIL)

    def _kill_workers(self, gen: Generation) -> None:
        """SIGKILL every live worker of `gen`, marked as told to go first so that its exit
        is logged as an exit, not as a crash (and never restarted)."""
        for w in gen.workers:
            if w is None:
                continue
            self._cancel_timer(gen.id, w.slot)
            if w.state in (SlotState.STARTING, SlotState.READY, SlotState.BACKOFF):
                w.transition(SlotEvent.DRAIN)
            if w.child.status is None:
                self.processes.signal_group(w.child, signal.SIGKILL)
                # and the process itself, should it have left its group
                self.processes.send_signal(w.child, signal.SIGKILL)

    def _spawn(self, spec: WorkerSpec) -> WorkerProcess:
        assert self._loop is not None
        worker = spawn_worker(spec, self.processes, self._loop)
        worker.on_message = self._on_worker_message
        self._loop.add_reader(worker.child.pidfd, self._on_pidfd, worker)
        if spec.config.readiness == "exec":
            worker.mark_ready({"standby": False, "via": "exec"})
        log.info("event=worker.spawn %s role=%s", worker.tag, spec.role)
        return worker

    def commit(self, new: Generation, old: Generation | None, *, drain_old: bool = True
               ) -> None:
        """The point of no return: `new` serves, `old` drains (now, or via `retire`)."""
        new.transition(GenEvent.COMMIT)
        new.committed = time.monotonic()
        self.active = new
        self.config = new.config
        if old is None:
            return
        # Crash history belongs to the code that crashed: a new generation starts clean.
        self.crashes.clear()
        self.crash_loop.clear()
        if self.journal:
            # New code from disk: the patches of the old generation do not apply to it.
            log.warning("event=patch.journal_cleared gen=%d patches=%s", new.id,
                        ",".join(str(r.id) for r in self.journal))
            self.journal.clear()
        old.transition(GenEvent.SUPERSEDE)
        if drain_old:
            self.retire(old)

    def retire(self, old: Generation) -> None:
        """Tell a superseded generation to drain."""
        self._drain(old, old.config.timeouts.drain)

    def after_resume(self, gen: Generation) -> None:
        """A generation became active again after an aborted handoff: refill dead slots."""
        for w in gen.workers:
            if (w is not None and w.state == SlotState.BACKOFF
                    and (gen.id, w.slot) not in self._timers):
                self._schedule_respawn(gen, w.slot)

    def _drain(self, gen: Generation, timeout: float) -> None:
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
                    w.channel.send({"t": "drain", "deadline": timeout})
                    continue
                except Exception as e:  # fall back to the signal every worker understands
                    log.warning("event=drain.channel_failed %s error=%r", w.tag, str(e))
            self.processes.send_signal(w.child, signal.SIGTERM)
        task = asyncio.ensure_future(self._reap_drained(gen, timeout))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _reap_drained(self, gen: Generation, timeout: float) -> None:
        live = gen.live()
        if live:
            _, pending = await asyncio.wait([w.exited for w in live], timeout=timeout)
            for w in gen.live():
                log.warning("event=drain.timeout %s timeout=%gs action=SIGKILL", w.tag, timeout)
                self.processes.signal_group(w.child, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=KILL_WAIT)
        if gen.state == GenState.DRAINING:
            gen.transition(GenEvent.EXITED)
        self.drain_deadlines.pop(gen.id, None)
        log.info("event=gen.exited gen=%d", gen.id)

    async def kill_generation(self, gen: Generation) -> None:
        """Abort path: SIGKILL every worker of a generation that never committed."""
        self._kill_workers(gen)
        live = [w.exited for w in gen.live()]
        if live:
            await asyncio.wait(live, timeout=KILL_WAIT)
        if gen.state in (GenState.STARTING, GenState.STANDBY):
            gen.transition(GenEvent.FAIL)

    # -- child events -----------------------------------------------------------

    def _on_pidfd(self, worker: WorkerProcess) -> None:
        assert self._loop is not None
        status = self.processes.reap(worker.child)
        if status is None:
            return  # spurious wakeup; the pidfd stays readable until reaped
        self._loop.remove_reader(worker.child.pidfd)
        self.processes.release(worker.child)
        worker.on_exit(status)
        self._after_exit(worker, status)

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
        if gen.state == GenState.ACTIVE and not self._stopping():
            self._schedule_respawn(gen, w.slot)

    def _schedule_respawn(self, gen: Generation, slot: int) -> None:
        assert self._loop is not None
        self.crashes.setdefault(slot, deque()).append(time.monotonic())
        recent = self._recent_crashes(slot)
        delay = min(0.1 * 2 ** (recent - 1), BACKOFF_MAX)
        if recent >= CRASH_LOOP and slot not in self.crash_loop:  # logged once per loop
            self.crash_loop.add(slot)
            log.error("event=worker.crash_loop gen=%d worker=%d crashes=%d window=%gs "
                      "backoff=%gs", gen.id, slot, recent, CRASH_WINDOW, delay)
        log.info("event=worker.respawn_scheduled gen=%d worker=%d delay=%gs", gen.id, slot, delay)
        self._cancel_timer(gen.id, slot)
        self._timers[(gen.id, slot)] = self._loop.call_later(delay, self._respawn, gen, slot)

    def _recent_crashes(self, slot: int) -> int:
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

    def _respawn(self, gen: Generation, slot: int) -> None:
        self._timers.pop((gen.id, slot), None)
        old = gen.workers[slot]
        if gen.state != GenState.ACTIVE or self._stopping():
            return
        if old is not None and old.state != SlotState.BACKOFF:
            return
        fds, names = self.listeners.fds_for(gen.config.binds)
        spec = WorkerSpec(gen.id, slot, gen.config, fds, names, "fresh", self.base_env)
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
        task = asyncio.ensure_future(self._watch_respawn(gen, worker))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _watch_respawn(self, gen: Generation, w: WorkerProcess) -> None:
        waiting: set[asyncio.Future[Any]] = {w.ready, w.exited}
        done, _ = await asyncio.wait(waiting, timeout=gen.config.timeouts.ready,
                                     return_when=asyncio.FIRST_COMPLETED)
        if w.ready in done and not w.exited.done():
            w.transition_ready()
            log.info("event=worker.ready %s restarts=%d", w.tag, gen.restarts[w.slot])
        elif not done:
            log.error("event=worker.ready_timeout %s timeout=%gs action=SIGKILL", w.tag,
                      gen.config.timeouts.ready)
            self.processes.signal_group(w.child, signal.SIGKILL)

    def _on_worker_message(self, w: WorkerProcess, msg: Message) -> None:
        if msg.type == "hello" and w.channel is not None:
            w.hello = {k: msg.body.get(k) for k in ("proto", "pid", "features", "lib")}
            w.channel.reply(msg, {"ok": True, "journal": self.journal_for(w)})
            log.debug("event=worker.hello %s features=%s", w.tag, w.hello.get("features"))
        else:
            log.warning("event=channel.unexpected %s type=%r", w.tag, msg.type)
        msg.close_fds()

    def journal_for(self, w: WorkerProcess) -> list[dict[str, Any]]:
        """What a (re)started worker must re-apply: its generation's patches, in order."""
        if self.active is None or w.gen != self.active.id:
            return []
        return self.journal_state()

    def journal_state(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.journal]

    def next_patch_id(self) -> int:
        self._patch_serial += 1
        return self._patch_serial

    @property
    def control_fd(self) -> int | None:
        return self._control_sock.fileno() if self._control_sock is not None else None

    # -- re-exec (upgrade --self) ----------------------------------------------------

    async def _reexec(self, emit: Emit, peer: Peer) -> dict[str, Any]:
        self._refuse_if_busy("re-exec")
        self.reexec_in_flight = True
        try:
            state = reexec.capture(self, None).state
            emit("reexec", f"checking that the new code on disk takes over "
                 f"{len(self.generations)} generation(s), then exec'ing in place", None)
            log.info("event=reexec.begin version=%s argv=%r", __version__, reexec.exec_argv())
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, reexec.check_state, state)
                if self._stopping():
                    raise reexec.ReexecError("supervisor is stopping; no re-exec")
                reply_fd = os.dup(peer.fd)
                try:
                    # No await from here to the exec: the capture is what we own at the exec.
                    captured = reexec.capture(self, reply_fd)
                    self.manager.ping_watchdog()  # the new image's start-up is a long gap
                    reexec.execute(captured)
                finally:
                    os.close(reply_fd)
            except (reexec.ReexecError, OSError) as e:
                tail = e.tail if isinstance(e, reexec.ReexecError) else ""
                log.error("event=reexec.failed reason=%r", str(e))
                raise ControlError(str(e), data={"tail": tail, "worker": "pre-flight check"}
                                   ) from e
        finally:
            self.reexec_in_flight = False
        raise ControlError("re-exec returned without an error")  # not reached

    def _refuse_if_busy(self, what: str) -> None:
        """One change at a time: a swap, a patch or a re-exec."""
        if self._stopping():
            raise ControlError(f"supervisor is stopping; no {what}")
        if self.active is None:
            raise ControlError(f"supervisor is still starting; no {what}")
        if self.reexec_in_flight:
            raise ControlError("a re-exec (upgrade --self) is in flight; retry when it finishes")
        if self.swap is not None:
            raise ControlError(f"{_a(self.swap.kind)} is in flight (gen={self.swap.gen}, "
                               f"started {time.monotonic() - self.swap.started:.1f}s ago); "
                               "retry when it finishes")
        if self.patch_in_flight is not None:
            raise ControlError(f"patch {self.patch_in_flight} is in flight; retry when it "
                               "finishes")

    @classmethod
    def from_reexec(cls, state: dict[str, Any]) -> Supervisor:
        """The new image after `upgrade --self`: adopt what the old one owned."""
        config = reexec.config_of(state["config"], state["config_file"])
        sup = cls(config, state["overrides"])
        sup._resumed = state
        sup.started = state["started"]
        sup.next_gen = state["next_gen"]
        sup.swap_counts = state["swaps"]
        sup.last_swap = state["last_swap"]
        sup.crashes = {int(k): deque(v) for k, v in state["crashes"].items()}
        sup.journal = [PatchRecord(**r) for r in state.get("journal", [])]
        sup._patch_serial = max((r.id for r in sup.journal), default=0)
        for item in state["listeners"]:
            sock = socket.socket(fileno=item["fd"])
            sock.set_inheritable(False)
            sup.listeners.add(Listener(item["name"], parse_address(item["address"]), sock,
                                       item["source"]))
        sup._control_sock = socket.socket(fileno=state["control_fd"])
        sup._control_sock.set_inheritable(False)
        return sup

    def _resume(self, state: dict[str, Any]) -> None:
        assert self._loop is not None
        reexec.unblock_signals()
        now = time.monotonic()
        for g in state["generations"]:
            config = reexec.config_of(g["config"], g["config_file"])
            gen = Generation(g["id"], config, state=GenState(g["state"]), created=g["created"],
                             committed=g["committed"], restarts=g["restarts"])
            for info in g["workers"]:
                if info is None or info.get("dead"):
                    gen.workers.append(None)
                    continue
                w = WorkerProcess.resume(gen.id, info, self._loop)
                w.on_message = self._on_worker_message
                self._loop.add_reader(w.child.pidfd, self._on_pidfd, w)
                gen.workers.append(w)
            self.generations[gen.id] = gen
            if gen.state == GenState.DRAINING:
                remaining = max(0.0, (g["drain_deadline"] or now) - now)
                self.drain_deadlines[gen.id] = now + remaining
                task = asyncio.ensure_future(self._reap_drained(gen, remaining))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
        self.active = self.generations.get(state["active"]) if state["active"] else None
        if self.active is not None:
            self.config = self.active.config
            for slot, dead in enumerate(self.active.workers):
                if dead is None:
                    self._respawn(self.active, slot)
        log.info("event=reexec.done version=%s previous=%s generations=%d", __version__,
                 state["version"], len(self.generations))
        self.manager.status(f"re-exec'd swapd {__version__}; {self._status_line()}")
        if state.get("reply_fd") is not None:
            _answer(state["reply_fd"], {"reexec": True, "pid": os.getpid(),
                                        "version": __version__, "previous": state["version"]})

    # -- swaps --------------------------------------------------------------------

    async def request_swap(self, kind: str, origin: str, emit: Emit | None) -> dict[str, Any]:
        """Start a swap, or join the one in flight if it is the same kind."""
        job = self.swap
        if job is None or job.kind != kind or self._stopping():
            self._refuse_if_busy("swap started")
        if job is not None:
            log.info("event=swap.join kind=%s origin=%s gen=%s", kind, origin, job.gen)
            if emit is not None:
                job.subscribers.append(emit)
                emit("joined", f"joined the {kind} in flight (gen={job.gen})", None)
        else:
            job = SwapJob(kind, origin)
            if emit is not None:
                job.subscribers.append(emit)
            self.swap = job
            job.task = asyncio.ensure_future(self._run_swap(job))
        return await asyncio.shield(job.done)

    def _status_line(self) -> str:
        gen = self.active
        if gen is None:
            return "starting"
        return f"gen {gen.id} active, {len(gen.live())} worker(s)"

    async def _run_swap(self, job: SwapJob) -> None:
        log.info("event=swap.start kind=%s origin=%s", job.kind, job.origin)
        self.manager.reloading(f"{job.kind} in progress; {self._status_line()}",
                               _swap_bound(self.config))
        outcome: dict[str, Any]
        try:
            config = self.config
            if job.kind == "reload":
                config = self._reread_config()
                job.emit("config", f"configuration re-read ({config.config_file or 'flags only'})")
            try:
                plan = self.listeners.prepare(config.binds, config.backlog)
            except ListenerError as e:
                raise SwapFailed(str(e)) from e
            try:
                result = await run_swap(self, job, config)
            except BaseException:
                self.listeners.settle(plan, committed=False, binds=())
                raise
            self.listeners.settle(plan, committed=True, binds=config.binds)
            outcome = {"ok": True, **result}
            log.info("event=swap.commit kind=%s gen=%d timings_ms=%s", job.kind, result["gen"],
                     result["timings_ms"])
        except SwapFailed as e:
            outcome = {"ok": False, "error": e.reason, "worker": e.worker, "tail": e.tail,
                       "gen": job.gen, "timings_ms": dict(job.timings)}
            _report_failure("event=swap.failed", e)
        except asyncio.CancelledError:
            outcome = {"ok": False, "error": "swap cancelled (supervisor stopping)",
                       "gen": job.gen}
        except Exception as e:
            log.exception("event=swap.crashed")
            outcome = {"ok": False, "error": f"internal error: {e!r}", "gen": job.gen}
        finally:
            self.swap = None
        outcome.update(kind=job.kind, origin=job.origin,
                       duration_ms=round((time.monotonic() - job.started) * 1000, 1))
        self.last_swap = outcome
        self.swap_counts["ok" if outcome["ok"] else "failed"] += 1
        # READY=1 ends the reload state whether the swap committed or not: sd_notify has no
        # "reload failed"; the status line and `swapd reload`'s exit code tell which.
        failed = "" if outcome["ok"] else f"; last {job.kind} FAILED: {outcome['error']}"
        if self._stopping():  # a swap cancelled by a stop: READY=1 after STOPPING=1 is wrong
            self.manager.status(self._status_line() + failed)
        else:
            self.manager.ready(self._status_line() + failed)
        if not job.done.done():
            job.done.set_result(outcome)

    def _reread_config(self) -> Config:
        try:
            new = load(self.config.config_file, self.overrides)
        except ConfigError as e:
            raise SwapFailed(f"configuration not reloaded: {e}") from e
        if new.control != self.config.control:
            log.warning("event=reload.ignored key=control reason='needs a restart'")
            new = replace(new, control=self.config.control)
        return new

    # -- control ------------------------------------------------------------------

    async def _handle(self, cmd: str, args: dict[str, Any], emit: Emit, peer: Peer
                      ) -> dict[str, Any]:
        log.info("event=control.request cmd=%s peer=%s", cmd, peer)
        if cmd == "status":
            return self.status()
        if cmd == "upgrade" and args.get("self"):
            return await self._reexec(emit, peer)
        if cmd in ("upgrade", "reload"):
            outcome = await self.request_swap(cmd, f"control {peer}", emit)
            if not outcome.get("ok"):
                raise ControlError(str(outcome.get("error")), data=outcome)
            return outcome
        if cmd == "patch":
            return await self._patch(args, emit, peer)
        if cmd == "stop":
            self.request_stop(bool(args.get("fast")))
            assert self._stopped is not None
            await asyncio.shield(self._stopped)
            return {"stopped": True}
        raise ControlError(f"unknown command {cmd!r}")

    async def _patch(self, args: dict[str, Any], emit: Emit, peer: Peer) -> dict[str, Any]:
        action = args.get("action", "apply")
        if action == "list":
            return {"patches": [r.summary() for r in self.journal],
                    "gen": self.active.id if self.active else None}
        if action not in ("apply", "rollback", "squash"):
            raise ControlError(f"unknown patch action {action!r} (apply, rollback, squash, "
                               "list)")
        self._refuse_if_busy("patch")
        rolling = action != "apply" and self.journal
        self.patch_in_flight = self.journal[-1].id if rolling else self._patch_serial + 1
        try:
            if action == "rollback":
                return await patching.rollback(self, emit, peer)
            if action == "squash":
                return await patching.squash(self, emit, peer)
            return await patching.apply(self, args, emit, peer)
        finally:
            self.patch_in_flight = None

    def status(self) -> dict[str, Any]:
        for slot in list(self.crash_loop):
            self._recent_crashes(slot)
        gens = [g for g in self.generations.values() if g.state not in (GenState.EXITED,
                                                                          GenState.FAILED)]
        described = []
        for g in gens:
            d = g.describe()
            for wd, w in zip(d["workers"], [w for w in g.workers if w is not None], strict=True):
                wd.update(_usage(w))
                if w.slot in self.crash_loop and g is self.active:
                    wd["crash_loop"] = True
            described.append(d)
        warnings = []
        for slot in sorted(self.crash_loop):
            warnings.append(f"worker {slot} is in a crash loop ({len(self.crashes[slot])} "
                            f"crashes in {CRASH_WINDOW:g}s)")
        warnings += patching.warnings(self.journal)
        return {
            "patches": [r.summary() for r in self.journal],
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(time.monotonic() - self.started, 3),
            "mode": self.config.mode,
            "control": self.config.control,
            "active": self.active.id if self.active else None,
            "listeners": self.listeners.describe(),
            "generations": described,
            "swap": self.swap.describe() if self.swap else None,
            "last_swap": self.last_swap,
            "swaps": dict(self.swap_counts),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "warnings": warnings,
        }

    # -- stop ---------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.done()

    async def _shutdown(self, fast: bool) -> None:
        log.info("event=supervisor.stopping fast=%s", fast)
        t = self.config.timeouts
        # the swap in flight cancelled, the state stored, the drain and its SIGKILLs
        self.manager.stopping("stopping" + (" (fast)" if fast else ", draining"),
                              t.quiesce + t.drain + 4 * KILL_WAIT)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        job = self.swap
        if job is not None and job.task is not None:
            job.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(job.done), KILL_WAIT * 2)
        active = self.active
        if (not fast and self.manager.fdstore and active is not None
                and active.state == GenState.ACTIVE and active.config.mode == "stateful"):
            await store_state(self, active)
        for gen in list(self.generations.values()):
            if gen.state in (GenState.ACTIVE, GenState.QUIESCED):
                gen.transition(GenEvent.SUPERSEDE)
                if not fast:
                    self._drain(gen, gen.config.timeouts.drain)
            if fast:
                self._kill_workers(gen)
        waiting: list[asyncio.Future[Any]] = [t for t in self._drains if not t.done()]
        waiting += [w.exited for g in self.generations.values() for w in g.live()]
        if waiting:
            await asyncio.wait(waiting,
                               timeout=self.config.timeouts.drain + KILL_WAIT * 2)
        for gen in self.generations.values():
            for w in gen.live():
                log.error("event=worker.unkillable %s", w.tag)

    def _close_listeners(self) -> None:
        # With the fd store, the sockets live on for the next supervisor (restart, crash):
        # their unix paths must stay.
        self.listeners.close_all(unlink=not self.manager.fdstore)

    def _close_control(self) -> None:
        if self._control_sock is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.control)
            self._control_sock.close()
            self._control_sock = None


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _swap_bound(config: Config) -> float:
    """The longest a swap can take with every deadline run out: what systemd is promised."""
    t = config.timeouts
    bound = t.ready + KILL_WAIT  # all ready, or the new generation killed
    if config.mode == "stateful":
        if config.precopy:
            bound += t.ready + t.restore  # the bulk, shipped and loaded
        bound += t.quiesce + t.restore  # the pause
        bound += max(t.restore, t.quiesce + t.restore)  # commit acks, or the old one resumed
    return bound


def _answer(fd: int, data: dict[str, Any]) -> None:
    """The result line of `upgrade --self`, written by the new image to the old connection."""
    line = json.dumps({"v": 1, "type": "result", "ok": True, "data": data}).encode() + b"\n"
    try:
        os.write(fd, line)
    except OSError as e:
        log.warning("event=reexec.reply_failed error=%r", str(e))
    finally:
        os.close(fd)


def _base_env(environ: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """The environment every worker starts from: ours minus what only we may use."""
    drop = (*LISTEN_ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in environ.items() if k not in drop and not k.startswith("SWAPD_")}


def _usage(w: WorkerProcess) -> dict[str, Any]:
    if w.child.status is not None:
        return {}
    try:
        p = psutil.Process(w.pid)
        with p.oneshot():
            mem = p.memory_info().rss
            cpu = p.cpu_times()
            children = p.children(recursive=True)
        return {"rss": mem, "cpu_seconds": round(cpu.user + cpu.system, 3),
                "children": len(children)}
    except psutil.Error:
        return {}


def _report_failure(event: str, e: SwapFailed) -> None:
    log.error("%s reason=%r", event, e.reason)
    if e.tail:
        log.error("%s output tail of %s:\n%s", event, e.worker, e.tail)
