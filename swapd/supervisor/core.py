"""The supervisor: owns listeners, the control socket and generations; runs swaps.

It is never in the data path: workers accept straight from the shared listen
queues. Its event loop sleeps until something happens (a pidfd becomes readable,
a channel or notify datagram arrives, a control request, a signal, a deadline);
nothing polls.

Signals only record an intent that the loop acts on (asyncio's signal handlers
already run inside the loop): HUP = reload, TERM/INT = graceful stop (drain, exit
0), QUIT = fast stop (workers killed), CHLD = look for strays to reap.

SIGHUPs coalesce: with no change in flight the first starts a reload; those that
arrive while a swap or a patch is in flight (however many) make exactly one more
reload once it is over. That reload re-reads the configuration, so an edit written
during the change in flight is never missed, and a burst never makes more than one
generation per swap it overlaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import replace
from typing import Any

from swapd import __version__, control
from swapd.commands import (
    COMMANDS,
    Args,
    HistoryArgs,
    PatchArgs,
    ReloadArgs,
    RollbackArgs,
    StatusArgs,
    StopArgs,
    UpgradeArgs,
)
from swapd.config import Config, ConfigError, load
from swapd.control import ControlError, ControlServer, Emit, Peer, bind_control
from swapd.sockets import (
    STATE_NAME,
    AddressError,
    describe,
)
from swapd.supervisor import patching, reexec
from swapd.supervisor.deploys import Deploys, patch_fields, swap_options
from swapd.supervisor.fleet import KILL_WAIT, Fleet, SpawnFailed
from swapd.supervisor.generation import Generation
from swapd.supervisor.journal import Journal
from swapd.supervisor.lifecycle import GenEvent, GenState
from swapd.supervisor.listeners import ListenerError, Listeners
from swapd.supervisor.manager import ServiceManager, split_inherited
from swapd.supervisor.metrics import MetricsUnavailable
from swapd.supervisor.ops import Operations, Who, who_control, who_signal
from swapd.supervisor.process import OsProcesses
from swapd.supervisor.reloads import ReloadSignals
from swapd.supervisor.selfexec import SelfExec
from swapd.supervisor.status import report as status_report
from swapd.supervisor.strays import STRAY_GRACE
from swapd.supervisor.swap import (
    SwapFailed,
    SwapJob,
    activate,
    committed,
    restore_stored,
    run_swap,
    store_state,
    swap_bound,
    wait_ready,
)
from swapd.supervisor.watch import HealthUrlError, SwapOptions, check_health_url
from swapd.systemd import LISTEN_ENV

log = logging.getLogger("swapd")

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
        release: str | None = None,
    ) -> None:
        self._config = config  # until a generation is active; then its config
        self.overrides = overrides
        self.swap: SwapJob | None = None
        self.last_swap: dict[str, Any] | None = None
        self.swap_counts = {"ok": 0, "failed": 0}
        self.journal = Journal()  # patches in force in the active generation
        self.patch_in_flight: int | None = None
        self.started = time.monotonic()
        self._control_sock: socket.socket | None = None
        self._control: ControlServer | None = None
        self._stop_requested: asyncio.Future[bool] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resumed: reexec.State | None = None  # when we are the new image of a re-exec
        self.manager = ServiceManager(fdstore=config.fdstore)
        self.listeners = Listeners(self.manager)
        self.fleet = Fleet(processes or OsProcesses(), self.listeners, self.journal,
                           _base_env(os.environ), self._stopping)
        self.first_release = release  # the first generation's label (None: derived)
        self.ops = Operations(config)  # history and metrics
        self.fleet.on_event = self.ops.worker_event
        self.deploys = Deploys(self.fleet, self.listeners, self.manager, self.ops,
                               self._stopping, self._status_line,
                               lambda: swap_bound(self.config))
        self.reloads = ReloadSignals(
            self._change_in_flight,
            lambda: self.request_swap("reload", "SIGHUP", None,
                                      SwapOptions(who=who_signal("SIGHUP"))),
            ControlError, self._stopping,
            lambda: self.fleet.active is not None and not self._stopping(),
            self.manager, self._status_line, lambda: swap_bound(self.config), self.fleet.tasks)
        self.selfexec = SelfExec(self.fleet, self.listeners, self.journal, self.manager,
                                 self.ops, self.deploys, self._owned, self._stopping,
                                 self._status_line)
        self._stop_who: Who = {"via": "control"}
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
            self.listeners.bind_missing(self.config.binds, self.config.backlog,
                                        self.config.timeouts.drain)
            if not self.listeners:
                raise StartupError("no listeners: give --bind NAME=ADDR (or use socket activation)")
            self._control_sock = bind_control(self.config.control)
            self.listeners.store_all()
            self._prepare_ops()
        except OSError as e:
            self._close_listeners()
            raise StartupError(e.strerror or str(e)) from e
        except AddressError as e:  # an inherited fd that is not a listening stream socket
            self._close_listeners()
            raise StartupError(f"socket activation: {e}") from e
        except StartupError:
            self._close_listeners()
            self._close_control()
            raise

    def _prepare_ops(self) -> None:
        health = self.config.health
        if health is not None and health[0] is not None and health[0] not in {
                lis.name for lis in self.listeners}:
            raise StartupError(f"health_url {self.config.health_url}: no listener named "
                               f"{health[0]!r}")
        try:
            self.ops.prepare()
        except MetricsUnavailable as e:
            raise StartupError(str(e)) from e
        except OSError as e:
            raise StartupError(f"metrics endpoint {self.config.metrics}: "
                               f"{e.strerror or e}") from e

    @property
    def config(self) -> Config:
        """The configuration in force: the active generation's."""
        active = self.fleet.active
        return active.config if active is not None else self._config

    # -- main loop --------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.fleet.attach(loop)
        self.ops.attach(loop, lambda: self.deploys.snapshot(self.swap is not None))
        self._stop_requested = loop.create_future()
        self._stopped = loop.create_future()
        assert self._control_sock is not None
        self._control = ControlServer(self._control_sock, self._handle, COMMANDS)
        await self._control.start()
        self._install_signals()
        self.manager.start_watchdog(loop)
        # What a worker forks and leaves is reparented to us, not to init: found and ended.
        subreaper = self.fleet.processes.become_subreaper()
        log.info("event=supervisor.start pid=%d version=%s control=%s listeners=%s "
                 "subreaper=%s", os.getpid(), __version__, self.config.control,
                 ",".join(f"{lis.name}={describe(lis.sock)}" for lis in self.listeners),
                 "pid1" if os.getpid() == 1 else subreaper)
        code = 0
        try:
            if self._resumed is not None:
                self.selfexec.resume(self._resumed)
                self.fleet.strays.scan()  # workers adopted: reap what exited during the exec
            else:
                first = await self._first_unless_stopped()
                if first is not None:
                    await self._check_health_url(first)
                    log.info("event=supervisor.ready gen=%d workers=%d release=%s", first.id,
                             len(first.workers), first.release)
                    self.ops.started(first, round((time.monotonic() - self.started) * 1000, 1))
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
            self.fleet.strays.close()
            self.manager.stop_watchdog()
            if not self._stopped.done():
                self._stopped.set_result(None)  # lets a waiting `swapd stop` get its answer
            await self._control.close()
            self._close_control()
            self._close_listeners()
            self.ops.close()
            log.info("event=supervisor.exit code=%d", code)
        return code

    async def _first_unless_stopped(self) -> Generation | None:
        """The first generation; a stop asked for while it starts cancels the start (None):
        `swapd stop` never waits out a `ready_timeout`."""
        assert self._stop_requested is not None
        start = asyncio.ensure_future(self._start_first())
        either: set[asyncio.Future[Any]] = {start, self._stop_requested}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            return start.result()
        log.info("event=start.cancelled reason='stop requested'")
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        return None

    async def _start_first(self) -> Generation:
        """The first generation, restoring a snapshot the fd store kept, if there is one."""
        t = self.config.timeouts
        self.manager.extend(t.ready + t.restore + KILL_WAIT)  # a slow first start is no failure
        stored = self.stored_state if self.config.mode == "stateful" else {}
        if self.stored_state and not stored:
            log.warning("event=state.ignored reason='stored state but mode is stateless'")
        try:
            try:
                first = self.fleet.start_generation(self.config, successor_of=None,
                                                    restore_slots=set(stored),
                                                    release=self.first_release)
            except SpawnFailed as e:
                raise StartupError(str(e), code=2) from e
            try:
                await wait_ready(first, first.config.timeouts.ready)
                first.transition(GenEvent.READY)
                _check_can_hand_over(first)
                if stored:
                    await restore_stored(first, stored, self.config)
            except asyncio.CancelledError:
                await self.fleet.kill_generation(first)
                raise
            except StartupError:
                await self.fleet.kill_generation(first)
                raise
            except SwapFailed as e:
                await self.fleet.kill_generation(first)
                _report_failure("event=start.failed", e)
                if not stored:
                    raise StartupError(e.reason, code=1, tail=e.tail) from e
                log.error("event=state.restore_failed reason=%r action='start fresh: the stored "
                          "state is lost'", e.reason)
                self._drop_stored_state()
                return await self._start_first()
        finally:
            self._drop_stored_state()
        self.fleet.commit(first, None)
        if first.config.mode == "stateful":
            await activate(self.fleet, first, self.config, SwapJob("start", "start"))
        return first

    async def _check_health_url(self, first: Generation) -> None:
        """Bad input refused at start: a health URL the first generation does not answer
        with HTTP 2xx (not an HTTP listener, a 404...) would roll every watched swap back."""
        try:
            await check_health_url(self.listeners, self.config)
        except HealthUrlError as e:
            log.error("event=start.failed reason=%r", str(e))
            await self.fleet.kill_generation(first)
            raise StartupError(str(e), code=2) from e

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
        self._loop.add_signal_handler(signal.SIGHUP, self.reloads.on_sighup)
        self._loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM", False)
        self._loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT", False)
        self._loop.add_signal_handler(signal.SIGQUIT, self._on_stop_signal, "SIGQUIT", True)
        self._loop.add_signal_handler(signal.SIGCHLD, self.fleet.strays.on_sigchld)

    def _remove_signals(self) -> None:
        if self._loop is None:
            return
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                    signal.SIGCHLD):
            self._loop.remove_signal_handler(sig)

    def _change_in_flight(self) -> str | None:
        """The swap or patch in flight that a SIGHUP waits for (None: none, or nothing a
        reload could follow: still starting, a re-exec; the reload is then refused)."""
        if self.fleet.active is None or self._stopping():
            return None
        if self.swap is not None:
            return f"the {self.swap.kind} in flight (gen={self.swap.gen})"
        if self.patch_in_flight is not None:
            return f"patch {self.patch_in_flight}"
        return None

    def _on_stop_signal(self, name: str, fast: bool) -> None:
        self._stop_who = who_signal(name)
        self.request_stop(fast)

    def request_stop(self, fast: bool = False) -> None:
        if self._stop_requested is not None and not self._stop_requested.done():
            log.info("event=stop.requested fast=%s", fast)
            self._stop_requested.set_result(fast)

    # -- re-exec (upgrade --self) ----------------------------------------------------

    def _owned(self) -> reexec.Owned:
        """For a re-exec's capture: what we own besides the fleet and the listeners."""
        assert self._control_sock is not None
        return reexec.Owned(self.config, self.overrides, self._control_sock.fileno(),
                            self.started, self.swap_counts, self.last_swap)

    def _refuse_if_busy(self, what: str) -> None:
        """One change at a time: a swap, a patch or a re-exec."""
        if self._stopping():
            raise ControlError(f"supervisor is stopping; no {what}")
        if self.fleet.active is None:
            raise ControlError(f"supervisor is still starting; no {what}")
        if self.selfexec.in_flight:
            raise ControlError("a re-exec (upgrade --self) is in flight; retry when it finishes")
        if self.swap is not None:
            raise ControlError(f"{_a(self.swap.kind)} is in flight (gen={self.swap.gen}, "
                               f"started {time.monotonic() - self.swap.started:.1f}s ago); "
                               "retry when it finishes")
        if self.patch_in_flight is not None:
            raise ControlError(f"patch {self.patch_in_flight} is in flight; retry when it "
                               "finishes")
        if self.deploys.busy():
            raise ControlError(f"no {what}: {self.deploys.busy()}")

    @classmethod
    def from_reexec(cls, state: reexec.State) -> Supervisor:
        """The new image after `upgrade --self`: adopt what the old one owned."""
        sup = cls(state.config, state.overrides)
        sup._resumed = state
        sup.started = state.started
        sup.swap_counts = dict(state.swaps)
        sup.last_swap = state.last_swap
        sup._control_sock = sup.selfexec.adopt(state)
        return sup

    # -- swaps --------------------------------------------------------------------

    async def request_swap(self, kind: str, origin: str, emit: Emit | None,
                           opts: SwapOptions | None = None) -> dict[str, Any]:
        """Start a swap, or join the one in flight if it is the same kind."""
        opts = opts or SwapOptions()
        job = self.swap
        if job is None or job.kind != kind or self._stopping():
            try:
                self._refuse_if_busy("swap started")
            except ControlError as e:
                self.ops.refused(kind, opts.who, str(e))
                raise
        if job is not None:
            log.info("event=swap.join kind=%s origin=%s gen=%s", kind, origin, job.gen)
            if emit is not None:
                job.subscribers.append(emit)
                emit(control.DEADLINE, "", {"seconds": job.remaining()})
                emit("joined", f"joined the {kind} in flight (gen={job.gen})", None)
        else:
            job = SwapJob(kind, origin, release=opts.release, who=opts.who,
                          bound=swap_bound(self.config) + KILL_WAIT)
            if emit is not None:
                job.subscribers.append(emit)
                emit(control.DEADLINE, "", {"seconds": job.remaining()})
            self.swap = job
            job.task = asyncio.ensure_future(self._run_swap(job, opts))
        return await asyncio.shield(job.done)

    def _status_line(self) -> str:
        gen = self.fleet.active
        if gen is None:
            return "starting"
        return f"gen {gen.id} active, {len(gen.live())} worker(s)"

    async def _run_swap(self, job: SwapJob, opts: SwapOptions) -> None:
        log.info("event=swap.start kind=%s origin=%s", job.kind, job.origin)
        before = self.fleet.active
        journal = list(self.journal.records)  # the held generation's, should it come back
        self.manager.reloading(f"{job.kind} in progress; {self._status_line()}",
                               swap_bound(self.config))
        outcome: dict[str, Any]
        try:
            config = self.config
            if job.kind == "reload":
                config = self._reread_config()
                job.extend(swap_bound(config) + KILL_WAIT)  # its timeouts may be longer
                job.emit("config", f"configuration re-read ({config.config_file or 'flags only'})")
            job.watch = opts.watch if opts.watch is not None else config.watch
            why = self.deploys.why_not(before, job.watch)
            if why is not None:
                raise SwapFailed(why)
            try:
                plan = self.listeners.prepare(config.binds, config.backlog)
            except ListenerError as e:
                raise SwapFailed(str(e)) from e
            try:
                result = await run_swap(self.fleet, job, config)
            except BaseException:
                # (an error after the commit is still a commit: its listeners stay)
                self.listeners.settle(plan, committed=job.committed,
                                      binds=config.binds if job.committed else ())
                raise
            self.listeners.settle(plan, committed=True, binds=config.binds)
            outcome = {"ok": True, **result}
            if job.watch > 0 and before is not None:
                outcome["watch"] = self.deploys.open_watch(job.watch, before, journal)
            log.info("event=swap.commit kind=%s gen=%d timings_ms=%s", job.kind, result["gen"],
                     result["timings_ms"])
        except SwapFailed as e:
            outcome = {"ok": False, "error": e.reason, "worker": e.worker, "tail": e.tail,
                       "gen": job.gen, "timings_ms": dict(job.timings),
                       "warnings": list(job.warnings)}
            _report_failure("event=swap.failed", e)
        except (asyncio.CancelledError, Exception) as e:
            if isinstance(e, asyncio.CancelledError):
                error = "swap cancelled (supervisor stopping)"
            else:
                log.exception("event=swap.crashed")
                error = f"internal error: {e!r}"
            if job.committed:  # what happened is a commit: say so, and what went wrong after
                assert job.gen is not None
                job.warn(f"after the commit: {error}")
                outcome = {"ok": True, **committed(job, job.gen, job.previous)}
            else:
                outcome = {"ok": False, "error": error, "gen": job.gen,
                           "warnings": list(job.warnings)}
        finally:
            self.swap = None
        outcome.update(kind=job.kind, origin=job.origin,
                       duration_ms=round((time.monotonic() - job.started) * 1000, 1))
        self.last_swap = outcome
        self.swap_counts["ok" if outcome["ok"] else "failed"] += 1
        self.ops.swap_done(outcome, job.who or {"origin": job.origin}, before,
                           self.fleet.generations.get(job.gen) if job.gen else None, job.watch)
        # READY=1 ends the reload state whether the swap committed or not: sd_notify has no
        # "reload failed"; the status line and `swapd reload`'s exit code tell which.
        failed = "" if outcome["ok"] else f"; last {job.kind} FAILED: {outcome['error']}"
        # Not READY=1 either while a SIGHUP waits for its reload: that one is the end of it.
        if self._stopping() or self.reloads.pending:  # READY=1 after STOPPING=1 is wrong too
            self.manager.status(self._status_line() + failed)
        else:
            self.manager.ready(self._status_line() + failed)
        if not job.done.done():
            job.done.set_result(outcome)
        self.reloads.change_over()

    def _reread_config(self) -> Config:
        try:
            new = load(self.config.config_file, self.overrides)
        except ConfigError as e:
            raise SwapFailed(f"configuration not reloaded: {e}") from e
        if new.control != self.config.control:
            log.warning("event=reload.ignored key=control reason='needs a restart'")
            new = replace(new, control=self.config.control)
        for key in ("metrics", "state_dir"):  # bound or opened once, at start
            if getattr(new, key) != getattr(self.config, key):
                log.warning("event=reload.ignored key=%s reason='needs a restart'", key)
                new = replace(new, **{key: getattr(self.config, key)})
        return new

    # -- control ------------------------------------------------------------------

    async def _handle(self, cmd: str, args: Args, emit: Emit, peer: Peer) -> dict[str, Any]:
        log.info("event=control.request cmd=%s peer=%s", cmd, peer)
        if isinstance(args, StatusArgs):
            return self.status()
        if isinstance(args, UpgradeArgs) and args.self_:
            emit(control.DEADLINE, "", {"seconds": reexec.CHECK_TIMEOUT + KILL_WAIT * 3})
            self._refuse_if_busy("re-exec")
            return await self.selfexec.run(emit, peer)
        if isinstance(args, UpgradeArgs | ReloadArgs):
            opts = swap_options(args, who_control(peer))
            outcome = await self.request_swap(cmd, f"control {peer}", emit, opts)
            if not outcome.get("ok"):
                raise ControlError(str(outcome.get("error")), data=outcome)
            if opts.wait_watch and "watch" in outcome:
                return await self.deploys.wait_watch(outcome, emit)
            return outcome
        if isinstance(args, RollbackArgs):
            return await self.deploys.rollback(peer)
        if isinstance(args, HistoryArgs):
            return await self.deploys.history(args)
        if isinstance(args, PatchArgs):
            emit(control.DEADLINE, "", {"seconds": patching.bound(len(args.parts or ()) or 1)})
            return await self._patch(args, emit, peer)
        if isinstance(args, StopArgs):
            emit(control.DEADLINE, "", {"seconds": self._stop_bound() + 2 * KILL_WAIT})
            if not self._stopping():
                self._stop_who = who_control(peer)
            self.request_stop(args.fast)
            assert self._stopped is not None
            await asyncio.shield(self._stopped)
            return {"stopped": True}
        raise ControlError(f"unknown command {cmd!r}")

    async def _patch(self, args: PatchArgs, emit: Emit, peer: Peer) -> dict[str, Any]:
        if args.action == "list":
            return {"patches": self.journal.summaries(),
                    "gen": self.fleet.active.id if self.fleet.active else None}
        self._refuse_if_busy("patch")
        last = self.journal.last
        rolling = args.action != "apply" and last is not None
        self.patch_in_flight = last.id if rolling and last else self.journal.serial + 1
        gen = self.fleet.active.id if self.fleet.active else None
        try:
            if args.action == "rollback":
                data = await patching.rollback(self.fleet.active, self.journal, emit, peer)
            elif args.action == "squash":
                data = await patching.squash(self.fleet.active, self.journal, emit, peer)
            else:
                data = await patching.apply(self.fleet.active, self.journal, args, emit, peer)
        except ControlError as e:
            self.ops.patch_done(args.action, False, who_control(peer), gen,
                                {**patch_fields(args), **e.data}, str(e))
            raise
        finally:
            self.patch_in_flight = None
            self.reloads.change_over()
        self.ops.patch_done(args.action, True, who_control(peer), gen,
                            {**patch_fields(args), **data}, None)
        return data

    def status(self) -> dict[str, Any]:
        return status_report(self)

    # -- stop ---------------------------------------------------------------------

    def _stop_bound(self) -> float:
        """The longest a stop takes: the swap in flight cancelled, the state stored, the drain
        and its SIGKILLs."""
        t = self.config.timeouts
        return t.quiesce + t.drain + 4 * KILL_WAIT + STRAY_GRACE

    def _stopping(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.done()

    async def _shutdown(self, fast: bool) -> None:
        log.info("event=supervisor.stopping fast=%s", fast)
        self.manager.stopping("stopping" + (" (fast)" if fast else ", draining"),
                              self._stop_bound())
        fleet = self.fleet
        stopped_gen = fleet.active
        began = time.monotonic()
        await self.deploys.stop()
        fleet.cancel_timers()
        job = self.swap
        if job is not None and job.task is not None:
            job.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(job.done), KILL_WAIT * 2)
        active = fleet.active
        if (not fast and self.manager.fdstore and active is not None
                and active.state == GenState.ACTIVE and active.config.mode == "stateful"):
            await store_state(active, self.manager.store_state)
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
                               timeout=self.config.timeouts.drain + KILL_WAIT * 2)
        for gen in fleet.generations.values():
            for w in gen.live():
                log.error("event=worker.unkillable %s", w.tag)
        # Their process groups are being ended already; now every other child, so that
        # nothing a worker started keeps the listeners (and the port) after we exit.
        fleet.strays.scan(final=True, grace=0 if fast else STRAY_GRACE)
        for pid in await fleet.strays.wait(STRAY_GRACE + KILL_WAIT):
            log.error("event=stray.unkillable pid=%d", pid)
        self.ops.stopped(self._stop_who, fast, stopped_gen,
                         round((time.monotonic() - began) * 1000, 1))

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


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _base_env(environ: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """The environment every worker starts from: ours minus what only we may use."""
    drop = (*LISTEN_ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in environ.items() if k not in drop and not k.startswith("SWAPD_")}


def _report_failure(event: str, e: SwapFailed) -> None:
    log.error("%s reason=%r", event, e.reason)
    if e.tail:
        log.error("%s output tail of %s:\n%s", event, e.worker, e.tail)
