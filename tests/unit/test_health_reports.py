"""The supervisor's side of a worker's health: a `health` message on the channel and
WATCHDOG=trigger on the notify socket both resolve `unhealthy` (what a watch window
awaits); a later healthy report arms a fresh one. And who can be held for a window."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from swapd import messages as m
from swapd.channel import Channel, socketpair
from swapd.supervisor.generation import Generation, WorkerProcess
from swapd.supervisor.notify import notify_socket
from swapd.supervisor.process import Child
from swapd.supervisor.watch import hold, unholdable
from tests.unit.test_swap import FakeFleet, FakeWorker, config


async def with_worker(body: Any) -> None:
    loop = asyncio.get_running_loop()
    w = WorkerProcess(2, 0, "fresh", Child(pid=os.getpid(), pidfd=-1, started=0.0), loop)
    ours, theirs = socketpair()
    notify, address = notify_socket(2, 0)
    w.attach(ours, notify, None)
    peer = Channel(theirs, lambda msg: msg.close_fds(), lambda e: None)
    try:
        await body(w, peer, address)
    finally:
        peer.close()
        w.close_pipes()


def test_channel_reports() -> None:
    async def body(w: WorkerProcess, peer: Channel, address: str) -> None:
        assert w.passthrough  # attached without an output pipe
        assert "not captured" in w.tail_text()
        peer.send(m.Health(ok=False, reason="db unreachable").body())
        reason = await asyncio.wait_for(w.unhealthy, 5)
        assert reason == "db unreachable" and w.health == (False, "db unreachable")
        assert w.describe()["unhealthy"] == "db unreachable"
        first = w.unhealthy
        # healthy again, then (the channel keeps order) a malformed report, ignored, and a
        # new unhealthy one: it resolves a fresh future, armed by the healthy report
        peer.send(m.Health(ok=True).body())
        peer.send({"t": "health", "ok": "no"})
        peer.send(m.Health(ok=False, reason="again").body())
        await asyncio.wait_for(asyncio.shield(first), 5)
        while w.unhealthy is first:  # bounded: each pass waits for the next message
            await asyncio.wait_for(_next_message(w), 5)
        assert await asyncio.wait_for(w.unhealthy, 5) == "again"
        assert w.health == (False, "again")

    asyncio.run(with_worker(body))


async def _next_message(w: WorkerProcess) -> None:
    """Until the worker's channel has handled one more message (health state changes)."""
    before = w.health
    seen = asyncio.get_running_loop().create_future()
    original = w.mark_health

    def spy(ok: bool, reason: str, via: str) -> None:
        original(ok, reason, via)
        if not seen.done():
            seen.set_result(None)

    w.mark_health = spy  # type: ignore[method-assign]
    try:
        if w.health == before:
            await seen
    finally:
        w.mark_health = original  # type: ignore[method-assign]


def test_watchdog_trigger_on_the_notify_socket() -> None:
    async def body(w: WorkerProcess, peer: Channel, address: str) -> None:
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sender.sendto(b"STATUS=busy\nWATCHDOG=trigger\n", "\0" + address[1:])
            assert await asyncio.wait_for(w.unhealthy, 5) == "WATCHDOG=trigger"
            assert w.status_text == "busy"
        finally:
            sender.close()

    asyncio.run(with_worker(body))


def test_who_can_be_held() -> None:
    async def go() -> None:
        fleet = FakeFleet(old_workers=2)
        gen = fleet.old
        assert unholdable(gen) is None
        plain = gen.workers[1]
        assert isinstance(plain, FakeWorker)
        plain.features_ = {"drain"}  # e.g. an older swapd.worker
        assert unholdable(gen) == (
            "gen=1 worker=1 pid=101 cannot be held for a watch window: it does not use "
            "swapd.worker (or an older one); swap with --watch 0")
        hold(fleet, gen)  # type: ignore[arg-type]
        first = gen.workers[0]
        assert isinstance(first, FakeWorker)
        assert first.channel.sent == ["hold"] and plain.channel.sent == []
        assert fleet.processes.killed == [9]  # it must not keep serving the old code

    asyncio.run(go())


def test_generation_describes_its_release() -> None:
    gen = Generation(4, config(), release="v42")
    assert gen.describe()["release"] == "v42"
