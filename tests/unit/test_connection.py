"""ConnectionHub, Connection and the handoff link on a real loop and real sockets: quiesce,
resume, release, mid-request handover, boundaries, accept backoff, pre-send and delta."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import pytest

from swapd.worker.connection import Connection, ConnectionHub, HandedOff
from swapd.worker.link import LinkReceiver, LinkSender

Handler = Callable[[Connection], Awaitable[None]]


class Echo:
    """A line echo handler that records what happened to each call."""

    def __init__(self) -> None:
        self.calls = 0
        self.handed_off = 0
        self.lines: list[bytes] = []

    async def __call__(self, conn: Connection) -> None:
        self.calls += 1
        try:
            while True:
                line = await conn.readline(idle=True)
                if not line:
                    return
                self.lines.append(line)
                await conn.send(line)
        except HandedOff:
            self.handed_off += 1
            raise


async def serve(hub: ConnectionHub, handler: Handler) -> socket.socket:
    lsock = socket.create_server(("127.0.0.1", 0))
    hub.register("echo", lsock, handler)
    hub.start_accepting()
    return lsock


async def client(lsock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*lsock.getsockname())


async def ask(io: tuple[asyncio.StreamReader, asyncio.StreamWriter], line: bytes) -> bytes:
    reader, writer = io
    writer.write(line)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5)


async def settle(hub: ConnectionHub, count: int) -> None:
    """Until `count` connections sit at a boundary (their handlers parked)."""
    async def idle() -> None:
        while len(hub.conns) != count or hub.busy:
            hub._changed.clear()
            await hub._changed.wait()

    await asyncio.wait_for(idle(), 5)


def test_an_aborted_quiesce_wakes_no_handler_and_they_serve_on() -> None:
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=1.0)
        echo = Echo()
        lsock = await serve(hub, echo)
        ios = [await client(lsock) for _ in range(3)]
        for io in ios:
            assert await ask(io, b"a\n") == b"a\n"
        await settle(hub, 3)
        hub.stop_accepting()
        handover = await hub.quiesce(5, 0)
        assert handover.count == 3 and all(c.handed for c in hub.conns)
        ios[0][1].write(b"b\n")  # arrives while handed over: left in the kernel
        await ios[0][1].drain()
        await asyncio.sleep(0)  # one loop turn: our reader would have fired by now
        hub.resume()
        hub.start_accepting()
        assert await asyncio.wait_for(ios[0][0].readline(), 5) == b"b\n"
        assert await ask(ios[1], b"c\n") == b"c\n"
        assert (echo.calls, echo.handed_off) == (3, 0), "the same handler calls, never woken"
        for _, writer in ios:
            writer.close()
        hub.begin_drain()
        await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())


def test_after_commit_parked_handlers_get_handed_off_and_the_connection_lives_on() -> None:
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=1.0)
        echo = Echo()
        lsock = await serve(hub, echo)
        io = await client(lsock)
        assert await ask(io, b"a\n") == b"a\n"
        await settle(hub, 1)
        hub.stop_accepting()
        await hub.quiesce(5, 0)
        (conn,) = hub.conns
        successor = conn.sock.dup()  # what the new worker holds
        hub.release_handed()
        await asyncio.wait_for(hub.wait_empty(), 5)
        assert echo.handed_off == 1 and not hub.conns
        io[1].write(b"b\n")
        await io[1].drain()
        successor.settimeout(5)
        assert successor.recv(16) == b"b\n", "the connection itself stayed open"
        successor.close()
        io[1].close()
        lsock.close()

    asyncio.run(main())


def test_a_request_half_received_travels_with_its_bytes() -> None:
    """A handler waiting for the rest of a request (nothing sent) is handed over after the
    boundary wait; the successor gets the bytes consumed so far, then the unconsumed ones."""
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=1.0)
        started = asyncio.Event()

        async def handler(conn: Connection) -> None:
            head = await conn.recv(4, idle=True)  # the start of a request...
            started.set()
            await conn.recv(100)  # ...and the wait for its rest
            raise AssertionError(f"read the rest of {head!r} after the handover")

        lsock = await serve(hub, handler)
        io = await client(lsock)
        io[1].write(b"PUT ")
        await asyncio.wait_for(started.wait(), 5)
        hub.stop_accepting()
        handover = await hub.quiesce(5, 0.01)
        assert handover.replayed == 1
        (conn,) = hub.conns
        assert conn.pending_bytes() == b"PUT "
        hub.release_handed()
        io[1].close()
        lsock.close()

    asyncio.run(main())


def test_a_request_that_sent_something_is_waited_for() -> None:
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=1.0)

        async def handler(conn: Connection) -> None:
            await conn.recv(4, idle=True)
            await conn.send(b"100 continue\n")  # a replay would send it twice
            await conn.recv(100)

        lsock = await serve(hub, handler)
        io = await client(lsock)
        assert await ask(io, b"PUT ") == b"100 continue\n"
        hub.stop_accepting()
        with pytest.raises(TimeoutError, match=r"1 connection.* still mid-request"):
            await hub.quiesce(0.2, 0.01)
        hub.resume()
        io[1].close()
        hub.begin_drain()
        await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())


def test_boundary_lets_a_swap_through_while_the_handler_still_works() -> None:
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=1.0)
        after = asyncio.Event()
        outcome: list[str] = []

        async def handler(conn: Connection) -> None:
            await conn.recv(16, idle=True)
            await conn.send(b"done\n")
            conn.boundary()
            await after.wait()  # post-response work, as Django's request_finished
            try:
                await conn.send(b"late\n")
            except HandedOff:
                outcome.append("handed off")
                raise

        lsock = await serve(hub, handler)
        io = await client(lsock)
        assert await ask(io, b"req\n") == b"done\n"
        hub.stop_accepting()
        handover = await hub.quiesce(5, 5)  # returns at once: no busy connection
        assert handover.count == 1 and handover.replayed == 0
        after.set()
        await asyncio.wait_for(_until(lambda: not hub.tasks), 5)
        assert outcome == ["handed off"]
        hub.resume()  # an abort gives the connection a fresh handler call
        assert len(hub.tasks) == 1
        io[1].close()
        hub.begin_drain()
        await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())


class FailingListener(socket.socket):
    """A listening socket whose accept fails with EMFILE while `failing` (the hub calls
    `_accept()`, the half of socket.accept() that makes the system call)."""

    failing = True
    calls = 0

    def _accept(self) -> tuple[int, object]:
        FailingListener.calls += 1
        if FailingListener.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return super()._accept()  # type: ignore[misc,no-any-return]


def test_accept_out_of_descriptors_backs_off_instead_of_spinning(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=1.0)
        echo = Echo()
        lsock = FailingListener(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        hub.register("echo", lsock, echo)
        hub.start_accepting()
        io = await client(lsock)  # queued; accept() fails
        for _ in range(1000):  # a thousand loop turns: without backoff, a thousand accepts
            await asyncio.sleep(0)
        assert FailingListener.calls == 1
        assert hub.accept_backoff > 0
        FailingListener.failing = False
        assert await ask(io, b"x\n") == b"x\n"  # accepted once the backoff ended
        assert hub.accept_backoff == 0
        io[1].close()
        hub.begin_drain()
        await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    with caplog.at_level(logging.INFO, logger="swapd.worker"):
        asyncio.run(main())
    failed = [r for r in caplog.records if "event=accept.failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert any("event=accept.recovered" in r.getMessage() for r in caplog.records)


def test_the_drain_deadline_closes_what_is_left() -> None:
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=60)

        async def stuck(conn: Connection) -> None:
            await conn.recv(4, idle=True)
            await asyncio.Event().wait()  # a request that never finishes

        lsock = await serve(hub, stuck)
        io = await client(lsock)
        io[1].write(b"GET ")
        await asyncio.wait_for(_until(lambda: bool(hub.busy)), 5)
        hub.begin_drain()
        assert hub.close_all() == 1
        await asyncio.wait_for(hub.wait_empty(), 5)
        assert await asyncio.wait_for(io[0].read(), 5) == b"", "the client saw EOF"
        io[1].close()
        lsock.close()

    asyncio.run(main())


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0)


# -- the handoff link: pre-send, then only the delta -----------------------------------------


def test_presend_then_delta_hands_over_exactly_the_connections_as_they_are() -> None:
    """Ten connections pre-sent; before the pause one closes, one is accepted, one gets new
    meta, one has half a line buffered. The successor ends with exactly the nine open
    ones, each with its meta and bytes; the closed one's client saw EOF although the
    successor had held a duplicate."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        old = ConnectionHub(loop, idle_grace=1.0)
        new = ConnectionHub(loop, idle_grace=1.0)
        echo = Echo()

        async def game(conn: Connection) -> None:
            while True:
                line = await conn.readline(idle=True)
                if not line:
                    return
                conn.meta["last"] = line.strip().decode()
                await conn.send(line)

        lsock = await serve(old, game)
        new.register("echo", lsock, echo)
        ios = [await client(lsock) for _ in range(10)]
        for i, io in enumerate(ios):
            assert await ask(io, f"p{i}\n".encode()) == f"p{i}\n".encode()
        await settle(old, 10)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sender = LinkSender(a, old, "old")
        receiver = LinkReceiver(b, new, "new")
        assert await sender.presend() == 10
        assert await asyncio.wait_for(receiver.present, 5) == 10
        # changes after the pre-send
        ios[0][1].close()  # the client leaves: the old worker closes it
        assert await asyncio.wait_for(ios[0][0].read(), 5) == b""  # FIN despite the dup
        assert await ask(ios[1], b"q1\n") == b"q1\n"  # meta "last" changes to q1
        ios[2][1].write(b"half")  # half a line: stays buffered at a boundary
        await ios[2][1].drain()
        late = await client(lsock)
        assert await ask(late, b"late\n") == b"late\n"
        await _until(lambda: len(old.conns) == 10 and not old.busy
                     and any(c.buffer == b"half" for c in old.conns))
        old.stop_accepting()
        handover = await old.quiesce(5, 0)
        assert (handover.count, len(handover.new), len(handover.gone)) == (10, 1, 1)
        sender.send_delta(handover)
        conns = await asyncio.wait_for(receiver.delta, 5)
        got = {c.meta.get("last"): bytes(c.buffer) for c in conns}
        assert got == {"p2": b"half", "q1": b"", "late": b"",
                       **{f"p{i}": b"" for i in range(3, 10)}}
        by_fd, watch = receiver.take()
        old.release_handed()
        sender.close()
        receiver.close()
        new.start_accepting()
        new.adopt_many(by_fd, watch)
        ios[2][1].write(b" done\n")
        assert await asyncio.wait_for(ios[2][0].readline(), 5) == b"half done\n"
        assert await ask(ios[1], b"again\n") == b"again\n"
        assert echo.lines == [b"half done\n", b"again\n"]
        for _, writer in [*ios[1:], late]:
            writer.close()
        for hub in (old, new):
            hub.begin_drain()
            await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())


def test_pinned_connections_are_neither_present_nor_handed_over() -> None:
    """Three connections, one pinned before the pre-send: it is not sent. Then one sent
    gets pinned (the delta says `gone`: the successor drops its copy) and the first is
    unpinned (it travels as new). The old worker keeps serving the pinned one after the
    commit; the successor serves the other two."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        old = ConnectionHub(loop, idle_grace=1.0)
        new = ConnectionHub(loop, idle_grace=1.0)
        echo = Echo()
        lsock = await serve(old, echo)
        new.register("echo", lsock, Echo())
        ios = [await client(lsock) for _ in range(3)]
        for i, io in enumerate(ios):
            assert await ask(io, f"p{i}\n".encode()) == f"p{i}\n".encode()
        await settle(old, 3)
        by_peer = {c.peer: c for c in old.conns}
        conns = [by_peer[io[1].get_extra_info("sockname")] for io in ios]
        conns[0].pinned = True
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sender = LinkSender(a, old, "old")
        receiver = LinkReceiver(b, new, "new")
        assert await sender.presend() == 2
        assert await asyncio.wait_for(receiver.present, 5) == 2
        conns[0].pinned = False
        conns[1].pinned = True
        old.stop_accepting()
        handover = await old.quiesce(5, 0)
        assert (handover.count, handover.new, handover.gone) == (2, [conns[0]], [conns[1].id])
        assert [c.handed for c in conns] == [True, False, True]
        sender.send_delta(handover)
        assert len(await asyncio.wait_for(receiver.delta, 5)) == 2
        by_fd, watch = receiver.take()
        assert old.release_handed() == 2 and old.conns == {conns[1]}
        sender.close()
        receiver.close()
        new.adopt_many(by_fd, watch)
        for io in ios:
            assert await ask(io, b"again\n") == b"again\n"
        assert echo.lines.count(b"again\n") == 1, "the old worker served only the pinned one"
        for _, writer in ios:
            writer.close()
        for hub in (old, new):
            hub.begin_drain()
            await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())
