"""A hostile peer on the channel: oversized bodies, descriptor floods, unreadable bodies, lost
descriptors. Each fails the request it answers (or, unreadable, those waiting on that peer),
never the channel, and holds nothing afterwards."""

from __future__ import annotations

import array
import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from swapd.channel import (
    MAX_FDS,
    Channel,
    ChannelBusy,
    Limits,
    Message,
    MessageRefused,
    encode,
    socketpair,
)

STRICT = Limits(max_body=16 * 1024 * 1024, unsolicited_fds=0, reply_fds=0, max_queued=64)
HEADER = struct.Struct(">4sBBHI")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def send_raw(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def spilled_frame(length: int, body: bytes = b"") -> tuple[bytes, int]:
    """A SPILLED frame announcing `length` bytes, and its memfd (sparse: costs nothing)."""
    memfd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    if body:
        os.write(memfd, body)
    os.ftruncate(memfd, length)
    return HEADER.pack(b"SWPD", 1, 0x01, 1, length), memfd


class Side:
    """The strict end (a supervisor) with a raw socket as its hostile peer."""

    def __init__(self) -> None:
        self.raw, theirs = socketpair()
        self.refused: asyncio.Queue[str] = asyncio.Queue()
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.chan = Channel(theirs, self.inbox.put_nowait, lambda e: None, limits=STRICT,
                            on_refused=self.refused.put_nowait)

    async def next_request_id(self) -> int:
        """The id of the request the strict end just sent."""
        data = await asyncio.get_running_loop().sock_recv(self.raw, 1 << 16)
        return int(json.loads(data[HEADER.size:])["id"])

    async def reason(self) -> str:
        return await asyncio.wait_for(self.refused.get(), 5)

    def close(self) -> None:
        self.chan.close()
        self.raw.close()


def reply(re: int, **body: object) -> bytes:
    (frame, _), = encode({"ok": True, **body, "re": re})
    return frame


def test_an_oversized_body_fails_its_request_without_being_read() -> None:
    async def main() -> None:
        side = Side()
        side.raw.setblocking(False)
        task = asyncio.ensure_future(side.chan.request({"t": "quiesce"}, timeout=5))
        await side.next_request_id()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        header, memfd = spilled_frame(1 << 30)  # 1 GiB announced and really there (sparse)
        send_raw(side.raw, header, [memfd])
        os.close(memfd)
        with pytest.raises(MessageRefused, match=r"body of 1073741824 bytes \(limit 16777216\)"):
            await task
        assert "unreadable frame refused" in await side.reason()
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # KiB
        assert not side.chan.closed
        task = asyncio.ensure_future(side.chan.request({"t": "again"}, timeout=5))
        send_raw(side.raw, reply(await side.next_request_id(), fine=True))
        assert (await task).body["fine"] is True
        side.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before


def test_unsolicited_descriptors_are_closed_on_arrival() -> None:
    async def main() -> None:
        side = Side()
        side.raw.setblocking(False)
        devnull = os.open(os.devnull, os.O_RDONLY)
        base = open_fds()
        carrier = HEADER.pack(b"SWPD", 1, 0x02, MAX_FDS, 0)
        # 10,000 descriptors in carrier frames that no message ever follows
        for _ in range(40):
            send_raw(side.raw, carrier, [devnull] * MAX_FDS)
            await asyncio.sleep(0)  # let the strict end read: the socket buffer is small
        # The message after the flood (which would have carried them) is refused, not fed;
        # once it is, every carrier before it has been read: none of their fds is held.
        send_raw(side.raw, encode({"t": "status", "text": "hi"})[0][0])
        reason = await side.reason()
        assert "'status' message refused: more than 0 descriptors (10000 descriptors)" in reason
        assert open_fds() == base
        send_raw(side.raw, encode({"t": "status", "text": "hi"})[0][0])
        assert (await asyncio.wait_for(side.inbox.get(), 5)).body["text"] == "hi"
        os.close(devnull)
        side.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before


def test_a_reply_over_its_descriptor_allowance_fails_only_that_request() -> None:
    async def main() -> None:
        side = Side()
        side.raw.setblocking(False)
        first = asyncio.ensure_future(side.chan.request({"t": "a"}, timeout=5, reply_fds=300))
        first_id = await side.next_request_id()
        second = asyncio.ensure_future(side.chan.request({"t": "b"}, timeout=5))
        second_id = await side.next_request_id()
        devnull = os.open(os.devnull, os.O_RDONLY)
        # the second request allows no descriptor: its reply with 3 is refused ...
        (frame, fds), = encode({"ok": True, "re": second_id}, [devnull] * 3)
        send_raw(side.raw, frame, fds)
        with pytest.raises(MessageRefused, match=r"3 descriptors \(at most 0 allowed\)"):
            await second
        # ... while the first takes its 300 (carriers then the body), in order
        for frame, fds in encode({"ok": True, "re": first_id}, [devnull] * 300):
            send_raw(side.raw, frame, fds)
        msg = await asyncio.wait_for(first, 5)
        assert len(msg.fds) == 300
        msg.close_fds()
        os.close(devnull)
        side.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"[" * 50_000 + b"]" * 50_000, "RecursionError"),
        (b'{"ok": true, "n": ' + b"9" * 5000 + b"}", "ValueError"),
    ],
)
def test_an_unusable_body_is_refused_not_raised(body: bytes, error: str) -> None:
    async def main() -> None:
        side = Side()
        side.raw.setblocking(False)
        task = asyncio.ensure_future(side.chan.request({"t": "q"}, timeout=5))
        await side.next_request_id()
        header, memfd = spilled_frame(len(body), body)
        send_raw(side.raw, header, [memfd])
        os.close(memfd)
        with pytest.raises(MessageRefused, match=error):
            await task
        assert not side.chan.closed
        side.close()

    asyncio.run(main())


def test_a_spilled_body_in_a_pipe_is_refused_without_blocking() -> None:
    async def main() -> None:
        side = Side()
        side.raw.setblocking(False)
        task = asyncio.ensure_future(side.chan.request({"t": "q"}, timeout=5))
        await side.next_request_id()
        r, w = os.pipe()  # nobody ever writes: a read would block the loop for good
        send_raw(side.raw, HEADER.pack(b"SWPD", 1, 0x01, 1, 100), [r])
        with pytest.raises(MessageRefused, match="not in a memfd"):
            await task
        os.close(r)
        os.close(w)
        side.close()

    asyncio.run(main())


def test_a_peer_that_does_not_read_gets_no_unbounded_queue() -> None:
    async def main() -> None:
        side = Side()
        sent = 0
        with pytest.raises(ChannelBusy, match="not reading its channel"):
            for _ in range(100_000):
                side.chan.send({"t": "x", "pad": "p" * 30_000})
                sent += 1
        assert sent < 100_000
        side.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before


# The kernel drops descriptors it cannot install (the receiver at its fd limit) and sets
# MSG_CTRUNC: the reply is refused by its id, the channel stays, the next request works.
CTRUNC = textwrap.dedent(
    """
    import asyncio, json, os, resource, socket
    from swapd.channel import Channel, DescriptorsLost, Limits, MessageRefused, encode, socketpair

    async def main():
        mine, theirs = socketpair()
        chan = Channel(mine, lambda m: None, lambda e: None, limits=Limits(reply_fds=1000))
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = {}
        task = asyncio.ensure_future(chan.request({"t": "quiesce"}, timeout=5))
        rid = json.loads((await loop.sock_recv(theirs, 65536))[12:])["id"]
        open_now = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 20, 4096))
        for frame, fds in encode({"ok": True, "re": rid}, [devnull] * 200):
            theirs.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      bytes(__import__("array").array("i", fds)))])
        try:
            await task
        except MessageRefused as e:
            out["refused"] = str(e)
            out["lost"] = isinstance(e, DescriptorsLost)
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
        out["closed"] = chan.closed
        out["open_after"] = len(os.listdir("/proc/self/fd")) - open_now
        task = asyncio.ensure_future(chan.request({"t": "again"}, timeout=5))
        rid = json.loads((await loop.sock_recv(theirs, 65536))[12:])["id"]
        theirs.send(encode({"ok": True, "re": rid, "fine": 1})[0][0])
        out["next"] = (await task).body.get("fine")
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_descriptors_lost_at_the_fd_limit_fail_the_reply_not_the_channel() -> None:
    out = subprocess.run([sys.executable, "-c", CTRUNC], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["refused"].startswith("reply to request 1 refused: descriptors lost")
    assert result["lost"] is True
    assert result["closed"] is False
    assert result["open_after"] <= 1  # every descriptor that did arrive was closed again
    assert result["next"] == 1


def test_a_refused_request_is_answered_at_once() -> None:
    async def main() -> None:
        # The strict end is asked something with descriptors it does not take: the asker
        # hears why at once instead of waiting out its timeout.
        a, b = socketpair()
        asker = Channel(a, lambda m: None, lambda e: None)
        strict = Channel(b, lambda m: None, lambda e: None, limits=STRICT)
        devnull = os.open(os.devnull, os.O_RDONLY)
        reply = await asker.request({"t": "restore"}, [devnull] * 3, timeout=5)
        assert reply.body == {"ok": False, "re": 1, "error": "request refused: 3 descriptors "
                                                            "(at most 0 allowed)"}
        os.close(devnull)
        asker.close()
        strict.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before
