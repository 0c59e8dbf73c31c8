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
from swapd.commands import PatchArgs
from swapd.control import ControlError
from swapd.supervisor import patching
from swapd.supervisor.generation import WorkerProcess
from swapd.supervisor.journal import Journal, PatchRecord
from swapd.supervisor.lifecycle import SlotState
from swapd.worker.patches import PatchHost
from tests.unit.patch_support import Mods

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

    async def request(self, body: dict[str, Any], fds: Any = (), *, timeout: float,
                      reply_fds: int | None = None) -> Message:
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

    ask_raw = WorkerProcess.ask_raw  # the real request path, over the scripted channel


class FakeGeneration:
    def __init__(self, workers: list[FakeWorker]) -> None:
        self.id = 1
        self.workers = workers


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
        journal = Journal()
        args = PatchArgs(module="app.rules", source=SRC)
        with pytest.raises(ControlError, match="rolled back on every worker"):
            await patching.apply(FakeGeneration(workers), journal,  # type: ignore[arg-type]
                                 args, lambda *a: None, "tester")  # type: ignore[arg-type]
        assert not journal
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
    record = PatchRecord(1, "rules", sent, sha, "fix.py", 0.0, "tester", path=str(path))
    assert record.on_disk() is True and Journal([record]).warnings() == []
    path.write_text(fix.replace("2", "3"))
    assert record.on_disk() is False and Journal([record]).warnings()
    path.write_bytes(b"\xff\xfe not utf-8")
    assert record.on_disk() is False


def test_worker_commits_a_patch_set_as_one_and_squashes(mods: Mods) -> None:
    a = mods.load("RATE = 2\n\ndef rate():\n    return RATE\n")
    b = mods.load(f"import {a.__name__}\n\ndef total(x):\n    return x * {a.__name__}.rate()\n")
    host = PatchHost()
    a2 = "RATE = 2\n\ndef rate():\n    return RATE\n\ndef bonus():\n    return 1\n"
    b2 = (f"import {a.__name__}\nfrom {a.__name__} import bonus\n\n"
          f"def total(x):\n    return x * {a.__name__}.rate() + bonus()\n")

    async def scenario() -> None:
        for module, source in ((a.__name__, a2), (b.__name__, b2)):
            reply = await host.prepare({"pid": 1, "module": module, "source": source})
            assert reply["ok"], reply  # b's new import sees what a's plan adds
        done = host.commit({"pid": 1})
        assert done["ok"] and [x["module"] for x in done["applied"]] == [a.__name__, b.__name__]
        assert b.total(10) == 21
        assert host.rollback({"pid": 1})["ok"] and b.total(10) == 20 and not hasattr(a, "bonus")
        for module, source in ((a.__name__, a2), (b.__name__, b2)):
            await host.prepare({"pid": 2, "module": module, "source": source})
        host.commit({"pid": 2})
        squashed = await host.squash({"pid": 2})
        assert squashed == {"ok": True, "folded": 2}
        refused = host.rollback({"pid": 2})
        assert not refused["ok"] and "squashed" in refused["error"] and b.total(10) == 21

    asyncio.run(scenario())


def test_replay_applies_patch_sets_and_folds_the_squashed_ones(mods: Mods) -> None:
    a = mods.load("def f():\n    return 1\n")
    b = mods.load("def g():\n    return 1\n")
    journal = [
        {"id": 1, "module": a.__name__, "source": "def f():\n    return 2\n", "squashed": True,
         "parts": [{"module": a.__name__, "source": "def f():\n    return 2\n"},
                   {"module": b.__name__, "source": "def g():\n    return 2\n"}]},
        {"id": 2, "module": a.__name__, "source": "def f():\n    return 3\n"},
    ]
    host = PatchHost()
    host.replay(journal)
    assert (a.f(), b.g()) == (3, 2)
    assert [c.pid for c in host.stack] == [2] and host.squashed == {1}
    assert host.rollback({"pid": 2})["ok"] and a.f() == 2
    assert not host.rollback({"pid": 1})["ok"] and a.f() == 2


def set_script(refuse_module: str | None = None) -> Script:
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        if body["t"] == "patch.prepare":
            ok = body["module"] != refuse_module
            plan = {"module": body["module"], "changed": [], "notes": [f"note {body['module']}"],
                    "path": None}
            return {"ok": ok, "plan": plan, **({} if ok else {"error": "1 change(s) refused"})}
        return {"ok": True, "applied": [], "notes": [], "folded": 1}

    return reply


def test_supervisor_prepares_each_module_in_order_then_commits_once() -> None:
    parts = [{"module": "app.a", "source": SRC, "name": "a.py"},
             {"module": "app.b", "source": SRC, "name": "b.py"}]
    args = PatchArgs(parts=parts)

    async def scenario() -> tuple[list[FakeWorker], Journal, dict[str, Any]]:
        workers = [FakeWorker(0, set_script()), FakeWorker(1, set_script())]
        journal = Journal()
        result = await patching.apply(FakeGeneration(workers), journal,  # type: ignore[arg-type]
                                      args, lambda *a: None, "tester")  # type: ignore[arg-type]
        return workers, journal, result

    workers, journal, result = asyncio.run(scenario())
    for w in workers:
        assert w.channel.sent == ["patch.prepare", "patch.prepare", "patch.commit"]
    [record] = journal.records
    assert [p["module"] for p in record.each_part()] == ["app.a", "app.b"]
    assert record.summary()["modules"] == ["app.a", "app.b"]
    assert [p["module"] for p in result["plans"]] == ["app.a", "app.a", "app.b", "app.b"]

    async def refused() -> list[FakeWorker]:
        workers = [FakeWorker(0, set_script()), FakeWorker(1, set_script("app.b"))]
        journal = Journal()
        with pytest.raises(ControlError, match="no worker changed"):
            await patching.apply(FakeGeneration(workers), journal,  # type: ignore[arg-type]
                                 args, lambda *a: None, "tester")  # type: ignore[arg-type]
        assert not journal
        return workers

    for w in asyncio.run(refused()):  # both had a plan for app.a: both discard it all
        assert w.channel.sent == ["patch.prepare", "patch.prepare", "patch.abort"]


def test_supervisor_squash_then_rollback_is_refused() -> None:
    async def scenario() -> Journal:
        workers = [FakeWorker(0, set_script()), FakeWorker(1, set_script())]
        gen, journal = FakeGeneration(workers), Journal()
        await patching.apply(gen, journal, PatchArgs(module="app.a", source=SRC),  # type: ignore[arg-type]
                             lambda *a: None, "tester")  # type: ignore[arg-type]
        done = await patching.squash(gen, journal, lambda *a: None, "tester")  # type: ignore[arg-type]
        assert done["squashed"] == [1] and journal.records[0].squashed
        with pytest.raises(ControlError, match=r"squashed .* can no longer be rolled back"):
            await patching.rollback(gen, journal, lambda *a: None, "tester")  # type: ignore[arg-type]
        with pytest.raises(ControlError, match="nothing to squash"):
            await patching.squash(gen, journal, lambda *a: None, "tester")  # type: ignore[arg-type]
        for w in workers:
            assert w.channel.sent == ["patch.prepare", "patch.commit", "patch.squash"]
        return journal

    asyncio.run(scenario())
