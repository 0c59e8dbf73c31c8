"""The `Worker` class: one application process's lifecycle under swapd (see `swapd.worker`
for the picture and the public names)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable, Container
from typing import TYPE_CHECKING, Any, ClassVar

# Imported here, not at first use: its import cost must stay outside the handoff pause.
from swapd import __version__, handoff
from swapd import messages as m
from swapd.channel import Channel, ChannelError, Message
from swapd.handoff import SharedBuffer, TrackedDict
from swapd.patch.source import record_sources
from swapd.systemd import Notifier
from swapd.worker.client import Connection, HandedOff, Handler
from swapd.worker.errors import WorkerError
from swapd.worker.hub import ConnectionHub
from swapd.worker.link import LinkReceiver, LinkSender
from swapd.worker.process import (
    env_seconds,
    install_signals,
    listeners_from_env,
    raise_nofile,
    restore_signals,
)
from swapd.worker.state import Migrate, StateParts, TrackedEntry

if TYPE_CHECKING:
    from swapd.worker.patches import PatchHost

# Remember the source of every module imported from now on, so that a patch is diffed
# against what the process really runs even if a deploy has replaced the files since.
# (Import swapd.worker before the application's own modules.)
record_sources()

__all__ = ["Connection", "HandedOff", "SharedBuffer", "TrackedDict", "Worker", "WorkerError",
           "current", "run"]

log = logging.getLogger("swapd.worker")

Snapshot = Callable[[], Any]
Restore = Callable[[Any, int], Any]
Hook = Callable[[], Any]

_current: Worker | None = None


class Worker:
    """The application's handle on its process's lifecycle under swapd."""

    # What this library speaks, said in its hello (the supervisor uses a feature only when
    # every worker involved has it: "link" needs both ends of a slot).
    FEATURES: ClassVar[tuple[str, ...]] = ("drain", "state", "conns", "patch", "hold", "link")

    def __init__(self, environ: dict[str, str] | None = None,
                 default_binds: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        self.generation = int(env.get("SWAPD_GENERATION", "0"))
        self.slot = int(env.get("SWAPD_SLOT", "0"))
        self.workers = int(env.get("SWAPD_WORKERS", "1"))
        self.mode = env.get("SWAPD_MODE", "stateless")
        self.role = env.get("SWAPD_ROLE", "fresh")
        self.idle_grace = env_seconds(env, "SWAPD_IDLE_GRACE", 1.0)
        # How long a drain may last before the remaining connections are closed: the
        # supervisor's drain request says; an orphan (supervisor gone) uses this.
        self.drain_timeout = env_seconds(env, "SWAPD_DRAIN_TIMEOUT", 30.0)
        # How long a quiesce waits for a connection blocked on its client mid-request before
        # handing it over with the request's bytes so far (docs/worker.md).
        self.boundary_wait = env_seconds(env, "SWAPD_BOUNDARY_WAIT", 0.05)
        self.drain_deadline: float | None = None  # loop.time() by which the drain must end
        self._parts = StateParts()
        # Versions of predecessor state this code can restore; default: its own and older.
        self.accept_versions: set[int] | None = None
        self.listeners = listeners_from_env(env, default_binds)
        self._channel_fd = int(env["SWAPD_CHANNEL_FD"]) if env.get("SWAPD_CHANNEL_FD") else None
        self._notify_addr = env.get("NOTIFY_SOCKET") if self._channel_fd is None else None
        self._snapshot: Snapshot | None = None
        self._restore: Restore | None = None
        self._on_drain: list[Hook] = []
        self._on_quiesce: list[Hook] = []
        self._on_precopied: list[Hook] = []
        self._on_resume: list[Hook] = []
        self._channel: Channel | None = None
        self._hub: ConnectionHub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_called = False
        self._closed: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._restored: asyncio.Future[None] | None = None
        self._committed: asyncio.Future[None] | None = None
        self._handed_over: list[Connection] | dict[int, Connection] = []
        self._handed_watch: select.epoll | None = None
        self._link_out: LinkSender | None = None
        self._link_in: LinkReceiver | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._gc_paused = False
        self._owns_process = False  # started by run(): process-wide settings are ours to touch
        self._quiesce_task: asyncio.Task[Any] | None = None
        self._quiesced = False  # since a "quiesce" request, until "resume"
        self._held = False  # since a "hold" request (watch window), until "revive" or "drain"
        self._patch_host: PatchHost | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- registration (before ready) --------------------------------------------

    def listener(self, name: str) -> socket.socket:
        try:
            return self.listeners[name]
        except KeyError:
            known = ", ".join(self.listeners) or "none"
            raise WorkerError(f"no listener named {name!r} (have: {known})") from None

    def on_snapshot(self, fn: Snapshot) -> Snapshot:
        """Register the function returning this worker's state for its successor."""
        self._snapshot = fn
        return fn

    def on_restore(self, fn: Restore) -> Restore:
        """Register `restore(state, from_version)`; not called for a fresh worker."""
        self._restore = fn
        return fn

    @property
    def state_version(self) -> int:
        """This code's state version, sent with every snapshot (restore's `from_version`)."""
        return self._parts.version

    @state_version.setter
    def state_version(self, version: int) -> None:
        self._parts.version = version

    @property
    def state_codec(self) -> str:
        """Codec of `snapshot()`'s state: "pickle5" (default, any picklable object) or
        "marshal" (plain data only: str, int, float, bytes, list, dict...; dumps 1.3-3.4x
        faster, loads about as fast: see bench/notes/handoff-pause.md)."""
        return self._parts.codec

    @state_codec.setter
    def state_codec(self, codec: str) -> None:
        handoff.get_codec(codec)  # fail now, not in the middle of a swap
        self._parts.codec = codec

    def tracked_dict(self, name: str, *, migrate: Migrate | None = None,
                     codec: str = "pickle5") -> TrackedDict[Any, Any]:
        """A dict handed to the successor by pre-copy (with `--precopy`): its bulk travels
        while this worker still serves, only the keys changed since inside the pause.

        Register it at start-up, under the same name in every version of the code; a
        successor's is filled before `restore()` is called. `migrate(value, from_version)`
        converts entries of older state versions, outside the pause for the bulk. Mark
        in-place changes of nested values with `td.touch(key)`. `codec="marshal"` takes plain
        data only (str, int, float, bytes, list, dict...); measured through swapd it changes
        neither the bulk nor the pause much (bench/notes/handoff-pause.md).
        """
        if not name or name in self._parts.tracked:
            raise WorkerError(f"tracked dict {name!r} is already registered (or empty)")
        td: TrackedDict[Any, Any] = TrackedDict()
        handoff.get_codec(codec)  # an unknown codec fails here, not in the middle of a swap
        self._parts.tracked[name] = TrackedEntry(td, migrate, codec)
        return td

    def on_drain(self, fn: Hook) -> Hook:
        """Called when the worker starts draining (stop background work; may be async)."""
        self._on_drain.append(fn)
        return fn

    def on_precopied(self, fn: Hook) -> Hook:
        """Called (synchronously) right after this worker handed a pre-copy round over (the
        bulk, then each further round of changes); what changes from here on travels in
        the next round or in the pause."""
        self._on_precopied.append(fn)
        return fn

    def on_quiesce(self, fn: Hook) -> Hook:
        """Called before a snapshot: pause anything that changes state outside requests."""
        self._on_quiesce.append(fn)
        return fn

    def on_resume(self, fn: Hook) -> Hook:
        """Called when a handoff aborted and this worker serves again with its state."""
        self._on_resume.append(fn)
        return fn

    async def serve(self, name: str, handler: Handler, *, accept_batch: int = 1) -> None:
        """Serve connections of listener `name` with `handler(conn)`, once allowed to.

        `accept_batch`: connections taken per wakeup. 1 (the default) spreads long-lived
        connections most evenly over the workers; more costs fewer wakeups under a flood of
        short connections."""
        hub = self._require_hub()
        hub.register(name, self.listener(name), handler, accept_batch)

    @property
    def draining(self) -> bool:
        return self._hub is not None and self._hub.draining

    @property
    def held(self) -> bool:
        """Superseded under a watch window: not accepting, kept for a rollback (`draining`
        is true too: connections are let go at their next request boundary)."""
        return self._held

    def report_health(self, ok: bool, reason: str = "") -> None:
        """Tell the supervisor whether this worker is healthy. Unhealthy during a watch
        window rolls the swap back; outside one it is logged and shown by `swapd status`.
        (Without swapd's channel: `WATCHDOG=trigger` on $NOTIFY_SOCKET when not ok.)"""
        if self._channel is not None and not self._channel.closed:
            self._channel.send(m.Health(ok=ok, reason=reason[:500]).body())
        elif not ok and self._notify_addr:
            with Notifier(self._notify_addr) as notifier:
                notifier.send(WATCHDOG="trigger")

    # -- lifecycle ----------------------------------------------------------------

    async def ready(self) -> None:
        """Declare the worker ready. A successor returns once state is restored and committed,
        or once it drains without a commit (then `w.draining` is true)."""
        if self._ready_called:
            return
        self._ready_called = True
        hub = self._require_hub()
        if self._channel is not None:
            await self._hello()
            if self.role == "successor":
                self._channel.send(m.Ready(standby=True).body())
                assert self._committed is not None
                await self._committed
                return
            hub.start_accepting()
            self._channel.send(m.Ready(standby=False).body())
            return
        hub.start_accepting()
        if self._notify_addr:
            with Notifier(self._notify_addr) as notifier:
                notifier.ready()

    async def wait_closed(self) -> None:
        """Return once the worker has drained: every connection finished or handed over."""
        assert self._closed is not None
        await self._closed.wait()

    # -- internals ----------------------------------------------------------------

    def _require_hub(self) -> ConnectionHub:
        if self._hub is None:
            raise WorkerError("the worker is not running: call this from inside worker.run()")
        return self._hub

    async def _main(self, main: Callable[[Worker], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._hub = ConnectionHub(loop, self.idle_grace)
        self._closed = asyncio.Event()
        self._drained = asyncio.Event()
        self._committed = loop.create_future()
        if self._channel_fd is not None:
            sock = socket.socket(fileno=self._channel_fd)
            sock.set_inheritable(False)
            self._channel = Channel(sock, self._on_message, self._on_channel_close,
                                    on_refused=self._on_channel_refused)
        previous = install_signals(loop, self._begin_drain)
        try:
            await main(self)
            if not self._ready_called:
                await self.ready()
            await self._drained.wait()
            await self._hub.wait_empty()
        finally:
            restore_signals(loop, previous)
            self._closed.set()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            for task in self._background:
                task.cancel()
            self._end_links()
            self._drop_handed_over()
            if self._channel is not None:
                self._channel.close()

    async def _hello(self) -> None:
        assert self._channel is not None
        hello = m.Hello(proto=1, pid=os.getpid(), lib=f"swapd.worker {__version__}",
                        features=self.FEATURES)
        reply = await self._channel.request(hello.body(), timeout=30)
        reply.close_fds()
        answer = m.parse_reply(m.HelloReply, reply.body)
        if isinstance(answer, m.Failure):
            raise WorkerError(f"the supervisor refused this worker: {answer.error}")
        journal = answer.journal
        if journal:
            # A restarted worker runs what its siblings run: the generation's patches first.
            self._patches().replay(journal)

    def _patches(self) -> PatchHost:
        # Imported on first use: the patch engine stays out of every worker's start-up.
        if self._patch_host is None:
            from swapd.worker.patches import PatchHost

            self._patch_host = PatchHost()
        return self._patch_host

    def _on_channel_close(self, error: ChannelError) -> None:
        # The supervisor is gone (or broke the protocol): finish what we have and exit.
        log.warning("event=channel.closed reason=%r action=drain", str(error))
        self._begin_drain()

    def _on_channel_refused(self, reason: str) -> None:
        log.warning("event=channel.refused reason=%r", reason)

    def _on_message(self, msg: Message) -> None:
        handler = _HANDLERS.get(msg.type)
        req: m.Body | None = None
        error = f"unknown request {msg.type[:64]!r}" if handler is None else None
        if handler is not None and not msg.type.startswith("patch."):
            try:
                req = (m.precopy_request(msg.body) if msg.type == "precopy"
                       else m.WORKER_REQUESTS[msg.type].parse(msg.body))
            except m.MessageError as e:
                error = f"malformed {msg.type} request: {e}"
        if handler is None or error is not None:
            log.warning("event=channel.refused type=%r error=%r", msg.type[:64], error)
            if "id" in msg.body and self._channel is not None:
                self._channel.reply(msg, m.failed(str(error)))
            msg.close_fds()
            return
        task = asyncio.ensure_future(self._guarded(handler, msg, req))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _guarded(self, handler: Callable[[Worker, Message, Any], Awaitable[None]],
                       msg: Message, req: Any) -> None:
        """Every request gets an answer: an exception a handler let escape (an error while
        sending its reply, such as EMFILE duplicating the snapshot's fds) becomes `ok: false`
        at once, instead of a silence the supervisor waits out to its deadline."""
        try:
            await handler(self, msg, req)
        except Exception as e:
            log.exception("event=request.failed type=%s gen=%d slot=%d", msg.type,
                          self.generation, self.slot)
            msg.close_fds()
            with contextlib.suppress(Exception):
                self._reply(msg, m.failed(f"{type(e).__name__}: {e}"))

    def _reply(self, msg: Message, body: dict[str, Any], fds: list[int] | None = None) -> None:
        if self._channel is not None and not self._channel.closed:
            self._channel.reply(msg, body, fds or [])

    def _begin_drain(self, deadline: float | None = None) -> None:
        """Stop accepting and finish; at the deadline close whatever is left.

        `deadline`: seconds, from the supervisor's drain request; None (SIGTERM, or the
        channel closed: the supervisor is gone) takes SWAPD_DRAIN_TIMEOUT, so an orphaned
        worker exits on its own even with a client that never finishes its request.
        """
        hub = self._hub
        if hub is None or (hub.draining and not self._held):
            return
        self._held = False  # a held worker's window ended (or the supervisor went away)
        if deadline is None:
            deadline = self.drain_timeout
        assert self._loop is not None
        self.drain_deadline = self._loop.time() + deadline
        log.info("event=drain.begin gen=%d slot=%d pid=%d connections=%d deadline=%gs",
                 self.generation, self.slot, os.getpid(), len(hub.conns), deadline)
        # Connections handed over in a committed swap belong to the successor: let them go
        # before the drain's idle grace could close them under it.
        if hub.release_handed() and self._owns_process:
            # Committed: this process only winds down now (ending thousands of parked
            # handlers, freeing its heap); leave the CPU to the successor, which serves.
            with contextlib.suppress(OSError):
                os.nice(10)
        self._end_links()
        self._resume_gc()
        hub.begin_drain()
        for hook in self._on_drain:
            self._run_hook(hook)
        if self._committed is not None and not self._committed.done():
            # A successor drained before commit: its ready() returns (w.draining says why)
            # and run() ends normally, as documented; cancelling would raise in the app.
            self._committed.set_result(None)
        assert self._drained is not None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._drain_timer = self._loop.call_later(deadline, self._drain_deadline, deadline)
        self._drained.set()

    def _drain_deadline(self, deadline: float) -> None:
        self._drain_timer = None
        hub = self._hub
        if hub is None or not hub.conns:
            return
        closed = hub.close_all()
        log.warning("event=drain.deadline gen=%d slot=%d pid=%d deadline=%gs closed=%d",
                    self.generation, self.slot, os.getpid(), deadline, closed)

    def _end_links(self) -> None:
        """Close the handoff links of a swap that is over (commit, abort, drain)."""
        if self._link_out is not None:
            self._link_out.close()
            self._link_out = None
        if self._hub is not None:
            self._hub.end_tracking()
        if self._link_in is not None:
            self._link_in.close()
            self._link_in = None

    def _drop_handed_over(self) -> None:
        """Connections received for a commit that never came: close our copies."""
        conns = self._handed_over
        for conn in conns.values() if isinstance(conns, dict) else conns:
            conn.closed = True
            conn.sock.close()
        self._handed_over = []
        if self._handed_watch is not None:
            self._handed_watch.close()
            self._handed_watch = None

    def _pause_gc(self) -> None:
        """No cyclic collection inside the pause: with thousands of connections (each a
        handful of objects) a full collection costs tens of ms, more than the pause."""
        if not self._gc_paused and gc.isenabled():
            gc.disable()
            self._gc_paused = True

    def _resume_gc(self) -> None:
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

    def _accepted(self) -> Container[int]:
        if self.accept_versions is None:  # an explicit empty set refuses everything
            return range(0, self.state_version + 1)
        return self.accept_versions

    def _run_hook(self, hook: Hook) -> None:
        try:
            result = hook()
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        except Exception:
            log.exception("event=hook.error hook=%r", hook)

    async def _run_hook_async(self, hook: Hook) -> None:
        result = hook()
        if asyncio.iscoroutine(result):
            await result

    # -- channel requests -----------------------------------------------------------

    async def _handle_drain(self, msg: Message, req: m.Drain) -> None:
        msg.close_fds()
        # A little before the supervisor's SIGKILL, so the worker closes and exits on its own.
        self._begin_drain(max(0.0, req.deadline - min(1.0, req.deadline * 0.1)))

    async def _handle_quiesce(self, msg: Message, req: m.Quiesce) -> None:
        msg.close_fds()
        cpu = time.process_time()
        self._pause_gc()
        self._quiesced = True
        self._quiesce_task = asyncio.current_task()
        hub = self._require_hub()
        t_stop = hub.stop_accepting()
        keep = req.conns
        snaps: list[handoff.Snapshot] = []
        try:
            for hook in self._on_quiesce:
                await self._run_hook_async(hook)
            # Answer a little before the supervisor's own deadline: the reason then names
            # the connections, instead of "no reply".
            deadline = max(0.0, req.deadline - min(0.5, req.deadline * 0.1))
            await hub.quiesce(deadline, self.boundary_wait)
            if req.link and keep and self._link_out is None:
                raise WorkerError("quiesce over the handoff link, but no link.out came")
            # The app's snapshot first: it may still put a handed connection's state into its
            # meta (swapd serve's WebSockets), which the handover must carry.
            app_state = self._snapshot() if self._snapshot is not None else None
            if inspect.isawaitable(app_state):
                app_state = await app_state
            handover = hub.handover()
            conns: list[tuple[Any, ...]] = []
            if req.link and keep:
                assert self._link_out is not None
                self._link_out.send_delta(handover)
            elif keep:
                conns = [(c.listener, c.sock, dict(c.meta), c.pending_bytes())
                         for c in handover.new]
            # Deltas only when the successor has loaded a pre-copy of this round; otherwise
            # (none, a failed one, a snapshot for the fd store) every tracked dict goes whole.
            snaps = self._parts.dump(app_state, conns, precopied=req.precopied)
            reply = m.QuiesceReply(
                envelope=snaps[0].envelope.to_dict(),
                size=sum(s.envelope.size + s.envelope.buffers_size for s in snaps),
                t_stop=t_stop, conns=handover.count if keep else 0,
                replayed=handover.replayed if keep else 0, cpu=time.process_time() - cpu)
            # An error here (EMFILE duplicating the fds) is answered below, at once.
            self._reply(msg, m.ok(reply), [fd for snap in snaps for fd in snap.send_fds])
        except asyncio.CancelledError:
            log.warning("event=quiesce.cancelled reason='resumed before the snapshot was taken'")
            raise
        except Exception as e:
            log.exception("event=quiesce.failed gen=%d slot=%d", self.generation, self.slot)
            self._reply(msg, m.failed(f"{type(e).__name__}: {e}"))
        finally:
            for snap in snaps:
                snap.close()
            self._resume_gc()
            self._quiesce_task = None
            if not keep:
                # A snapshot for systemd's fd store: the connections stay here. Serve them
                # again (not accepting) so the drain that follows answers what arrives on
                # them and closes them at a request boundary, after the idle grace.
                hub.resume()

    async def _handle_precopy(self, msg: Message, req: m.PrecopyIn | m.PrecopyOut) -> None:
        fds = msg.take_fds()
        try:
            if isinstance(req, m.PrecopyIn):  # the new worker: load the bulk, outside the pause
                self._parts.load_precopy(req.names, fds, self._accepted())
                self._reply(msg, m.ok())
                return
            names: list[str] = []
            snaps: list[handoff.Snapshot] = []
            keys = 0
            if req.delta:  # another round: only worth it if enough changed since
                keys = self._parts.dirty
                if keys >= req.min_keys:
                    for name, part in self._parts.precopy_delta():
                        names.append(name)
                        snaps.append(part)
                else:
                    keys = 0
            else:
                for name, part in self._parts.precopy():  # the old worker, still serving
                    names.append(name)
                    snaps.append(part)
                    await asyncio.sleep(0)  # let requests run between chunks
        except Exception as e:
            log.exception("event=precopy.failed")
            if isinstance(req, m.PrecopyOut):
                self._parts.end_rounds()  # a half-produced bulk starts no round
            self._reply(msg, m.failed(f"{type(e).__name__}: {e}"))
            return
        try:
            reply = m.PrecopyOutReply(names, size=sum(s.envelope.size for s in snaps),
                                      keys=keys)
            self._reply(msg, m.ok(reply), [fd for snap in snaps for fd in snap.send_fds])
        finally:
            for snap in snaps:
                snap.close()
        if snaps:
            for hook in self._on_precopied:
                self._run_hook(hook)

    async def _handle_resume(self, msg: Message, req: m.Resume) -> None:
        msg.close_fds()
        if not self._quiesced:
            # After a failed pre-copy or pre-send: the worker kept serving; the round it
            # began ends, and the link goes.
            self._parts.end_rounds()
            self._end_links()
            log.info("event=resume gen=%d slot=%d quiesced=no", self.generation, self.slot)
            self._reply(msg, m.ok())
            return
        self._quiesced = False
        task = self._quiesce_task
        if task is not None and not task.done():
            task.cancel()  # a snapshot still in progress (e.g. an async hook that hangs)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        hub = self._require_hub()
        self._parts.end_rounds()
        self._end_links()
        hub.resume()
        hub.start_accepting()
        for hook in self._on_resume:
            self._run_hook(hook)
        log.info("event=resume gen=%d slot=%d", self.generation, self.slot)
        self._reply(msg, m.ok())

    async def _handle_restore(self, msg: Message, req: m.Restore) -> None:
        fds = msg.take_fds()
        cpu = time.process_time()
        hub = self._require_hub()
        self._pause_gc()  # until the commit has started every handed-over connection
        try:
            # The envelope that travelled beside the fds (None from the fd store) must match
            # the main part's header: a mixed-up fd fails here, not in restore().
            main = self._parts.load(fds, self._accepted(), req.envelope)
            state = main.state
            if req.link:
                if self._link_in is None:
                    raise WorkerError("restore over the handoff link, but no link.in came")
                await self._link_in.delta  # usually there already: sent before the snapshot
                conns, self._handed_watch = self._link_in.take()
                if len(conns) != req.conns:
                    raise handoff.FdMismatch(f"the supervisor announced {req.conns} "
                                             f"connections, the link delivered {len(conns)}")
                self._handed_over = conns
            if self._restore is not None:
                result = self._restore(state["app"], main.app_version)
                if inspect.isawaitable(result):
                    await result
            if not req.link:
                self._handed_over = [
                    Connection(sock, listener, hub, meta, buffered)
                    for listener, sock, meta, buffered in state["conns"]
                ]
        except Exception as e:
            log.exception("event=restore.failed")
            self._resume_gc()
            self._drop_handed_over()
            self._reply(msg, m.failed(f"{type(e).__name__}: {e}"))
            return
        self._reply(msg, m.ok(m.RestoreReply(cpu=time.process_time() - cpu)))

    async def _handle_link_out(self, msg: Message, req: m.LinkOut) -> None:
        """The old worker, still serving: pre-send every connection to the successor."""
        fds = msg.take_fds()
        if len(fds) != 1:
            Message({}, fds).close_fds()
            self._reply(msg, m.failed(f"link.out needs one descriptor, got {len(fds)}"))
            return
        self._end_links()  # a previous swap's, if any
        sock = socket.socket(fileno=fds[0])
        sender = LinkSender(sock, self._require_hub(), self._who())
        self._link_out = sender
        try:
            sent = await sender.presend()
        except Exception as e:
            log.warning("event=link.presend_failed gen=%d slot=%d error=%r", self.generation,
                        self.slot, str(e))
            if self._link_out is sender:
                self._end_links()
            self._reply(msg, m.failed(str(e)))
            return
        log.info("event=link.presend gen=%d slot=%d connections=%d", self.generation,
                 self.slot, sent)
        self._reply(msg, m.ok(m.LinkReply(sent)))

    async def _handle_link_in(self, msg: Message, req: m.LinkIn) -> None:
        """The new worker: take the predecessor's connections, serve none before commit."""
        fds = msg.take_fds()
        if len(fds) != 1:
            Message({}, fds).close_fds()
            self._reply(msg, m.failed(f"link.in needs one descriptor, got {len(fds)}"))
            return
        if self._link_in is not None:
            self._link_in.close()
        receiver = LinkReceiver(socket.socket(fileno=fds[0]), self._require_hub(), self._who())
        self._link_in = receiver
        try:
            count = await receiver.present
        except Exception as e:
            self._reply(msg, m.failed(str(e)))
            return
        self._reply(msg, m.ok(m.LinkReply(count)))

    def _who(self) -> str:
        return f"gen={self.generation} worker={self.slot} pid={os.getpid()}"

    async def _handle_commit(self, msg: Message, req: m.Commit) -> None:
        msg.close_fds()
        cpu = time.process_time()
        hub = self._require_hub()
        error = None
        try:
            self._parts.commit()  # before accepting: its work is part of the pause, honestly
        except Exception as e:
            # Past the point of no return: serve anyway (the predecessor is going away), and
            # say so; SharedBuffers not committed stay read-only.
            log.exception("event=commit.failed gen=%d slot=%d", self.generation, self.slot)
            error = f"{type(e).__name__}: {e}"
        hub.start_accepting()
        t_start = time.monotonic()
        cpu = time.process_time() - cpu
        hub.adopt_many(self._handed_over, self._handed_watch, done=self._resume_gc)
        self._handed_over = []
        self._handed_watch = None
        self._end_links()
        if self._committed is not None and not self._committed.done():
            self._committed.set_result(None)
        if error is None:
            self._reply(msg, m.ok(m.CommitReply(t_start, cpu=cpu)))
        else:
            self._reply(msg, m.failed(error, t_start=t_start))

    async def _handle_hold(self, msg: Message, req: m.Hold) -> None:
        msg.close_fds()
        hub = self._require_hub()
        if hub.draining:
            return  # already going (a drain overtook the hold): nothing to keep
        self._held = True
        # Stateful: the connections were handed to the successor, which owns duplicates of
        # them: close our copies now (a client must see the successor's close, not wait for
        # ours). Stateless: the live ones finish their request and leave, as in a drain.
        self._quiesced = False
        hub.release_handed()  # pinned ones stay, as in a drain
        hub.quiescing = False
        self._end_links()
        self._resume_gc()
        self._parts.end_rounds()
        hub.begin_drain()
        log.info("event=hold gen=%d slot=%d connections=%d", self.generation, self.slot,
                 len(hub.conns))

    async def _handle_revive(self, msg: Message, req: m.Revive) -> None:
        if not self._held:
            msg.close_fds()
            self._reply(msg, m.failed("not held (drained, or never held): cannot revive"))
            return
        self._held = False
        self._require_hub().draining = False
        # As a successor's commit: restored state (if a restore came) committed, accepting,
        # handed-over connections adopted, the instant replied.
        await self._handle_commit(msg, m.Commit())
        for hook in self._on_resume:
            self._run_hook(hook)
        log.info("event=revive gen=%d slot=%d", self.generation, self.slot)

    async def _handle_patch(self, msg: Message, req: None) -> None:
        msg.close_fds()
        host = self._patches()
        kind = msg.type.removeprefix("patch.")
        try:
            if kind == "prepare":
                reply = await host.prepare(msg.body)
            elif kind == "commit":
                reply = host.commit(msg.body)  # synchronous: between two loop callbacks
            elif kind == "abort":
                reply = host.abort(msg.body)
            elif kind == "rollback":
                reply = host.rollback(msg.body)
            elif kind == "squash":
                reply = await host.squash(msg.body)
            else:
                reply = {"ok": False, "error": f"unknown patch request {msg.type!r}"}
        except Exception as e:  # a bug, but the supervisor must hear about it
            log.exception("event=patch.error request=%s", msg.type)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self._reply(msg, reply)


# Each handler gets the request already parsed by its type in swapd.messages (patch requests,
# whose bodies the patch host reads, get None).
_HANDLERS: dict[str, Callable[[Worker, Message, Any], Awaitable[None]]] = {
    "drain": Worker._handle_drain,
    "quiesce": Worker._handle_quiesce,
    "resume": Worker._handle_resume,
    "restore": Worker._handle_restore,
    "precopy": Worker._handle_precopy,
    "patch.prepare": Worker._handle_patch,
    "patch.commit": Worker._handle_patch,
    "patch.abort": Worker._handle_patch,
    "patch.rollback": Worker._handle_patch,
    "patch.squash": Worker._handle_patch,
    "commit": Worker._handle_commit,
    "hold": Worker._handle_hold,
    "revive": Worker._handle_revive,
    "link.out": Worker._handle_link_out,
    "link.in": Worker._handle_link_in,
}


def current() -> Worker:
    if _current is None:
        raise WorkerError("no worker is running in this process")
    return _current


def run(main: Callable[[Worker], Awaitable[None]], *,
        default_binds: dict[str, str] | None = None, use_uvloop: bool | None = None) -> None:
    """Run `main(worker)` on uvloop (when available) until the worker has drained."""
    global _current
    raise_nofile()
    w = Worker(default_binds=default_binds)
    w._owns_process = True
    _current = w
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop is not False and os.environ.get("SWAPD_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            if use_uvloop:
                raise
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(w._main(main))
    finally:
        _current = None
        for sock in w.listeners.values():
            sock.close()
