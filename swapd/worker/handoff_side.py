"""`HandoffSide`: what a swap asks of a worker, answered inside the application's process.

The supervisor drives a handoff with requests on the channel; the `Worker`
(`swapd.worker.core`) owns the channel, the lifecycle and the public hooks, and hands
these requests to its `HandoffSide`:

    old worker   precopy (state bulk, while serving) · link.out (pre-send every connection
                 to the successor) · quiesce (stop accepting, reach request boundaries,
                 snapshot, hand the connections over) · resume (abort: serve again) ·
                 hold (superseded under a watch window) · revive (rolled back to)
    new worker   precopy (load the bulk) · link.in (take the predecessor's connections) ·
                 restore (load the snapshot, the app's restore()) · commit (accept, start
                 the handed-over connections' handlers)

It keeps what lives from one of these requests to the next: the handoff links, the
connections received before the commit, the state parts (shared with the `Worker`, which
registers tracked dicts into them), whether this worker is quiesced or held, the garbage
collector (paused during the pause), and the app's snapshot, restore, quiesce, precopied and
resume hooks (registered through the `Worker`). The drain stays the `Worker`'s: it ends
the swap's links and un-pauses the collector through `end_links()` and `resume_gc()`.
"""

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
from typing import Any, Protocol

from swapd import handoff
from swapd import messages as m
from swapd.channel import Message
from swapd.worker.client import Connection
from swapd.worker.errors import WorkerError
from swapd.worker.hub import ConnectionHub
from swapd.worker.link import LinkReceiver, LinkSender
from swapd.worker.state import StateParts

log = logging.getLogger("swapd.worker")

Snapshot = Callable[[], Any]
Restore = Callable[[Any, int], Any]
Hook = Callable[[], Any]
Request = Callable[[Message, Any], Awaitable[None]]


class Reply(Protocol):
    """The worker's answer to a channel request (nothing once the channel is closed)."""

    def __call__(self, msg: Message, body: dict[str, Any], fds: list[int] | None = None
                 ) -> None: ...


class HandoffSide:
    """The worker's side of a swap: the handoff requests and what they keep in between."""

    def __init__(self, parts: StateParts, *, generation: int, slot: int, boundary_wait: float,
                 reply: Reply, run_hook: Callable[[Hook], None]) -> None:
        self.generation = generation
        self.slot = slot
        # How long a quiesce waits for a connection blocked on its client mid-request before
        # handing it over with the request's bytes so far (docs/worker.md).
        self.boundary_wait = boundary_wait
        # Versions of predecessor state this code can restore; default: its own and older.
        self.accept_versions: set[int] | None = None
        self._parts = parts
        self._reply = reply
        self._run_hook = run_hook
        self.snapshot: Snapshot | None = None
        self.restore: Restore | None = None
        self.quiesce_hooks: list[Hook] = []
        self.precopied_hooks: list[Hook] = []
        self.resume_hooks: list[Hook] = []
        self.hub: ConnectionHub | None = None  # set when the worker runs (start())
        self.committed: asyncio.Future[None] | None = None  # a successor's ready() waits on it
        self._handed_over: list[Connection] | dict[int, Connection] = []
        self._handed_watch: select.epoll | None = None
        self._link_out: LinkSender | None = None
        self._link_in: LinkReceiver | None = None
        self._gc_paused = False
        self._quiesce_task: asyncio.Task[Any] | None = None
        self._quiesced = False  # since a "quiesce" request, until "resume"
        self.held = False  # since a "hold" request (watch window), until "revive" or "drain"

    def requests(self) -> dict[str, Request]:
        """The channel requests answered here, by type (each gets its request already parsed
        by its type in swapd.messages)."""
        return {
            "quiesce": self._handle_quiesce,
            "resume": self._handle_resume,
            "restore": self._handle_restore,
            "precopy": self._handle_precopy,
            "commit": self._handle_commit,
            "hold": self._handle_hold,
            "revive": self._handle_revive,
            "link.out": self._handle_link_out,
            "link.in": self._handle_link_in,
        }

    def start(self, hub: ConnectionHub, committed: asyncio.Future[None]) -> None:
        """The worker runs: its hub, and the future a successor's ready() waits on."""
        self.hub = hub
        self.committed = committed

    def close(self) -> None:
        """The worker returns: links closed, connections received for no commit dropped."""
        self.end_links()
        self._drop_handed_over()

    def _require_hub(self) -> ConnectionHub:
        if self.hub is None:
            raise WorkerError("the worker is not running: call this from inside worker.run()")
        return self.hub

    def end_links(self) -> None:
        """Close the handoff links of a swap that is over (commit, abort, drain)."""
        if self._link_out is not None:
            self._link_out.close()
            self._link_out = None
        if self.hub is not None:
            self.hub.end_tracking()
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

    def resume_gc(self) -> None:
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

    def _accepted(self) -> Container[int]:
        if self.accept_versions is None:  # an explicit empty set refuses everything
            return range(0, self._parts.version + 1)
        return self.accept_versions

    async def _run_hook_async(self, hook: Hook) -> None:
        result = hook()
        if asyncio.iscoroutine(result):
            await result

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
            for hook in self.quiesce_hooks:
                await self._run_hook_async(hook)
            # Answer a little before the supervisor's own deadline: the reason then names
            # the connections, instead of "no reply".
            deadline = max(0.0, req.deadline - min(0.5, req.deadline * 0.1))
            await hub.quiesce(deadline, self.boundary_wait)
            if req.link and keep and self._link_out is None:
                raise WorkerError("quiesce over the handoff link, but no link.out came")
            # The app's snapshot first: it may still put a handed connection's state into its
            # meta (swapd serve's WebSockets), which the handover must carry.
            app_state = self.snapshot() if self.snapshot is not None else None
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
            self.resume_gc()
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
            for hook in self.precopied_hooks:
                self._run_hook(hook)

    async def _handle_resume(self, msg: Message, req: m.Resume) -> None:
        msg.close_fds()
        if not self._quiesced:
            # After a failed pre-copy or pre-send: the worker kept serving; the round it
            # began ends, and the link goes.
            self._parts.end_rounds()
            self.end_links()
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
        self.end_links()
        hub.resume()
        hub.start_accepting()
        for hook in self.resume_hooks:
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
            if self.restore is not None:
                result = self.restore(state["app"], main.app_version)
                if inspect.isawaitable(result):
                    await result
            if not req.link:
                self._handed_over = [
                    Connection(sock, listener, hub, meta, buffered)
                    for listener, sock, meta, buffered in state["conns"]
                ]
        except Exception as e:
            log.exception("event=restore.failed")
            self.resume_gc()
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
        self.end_links()  # a previous swap's, if any
        sock = socket.socket(fileno=fds[0])
        sender = LinkSender(sock, self._require_hub(), self._who())
        self._link_out = sender
        try:
            sent = await sender.presend()
        except Exception as e:
            log.warning("event=link.presend_failed gen=%d slot=%d error=%r", self.generation,
                        self.slot, str(e))
            if self._link_out is sender:
                self.end_links()
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
        hub.adopt_many(self._handed_over, self._handed_watch, done=self.resume_gc)
        self._handed_over = []
        self._handed_watch = None
        self.end_links()
        if self.committed is not None and not self.committed.done():
            self.committed.set_result(None)
        if error is None:
            self._reply(msg, m.ok(m.CommitReply(t_start, cpu=cpu)))
        else:
            self._reply(msg, m.failed(error, t_start=t_start))

    async def _handle_hold(self, msg: Message, req: m.Hold) -> None:
        msg.close_fds()
        hub = self._require_hub()
        if hub.draining:
            return  # already going (a drain overtook the hold): nothing to keep
        self.held = True
        # Stateful: the connections were handed to the successor, which owns duplicates of
        # them: close our copies now (a client must see the successor's close, not wait for
        # ours). Stateless: the live ones finish their request and leave, as in a drain.
        self._quiesced = False
        hub.release_handed()  # pinned ones stay, as in a drain
        hub.quiescing = False
        self.end_links()
        self.resume_gc()
        self._parts.end_rounds()
        hub.begin_drain()
        log.info("event=hold gen=%d slot=%d connections=%d", self.generation, self.slot,
                 len(hub.conns))

    async def _handle_revive(self, msg: Message, req: m.Revive) -> None:
        if not self.held:
            msg.close_fds()
            self._reply(msg, m.failed("not held (drained, or never held): cannot revive"))
            return
        self.held = False
        self._require_hub().draining = False
        # As a successor's commit: restored state (if a restore came) committed, accepting,
        # handed-over connections adopted, the instant replied.
        await self._handle_commit(msg, m.Commit())
        for hook in self.resume_hooks:
            self._run_hook(hook)
        log.info("event=revive gen=%d slot=%d", self.generation, self.slot)
