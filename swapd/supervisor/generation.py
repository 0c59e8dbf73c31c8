"""Generations and their workers: what the supervisor knows about each child.

A `WorkerProcess` bundles one child process with its three pipes to the supervisor:
the channel (SEQPACKET, for swapd.worker apps), a notify socket (a datagram
socket of its own, given as NOTIFY_SOCKET, for any sd_notify-speaking program)
and its output pipe (stdout and stderr, forwarded to the supervisor's log with
a tail kept for failure reports). Lifecycle decisions live in `lifecycle`; this
module only records facts and turns OS events into futures the supervisor awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from swapd import messages
from swapd.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    DescriptorsLost,
    Limits,
    Message,
)
from swapd.config import Config
from swapd.supervisor import fdbudget, notify
from swapd.supervisor.lifecycle import (
    GenEvent,
    GenState,
    SlotEvent,
    SlotState,
    next_slot_state,
    next_state,
)
from swapd.supervisor.process import Child, ExitStatus
from swapd.throttle import Throttle

log = logging.getLogger("swapd")
out_log = logging.getLogger("swapd.output")

TAIL_LINES = 40
_MAX_LINE = 4096
_PIPE_SIZE_FALLBACK = 1 << 20  # fs.pipe-max-size's default: no pipe holds more
_EXIT_GRACE = 1.0  # seconds to wait for a pidfd after the channel of a dying worker closed
# What the supervisor accepts from a worker: nothing it sends unasked carries descriptors,
# nor does any reply unless its request says how many (a snapshot: see swap.py); no body
# beyond 16 MiB (the largest legitimate ones, patch plans, are far smaller).
WORKER_LIMITS = Limits(max_body=16 * 1024 * 1024, unsolicited_fds=0, reply_fds=0,
                       max_queued=4096)

R = TypeVar("R", bound=messages.Body)


class RequestFailed(Exception):
    """A request to one worker failed: it died, broke the protocol, timed out, or answered
    `ok: false` or a malformed reply (`answered`: it is alive and talking). The reason names
    the worker; `tail` is its last output."""

    def __init__(self, reason: str, worker: WorkerProcess, *, answered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answered = answered
        self.worker = worker.tag
        self.tail = worker.tail_text()


@dataclass
class Answer(Generic[R]):
    """A typed reply and the descriptors that came with it (the caller closes them)."""

    reply: R
    fds: list[int]

    def close_fds(self) -> None:
        Message({}, self.fds).close_fds()
        self.fds = []


@dataclass(frozen=True)
class WorkerRecord:
    """A live worker as a re-exec state describes it (its fds are inherited)."""

    slot: int
    role: str
    pid: int
    pidfd: int
    channel_fd: int | None
    notify_fd: int | None
    output_fd: int | None
    state: SlotState
    started: float
    ready_at: float | None
    hello: dict[str, Any] | None
    status: str
    tail: list[str]
    ready_info: dict[str, Any] | None
    probe_fd: int | None = None  # a readiness probe's private listener, still probing


@dataclass(frozen=True)
class GenerationRecord:
    """A generation as a re-exec state describes it."""

    id: int
    state: GenState
    config: Config
    created: float
    committed: float | None
    restarts: list[int]
    drain_deadline: float | None
    workers: list[WorkerRecord | None]  # None: a slot whose worker is gone
    release: str = ""
    root: str | None = None


class WorkerProcess:
    """One worker process and its pipes."""

    def __init__(self, gen: int, slot: int, role: str, child: Child,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.gen = gen
        self.slot = slot
        self.role = role
        self.child = child
        self.state = SlotState.STARTING
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.ready_via: str | None = None  # when set, the only source of readiness that counts
        self.hello: dict[str, Any] | None = None
        self.status_text = ""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.channel: Channel | None = None
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[ExitStatus] = loop.create_future()
        self.on_message: Callable[[WorkerProcess, Message], None] = lambda w, m: m.close_fds()
        # The worker's own verdict (channel `health`, or WATCHDOG=trigger): a watch window
        # awaits `unhealthy`; a later `ok` report arms a fresh one.
        self.health: tuple[bool, str] = (True, "")
        self.unhealthy: asyncio.Future[str] = loop.create_future()
        self.passthrough = False  # output not captured (--worker-output passthrough)
        self._loop = loop
        self._notify: socket.socket | None = None
        self._output_fd = -1
        self._partial = b""
        self._refusals = {"notify": Throttle(), "channel": Throttle()}

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def tag(self) -> str:
        return f"gen={self.gen} worker={self.slot} pid={self.pid}"

    @property
    def speaks_channel(self) -> bool:
        return self.hello is not None

    def features(self) -> set[str]:
        return set(self.hello.get("features", [])) if self.hello else set()

    def transition(self, event: SlotEvent) -> None:
        self.state = next_slot_state(self.state, event)

    def transition_ready(self) -> None:
        if self.state == SlotState.STARTING:
            self.transition(SlotEvent.READY)

    @property
    def standby(self) -> bool:
        """Ready but waiting for state and commit before it accepts (stateful successor)."""
        return bool(self.ready.done() and self.ready.result().get("standby"))

    def tail_text(self) -> str:
        if self.passthrough:
            return ("(output not captured: --worker-output passthrough sends it straight to "
                    "the supervisor's stderr)")
        return "\n".join(self.tail)

    def mark_health(self, ok: bool, reason: str, via: str) -> None:
        if ok == self.health[0] and reason == self.health[1]:
            return
        self.health = (ok, reason)
        if ok:
            log.info("event=worker.healthy %s via=%s", self.tag, via)
            if self.unhealthy.done():
                self.unhealthy = self._loop.create_future()
            return
        log.warning("event=worker.unhealthy %s via=%s reason=%r", self.tag, via, reason)
        if not self.unhealthy.done():
            self.unhealthy.set_result(reason or f"reported unhealthy ({via})")

    # -- pipes ------------------------------------------------------------

    def attach(self, channel_sock: socket.socket, notify: socket.socket,
               output_fd: int | None) -> None:
        self.channel = self._open_channel(channel_sock)
        self._watch_notify(notify)
        if output_fd is None:  # passthrough: the worker writes to our stderr itself
            self.passthrough = True
            return
        self._output_fd = output_fd
        os.set_blocking(output_fd, False)
        self._loop.add_reader(output_fd, self._on_output)

    def pipe_fds(self) -> tuple[int | None, int | None, int | None]:
        """(channel, notify, output) fds, for a supervisor re-exec."""
        channel = self.channel.sock.fileno() if self.channel and not self.channel.closed else None
        notify = self._notify.fileno() if self._notify is not None else None
        return channel, notify, self._output_fd if self._output_fd >= 0 else None

    @classmethod
    def resume(cls, gen: int, rec: WorkerRecord, loop: asyncio.AbstractEventLoop
               ) -> WorkerProcess:
        """Rebuild a worker described by a re-exec state (its fds were inherited)."""
        child = Child(pid=rec.pid, pidfd=rec.pidfd, started=rec.started)
        w = cls(gen, rec.slot, rec.role, child, loop)
        w.state = rec.state
        w.started = rec.started
        w.ready_at = rec.ready_at
        w.hello = rec.hello
        w.status_text = rec.status
        w.tail.extend(rec.tail)
        if rec.ready_info is not None:
            w.ready.set_result(rec.ready_info)
        os.set_inheritable(child.pidfd, False)
        channel = _adopt_socket(rec.channel_fd)
        notify = _adopt_socket(rec.notify_fd)
        if channel is not None:
            w.channel = w._open_channel(channel)
        if notify is not None:
            w._watch_notify(notify)
        if rec.output_fd is not None:
            w._output_fd = rec.output_fd
            os.set_inheritable(w._output_fd, False)
            os.set_blocking(w._output_fd, False)
            loop.add_reader(w._output_fd, w._on_output)
        return w

    def _open_channel(self, sock: socket.socket) -> Channel:
        return Channel(sock, self._on_channel_message, self._on_channel_close, loop=self._loop,
                       limits=WORKER_LIMITS, on_refused=self._on_channel_refused)

    def _watch_notify(self, notify: socket.socket) -> None:
        # Credentials on every datagram: the socket's name is world-readable in
        # /proc/net/unix and anyone may send to it; only the worker's own processes count.
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.setblocking(False)
        self._notify = notify
        self._loop.add_reader(notify.fileno(), self._on_notify)

    # -- requests -----------------------------------------------------------

    async def ask(self, request: messages.Body, reply: type[R], timeout: float, what: str,
                  fds: list[int] | None = None, reply_fds: int | None = None) -> Answer[R]:
        """Send `request`, return its typed reply; RequestFailed on any problem.

        `reply_fds`: how many descriptors the reply may carry (more: the request fails);
        by default what the supervisor can take in for a request whose reply carries them
        (`REPLY_FDS`), else none."""
        if reply_fds is None:
            reply_fds = fdbudget.headroom() if request.REPLY_FDS else 0
        msg = await self.ask_raw(request.body(), timeout, what, fds, reply_fds)
        try:
            parsed = messages.parse_reply(reply, msg.body)
        except messages.MessageError as e:
            msg.close_fds()
            # Alive and talking, if wrongly: `answered`, as much as an `ok: false`.
            raise RequestFailed(f"{self.tag} {what}: malformed reply: {e}", self,
                                answered=True) from e
        if isinstance(parsed, messages.Failure):
            msg.close_fds()
            raise RequestFailed(f"{self.tag} {what} failed: {parsed.error}", self,
                                answered=True)
        return Answer(parsed, msg.take_fds())

    async def ask_raw(self, body: dict[str, Any], timeout: float, what: str,
                      fds: list[int] | None = None, reply_fds: int = 0) -> Message:
        """Send a request body; the reply message as it came (RequestFailed if none)."""
        if self.channel is None or self.channel.closed:
            raise RequestFailed(f"{self.tag} has no open channel for {what}", self)
        req = asyncio.ensure_future(self.channel.request(body, fds or [], timeout=timeout,
                                                         reply_fds=reply_fds))
        waiting: set[asyncio.Future[Any]] = {req, self.exited}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if req not in done:
            req.cancel()
            raise RequestFailed(f"{self.tag} {self.exited.result()} during {what}", self)
        try:
            return req.result()
        except ChannelError as e:
            if isinstance(e, DescriptorsLost):
                raise RequestFailed(f"{self.tag} {what} failed: {e} ({fdbudget.open_fds()} "
                                    f"open now, limit {fdbudget.limit()})", self) from e
            if not isinstance(e, ChannelClosed):  # a refused reply, a timeout: it lives on
                raise RequestFailed(f"{self.tag} {what} failed: {e}", self) from e
            # EOF on the channel usually means the process died; its pidfd reports that a
            # moment later. Wait for it briefly so the reason names the exit, not the symptom.
            await asyncio.wait([self.exited], timeout=_EXIT_GRACE)
            if self.exited.done():
                raise RequestFailed(f"{self.tag} {self.exited.result()} during {what}",
                                    self) from e
            raise RequestFailed(f"{self.tag} {what} failed: {e}", self) from e

    def _on_channel_message(self, msg: Message) -> None:
        try:
            if msg.type == messages.Ready.T:
                ready = messages.Ready.parse(msg.body)
                self.mark_ready({"standby": ready.standby, "via": "channel"})
            elif msg.type == messages.Status.T:
                self.status_text = messages.Status.parse(msg.body).text[:200]
            elif msg.type == messages.Health.T:
                health = messages.Health.parse(msg.body)
                self.mark_health(health.ok, health.reason[:500], "channel")
            else:
                self.on_message(self, msg)
                return
        except messages.MessageError as e:
            self.refused(f"malformed {msg.type[:64]!r} message: {e}")
        msg.close_fds()

    def _on_channel_close(self, error: ChannelError) -> None:
        log.debug("event=channel.closed %s reason=%r", self.tag, str(error))

    def refused(self, reason: str) -> None:
        """Something the worker sent was refused: one log line, at most once per interval."""
        self._on_channel_refused(reason)

    def _on_channel_refused(self, reason: str) -> None:
        throttle = self._refusals["channel"]
        if throttle.allow():
            log.warning("event=channel.refused %s reason=%r suppressed=%d", self.tag, reason,
                        throttle.take_suppressed())

    def _on_notify(self) -> None:
        assert self._notify is not None
        verdicts: dict[int, str | None] = {}  # a flood comes from few pids: look each up once
        for _ in range(notify.PER_WAKEUP):
            try:
                # No room for descriptors: the kernel drops any (FDSTORE, BARRIER) instead of
                # installing them here, which also releases a BARRIER sender at once.
                data, anc, _flags, _ = self._notify.recvmsg(4096, notify.ANCILLARY)
            except OSError:  # BlockingIOError included: nothing more queued
                return
            sender = notify.sender(anc)
            who = sender[0] if sender is not None else -1
            if who not in verdicts:
                verdicts[who] = self._refuse_notify(sender)
            refused = verdicts[who]
            if refused is not None:
                throttle = self._refusals["notify"]
                if throttle.allow():
                    pid, uid = sender or (0, -1)
                    log.warning("event=notify.refused %s sender_pid=%d sender_uid=%d "
                                "reason=%r suppressed=%d", self.tag, pid, uid, refused,
                                throttle.take_suppressed())
                continue
            for line in data.decode(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    if self.speaks_channel:  # its readiness is the channel's `ready`
                        log.debug("event=notify.ignored %s reason='speaks the channel'",
                                  self.tag)
                        continue
                    self.mark_ready({"standby": False, "via": "notify"})
                elif key == "STATUS":
                    self.status_text = value[:200]
                elif key == "WATCHDOG" and value == "trigger":
                    self.mark_health(False, "WATCHDOG=trigger", "notify")

    def _refuse_notify(self, sender: tuple[int, int] | None) -> str | None:
        """Why a notify datagram is not the worker's (None: it is)."""
        if sender is None:
            return "no credentials"
        if self.child.status is not None:
            return "the worker has exited"
        if not notify.in_process_tree(sender[0], self.pid):
            return "sender is not the worker, nor in its process group, nor a descendant"
        return None

    def mark_ready(self, info: dict[str, Any]) -> None:
        if self.ready_via is not None and info.get("via") != self.ready_via:
            log.debug("event=worker.ready_ignored %s via=%s waiting_for=%s", self.tag,
                      info.get("via"), self.ready_via)
            return
        if not self.ready.done():
            self.ready_at = time.monotonic()
            self.ready.set_result(info)

    def _on_output(self) -> int:
        """Read one chunk of output; its size, 0 when there is nothing more to read for now."""
        try:
            chunk = os.read(self._output_fd, 65536)
        except BlockingIOError:
            return 0
        except OSError:
            chunk = b""
        if not chunk:
            self._flush_partial()
            self._loop.remove_reader(self._output_fd)
            os.close(self._output_fd)
            self._output_fd = -1
            return 0
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            self._emit_line(raw)
        return len(chunk)

    def _pipe_size(self) -> int:
        try:
            return fcntl.fcntl(self._output_fd, fcntl.F_GETPIPE_SZ)
        except OSError:
            return _PIPE_SIZE_FALLBACK

    def _flush_partial(self) -> None:
        if self._partial:
            self._emit_line(self._partial)
            self._partial = b""

    def _emit_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")[:_MAX_LINE]
        self.tail.append(line)
        out_log.info("%s| %s", self.tag, line)

    def on_exit(self, status: ExitStatus) -> None:
        """Called once the child has been reaped: drain its output, release its pipes."""
        # Whatever the child wrote before dying is still in the pipe: read it now so a
        # failure report carries the traceback. Stop at EAGAIN, not only at EOF: a process
        # the worker started may still hold the pipe's write end open. And stop after what
        # the pipe can hold: one that keeps writing (`setsid yes &`) would never let EAGAIN
        # come, and its output is not the worker's. Closing the pipe then ends its writes.
        budget = self._pipe_size() if self._output_fd >= 0 else 0  # EOF came first: closed
        while self._output_fd >= 0 and budget > 0 and (read := self._on_output()):
            budget -= read
        self._flush_partial()
        self.close_pipes()
        if not self.exited.done():
            self.exited.set_result(status)

    def close_pipes(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self._notify is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._notify.fileno())
            self._notify.close()
            self._notify = None
        if self._output_fd >= 0:
            self._loop.remove_reader(self._output_fd)
            os.close(self._output_fd)
            self._output_fd = -1

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        info: dict[str, Any] = {
            "slot": self.slot,
            "pid": self.pid,
            "state": self.state.value,
            "role": self.role,
            "uptime": round(now - self.started, 3),
            "speaks_channel": self.speaks_channel,
        }
        if self.status_text:
            info["status"] = self.status_text
        if not self.health[0]:
            info["unhealthy"] = self.health[1] or "reported unhealthy"
        if self.child.status is not None:
            info["exit"] = str(self.child.status)
        return info


@dataclass
class Generation:
    id: int
    config: Config
    state: GenState = GenState.STARTING
    workers: list[WorkerProcess | None] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    committed: float | None = None
    restarts: list[int] = field(default_factory=list)  # per slot
    release: str = ""  # the release label (release.py)
    root: str | None = None  # the workers' directory, its symlinks resolved once at start

    def transition(self, event: GenEvent) -> None:
        old = self.state
        self.state = next_state(self.state, event)
        log.info("event=gen.state gen=%d from=%s to=%s", self.id, old.value, self.state.value)

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w is not None and w.child.status is None]

    def summary(self) -> dict[str, Any]:
        """What the history keeps of a generation that is over: a few fields, no output."""
        return {
            "id": self.id,
            "state": self.state.value,
            "lived": round(time.monotonic() - self.created, 3),
            "workers": [{"slot": w.slot, "pid": w.pid, "exit": str(w.child.status)}
                        for w in self.workers if w is not None],
            "restarts": sum(self.restarts),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "mode": self.config.mode,
            "release": self.release,
            "command": list(self.config.command),
            "age": round(time.monotonic() - self.created, 3),
            "workers": [w.describe() for w in self.workers if w is not None],
            "restarts": list(self.restarts),
        }


def _adopt_socket(fd: int | None) -> socket.socket | None:
    if fd is None:
        return None
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock
