"""`swapd serve` swapped under load: the examples (Flask, FastAPI, the WebSocket chat), real
clients (swapd.loadgen in both connection modes at once, the `websockets` client).

Between swaps each test waits for a number of successes (an event), so every swap happens
under load; loads are bounded in time and count.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from swapd.loadgen import (
    BackgroundLoad,
    LoadReport,
    Request,
    fetch_sync,
    http_get,
    http_get_int,
    http_post,
)
from tests.integration.serve_client import RawHTTP, RawWebSocket
from tests.integration.supervised import ROOT, Supervised, supervised

EXAMPLES = ROOT / "examples"
APPS = ROOT / "tests" / "apps"
LOAD = {"clients": 8, "duration": 120.0, "max_requests": 1_000_000}


@contextmanager
def both_modes(s: Supervised, request: Request) -> Iterator[list[BackgroundLoad]]:
    """A keep-alive load and a connection-per-request load, at once."""
    with ExitStack() as stack:
        yield [stack.enter_context(BackgroundLoad(s.address(), request, mode=mode, **LOAD))
               for mode in ("keepalive", "close")]


def swaps_under(loads: list[BackgroundLoad], s: Supervised, count: int) -> None:
    for i in range(count):
        for load in loads:
            load.wait_for_successes(100, timeout=60)
        for load in loads:
            load.begin(f"swap {i + 1}")
        res = s.result("upgrade")
        for load in loads:
            load.end(f"swap {i + 1}")
        assert res["ok"], res
    for load in loads:
        load.wait_for_successes(100, timeout=60)


def reports(loads: list[BackgroundLoad]) -> list[LoadReport]:
    out = []
    for load in loads:
        report = load.report
        assert report is not None
        print(report.format())
        assert report.failed == 0, report.format()
        assert all(w.ok > 0 for w in report.windows), "every swap happened under load"
        out.append(report)
    return out


@pytest.mark.slow
def test_flask_stateless_swaps_under_load(tmp_path: Path) -> None:
    with supervised(tmp_path, ["--threads", "4"], args=[
            "--app", "app:app", "--cwd", str(EXAMPLES / "wsgi"), "--workers", "2"]) as s:
        with both_modes(s, http_get("/")) as loads:
            swaps_under(loads, s, 2)
        keepalive, _close = reports(loads)
        assert keepalive.connections_opened < keepalive.ok, "keep-alive connections were reused"
        assert s.status()["active"] == 3


@pytest.mark.slow
def test_fastapi_stateful_swaps_lose_no_acknowledged_write(tmp_path: Path) -> None:
    with supervised(tmp_path, ["--timeout-request-head", "120"], args=[
            "--app", "app:app", "--cwd", str(EXAMPLES / "asgi"),
                                        "--mode", "stateful"]) as s:
        url = "http://{}:{}".format(*s.address())
        assert httpx.put(url + "/items/greeting", content=b"hi", timeout=10).status_code == 200
        # A client half way through its request head when the swap comes: the partial head
        # moves with the connection and the request completes on the successor.
        partial = RawHTTP(s.address())
        partial.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        # A client stalling inside its request body (the app already reads it): it cannot
        # hold the swap up (--timeout-read is 30 s, the quiesce deadline 10 s): 408.
        stalled = RawHTTP(s.address())
        stalled.send(b"PUT /items/slow HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        with both_modes(s, http_post("/incr")) as loads:
            swaps_under(loads, s, 2)
        assert stalled.response("PUT")[0] == 408
        stalled.close()
        partial.send(b"\r\n")
        status, _, body = partial.response()
        partial.close()
        new_pid = s.active_pids()[0]
        assert (status, body.split()[3]) == (200, str(new_pid).encode())
        keepalive, close = reports(loads)
        final = fetch_sync(s.address(), http_get_int("/count"))
        assert final == keepalive.acknowledged + close.acknowledged, "no write lost"
        for r in (keepalive, close):
            assert r.duplicate_values == 0 and r.value_regressions == 0
        # Idle keep-alive connections moved between requests rather than being closed: the
        # keep-alive clients never had to reconnect.
        assert keepalive.connections_opened == LOAD["clients"], keepalive.format()
        assert httpx.get(url + "/items/greeting", timeout=10).content == b"hi"
        assert s.status()["active"] == 3


class Member:
    """A chat client: sends numbered texts, checks it sees every message, in order."""

    def __init__(self, uri: str, name: str) -> None:
        self.uri = uri
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.sent = 0
        self.first = 0
        self.stopped = asyncio.Event()
        self.close_code: int | None = -1
        self.same_connection = False

    async def run(self, stop: asyncio.Event, acked: asyncio.Condition,
                  last_seq: asyncio.Future[int]) -> None:
        async with websockets.connect(f"{self.uri}?name={self.name}") as ws:
            local = ws.local_address
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome", welcome
            self.first = int(welcome["seq"])
            for k in range(100_000):  # bounded; the test stops it much earlier
                if stop.is_set():
                    break
                text = f"{self.name}-{k}"
                await ws.send(text)
                while True:  # until our own message comes back (its acknowledgement)
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    self.seen.append(msg)
                    if msg.get("from") == self.name and msg["text"] == text:
                        break
                self.sent += 1
                async with acked:
                    acked.notify_all()
            self.stopped.set()
            last = await last_seq  # the room's last message, once every member stopped
            while not self.seen or self.seen[-1]["seq"] < last:
                self.seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            self.close_code = ws.close_code  # None: still open, never closed by the server
            self.same_connection = ws.local_address == local


@pytest.mark.slow
def test_websocket_clients_stay_connected_across_stateful_upgrade_v1_to_v2(
        tmp_path: Path) -> None:
    """The chat example deployed with a `current` symlink: v1 -> v2 under six talking
    clients. Nobody sees a close frame or reconnects, and every member receives every
    message of the room, in order, with no gap: v1's, then v2's."""
    deploy = tmp_path / "deploy"
    shutil.copytree(EXAMPLES / "wschat", deploy)
    (deploy / "current").symlink_to("v1")
    with supervised(tmp_path, [], args=["--app", "chat:app", "--cwd", str(deploy / "current"),
                                        "--mode", "stateful", "--drain-timeout", "3"]) as s:
        uri = "ws://{}:{}/chat/lobby".format(*s.address())
        members = [Member(uri, f"m{i}") for i in range(6)]
        # A client stuck half way through a fragmented message cannot hold the swap up: it
        # stays with v1, which closes it (1012) at its drain deadline.
        stuck = RawWebSocket(s.address(), "/chat/lobby?name=stuck")
        assert json.loads(stuck.read_frame()[1])["type"] == "welcome"
        stuck.send_frame(0x1, b"half a mess", fin=False)

        async def scenario() -> None:
            stop, acked = asyncio.Event(), asyncio.Condition()
            last_seq: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            tasks = [asyncio.create_task(m.run(stop, acked, last_seq)) for m in members]

            async def progress(count: int) -> None:  # every member acknowledged `count` more
                targets = [m.sent + count for m in members]
                async with acked:
                    await asyncio.wait_for(acked.wait_for(
                        lambda: all(m.sent >= t for m, t in zip(members, targets, strict=True))
                        or any(t.done() for t in tasks)), 60)

            await progress(20)
            (deploy / "current").unlink()
            (deploy / "current").symlink_to("v2")
            result: dict[str, Any] = {}
            upgrade = threading.Thread(target=lambda: result.update(s.result("upgrade")))
            upgrade.start()
            await asyncio.get_running_loop().run_in_executor(None, upgrade.join, 120)
            assert result.get("ok"), result
            await progress(20)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*(m.stopped.wait() for m in members)), 60)
            async with httpx.AsyncClient(base_url="http://{}:{}".format(*s.address())) as c:
                last_seq.set_result(int((await c.get("/rooms/lobby", timeout=10)).json()["seq"]))
            await asyncio.wait_for(asyncio.gather(*tasks), 60)

        asyncio.run(scenario())
        assert stuck.close_code() == 1012
        stuck.close()
        room = httpx.get("http://{}:{}/rooms/lobby".format(*s.address()), timeout=10).json()
        assert room["version"] == 2
        assert room["seq"] >= sum(m.sent for m in members)  # plus the members' "left" notes
        for m in members:
            assert m.close_code is None, f"{m.name} saw a close frame ({m.close_code})"
            assert m.same_connection, f"{m.name}: the same TCP connection throughout"
            seqs = [msg["seq"] for msg in m.seen]
            assert seqs == list(range(m.first + 1, m.first + 1 + len(seqs))), \
                f"{m.name} missed or reordered messages"
            versions = [msg["v"] for msg in m.seen]
            assert versions == sorted(versions) and set(versions) == {1, 2}


@pytest.mark.slow
def test_websockets_stay_with_the_old_version_when_the_swap_aborts(tmp_path: Path) -> None:
    """v2's restore raises after v1 has handed its connections over: the swap aborts, and v1
    resumes them itself (its app is called again with the saved state), still connected."""
    deploy = tmp_path / "deploy"
    shutil.copytree(EXAMPLES / "wschat", deploy)
    broken = deploy / "v2" / "chat.py"
    broken.write_text(broken.read_text().replace(
        "    for name, saved in state.items():",
        "    raise RuntimeError('v2 cannot read this state')\n    for name, saved in "
        "state.items():", 1))
    (deploy / "current").symlink_to("v1")
    with supervised(tmp_path, [], args=["--app", "chat:app", "--cwd", str(deploy / "current"),
                                        "--mode", "stateful"]) as s:
        address = s.address()
        old = s.active_pids()

        async def scenario() -> None:
            uri = "ws://{}:{}/chat/lobby".format(*address)
            async with websockets.connect(uri + "?name=a") as a, \
                    websockets.connect(uri + "?name=b") as b:
                for ws in (a, b):
                    assert json.loads(await ws.recv())["type"] == "welcome"
                await a.send("before")
                for ws in (a, b):
                    assert json.loads(await ws.recv())["text"] == "before"
                (deploy / "current").unlink()
                (deploy / "current").symlink_to("v2")
                loop = asyncio.get_running_loop()
                proc = await loop.run_in_executor(None, s.cli, "upgrade")
                assert proc.returncode == 1, proc.stdout + proc.stderr
                assert "v2 cannot read this state" in proc.stderr
                await b.send("after")
                for ws in (a, b):
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    assert (msg["text"], msg["v"], msg["seq"]) == ("after", 1, 2), msg
                assert a.close_code is None and b.close_code is None

        asyncio.run(scenario())
        assert s.active_pids() == old
        assert "event=ws.handed_off connections=2" in s.log_text()


@pytest.mark.slow
def test_a_failing_on_snapshot_leaves_websocket_apps_untouched(tmp_path: Path) -> None:
    """The app's save() raises, or returns what cannot be encoded: the swap fails before any
    WebSocket was handed off, so the opted-in connection's coroutine was neither ended nor
    called again (no disconnect, no resumed=True): same process, same counter. Once save()
    works, the next swap moves it."""
    fail = tmp_path / "fail-save"
    with supervised(tmp_path, [], args=["--app", "serve_app:app", "--cwd", str(APPS),
                                        "--mode", "stateful"],
                    env={"SERVE_FAIL_SAVE": str(fail)}) as s:
        old = s.active_pids()
        url = "http://{}:{}".format(*s.address())

        async def scenario() -> None:
            uri = "ws://{}:{}/ws-live".format(*s.address())
            async with websockets.connect(uri) as ws:
                await ws.send("a")
                assert await ws.recv() == f"1 a pid={old[0]} resumed=False"
                fail.write_text("x")
                loop = asyncio.get_running_loop()
                proc = await loop.run_in_executor(None, s.cli, "upgrade")
                assert proc.returncode == 1, proc.stdout + proc.stderr
                assert "RuntimeError: save refused (simulated)" in proc.stderr
                await ws.send("b")
                assert await ws.recv() == f"2 b pid={old[0]} resumed=False"
                fail.write_text("unpicklable")  # found before the handoff too
                proc = await loop.run_in_executor(None, s.cli, "upgrade")
                assert proc.returncode == 1, proc.stdout + proc.stderr
                assert "EncodeError: pickle5 cannot encode the state: TypeError: cannot " \
                    "pickle '_thread.lock' object" in proc.stderr, proc.stderr
                await ws.send("b2")
                assert await ws.recv() == f"3 b2 pid={old[0]} resumed=False"
                fail.unlink()
                res = await loop.run_in_executor(None, s.result, "upgrade")
                assert res["ok"], res
                await ws.send("c")
                new = s.active_pids()[0]
                assert await ws.recv() == f"4 c pid={new} resumed=True"
                assert ws.close_code is None
                async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                    events = (await client.get("/live-events")).text.splitlines()
                # (the old worker's list, as save() returned it, then the new one's entry)
                assert events == [f"start pid={old[0]} resumed=False",
                                  f"disconnect pid={old[0]} handed_off=True",
                                  f"start pid={new} resumed=True"], events

        asyncio.run(scenario())
        assert s.active_pids() != old
