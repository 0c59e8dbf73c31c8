"""swapd.worker driven over a real channel by a fake supervisor, in one event loop.

The worker runs `Worker._main` (what `run()` runs) with a real listener on 127.0.0.1; the
test plays the supervisor on the other end of the channel, request by request.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from swapd import messages as m
from swapd.channel import Channel, Message, socketpair
from swapd.handoff import Snapshot, TrackedDict
from swapd.worker import Worker
from swapd.worker.connection import Connection
from swapd.worker.state import StateParts, TrackedEntry


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeSupervisor:
    """The supervisor's end of one worker's channel: answers hello, queues the rest."""

    def __init__(self, role: str = "fresh") -> None:
        self._sock, theirs = socketpair()
        self.env = {"SWAPD_CHANNEL_FD": str(theirs.detach()), "SWAPD_ROLE": role,
                    "SWAPD_MODE": "stateful", "SWAPD_BIND": "http=127.0.0.1:0",
                    "SWAPD_IDLE_GRACE": "2.0"}
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.chan: Channel | None = None

    def start(self) -> None:
        self.chan = Channel(self._sock, self._on_message, lambda e: None)

    def _on_message(self, msg: Message) -> None:
        if msg.type == "hello":
            assert self.chan is not None
            self.chan.reply(msg, {"ok": True})
        else:
            self.inbox.put_nowait(msg)

    async def expect(self, kind: str) -> Message:
        msg = await asyncio.wait_for(self.inbox.get(), 5)
        assert msg.type == kind, msg.body
        return msg

    async def ask(self, body: dict[str, Any], fds: list[int] | None = None) -> Message:
        assert self.chan is not None
        return await self.chan.request(body, fds or [], timeout=5)

    def drain(self) -> None:
        assert self.chan is not None
        self.chan.send(m.Drain(deadline=5).body())


Main = Callable[[Worker], Awaitable[None]]
Script = Callable[[Worker, FakeSupervisor], Awaitable[None]]


def drive(main: Main, script: Script, role: str = "fresh",
          setup: Callable[[Worker], None] | None = None) -> Worker:
    """Run the worker and the supervisor's script; the worker must end normally."""
    async def both() -> None:
        sup = FakeSupervisor(role)
        sup.start()
        w = Worker(environ=sup.env)
        if setup is not None:
            setup(w)
        worker = asyncio.ensure_future(w._main(main))
        assert sup.chan is not None
        try:
            await script(w, sup)
            await asyncio.wait_for(worker, 10)  # and it ends normally
        finally:
            sup.chan.close()  # if the script failed: the worker drains on channel EOF
            if not worker.done():
                await asyncio.wait([worker], timeout=10)
            for sock in w.listeners.values():
                sock.close()
        holder.append(w)

    holder: list[Worker] = []
    before = open_fds()
    asyncio.run(both())
    assert open_fds() == before, "fds leaked"
    return holder[0]


async def echo(conn: Connection) -> None:
    while True:
        line = await conn.readline(idle=True)
        if not line:
            return
        await conn.send(line)


def receiver(*names: str) -> StateParts:
    parts = StateParts()
    for name in names:
        parts.tracked[name] = TrackedEntry(TrackedDict(), None)
    return parts


class OldWorker:
    """An application with a tracked dict "players", serving echo."""

    def __init__(self) -> None:
        self.players: TrackedDict[Any, Any] = TrackedDict()
        self.hooks: list[str] = []

    async def __call__(self, w: Worker) -> None:
        self.players = w.tracked_dict("players")
        self.players.update({f"p{i}": i for i in range(10)})
        w.on_resume(lambda: self.hooks.append("resume"))
        await w.serve("http", echo)
        await w.ready()


def load_handoff(reply: Message, *names: str) -> StateParts:
    parts = receiver(*names)
    parts.load(reply.take_fds(), range(0, 10))
    return parts


# -- an aborted pre-copy must not leave the old worker sending deltas ------------------------


def test_quiesce_without_precopied_sends_full_state_after_a_failed_precopy() -> None:
    app = OldWorker()

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        td = app.players
        (await sup.ask(m.PrecopyOut().body())).close_fds()  # the successor never loaded it
        assert td.tracking
        td["late"] = 1
        # e.g. a snapshot for systemd's fd store, with no resume and no pre-copy before it
        reply = await sup.ask(m.Quiesce(deadline=5, conns=False).body())
        assert reply.body["ok"], reply.body
        assert dict(load_handoff(reply, "players").tracked["players"].td) == dict(td)
        assert not td.tracking, "a whole copy leaves no round open"
        sup.drain()

    drive(app, script)


def test_quiesce_with_precopied_sends_only_the_changes() -> None:
    app = OldWorker()

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        td = app.players
        successor = receiver("players")
        bulk = await sup.ask(m.PrecopyOut().body())
        successor.load_precopy(bulk.body["names"], bulk.take_fds(), range(0, 10))
        td["late"] = 1
        del td["p0"]
        reply = await sup.ask(m.Quiesce(deadline=5, precopied=True).body())
        assert reply.body["ok"], reply.body
        successor.load(reply.take_fds(), range(0, 10))
        assert dict(successor.tracked["players"].td) == dict(td)
        assert td.tracking  # until resume (abort) or exit (commit)
        assert (await sup.ask(m.Resume().body())).body["ok"]
        assert not td.tracking
        sup.drain()

    drive(app, script)


def test_further_precopy_rounds_ship_the_changes_and_leave_the_pause_the_rest() -> None:
    app = OldWorker()

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        td = app.players
        successor = receiver("players")
        bulk = await sup.ask(m.PrecopyOut().body())
        successor.load_precopy(bulk.body["names"], bulk.take_fds(), range(0, 10))
        td.update({f"n{i}": i for i in range(5)})
        # fewer changes than asked for: no round, nothing shipped, nothing lost
        few = await sup.ask(m.PrecopyOut(delta=True, min_keys=6).body())
        assert few.body["ok"] and few.body["names"] == [] and not few.fds, few.body
        round2 = await sup.ask(m.PrecopyOut(delta=True, min_keys=5).body())
        assert round2.body["keys"] == 5 and round2.body["names"] == ["players"]
        successor.load_precopy(round2.body["names"], round2.take_fds(), range(0, 10))
        assert td.dirty_count == 0
        td["late"] = 1
        reply = await sup.ask(m.Quiesce(deadline=5, precopied=True).body())
        assert reply.body["ok"], reply.body
        successor.load(reply.take_fds(), range(0, 10))
        assert dict(successor.tracked["players"].td) == dict(td)
        assert (await sup.ask(m.Resume().body())).body["ok"]
        sup.drain()

    drive(app, script)


def test_resume_when_not_quiesced_only_ends_the_precopy_round() -> None:
    app = OldWorker()

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        td = app.players
        (await sup.ask(m.PrecopyOut().body())).close_fds()
        assert td.tracking
        for _ in range(2):  # idempotent
            reply = await sup.ask(m.Resume().body())
            assert reply.body["ok"], reply.body
        assert not td.tracking
        assert app.hooks == [], "on_resume is for a worker that was quiesced"
        assert w._hub is not None and w._hub.accepting
        # the next handoff is a whole one; resume after a quiesce is unchanged
        reply = await sup.ask(m.Quiesce(deadline=5).body())
        assert dict(load_handoff(reply, "players").tracked["players"].td) == dict(td)
        assert not w._hub.accepting
        assert (await sup.ask(m.Resume().body())).body["ok"]
        assert app.hooks == ["resume"]
        assert w._hub.accepting
        sup.drain()

    drive(app, script)


# -- a successor drained before commit --------------------------------------------------------


def test_successor_drained_before_commit_returns_from_ready_and_ends_normally() -> None:
    seen: list[str] = []

    async def main(w: Worker) -> None:
        await w.serve("http", echo)
        await w.ready()
        seen.append(f"ready returned, draining={w.draining}")

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        msg = await sup.expect("ready")
        assert msg.body["standby"] is True
        sup.drain()  # e.g. the swap aborted, or the supervisor is stopping

    drive(main, script, role="successor")
    assert seen == ["ready returned, draining=True"]


# -- state versions ---------------------------------------------------------------------------


async def send_snaps(sup: FakeSupervisor, body: dict[str, Any], snaps: list[Snapshot]) -> Message:
    try:
        return await sup.ask(body, [fd for snap in snaps for fd in snap.send_fds])
    finally:
        for snap in snaps:
            snap.close()


def test_a_refused_version_fails_the_precopy_load_before_migrate_runs() -> None:
    migrated: list[Any] = []

    async def main(w: Worker) -> None:
        w.state_version = 1
        w.tracked_dict("players", migrate=lambda value, version: migrated.append(value))
        await w.serve("http", echo)

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        bulk = TrackedDict({"a": 1}).begin_precopy(app_version=2)  # newer than this code
        reply = await send_snaps(sup, m.PrecopyIn(["players"]).body(), [bulk])
        assert not reply.body["ok"] and "VersionRefused" in reply.body["error"]
        assert migrated == []
        sup.drain()

    drive(main, script, role="successor")


def test_an_empty_accept_versions_refuses_every_version() -> None:
    async def main(w: Worker) -> None:
        w.accept_versions = set()
        w.on_restore(lambda state, version: None)
        await w.serve("http", echo)

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        snaps = StateParts(version=1).dump({"n": 1}, [])
        reply = await send_snaps(sup, m.Restore(None, from_gen=1).body(), snaps)
        assert not reply.body["ok"] and "VersionRefused" in reply.body["error"]
        sup.drain()

    drive(main, script, role="successor")


# -- the envelope beside the fds --------------------------------------------------------------


def test_restore_checks_the_envelope_that_came_beside_the_fds() -> None:
    restored: list[Any] = []

    async def main(w: Worker) -> None:
        w.on_restore(lambda state, version: restored.append(state))
        await w.serve("http", echo)

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        other = StateParts().dump({"n": 2, "pad": "x" * 100}, [])
        envelope = other[0].envelope.to_dict()
        for snap in other:
            snap.close()
        snaps = StateParts().dump({"n": 1}, [])
        reply = await send_snaps(sup, m.Restore(envelope, from_gen=1).body(), snaps)
        assert not reply.body["ok"] and "CorruptSnapshot" in reply.body["error"]
        assert restored == []
        snaps = StateParts().dump({"n": 1}, [])
        envelope = snaps[0].envelope.to_dict()
        reply = await send_snaps(sup, m.Restore(envelope, from_gen=1).body(), snaps)
        assert reply.body["ok"], reply.body
        assert restored == [{"n": 1}]
        sup.drain()

    drive(main, script, role="successor")


# -- a snapshot for systemd's fd store keeps the connections served ---------------------------


def test_after_an_fd_store_snapshot_requests_are_still_answered_through_the_drain() -> None:
    async def main(w: Worker) -> None:
        w.on_snapshot(lambda: {"n": 1})
        await w.serve("http", echo)

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        reader, writer = await asyncio.open_connection(*w.listener("http").getsockname())
        writer.write(b"a\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"a\n"
        reply = await sup.ask(m.Quiesce(deadline=5, conns=False).body())
        assert reply.body["ok"] and reply.body["conns"] == 0, reply.body
        reply.close_fds()
        assert w._hub is not None and not w._hub.accepting
        writer.write(b"b\n")  # between the snapshot and the drain
        await writer.drain()
        sup.drain()
        assert await asyncio.wait_for(reader.readline(), 5) == b"b\n"
        writer.write(b"c\n")  # within the idle grace
        assert await asyncio.wait_for(reader.readline(), 5) == b"c\n"
        writer.close()

    drive(main, script)


# -- commit ---------------------------------------------------------------------------------


def test_a_failing_commit_still_serves_and_says_why() -> None:
    seen: list[str] = []

    async def main(w: Worker) -> None:
        def broken_commit() -> None:
            raise RuntimeError("boom")

        w._parts.commit = broken_commit  # type: ignore[method-assign]
        await w.serve("http", echo)
        await w.ready()
        seen.append("ready returned")

    async def script(w: Worker, sup: FakeSupervisor) -> None:
        await sup.expect("ready")
        ours, handed = socket.socketpair()
        snaps = StateParts().dump({"n": 1}, [("http", handed, {}, b"")])
        handed.close()
        reply = await send_snaps(sup, m.Restore(None, from_gen=1).body(), snaps)
        assert reply.body["ok"], reply.body
        reply = await sup.ask(m.Commit().body())
        assert not reply.body["ok"] and "RuntimeError: boom" in reply.body["error"]
        assert w._hub is not None and w._hub.accepting
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(ours, b"x\n")
        assert await asyncio.wait_for(loop.sock_recv(ours, 16), 5) == b"x\n"
        ours.close()
        sup.drain()

    drive(main, script, role="successor")
    assert seen == ["ready returned"]
