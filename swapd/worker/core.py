"""The `Worker` class: one application process's lifecycle under swapd (see `swapd.worker`
for the picture and the public names).

Runs in the application's process. Here: the public hooks and settings, readiness (the
hello, `ready()`), the channel (each request dispatched to its handler, every one
answered), the drain and its deadline, patches, and `run()`/`current()`. What a swap asks
of a worker (pre-copy, pre-send, quiesce, resume, restore, commit, hold, revive) is
answered by its `HandoffSide` (`swapd.worker.handoff_side`), which the hooks registered
here feed; the connections are the `ConnectionHub`'s (`swapd.worker.hub`); the process
set-up (environment, listeners, signals) is in `swapd.worker.process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
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
from swapd.worker.handoff_side import HandoffSide, Hook, Request, Restore, Snapshot
from swapd.worker.hub import ConnectionHub
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
        self.drain_deadline: float | None = None  # loop.time() by which the drain must end
        self._parts = StateParts()
        # What a swap asks of this worker (quiesce, restore, commit...): see handoff_side.py.
        self._side = HandoffSide(
            self._parts, generation=self.generation, slot=self.slot,
            boundary_wait=env_seconds(env, "SWAPD_BOUNDARY_WAIT", 0.05),
            reply=self._reply, run_hook=self._run_hook)
        self.listeners = listeners_from_env(env, default_binds)
        self._channel_fd = int(env["SWAPD_CHANNEL_FD"]) if env.get("SWAPD_CHANNEL_FD") else None
        self._notify_addr = env.get("NOTIFY_SOCKET") if self._channel_fd is None else None
        self._on_drain: list[Hook] = []
        self._channel: Channel | None = None
        self._hub: ConnectionHub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_called = False
        self._closed: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._owns_process = False  # started by run(): process-wide settings are ours to touch
        self._patch_host: PatchHost | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Each handler gets the request already parsed by its type in swapd.messages (patch
        # requests, whose bodies the patch host reads, get None).
        self._requests: dict[str, Request] = {
            "drain": self._handle_drain,
            **self._side.requests(),
            **{f"patch.{kind}": self._handle_patch
               for kind in ("prepare", "commit", "abort", "rollback", "squash")},
        }

    # -- registration (before ready) --------------------------------------------

    def listener(self, name: str) -> socket.socket:
        try:
            return self.listeners[name]
        except KeyError:
            known = ", ".join(self.listeners) or "none"
            raise WorkerError(f"no listener named {name!r} (have: {known})") from None

    def on_snapshot(self, fn: Snapshot) -> Snapshot:
        """Register the function returning this worker's state for its successor."""
        self._side.snapshot = fn
        return fn

    def on_restore(self, fn: Restore) -> Restore:
        """Register `restore(state, from_version)`; not called for a fresh worker."""
        self._side.restore = fn
        return fn

    @property
    def state_version(self) -> int:
        """This code's state version, sent with every snapshot (restore's `from_version`)."""
        return self._parts.version

    @state_version.setter
    def state_version(self, version: int) -> None:
        self._parts.version = version

    @property
    def boundary_wait(self) -> float:
        """How long a quiesce waits for a connection blocked on its client mid-request before
        handing it over with the request's bytes so far (docs/worker.md;
        $SWAPD_BOUNDARY_WAIT, default 0.05 s)."""
        return self._side.boundary_wait

    @boundary_wait.setter
    def boundary_wait(self, seconds: float) -> None:
        self._side.boundary_wait = seconds

    @property
    def accept_versions(self) -> set[int] | None:
        """Versions of predecessor state this code can restore; None (the default): its own
        and older. An explicit empty set refuses every state."""
        return self._side.accept_versions

    @accept_versions.setter
    def accept_versions(self, versions: set[int] | None) -> None:
        self._side.accept_versions = versions

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
        self._side.precopied_hooks.append(fn)
        return fn

    def on_quiesce(self, fn: Hook) -> Hook:
        """Called before a snapshot: pause anything that changes state outside requests."""
        self._side.quiesce_hooks.append(fn)
        return fn

    def on_resume(self, fn: Hook) -> Hook:
        """Called when a handoff aborted and this worker serves again with its state."""
        self._side.resume_hooks.append(fn)
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
        return self._side.held

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
                assert self._side.committed is not None
                await self._side.committed
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
        self._side.start(self._hub, loop.create_future())
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
            self._side.close()
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
        handler = self._requests.get(msg.type)
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

    async def _guarded(self, handler: Request, msg: Message, req: Any) -> None:
        """Every request gets an answer: an exception a handler let escape (an error while
        sending its reply, such as EMFILE duplicating the snapshot's fds) becomes `ok: false`
        at once, instead of a silence the supervisor waits out to its deadline."""
        try:
            await handler(msg, req)
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
        side = self._side
        if hub is None or (hub.draining and not side.held):
            return
        side.held = False  # a held worker's window ended (or the supervisor went away)
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
        side.end_links()
        side.resume_gc()
        hub.begin_drain()
        for hook in self._on_drain:
            self._run_hook(hook)
        if side.committed is not None and not side.committed.done():
            # A successor drained before commit: its ready() returns (w.draining says why)
            # and run() ends normally, as documented; cancelling would raise in the app.
            side.committed.set_result(None)
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

    def _run_hook(self, hook: Hook) -> None:
        try:
            result = hook()
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        except Exception:
            log.exception("event=hook.error hook=%r", hook)

    # -- channel requests -----------------------------------------------------------

    async def _handle_drain(self, msg: Message, req: m.Drain) -> None:
        msg.close_fds()
        # A little before the supervisor's SIGKILL, so the worker closes and exits on its own.
        self._begin_drain(max(0.0, req.deadline - min(1.0, req.deadline * 0.1)))

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
