"""The supervisor: owns listeners, the control socket and generations; runs swaps.

This module is the orchestration: the event loop's life, one change at a time (a swap,
a patch, a re-exec), the control requests, the signals, the swap record. What it calls
runs in this process too and gets only what it needs: start-up (startup.py), the swap
itself (swap.py), SIGHUP coalescing (reloads.py), after a commit (deploys.py), `upgrade
--self` (selfexec.py), the status report (status.py), the stop (shutdown.py).

It is never in the data path: workers accept straight from the shared listen
queues. Its event loop sleeps until something happens (a pidfd becomes readable,
a channel or notify datagram arrives, a control request, a signal, a deadline);
nothing polls.

Signals only record an intent that the loop acts on (asyncio's signal handlers
already run inside the loop): HUP = reload, TERM/INT = graceful stop (drain, exit
0), QUIT = fast stop (workers killed), CHLD = look for strays to reap. A graceful stop
in progress is escalated to a fast one by `stop --fast`, QUIT, or another TERM/INT (as
gunicorn's second INT); another graceful `stop` is told it is in progress and waits.

SIGHUPs coalesce: with no change in flight the first starts a reload; those that
arrive while the first generation starts, or a swap or a patch is in flight (however
many) make exactly one more reload once it is over. That reload re-reads the
configuration, so an edit written during the change in flight is never missed, and a
burst never makes more than one generation per swap it overlaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from swapd import __version__, control, logsink
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
from swapd.config import Config
from swapd.control import ControlError, ControlServer, Emit, Peer, bind_control
from swapd.sockets import AddressError, describe
from swapd.supervisor import patching, reexec
from swapd.supervisor.deploys import Deploys, patch_fields, swap_options
from swapd.supervisor.fleet import KILL_WAIT, Fleet
from swapd.supervisor.generation import Generation
from swapd.supervisor.journal import Journal
from swapd.supervisor.listeners import ListenerError, Listeners
from swapd.supervisor.manager import ServiceManager
from swapd.supervisor.ops import Operations, Who, who_control, who_signal
from swapd.supervisor.process import OsProcesses
from swapd.supervisor.reloads import ReloadSignals, reread_config
from swapd.supervisor.selfexec import SelfExec
from swapd.supervisor.shutdown import StopRequest, shutdown
from swapd.supervisor.startup import FirstStart, StartupError, prepare_ops
from swapd.supervisor.status import report as status_report
from swapd.supervisor.swap import run_swap, swap_bound
from swapd.supervisor.swapjob import SwapFailed, SwapJob, committed
from swapd.supervisor.watch import SwapOptions
from swapd.systemd import LISTEN_ENV

log = logging.getLogger("swapd")


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
        self.stop_request = StopRequest()  # who asked, when, fast or escalated since
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resumed: reexec.State | None = None  # when we are the new image of a re-exec
        self._ready = False  # READY=1 said: the first generation serves (or we re-exec'd)
        self.manager = ServiceManager(fdstore=config.fdstore)
        self.listeners = Listeners(self.manager)
        self.fleet = Fleet(processes or OsProcesses(), self.listeners, self.journal,
                           _base_env(os.environ), self._stopping)
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
            lambda: self._ready and not self._stopping(),
            self.manager, self._status_line, lambda: swap_bound(self.config), self.fleet.tasks)
        self.selfexec = SelfExec(self.fleet, self.listeners, self.journal, self.manager,
                                 self.ops, self.deploys, self._owned, self._stopping,
                                 self._status_line)
        # LISTEN_FDS may carry, besides listeners, snapshots a previous supervisor stored.
        self.first_start = FirstStart(self.fleet, self.listeners, self.manager,
                                      inherited or [], release)

    # -- start-up (synchronous: errors here mean exit 2, nothing started) --------

    def prepare(self) -> None:
        """Bind listeners and the control socket; raise StartupError with one line."""
        try:
            self.listeners.adopt_inherited(self.first_start.activated,
                                           self.first_start.stored_listeners,
                                           dict(self.config.binds))
            self.listeners.bind_missing(self.config.binds, self.config.backlog,
                                        self.config.timeouts.drain)
            if not self.listeners:
                raise StartupError("no listeners: give --bind NAME=ADDR (or use socket activation)")
            self._control_sock = bind_control(self.config.control)
            self.listeners.store_all()
            prepare_ops(self.config, self.listeners, self.ops)
        except OSError as e:  # the control socket too, if it was bound (store_all failed)
            self._close_listeners()
            self._close_control()
            raise StartupError(e.strerror or str(e)) from e
        except AddressError as e:  # an inherited fd that is not a listening stream socket
            self._close_listeners()
            self._close_control()
            raise StartupError(f"socket activation: {e}") from e
        except StartupError:
            self._close_listeners()
            self._close_control()
            raise

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
        logsink.start_queue()  # from here on, a slow log sink must not stall the loop
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
                self._ready = True
                self.fleet.strays.scan()  # workers adopted: reap what exited during the exec
            else:
                first = await self._first_unless_stopped()
                if first is not None:
                    await self.first_start.check_health_url(first, self.config)
                    log.info("event=supervisor.ready gen=%d workers=%d release=%s", first.id,
                             len(first.workers), first.release)
                    self.ops.started(first, round((time.monotonic() - self.started) * 1000, 1))
                    self.manager.ready(self._status_line())
                    self._ready = True
                self.reloads.change_over()  # a SIGHUP during the start: its reload now
            await self._stop_requested
            await self._shutdown()
        except StartupError as e:
            code = e.code
            raise
        except BaseException:
            code = 1
            raise
        finally:
            try:
                self._remove_signals()
                self.fleet.strays.close()
                self.manager.stop_watchdog()
                if not self._stopped.done():
                    self._stopped.set_result(None)  # a waiting `swapd stop` gets its answer
                await self._control.close()
                self._close_control()
                self._close_listeners()
                self.ops.close()
                log.info("event=supervisor.exit code=%d", code)
            finally:
                logsink.stop_queue()  # every line out before we return (and print, or exit)
        return code

    async def _first_unless_stopped(self) -> Generation | None:
        """The first generation; a stop asked for while it starts cancels the start (None):
        `swapd stop` never waits out a `ready_timeout`."""
        assert self._stop_requested is not None
        start = asyncio.ensure_future(self.first_start.start(self.config))
        either: set[asyncio.Future[Any]] = {start, self._stop_requested}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            return start.result()
        log.info("event=start.cancelled reason='stop requested'")
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        return None

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
        """The start, swap or patch in flight that a SIGHUP waits for (None: none, or
        nothing a reload could follow: a re-exec, a watch window; it is then refused)."""
        if self._stopping():
            return None
        if not self._ready:
            return "the first start"
        if self.swap is not None:
            return f"the {self.swap.kind} in flight (gen={self.swap.gen})"
        if self.patch_in_flight is not None:
            return f"patch {self.patch_in_flight}"
        return None

    def _on_stop_signal(self, name: str, fast: bool) -> None:
        # A second TERM/INT during a graceful stop means "now" (gunicorn, systemd users).
        self.request_stop(fast or self._stopping(), who_signal(name))

    def request_stop(self, fast: bool = False, who: Who | None = None) -> str:
        """Ask for a stop: "started", "escalated" or "in progress" (shutdown.StopRequest)."""
        who = who or {"via": "control"}
        what = self.stop_request.ask(fast, who, _origin(str(who.get("signal", "control")), who),
                                     self.fleet, self.manager)
        if what == "started" and self._stop_requested is not None:
            self._stop_requested.set_result(fast)
        return what

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
        """Start a swap, or join the one in flight if it is the same kind and what this
        request asks (release, watch window) is what the one in flight will give."""
        opts = opts or SwapOptions()
        job = self.swap
        try:
            if job is None or job.kind != kind or self._stopping():
                self._refuse_if_busy("swap started")
            else:
                self._refuse_if_other_options(job, opts)
        except ControlError as e:
            self.ops.refused(kind, opts.who, str(e))
            raise
        if job is not None:
            log.info("event=swap.join kind=%s %s gen=%s", kind, _origin(origin, opts.who), job.gen)
            if emit is not None:
                job.subscribers.append(emit)
                emit(control.DEADLINE, "", {"seconds": job.remaining()})
                emit("joined", f"joined the {kind} in flight (gen={job.gen})", None)
        else:
            job = SwapJob(kind, origin, release=opts.release, who=opts.who,
                          bound=swap_bound(self.config) + KILL_WAIT,
                          watch=opts.watch if opts.watch is not None else self.config.watch)
            if emit is not None:
                job.subscribers.append(emit)
                emit(control.DEADLINE, "", {"seconds": job.remaining()})
            self.swap = job
            job.task = asyncio.ensure_future(self._run_swap(job, opts))
        return await asyncio.shield(job.done)

    def _refuse_if_other_options(self, job: SwapJob, opts: SwapOptions) -> None:
        """A request joins only a swap that gives it what it asks: one that asked for
        another release label or watch window is refused, not told "ok" for a release it
        did not get or a safety net that does not exist. (`--wait-watch` only changes how
        the caller waits: it may differ.)"""
        gen = self.fleet.generations.get(job.gen) if job.gen is not None else None
        release = job.release or (gen.release if gen is not None else None)
        asked = []
        if opts.release is not None and opts.release != release:
            asked.append(f"release {opts.release}")
        if opts.watch is not None and opts.watch != job.watch:
            asked.append(f"watch {opts.watch:g}s")
        if not asked:
            return
        what = (f"release {release}" if release else "a release label still to be derived"
                ) + f", watch {job.watch:g}s"
        raise ControlError(f"{_a(job.kind)} with {what} is in flight (gen="
                           f"{job.gen if job.gen is not None else 'starting'}); not "
                           f"joined: this request asks for {', '.join(asked)}; retry when it "
                           "finishes")

    def _status_line(self) -> str:
        gen = self.fleet.active
        if gen is None:
            return "starting"
        return f"gen {gen.id} active, {len(gen.live())} worker(s)"

    async def _run_swap(self, job: SwapJob, opts: SwapOptions) -> None:
        log.info("event=swap.start kind=%s %s", job.kind, _origin(job.origin, job.who))
        before = self.fleet.active
        journal = list(self.journal.records)  # the held generation's, should it come back
        self.manager.reloading(f"{job.kind} in progress; {self._status_line()}",
                               swap_bound(self.config))
        outcome: dict[str, Any]
        try:
            config = self.config
            if job.kind == "reload":
                config, ignored = reread_config(config, self.overrides)
                job.extend(swap_bound(config) + KILL_WAIT)  # its timeouts may be longer
                job.emit("config", f"configuration re-read ({config.config_file or 'flags only'})")
                for warning in ignored:
                    job.warn(warning)
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
            e.report("event=swap.failed")
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

    # -- control ------------------------------------------------------------------

    async def _handle(self, cmd: str, args: Args, emit: Emit, peer: Peer) -> dict[str, Any]:
        log.info("event=control.request cmd=%s peer_pid=%d peer_uid=%d", cmd, peer.pid, peer.uid)
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
            what = self.request_stop(args.fast, who_control(peer))
            emit(control.DEADLINE, "",
                 {"seconds": self.stop_request.left(self.config) + 2 * KILL_WAIT})
            if what != "started":
                emit(what.replace(" ", "_"), self.stop_request.say(what, self.config), None)
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

    def _stopping(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.done()

    async def _shutdown(self) -> None:
        stopped_gen = self.fleet.active
        began = time.monotonic()
        await shutdown(self, self.stop_request)
        self.ops.stopped(self.stop_request.who, self.stop_request.fast, stopped_gen,
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


def _origin(origin: str, who: Who) -> str:
    """Who asked, as log fields: a control client is `origin=control client_pid=N
    client_uid=N` (`pid` in a log line is a worker's)."""
    if who.get("via") == "control":
        return f"origin=control client_pid={who.get('pid')} client_uid={who.get('uid')}"
    return f"origin={origin}"


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _base_env(environ: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """The environment every worker starts from: ours minus what only we may use."""
    drop = (*LISTEN_ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in environ.items() if k not in drop and not k.startswith("SWAPD_")}
