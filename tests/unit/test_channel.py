"""The channel wire format: framing, spilled bodies, fd passing (many fds), bad frames."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct
from collections import Counter

import pytest

from swapd.channel import (
    MAX_FDS,
    MAX_INLINE,
    Channel,
    ChannelClosed,
    ChannelError,
    Message,
    ProtocolError,
    RequestTimeout,
    decode,
    encode,
    socketpair,
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def pair() -> tuple[Channel, Channel, asyncio.Queue[Message], list[ChannelError]]:
    a, b = socketpair()
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    closed: list[ChannelError] = []
    left = Channel(a, lambda m: None, closed.append)
    right = Channel(b, inbox.put_nowait, closed.append)
    return left, right, inbox, closed


def test_roundtrip_small_and_spilled_bodies() -> None:
    async def main() -> None:
        left, right, inbox, _ = await pair()
        left.send({"t": "x", "n": 1})
        big = "y" * (MAX_INLINE * 3)
        left.send({"t": "big", "data": big})
        first = await asyncio.wait_for(inbox.get(), 5)
        second = await asyncio.wait_for(inbox.get(), 5)
        assert first.body == {"t": "x", "n": 1} and first.fds == []
        assert second.body["data"] == big and second.fds == []  # memfd consumed, closed
        left.close()
        right.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before


@pytest.mark.parametrize("count", [1, MAX_FDS, MAX_FDS + 1, 3 * MAX_FDS + 7])
def test_fds_arrive_in_order_even_beyond_one_datagram(count: int) -> None:
    async def main() -> None:
        left, right, inbox, _ = await pair()
        pipes = [os.pipe() for _ in range(count)]
        try:
            left.send({"t": "fds", "spill": "z" * (MAX_INLINE + 1)}, [r for r, _ in pipes])
            msg = await asyncio.wait_for(inbox.get(), 10)
            assert len(msg.fds) == count
            for i, ((_, w), fd) in enumerate(zip(pipes, msg.take_fds(), strict=True)):
                os.write(w, str(i).encode())
                assert os.read(fd, 16) == str(i).encode(), "fd order preserved"
                os.close(fd)
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            left.close()
            right.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before


def test_request_reply_and_timeout() -> None:
    async def main() -> None:
        a, b = socketpair()
        server: Channel

        def on_message(msg: Message) -> None:
            if msg.body.get("t") == "ping":
                server.reply(msg, {"pong": True})

        server = Channel(b, on_message, lambda e: None)
        client = Channel(a, lambda m: None, lambda e: None)
        reply = await client.request({"t": "ping"}, timeout=5)
        assert reply.body["pong"] is True and reply.body["re"] == 1
        with pytest.raises(RequestTimeout, match="no reply to 'silent'"):
            await client.request({"t": "silent"}, timeout=0.05)
        server.close()
        with pytest.raises(ChannelClosed):
            await client.request({"t": "ping"}, timeout=5)
        client.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("datagram", "error"),
    [
        (b"XXXX" + bytes(8), "bad magic"),
        (b"SWPD" + struct.pack(">BBHI", 9, 0, 0, 0), "unsupported channel version 9"),
        (b"SW", "short frame"),
        (b"SWPD" + struct.pack(">BBHI", 1, 0, 1, 5) + b"[1]xx", "body is not JSON"),
        (b"SWPD" + struct.pack(">BBHI", 1, 0, 1, 3) + b"[1]", "not a JSON object"),
        (b"SWPD" + struct.pack(">BBHI", 1, 0, 2, 2) + b"{}", "announces 2 fds but 1 arrived"),
    ],
)
def test_bad_frames_are_refused_and_fds_closed(datagram: bytes, error: str) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ProtocolError, match=error):
        decode(datagram, [r])
    with pytest.raises(OSError):
        os.fstat(r)  # closed by decode


def test_peer_sending_garbage_is_refused_and_the_channel_stays_open() -> None:
    async def main() -> None:
        a, b = socketpair()
        refused: asyncio.Queue[str] = asyncio.Queue()
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        closed: list[ChannelError] = []
        chan = Channel(b, inbox.put_nowait, closed.append, on_refused=refused.put_nowait)
        a.send(b"not a frame at all")
        assert "bad magic" in await asyncio.wait_for(refused.get(), 5)
        assert not chan.closed and not closed
        frames = encode({"t": "after"})
        a.send(frames[0][0])
        assert (await asyncio.wait_for(inbox.get(), 5)).body == {"t": "after"}
        chan.close()
        a.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("datagram", "error"),
    [
        (b"XXXX" + bytes(8), "bad magic"),  # refused by decode()
        (b"SWPD" + struct.pack(">BBHI", 1, 0, 2, 70_000) + bytes(70_000), "truncated"),
        (b"SWPD" + struct.pack(">BBHI", 1, 2, 5, 0), "carrier frame announces 5"),
    ],
)
def test_fds_of_a_bad_frame_are_closed_exactly_once(
    datagram: bytes, error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second close of the same number could close an fd another thread was just given.
    closes: Counter[int] = Counter()
    real_close = os.close

    def counting_close(fd: int) -> None:
        closes[fd] += 1
        real_close(fd)

    async def main() -> None:
        a, b = socketpair()
        refused: asyncio.Queue[str] = asyncio.Queue()
        chan = Channel(b, lambda m: None, lambda e: None, on_refused=refused.put_nowait)
        r, w = os.pipe()
        a.sendmsg([datagram], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
        real_close(r)
        real_close(w)
        monkeypatch.setattr(os, "close", counting_close)
        if b"SWPD\x01\x02" in datagram:  # a bad carrier: refused with the message it precedes
            a.send(encode({"t": "x"})[0][0])
        reason = await asyncio.wait_for(refused.get(), 5)
        monkeypatch.undo()
        assert error in reason
        chan.close()
        a.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before
    assert len(closes) >= 2 and set(closes.values()) == {1}, closes


def test_encode_splits_fds_into_carriers() -> None:
    fds = list(range(100, 100 + MAX_FDS * 2 + 1))
    frames = encode({"t": "x"}, fds)
    assert [len(f) for _, f in frames] == [MAX_FDS, 1, MAX_FDS]
    assert [fd for _, f in frames for fd in f] == fds, "carriers first, in order"
    assert frames[-1][0].endswith(b'{"t":"x"}')


def test_eof_reports_closed() -> None:
    async def main() -> None:
        a, b = socketpair()
        closed: asyncio.Future[ChannelError] = asyncio.get_running_loop().create_future()
        Channel(b, lambda m: None, closed.set_result)
        a.close()
        err = await asyncio.wait_for(closed, 5)
        assert isinstance(err, ChannelClosed)

    asyncio.run(main())


def test_socketpair_is_seqpacket() -> None:
    a, b = socketpair()
    assert a.type == socket.SOCK_SEQPACKET and not a.get_inheritable()
    a.close()
    b.close()
