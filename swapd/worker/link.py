"""The handoff link: connections travel from old worker i to new worker i directly.

Why: a stateful swap used to put every live connection's descriptor inside the pause,
relayed through the supervisor (two SCM_RIGHTS hops and a dup of every fd on each side),
~54 µs per connection. A socket is a kernel object both workers can hold at once, so the
old worker *pre-sends* every connection before the pause, while it keeps serving them, and
inside the pause sends only what changed since (connections accepted or closed, meta
changed, bytes received): the pause no longer grows with idle connections.

The supervisor creates a SOCK_SEQPACKET socketpair per slot and hands one end to each
worker (`link.out`, `link.in`); it never holds a connection's descriptor. The wire format
is the channel's, the message types are in swapd.messages (the table there); every message
carries at most LINK_BATCH descriptors in one frame and announces their count.

Rules that keep this exact:
- until the pause, the new worker only holds the sockets; it reads nothing;
- the old worker closes a pre-sent connection with shutdown() first, so the client gets
  its FIN although the successor still holds a duplicate (dropped by the delta's `gone`);
- anything the old worker changes after pre-sending a connection marks it touched
  (client.Tracking), and the delta carries every touched connection again;
- a pinned connection is never pre-sent: it stays with the old worker; one pinned after
  its pre-send is in the delta's `gone` (the successor drops its duplicate), one unpinned
  since travels as new;
- an abort kills the new worker (its duplicates go with it); the old one never let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import select
import socket
from typing import Any

from swapd import handoff
from swapd import messages as m
from swapd.channel import Channel, ChannelError, Message
from swapd.worker.client import Connection
from swapd.worker.hub import ConnectionHub, Handover

log = logging.getLogger("swapd.worker")

FD_RESERVE = 64  # descriptors a worker keeps free beyond the connections it takes over


class LinkError(Exception):
    """The link failed or a peer broke its protocol; one line."""


class FdBudgetError(LinkError):
    """A handoff would need more descriptors than this process may open."""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_budget(extra: int, who: str) -> None:
    """FdBudgetError with the figures unless `extra` more descriptors fit under the limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    current = open_fds()
    needed = current + extra + FD_RESERVE
    if needed > soft:
        raise FdBudgetError(
            f"handoff needs {needed} descriptors in {who} ({current} open + {extra} "
            f"connections + {FD_RESERVE} spare), limit is {soft} (RLIMIT_NOFILE)")


def _state(conns: list[Connection], *, delta: bool) -> handoff.Snapshot | None:
    """The meta and pending bytes of `conns` as one snapshot, or None if there is nothing.

    Pre-send: every non-empty meta and pending bytes. Delta (`delta`): meta only where it
    changed since, and bytes for every connection, empty ones included (they replace what
    was pre-sent).
    """
    meta = {c.id: dict(c.meta) for c in conns if (c._meta_dirty or not delta) and c.meta}
    data = {c.id: c.pending_bytes() for c in conns}
    if not delta:
        data = {cid: b for cid, b in data.items() if b}
    for c in conns:
        c._meta_dirty = False
    if not meta and not data:
        return None
    return handoff.dump({"meta": meta, "bytes": data}, app_version=0)


def _chunks(items: list[Connection], size: int) -> list[list[Connection]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class LinkSender:
    """The old worker's end: pre-send while serving, the delta in the pause."""

    def __init__(self, sock: socket.socket, hub: ConnectionHub, who: str) -> None:
        self.hub = hub
        self.who = who
        self.error: str | None = None
        self.chan = Channel(sock, self._on_message, self._on_close)

    def _on_message(self, msg: Message) -> None:
        msg.close_fds()  # the successor sends nothing but replies

    def _on_close(self, error: ChannelError) -> None:
        self.error = str(error)

    async def _ask(self, body: m.Body, fds: list[int] | None = None) -> None:
        try:
            reply = await self.chan.request(body.body(), fds or [], timeout=3600)
        except ChannelError as e:
            raise LinkError(f"handoff link to the successor failed: {e}") from e
        reply.close_fds()
        answer = m.parse_reply(m.Empty, reply.body)
        if isinstance(answer, m.Failure):
            raise LinkError(f"the successor refused the connections: {answer.error}")

    async def presend(self) -> int:
        """Send every connection (fds, meta, pending bytes) while still serving them."""
        hub = self.hub
        tracking = hub.begin_tracking()
        conns = [c for c in hub.conns if not c.closed and not c.pinned]  # pinned ones stay
        # Channel.send duplicates a message's descriptors until the kernel took them.
        fd_budget(m.LINK_BATCH, self.who)
        await self._ask(m.ConnsBegin(len(conns)))
        for chunk in _chunks(conns, m.LINK_BATCH - 1):
            chunk = [c for c in chunk if not c.closed and not c.handed and not c.pinned]
            if not chunk:
                continue
            for c in chunk:
                tracking.sent[c.id] = c
            body, fds, snap = self._batch(chunk, ack=True)
            try:
                await self._ask(body, fds)
            finally:
                if snap is not None:
                    snap.close()
        await self._ask(m.ConnsEnd(len(tracking.sent)))
        return len(tracking.sent)

    def _batch(self, chunk: list[Connection], *, ack: bool
               ) -> tuple[m.ConnsBatch, list[int], handoff.Snapshot | None]:
        snap = _state(chunk, delta=False)
        fds = [*(snap.send_fds if snap is not None else []), *(c.sock.fileno() for c in chunk)]
        body = m.ConnsBatch(ids=[c.id for c in chunk], listeners=[c.listener for c in chunk],
                            count=len(chunk), state=snap is not None, ack=ack)
        return body, fds, snap

    def send_delta(self, handover: Handover) -> None:
        """Inside the pause: connections new since the pre-send, then what changed."""
        if self.error is not None:
            raise LinkError(f"handoff link to the successor failed: {self.error}")
        try:
            for chunk in _chunks(handover.new, m.LINK_BATCH - 1):
                body, fds, snap = self._batch(chunk, ack=False)
                try:
                    self.chan.send(body.body(), fds)
                finally:
                    if snap is not None:
                        snap.close()
            snap = _state(handover.changed, delta=True)
            try:
                delta = m.ConnsDelta(gone=handover.gone, conns=handover.count,
                                     state=snap is not None)
                self.chan.send(delta.body(), snap.send_fds if snap is not None else [])
            finally:
                if snap is not None:
                    snap.close()
        except ChannelError as e:
            raise LinkError(f"handoff link to the successor failed: {e}") from e

    def close(self) -> None:
        self.chan.close()


class LinkReceiver:
    """The new worker's end: keeps the pre-sent sockets (unserved), applies the delta."""

    def __init__(self, sock: socket.socket, hub: ConnectionHub, who: str) -> None:
        self.hub = hub
        self.who = who
        loop = asyncio.get_running_loop()
        self.conns: dict[int, Connection] = {}  # by the predecessor's id
        self.by_fd: dict[int, Connection] = {}  # the same, by our fd (built before the pause)
        self.watch: select.epoll | None = select.epoll()
        self.present: asyncio.Future[int] = loop.create_future()
        self.delta: asyncio.Future[list[Connection]] = loop.create_future()
        for fut in (self.present, self.delta):  # a failure nobody awaits (abort) is fine
            fut.add_done_callback(_retrieve)
        self._total = -1
        self.chan = Channel(sock, self._on_message, self._on_close)

    def _fail(self, error: str) -> None:
        for fut in (self.present, self.delta):
            if not fut.done():
                fut.set_exception(LinkError(error))

    def _on_close(self, error: ChannelError) -> None:
        self._fail(f"{m.LINK_CLOSED}: {error}")

    def _on_message(self, msg: Message) -> None:
        kind = m.LINK_MESSAGES.get(msg.type)
        try:
            if kind is None:
                raise LinkError(f"unknown link message {msg.type[:64]!r}")
            req = kind.parse(msg.body)
            if isinstance(req, m.ConnsBegin):
                msg.close_fds()
                self._begin(req)
            elif isinstance(req, m.ConnsBatch):
                self._take(req, msg.take_fds())
            elif isinstance(req, m.ConnsEnd):
                msg.close_fds()
                if req.total != len(self.conns):
                    raise LinkError(f"pre-send announced {req.total} connections, "
                                    f"{len(self.conns)} arrived")
                if not self.present.done():
                    self.present.set_result(len(self.conns))
            else:
                assert isinstance(req, m.ConnsDelta)
                self._apply(req, msg.take_fds())
        except (LinkError, m.MessageError, handoff.SnapshotError, OSError) as e:
            msg.close_fds()
            error = str(e)
            log.error("event=link.refused %s type=%r error=%r", self.who, msg.type[:64], error)
            if "id" in msg.body and not self.chan.closed:
                self.chan.reply(msg, m.failed(error))
            self._fail(error)
            return
        if "id" in msg.body and not self.chan.closed:
            self.chan.reply(msg, m.ok())

    def _begin(self, req: m.ConnsBegin) -> None:
        if self._total >= 0:
            raise LinkError("a second conns.begin on one link")
        if req.total < 0:
            raise LinkError(f"conns.begin: negative total {req.total}")
        fd_budget(req.total, self.who)
        self._total = req.total

    def _take(self, req: m.ConnsBatch, fds: list[int]) -> None:
        try:
            if self._total < 0:
                raise LinkError("conns.batch before conns.begin")
            if len(req.ids) != req.count or len(req.listeners) != req.count:
                raise LinkError(f"conns.batch: {req.count} announced, {len(req.ids)} ids, "
                                f"{len(req.listeners)} listeners")
            state, socks = self._split(req.state, req.count, fds)
        except BaseException:
            _close(fds)
            raise
        extra = self._load(state)
        families = {name: sock.family for name, sock in self.hub.listeners.items()
                    if sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)}
        made: list[int] = []
        i = 0
        try:
            for i, (cid, name, fd) in enumerate(zip(req.ids, req.listeners, socks, strict=True)):
                if cid in self.conns:
                    raise LinkError(f"conns.batch: connection {cid} sent twice")
                family = families.get(name)
                # Given the listener's family, Python skips its three detection calls; one
                # SO_TYPE check remains (ENOTSOCK for anything but a socket).
                sock = (socket.socket(fileno=fd) if family is None
                        else socket.socket(family, socket.SOCK_STREAM, 0, fd))
                i += 1  # fd is owned by `sock` from here on
                try:
                    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
                except OSError as e:
                    kind = -1
                    error = e.strerror
                if kind != socket.SOCK_STREAM:
                    sock.close()
                    raise LinkError(f"conns.batch: descriptor for connection {cid} is not a "
                                    f"stream socket{f' ({error})' if kind < 0 else ''}")
                conn = Connection(sock, name, self.hub, extra["meta"].get(cid),
                                  extra["bytes"].get(cid, b""), prepared=True)
                self.conns[cid] = conn
                self.by_fd[sock.fileno()] = conn
                made.append(cid)
                if self.watch is not None:
                    self.watch.register(sock.fileno(), select.EPOLLIN)
        except BaseException:
            _close(socks[i:])
            for cid in made:
                self._drop(self.conns.pop(cid))
            raise

    def _split(self, state: bool, count: int, fds: list[int]) -> tuple[list[int], list[int]]:
        """(the state snapshot's fds, the sockets), checked against the announced counts."""
        head = 0
        if state:
            if not fds:
                raise LinkError("conns message announces a state memfd but carries no fd")
            head = 1 + handoff.read_envelope(fds[0]).fds
        if len(fds) != head + count:
            raise LinkError(f"conns message announces {count} sockets"
                            f"{' and a state memfd' if state else ''}, {len(fds)} fds arrived")
        return fds[:head], fds[head:]

    @staticmethod
    def _load(fds: list[int]) -> dict[str, dict[int, Any]]:
        if not fds:
            return {"meta": {}, "bytes": {}}
        restored = handoff.load(None, fds[0], fds[1:])
        state = restored.state
        if (not isinstance(state, dict) or not isinstance(state.get("meta"), dict)
                or not isinstance(state.get("bytes"), dict)):
            raise LinkError("conns state is not {'meta': ..., 'bytes': ...}")
        return state

    def _drop(self, conn: Connection) -> None:
        self.by_fd.pop(conn.sock.fileno(), None)
        if self.watch is not None:
            with contextlib.suppress(OSError, ValueError):
                self.watch.unregister(conn.sock.fileno())
        conn.closed = True
        conn.sock.close()

    def _apply(self, req: m.ConnsDelta, fds: list[int]) -> None:
        try:
            if not self.present.done() or self.delta.done():
                raise LinkError("conns.delta before the end of the pre-send, or twice")
            state, _ = self._split(req.state, 0, fds)
        except BaseException:
            _close(fds)
            raise
        extra = self._load(state)
        for cid in req.gone:
            conn = self.conns.pop(cid, None)
            if conn is not None:
                self._drop(conn)
        for cid, meta in extra["meta"].items():
            if cid in self.conns:
                self.conns[cid].meta = meta
        for cid, data in extra["bytes"].items():
            if cid in self.conns:
                self.conns[cid].buffer = bytearray(data)
        if len(self.conns) != req.conns:
            raise LinkError(f"the predecessor hands over {req.conns} connections, "
                            f"{len(self.conns)} arrived")
        self.delta.set_result(list(self.conns.values()))

    def take(self) -> tuple[dict[int, Connection], select.epoll | None]:
        """The connections by fd (now owned by the caller) and the epoll set watching them."""
        conns, self.by_fd, self.conns = self.by_fd, {}, {}
        watch, self.watch = self.watch, None
        return conns, watch

    def close(self) -> None:
        """Drop what was not taken: sockets, the epoll set, the link."""
        for conn in self.conns.values():
            conn.closed = True
            conn.sock.close()
        self.conns = {}
        self.by_fd = {}
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        self.chan.close()
        self._fail("handoff link closed")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
