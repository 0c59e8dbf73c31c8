"""Patches as transactions: one worker's side (`PatchHost`) and the supervisor's
(`swapd.supervisor.patching`), with fake workers whose channel replies from a script."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swapd.channel import Message, RequestTimeout
from swapd.control import ControlError
from swapd.supervisor import patching
from swapd.supervisor.lifecycle import SlotState
from swapd.worker.patches import PatchHost
from tests.unit.test_patch_support import Mods

SRC = "def f():\n    return 1\n"


def test_worker_rollback_of_a_patch_not_in_force_succeeds(mods: Mods) -> None:
    m = mods.load(SRC)
    host = PatchHost()

    async def prepare(pid: int, source: str) -> None:
        reply = await host.prepare({"pid": pid, "module": m.__name__, "source": source})
        assert reply["ok"], reply

    async def scenario() -> None:
        await prepare(1, SRC.replace("1", "2"))
        assert host.commit({"pid": 1})["ok"] and m.f() == 2
        assert host.rollback({"pid": 1})["ok"] and m.f() == 1
        again = host.rollback({"pid": 1})  # a retry after a partial rollback elsewhere
        assert again["ok"] and "not in force in this worker" in again["notes"][0]
        assert host.rollback({"pid": 9})["ok"]  # never committed here
        # prepared, not committed (its commit timed out): discarded, so it never lands
        await prepare(2, SRC.replace("1", "3"))
        assert host.rollback({"pid": 2})["ok"]
        assert not host.commit({"pid": 2})["ok"] and m.f() == 1
        # a patch in force but not on top still refuses
        await prepare(3, SRC.replace("1", "4"))
        host.commit({"pid": 3})
        await prepare(4, SRC.replace("1", "5"))
        host.commit({"pid": 4})
        refused = host.rollback({"pid": 3})
        assert not refused["ok"] and "not the last one here (last: 4)" in refused["error"]

    asyncio.run(scenario())


Script = Callable[[dict[str, Any]], dict[str, Any]]


class FakeChannel:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.closed = False
        self.sent: list[str] = []

    async def request(self, body: dict[str, Any], fds: Any = (), *, timeout: float) -> Message:
        self.sent.append(body["t"])
        return Message(self.script(body))


class FakeWorker:
    def __init__(self, slot: int, script: Script) -> None:
        self.slot = slot
        self.pid = 1000 + slot
        self.tag = f"gen=1 worker={slot} pid={self.pid}"
        self.state = SlotState.READY
        self.channel = FakeChannel(script)
        self.exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def features(self) -> set[str]:
        return {"patch"}

    def tail_text(self) -> str:
        return ""


class FakeGeneration:
    def __init__(self, workers: list[FakeWorker]) -> None:
        self.id = 1
        self.workers = workers


class FakeSupervisor:
    def __init__(self, workers: list[FakeWorker]) -> None:
        self.active = FakeGeneration(workers)
        self.journal: list[patching.PatchRecord] = []

    def next_patch_id(self) -> int:
        return 1


def worker_script(commit_times_out: bool = False) -> Script:
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        t = body["t"]
        if t == "patch.prepare":
            return {"ok": True, "plan": {"changed": [], "path": None}}
        if t == "patch.commit" and commit_times_out:
            raise RequestTimeout("no reply to 'patch.commit' within 30s")
        return {"ok": True, "applied": {}, "notes": []}

    return reply


def test_a_commit_that_timed_out_is_rolled_back_too() -> None:
    async def scenario() -> list[FakeWorker]:
        workers = [FakeWorker(0, worker_script()), FakeWorker(1, worker_script(True))]
        sup = FakeSupervisor(workers)
        args = {"module": "app.rules", "source": SRC}
        with pytest.raises(ControlError, match="rolled back on every worker"):
            await patching.apply(sup, args, lambda *a: None, "tester")  # type: ignore[arg-type]
        assert sup.journal == []
        return workers

    workers = asyncio.run(scenario())
    for w in workers:  # the slow worker may commit later: it must hear the rollback too
        assert w.channel.sent == ["patch.prepare", "patch.commit", "patch.rollback"], w.tag


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_journal_knows_a_fix_is_on_disk_whatever_the_line_endings(
    tmp_path: Path, newline: str
) -> None:
    fix = "def f():\n    return 2\n"
    path = tmp_path / "rules.py"
    path.write_bytes(fix.replace("\n", newline).encode())
    with open(path, encoding="utf-8") as f:  # how `swapd patch` reads the fix it sends
        sent = f.read()
    sha = hashlib.sha256(sent.encode()).hexdigest()  # what the journal records
    record = patching.PatchRecord(1, "rules", sent, sha, "fix.py", 0.0, "tester", path=str(path))
    assert record.on_disk() is True and patching.warnings([record]) == []
    path.write_text(fix.replace("2", "3"))
    assert record.on_disk() is False and patching.warnings([record])
    path.write_bytes(b"\xff\xfe not utf-8")
    assert record.on_disk() is False
