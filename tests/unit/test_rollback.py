"""`rollback.roll_back` against fakes of the worker seam (those of test_swap): who is asked
what, in which order, and what each refusal leaves behind. Real processes go through the
same paths in tests/integration/test_watch.py."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from swapd.supervisor.generation import Generation
from swapd.supervisor.journal import PatchRecord
from swapd.supervisor.lifecycle import GenState
from swapd.supervisor.rollback import RollbackRefused, Rolled, roll_back
from tests.unit.test_swap import FakeFleet, FakeWorker, config

QUIESCED = {"envelope": {"format": 1}, "size": 10, "t_stop": 100.0, "conns": 2}
PATCH = PatchRecord(1, "app.rules", "x = 1\n", "0" * 64, "fix.py", 0.0, "pid=1 uid=0")


class Fleet(FakeFleet):
    def __init__(self) -> None:
        super().__init__()
        self.crashes: dict[int, list[float]] = {0: [1.0]}
        self.crash_loop = {0}
        self.timers_cancelled = 0
        self.journal = type("J", (), {"records": []})()

    def cancel_timers(self) -> None:
        self.timers_cancelled += 1


def generations(fleet: Fleet, mode: str, n: int, held_script: dict[str, Any],
                watched_script: dict[str, Any]) -> tuple[Generation, Generation]:
    cfg = config(mode=mode, workers=n)
    held = Generation(1, cfg, state=GenState.HELD, release="v1")
    watched = Generation(2, cfg, state=GenState.ACTIVE, release="v2")
    for slot in range(n):
        held.workers.append(FakeWorker(1, slot, "fresh", held_script))  # type: ignore[arg-type]
        watched.workers.append(FakeWorker(2, slot, "successor",  # type: ignore[arg-type]
                                          watched_script))
    fleet.active = watched
    return watched, held


def run(mode: str, n: int = 1, held_script: dict[str, Any] | None = None,
        watched_script: dict[str, Any] | None = None, before: Any = None
        ) -> tuple[Fleet, Generation, Generation, Rolled | RollbackRefused]:
    async def go() -> tuple[Fleet, Generation, Generation, Rolled | RollbackRefused]:
        fleet = Fleet()
        watched, held = generations(
            fleet, mode, n, held_script or {"Revive": {"t_start": 100.005}},
            watched_script or {"Quiesce": QUIESCED})
        if before is not None:
            before(watched, held)
        try:
            outcome: Rolled | RollbackRefused = await roll_back(
                fleet, watched, held, [PATCH])  # type: ignore[arg-type]
        except RollbackRefused as e:
            outcome = e
        return fleet, watched, held, outcome
    return asyncio.run(go())


def asked(gen: Generation) -> list[list[str]]:
    return [w.asked for w in gen.workers]  # type: ignore[union-attr]


def test_stateless_revives_the_held_generation_and_drains_the_watched_one() -> None:
    fleet, watched, held, rolled = run("stateless", n=2)
    assert isinstance(rolled, Rolled)
    assert asked(held) == [["Revive"], ["Revive"]]
    assert asked(watched) == [[], []]  # nothing to take back: it just drains
    assert held.state is GenState.ACTIVE and fleet.active is held
    assert watched.state is GenState.DRAINING and fleet.retired == [2]
    assert fleet.journal.records == [PATCH]  # the held generation's patches in force again
    assert fleet.crashes == {} and fleet.crash_loop == set()
    assert fleet.resumed == [1]  # its dead slots (none here) restarted
    assert fleet.timers_cancelled == 1  # no respawn of the watched code meanwhile
    assert "revived" in rolled.timings_ms and rolled.lost_slots == []


def test_stateful_hands_the_state_back_then_revives() -> None:
    _, watched, held, rolled = run(
        "stateful", n=2, held_script={"Restore": {}, "Revive": {"t_start": 100.004}})
    assert isinstance(rolled, Rolled)
    assert asked(watched) == [["Quiesce"], ["Quiesce"]]
    assert asked(held) == [["Restore", "Revive"], ["Restore", "Revive"]]
    assert held.state is GenState.ACTIVE and watched.state is GenState.DRAINING
    assert rolled.timings_ms["pause"] == pytest.approx(4.0)  # t_start - t_stop, in ms
    assert {"snapshotted", "restored", "revived"} <= set(rolled.timings_ms)


def test_stateful_refused_by_the_held_code_leaves_the_watched_one_serving() -> None:
    refused = {"ok": False, "error": "VersionRefused: state version 2 is not accepted "
                                     "(accepts 0-1)"}
    fleet, watched, held, outcome = run("stateful", n=2, held_script={"Restore": refused},
                                        watched_script={"Quiesce": QUIESCED, "Resume": {}})
    assert isinstance(outcome, RollbackRefused)
    assert "gen=1 worker=0 pid=100 restore for a rollback failed: VersionRefused: state " \
           "version 2 is not accepted" in str(outcome)
    assert asked(watched) == [["Quiesce", "Resume"], ["Quiesce", "Resume"]]
    assert asked(held) == [["Restore"], ["Restore"]]  # never revived
    assert watched.state is GenState.ACTIVE and fleet.active is watched
    assert held.state is GenState.HELD  # the window's owner lets it go
    assert fleet.retired == [] and fleet.resumed == [2]  # the watched one's dead slots back
    assert fleet.journal.records == []


def test_stateful_with_a_crashed_watched_worker_revives_that_slot_with_its_own_state() -> None:
    def crash(watched: Generation, held: Generation) -> None:
        watched.workers[1].die("killed by SIGKILL")  # type: ignore[union-attr]

    _, watched, held, rolled = run(
        "stateful", n=2, held_script={"Restore": {}, "Revive": {"t_start": 100.004}},
        before=crash)
    assert isinstance(rolled, Rolled) and rolled.lost_slots == [1]
    assert asked(watched) == [["Quiesce"], []]
    assert asked(held) == [["Restore", "Revive"], ["Revive"]]
    assert held.state is GenState.ACTIVE


def test_stateful_with_a_dead_held_worker_is_refused_before_anything_is_asked() -> None:
    def gone(watched: Generation, held: Generation) -> None:
        held.workers[0].die("exited with status 1")  # type: ignore[union-attr]

    _, watched, held, outcome = run("stateful", before=gone)
    assert isinstance(outcome, RollbackRefused)
    assert "gen=1 worker=0 is gone: the state of gen=2 worker=0 pid=200 would have " \
           "nowhere to go" in str(outcome)
    assert asked(watched) == [[]] and asked(held) == [[]]
    assert watched.state is GenState.ACTIVE and held.state is GenState.HELD


def test_stateful_quiesce_failure_resumes_the_watched_generation() -> None:
    _, watched, held, outcome = run(
        "stateful", n=2, watched_script={"Quiesce": {"ok": False, "error": "TimeoutError: 1 "
                                                     "connection(s) still busy"}, "Resume": {}})
    assert isinstance(outcome, RollbackRefused) and "still busy" in str(outcome)
    assert asked(watched) == [["Quiesce", "Resume"], ["Quiesce", "Resume"]]
    assert asked(held) == [[], []]
    assert watched.state is GenState.ACTIVE


def test_a_held_worker_that_cannot_revive_is_killed_and_the_rest_serve() -> None:
    def script(w: FakeWorker, request: Any) -> dict[str, Any]:
        if w.slot == 1:
            return {"ok": False, "error": "not held (drained, or never held): cannot revive"}
        return {"t_start": 100.0}

    fleet, watched, held, rolled = run("stateless", n=2, held_script={"Revive": script})
    assert isinstance(rolled, Rolled)
    assert fleet.processes.killed == [signal.SIGKILL]  # slot 1, restarted by its pidfd
    assert held.state is GenState.ACTIVE and watched.state is GenState.DRAINING
