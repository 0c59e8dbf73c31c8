"""Channel: framed, versioned messages with file descriptors between supervisor and worker.

One AF_UNIX SOCK_SEQPACKET socketpair per worker. SEQPACKET keeps message
boundaries and ties SCM_RIGHTS fds to exactly one message, so there is no
stream reassembly and no fd can be attributed to the wrong frame.

The frame (magic, version, flags SPILLED and FDS_ONLY, descriptor count, body length)
and the messages are specified once, in docs/architecture.md, "Wire formats"; the
message types themselves are `swapd.messages`.

A frame with another magic or version, a truncated
datagram or a body that is not a JSON object is a ProtocolError: the receiver
closes any fds that came with it and reports the error; it never guesses.

A bad message never closes the channel (a quiesced worker whose channel closed would
exit, taking the only copy of its state with it): the receiver refuses that message
only. If its body can be read, the request it answers fails with the reason
(`MessageRefused`), and a refused request is answered `ok: false` with it at once;
if the body cannot be read, every request waiting on that peer fails. Descriptors the
kernel could not give us (MSG_CTRUNC: our fd limit) make the message refused the same
way (`DescriptorsLost`).

`Limits` bounds what one end accepts: the body size (checked before a spilled body is
read), the descriptors of a reply (per request: a snapshot may carry one per
connection) and of an unsolicited message (the supervisor: none), and the frames
queued for a peer that does not read. Each wakeup reads at most 64 frames and
`READ_BUDGET` bytes of spilled bodies, so a flooding peer cannot starve the loop.
Only EOF or a failing socket closes a channel.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"SWPD"
VERSION = 1
_HEADER = struct.Struct(">4sBBHI")
_SPILLED = 0x01
_FDS_ONLY = 0x02
MAX_INLINE = 32 * 1024
MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253)
READ_BUDGET = 32 * 1024 * 1024  # bytes of spilled bodies read per wakeup
_FRAMES_PER_WAKEUP = 64
_LOST = "descriptors lost: the kernel could not give them all to this process (its fd limit)"
_RECV_SIZE = _HEADER.size + MAX_INLINE
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)

Body = dict[str, Any]


class ChannelError(Exception):
    """Base of channel failures."""


class ChannelClosed(ChannelError):
    """The peer closed its end (it exited or crashed)."""


class ProtocolError(ChannelError):
    """A frame that does not follow this module's wire format."""


class RequestTimeout(ChannelError):
    """No reply arrived before the request's deadline."""


class MessageRefused(ChannelError):
    """The peer's reply broke a bound or the wire format; the channel stays open."""


class DescriptorsLost(MessageRefused):
    """The kernel could not give us the reply's descriptors (MSG_CTRUNC: our fd limit)."""


class ChannelBusy(ChannelError):
    """The peer does not read: too many frames wait to be sent to it."""


@dataclass(frozen=True)
class Limits:
    """What one end accepts from its peer; None: no bound (a worker trusts its supervisor)."""

    max_body: int | None = None  # bytes of one message's body
    unsolicited_fds: int | None = None  # descriptors on a message that answers no request
    reply_fds: int | None = None  # descriptors on a reply, unless the request says otherwise
    max_queued: int | None = None  # frames waiting to be sent before send() refuses more


@dataclass
class Message:
    body: Body
    fds: list[int] = field(default_factory=list)

    @property
    def type(self) -> str:
        return str(self.body.get("t", ""))

    def take_fds(self) -> list[int]:
        """Hand the fds over to the caller, who must close them."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A fresh pair; both ends close-on-exec (the spawner makes the child's end inheritable)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode(body: Body, fds: Iterable[int] = ()) -> list[tuple[bytes, list[int]]]:
    """Frame a message: carrier frames for excess fds, then the frame with the body."""
    data = json.dumps(body, separators=(",", ":")).encode()
    fd_list = list(fds)
    spill = len(data) > MAX_INLINE
    room = MAX_FDS - (1 if spill else 0)
    carried, own = fd_list[: max(0, len(fd_list) - room)], fd_list[max(0, len(fd_list) - room):]
    frames = [(_HEADER.pack(MAGIC, VERSION, _FDS_ONLY, len(chunk), 0), chunk)
              for chunk in (carried[i : i + MAX_FDS] for i in range(0, len(carried), MAX_FDS))]
    if not spill:
        frames.append((_HEADER.pack(MAGIC, VERSION, 0, len(own), len(data)) + data, own))
        return frames
    memfd = os.memfd_create("swapd-channel-body", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write_all(memfd, data)
        fcntl.fcntl(
            memfd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE,
        )
    except BaseException:
        os.close(memfd)
        raise
    header = _HEADER.pack(MAGIC, VERSION, _SPILLED, len(own) + 1, len(data))
    frames.append((header, [memfd, *own]))
    return frames


def decode(datagram: bytes, fds: list[int], max_body: int | None = None, *,
           refused: bool = False) -> Message:
    """Parse one datagram; on any error the fds are closed before raising.

    `refused`: the message is refused already (its descriptors were lost, or do not match
    the header); any number of them is accepted, so the body can still say what it answers.
    """
    try:
        if len(datagram) < _HEADER.size:
            raise ProtocolError(f"short frame: {len(datagram)} bytes")
        magic, version, flags, nfds, length = _HEADER.unpack_from(datagram)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}")
        if version != VERSION:
            raise ProtocolError(
                f"unsupported channel version {version} (this side speaks {VERSION})"
            )
        if nfds != len(fds) and not refused:
            raise ProtocolError(f"frame announces {nfds} fds but {len(fds)} arrived")
        if max_body is not None and length > max_body:
            raise ProtocolError(f"body of {length} bytes (limit {max_body})")
        if flags & _SPILLED:
            if not fds or len(datagram) != _HEADER.size:
                raise ProtocolError("spilled frame without its memfd")
            memfd = fds.pop(0)
            try:
                data = _read_exact(memfd, length)
            finally:
                os.close(memfd)
        else:
            data = datagram[_HEADER.size :]
            if len(data) != length:
                raise ProtocolError(f"body length {len(data)} != announced {length}")
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"body is not JSON: {e}") from e
        except (ValueError, RecursionError) as e:  # a 5000-digit number, [[[[...]]]]
            raise ProtocolError(f"body is not usable JSON: {type(e).__name__}") from e
        if not isinstance(body, dict):
            raise ProtocolError("body is not a JSON object")
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return Message(body, fds)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, length: int) -> bytes:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a pipe or socket would block, or never end
            raise ProtocolError("spilled body is not in a memfd")
        data = os.pread(fd, length, 0)
    except OSError as e:
        raise ProtocolError(f"spilled body unreadable: {e.strerror or e}") from e
    if len(data) != length:
        raise ProtocolError(f"spilled body truncated: {len(data)} of {length} bytes")
    return data


def _spilled_size(datagram: bytes) -> int:
    if len(datagram) < _HEADER.size:
        return 0
    _, _, flags, _, length = _HEADER.unpack_from(datagram)
    return int(length) if flags & _SPILLED else 0


def _is_carrier(datagram: bytes) -> bool:
    if len(datagram) != _HEADER.size:
        return False
    magic, version, flags, _, _ = _HEADER.unpack_from(datagram)
    return magic == MAGIC and version == VERSION and bool(flags & _FDS_ONLY)


def _most(*bounds: int | None) -> int | None:
    """The largest of some bounds, None (no bound) winning."""
    if any(b is None for b in bounds):
        return None
    return max(b for b in bounds if b is not None)


class Channel:
    """One end of a channel, driven by an asyncio loop.

    Unsolicited messages go to `on_message`; replies to `request()` resolve its
    future instead. `on_close` runs once, on EOF or a failing socket (with the
    error). A message refused (see the module's docstring) is reported to
    `on_refused` with one line, at most once per frame. Sending never blocks the loop:
    frames the kernel cannot take yet wait in a queue flushed when the socket becomes
    writable.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_close: Callable[[ChannelError], None],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        limits: Limits | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._on_message = on_message
        self._on_close = on_close
        self._on_refused = on_refused or (lambda reason: None)
        self.limits = limits or Limits()
        # request id -> (its future, how many descriptors its reply may carry)
        self._pending: dict[int, tuple[asyncio.Future[Message], int | None]] = {}
        self._ids = itertools.count(1)
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._carried: list[int] = []  # fds of carrier frames, for the next message
        self._broken: str | None = None  # why the message being carried will be refused
        self._lost = False  # ... because the kernel dropped descriptors of it
        self._dropped = 0  # descriptors of that message closed on arrival
        self._closed: ChannelError | None = None
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def send(self, body: Body, fds: Iterable[int] = ()) -> None:
        """Queue a message; the caller keeps ownership of `fds` (the kernel duplicates them).

        Because sending may be deferred, fds are duplicated here so the caller
        may close its own copies at once. ChannelError if the message cannot be queued
        (closed, out of descriptors, the peer does not read).
        """
        if self._closed is not None:
            raise ChannelClosed(f"channel closed: {self._closed}")
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
            frames = encode(body, dups)
        except OSError as e:  # EMFILE: the message fails, the channel stays
            _close_all(dups)
            raise ChannelError(f"cannot pass descriptors: {e.strerror or e}") from e
        except BaseException:
            _close_all(dups)
            raise
        limit = self.limits.max_queued
        if limit is not None and len(self._out) + len(frames) > limit:
            for _, frame_fds in frames:
                _close_all(frame_fds)
            raise ChannelBusy(f"the peer is not reading its channel ({len(self._out)} frames "
                              f"queued, limit {limit})")
        idle = not self._out
        self._out.extend(frames)
        if idle:
            self._flush()

    async def request(
        self, body: Body, fds: Iterable[int] = (), *, timeout: float,
        reply_fds: int | None = None,
    ) -> Message:
        """Send a request and wait for the message whose `re` is its id.

        `reply_fds`: how many descriptors the reply may carry (default: the limits').
        """
        rid = next(self._ids)
        fut: asyncio.Future[Message] = self._loop.create_future()
        allowance = reply_fds if reply_fds is not None else self.limits.reply_fds
        self._pending[rid] = (fut, allowance)
        try:
            self.send({**body, "id": rid}, fds)
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise RequestTimeout(
                    f"no reply to {body.get('t')!r} within {timeout:g}s"
                ) from None
        finally:
            self._pending.pop(rid, None)

    def reply(self, request: Message, body: Body, fds: Iterable[int] = ()) -> None:
        self.send({**body, "re": request.body.get("id")}, fds)

    def close(self) -> None:
        self._shutdown(ChannelClosed("closed locally"), notify=False)

    # -- internals --------------------------------------------------------

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    self.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    self.sock.send(data)
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError as e:
                self._shutdown(ChannelClosed(f"send failed: {e.strerror or e}"))
                return
            self._out.popleft()
            _close_all(fds)

    def _on_writable(self) -> None:
        self._loop.remove_writer(self.sock.fileno())
        self._flush()

    def _on_readable(self) -> None:
        # Read what is available now, within a budget: one wakeup may carry several frames,
        # and a peer that floods us must not keep the loop to itself.
        budget = READ_BUDGET
        for _ in range(_FRAMES_PER_WAKEUP):
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    _RECV_SIZE, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError as e:
                self._shutdown(ChannelClosed(f"receive failed: {e.strerror or e}"))
                return
            fds = _fds_from(anc)
            if not data and not fds:
                self._shutdown(ChannelClosed("peer closed the channel"))
                return
            problem = None
            if flags & socket.MSG_CTRUNC:
                problem = _LOST
            elif flags & socket.MSG_TRUNC:
                problem = f"frame longer than {_RECV_SIZE} bytes, truncated"
            # One owner for the fds of a frame at a time: the carrier path, or decode()
            # (which closes them on error). Closing twice could close an fd number another
            # thread has just been given.
            if _is_carrier(data):
                self._on_carrier(data, fds, problem)
                continue
            self._on_frame(data, fds, problem)
            if self._closed is not None:
                return
            budget -= _spilled_size(data)
            if budget <= 0:
                return  # the rest at the next wakeup

    def _allowance(self, re: Any = None, *, carrying: bool = False) -> int | None:
        """How many descriptors the message may carry: as its request allows (unsolicited:
        the limits'); while carriers arrive, the message is unknown: the most any allows."""
        unsolicited = self.limits.unsolicited_fds
        if carrying:
            return _most(unsolicited, *(allowed for _, allowed in self._pending.values()))
        pending = self._pending.get(re) if type(re) is int else None  # true is not 1
        return pending[1] if pending is not None else unsolicited

    def _on_carrier(self, data: bytes, fds: list[int], problem: str | None) -> None:
        _, _, _, nfds, length = _HEADER.unpack_from(data)
        if problem is None and (nfds != len(fds) or length != 0):
            problem = f"carrier frame announces {nfds} fds but {len(fds)} arrived"
        allowance = self._allowance(carrying=True)
        if problem is None and allowance is not None and len(self._carried) + len(fds) > allowance:
            problem = f"more than {allowance} descriptors"
        if problem is None and self._broken is None:
            self._carried.extend(fds)
            return
        if problem == _LOST and self._broken is None:
            self._lost = True
        # The message these fds belong to is refused; its last frame will say which it was.
        self._dropped += len(self._carried) + len(fds)
        _close_all(self._carried)
        _close_all(fds)
        self._carried = []
        self._broken = self._broken or problem

    def _on_frame(self, data: bytes, fds: list[int], problem: str | None) -> None:
        carried, self._carried = self._carried, []
        broken, self._broken = self._broken, None
        dropped, self._dropped = self._dropped, 0
        lost, self._lost = self._lost or problem == _LOST, False
        problem = broken or problem
        if problem is None and len(data) >= _HEADER.size:
            nfds = _HEADER.unpack_from(data)[3]
            if nfds != len(fds):
                problem = f"frame announces {nfds} fds but {len(fds)} arrived"
        try:
            msg = decode(data, fds, self.limits.max_body, refused=problem is not None)
        except ProtocolError as e:
            _close_all(carried)
            self._refuse(f"{problem}; and {e}" if problem else str(e), None, lost=lost)
            return
        if carried:
            msg.fds[:0] = carried
        re = msg.body.get("re")
        allowance = self._allowance(re)
        count = len(msg.fds) + dropped
        if problem is None and allowance is not None and count > allowance:
            problem = f"{count} descriptors (at most {allowance} allowed)"
        elif problem is not None and dropped:
            problem = f"{problem} ({count} descriptors)"
        if problem is not None:
            msg.close_fds()
            self._refuse(problem, msg.body, lost=lost)
            return
        self._dispatch(msg)

    def _refuse(self, reason: str, body: Body | None, *, lost: bool = False) -> None:
        """Refuse one message: fail the request it answers (all, if it cannot be read)."""
        if body is None:
            what = "unreadable frame"
            failing = list(self._pending)
        else:
            re = body.get("re")
            what = f"{str(body.get('t', 'reply'))[:64]!r} message" if re is None else \
                f"reply to request {str(re)[:20]}"
            failing = [re] if type(re) is int and re in self._pending else []
        kind = DescriptorsLost if lost else MessageRefused
        for rid in failing:
            fut, _ = self._pending.pop(rid)
            if not fut.done():
                fut.set_exception(kind(f"{what} refused: {reason}"))
        self._on_refused(f"{what} refused: {reason}")
        asked = body.get("id") if body is not None and "re" not in body else None
        if type(asked) is int:
            # A request we cannot take: say so now, rather than let its sender time out.
            with contextlib.suppress(ChannelError):
                self.send({"ok": False, "error": f"request refused: {reason}", "re": asked})

    def _dispatch(self, msg: Message) -> None:
        re = msg.body.get("re")
        if re is None:
            self._on_message(msg)
            return
        pending = self._pending.pop(re, None) if type(re) is int else None
        if pending is None or pending[0].done():
            # A reply nobody waits for any more (its request timed out): drop it.
            msg.close_fds()
            return
        pending[0].set_result(msg)

    def _shutdown(self, error: ChannelError, *, notify: bool = True) -> None:
        if self._closed is not None:
            return
        self._closed = error
        fd = self.sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self.sock.close()
        _close_all(self._carried)
        self._carried = []
        while self._out:
            _close_all(self._out.popleft()[1])
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(str(error)))
        self._pending.clear()
        if notify:
            self._on_close(error)


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
