"""Channel: framed, versioned messages with file descriptors between supervisor and worker.

One AF_UNIX SOCK_SEQPACKET socketpair per worker. SEQPACKET keeps message
boundaries and ties SCM_RIGHTS fds to exactly one message, so there is no
stream reassembly and no fd can be attributed to the wrong frame.

Frame (one datagram):

     0        4     5       6         8              12
    +--------+-----+-------+---------+--------------+---------------------+
    | "SWPD" | ver | flags | nfds    | body length  | body: UTF-8 JSON    |
    |  4 B   | u8  | u8    | u16 BE  | u32 BE       | object, <= 32 KiB   |
    +--------+-----+-------+---------+--------------+---------------------+
    ancillary: SCM_RIGHTS with `nfds` descriptors

    flags bit 0 (SPILLED): the body did not fit inline; it is in a sealed memfd
    sent as the first descriptor, `body length` is its size, and the frame carries
    no body bytes. `nfds` counts that memfd too.
    flags bit 1 (FDS_ONLY): a carrier frame, no body, only descriptors: the kernel
    takes at most 253 per datagram, so a message with more (a handoff of thousands
    of connections) is sent as carriers followed by the frame with the body; the
    receiver prepends the carried descriptors, in order, to that message's.

The JSON body is an object with a type `t`; requests carry an `id`, replies carry
`re` (the id they answer). A frame with another magic or version, a truncated
datagram or a body that is not a JSON object is a ProtocolError: the receiver
closes any fds that came with it and reports the error; it never guesses.
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


def carried_fds(datagram: bytes, fds: list[int]) -> bool:
    """True if this datagram is a carrier frame (its fds belong to the next message)."""
    if len(datagram) != _HEADER.size:
        return False
    magic, version, flags, nfds, length = _HEADER.unpack_from(datagram)
    if magic != MAGIC or version != VERSION or not flags & _FDS_ONLY:
        return False
    if nfds != len(fds) or length != 0:
        raise ProtocolError(f"carrier frame announces {nfds} fds but {len(fds)} arrived")
    return True


def decode(datagram: bytes, fds: list[int]) -> Message:
    """Parse one datagram; on any error the fds are closed before raising."""
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
        if nfds != len(fds):
            raise ProtocolError(f"frame announces {nfds} fds but {len(fds)} arrived")
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
    data = os.pread(fd, length, 0)
    if len(data) != length:
        raise ProtocolError(f"spilled body truncated: {len(data)} of {length} bytes")
    return data


class Channel:
    """One end of a channel, driven by an asyncio loop.

    Unsolicited messages go to `on_message`; replies to `request()` resolve its
    future instead. `on_close` runs once, on EOF or a protocol error (with the
    error). Sending never blocks the loop: frames the kernel cannot take yet wait
    in a queue flushed when the socket becomes writable.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_close: Callable[[ChannelError], None],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._on_message = on_message
        self._on_close = on_close
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._carried: list[int] = []  # fds of carrier frames, for the next message
        self._closed: ChannelError | None = None
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def send(self, body: Body, fds: Iterable[int] = ()) -> None:
        """Queue a message; the caller keeps ownership of `fds` (the kernel duplicates them).

        Because sending may be deferred, fds are duplicated here so the caller
        may close its own copies at once.
        """
        if self._closed is not None:
            raise ChannelClosed(f"channel closed: {self._closed}")
        dups = [os.dup(fd) for fd in fds]
        try:
            frames = encode(body, dups)
        except BaseException:
            _close_all(dups)
            raise
        idle = not self._out
        self._out.extend(frames)
        if idle:
            self._flush()

    async def request(
        self, body: Body, fds: Iterable[int] = (), *, timeout: float
    ) -> Message:
        """Send a request and wait for the message whose `re` is its id."""
        rid = next(self._ids)
        fut: asyncio.Future[Message] = self._loop.create_future()
        self._pending[rid] = fut
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
        # Read everything available now: one wakeup may carry several frames.
        for _ in range(64):
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
            # One owner for the fds of a bad frame: this loop until decode(), then decode()
            # (which closes them on error). Closing twice could close an fd number another
            # thread has just been given.
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ProtocolError("truncated frame")
                if carried_fds(data, fds):
                    self._carried.extend(fds)
                    continue
            except ProtocolError as e:
                _close_all(fds)
                self._shutdown(e)
                return
            try:
                msg = decode(data, fds)
            except ProtocolError as e:
                self._shutdown(e)
                return
            if self._carried:
                msg.fds[:0], self._carried = self._carried, []
            self._dispatch(msg)
            if self._closed is not None:
                return

    def _dispatch(self, msg: Message) -> None:
        re = msg.body.get("re")
        if re is None:
            self._on_message(msg)
            return
        fut = self._pending.pop(re, None) if isinstance(re, int) else None
        if fut is None or fut.done():
            # A reply nobody waits for any more (its request timed out): drop it.
            msg.close_fds()
            return
        fut.set_result(msg)

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
        for fut in self._pending.values():
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
