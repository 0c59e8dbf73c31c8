"""`swap.run_swap` against fakes of the worker seam: where a swap's abort is decided.

Each fake worker answers the supervisor's requests from a script (a reply, an `ok: false`,
a death, a hang); the fleet is a fake that records what the swap asked of it. Every abort
must leave the old generation ACTIVE (resumed if it was quiesced) and the new one FAILED,
with a reason that names what happened; a commit must leave the new one ACTIVE and the old
one draining. Real processes go through the same paths in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from swapd import messages as m
from swapd.config import Config, Timeouts, build
from swapd.supervisor.fleet import SpawnFailed
from swapd.supervisor.generation import Answer, Generation, RequestFailed
from swapd.supervisor.lifecycle import GenEvent, GenState
from swapd.supervisor.swap import run_swap
from swapd.supervisor.swapjob import SwapFailed, SwapJob

Script = Callable[["FakeWorker", m.Body], dict[str, Any]]
HANG = object()  # a script returns this to never answer


@dataclass
class FakeChild:
    status: str | None = None


class FakeChannel:
    """One-way messages a worker was sent (drain, hold)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed = False

    def send(self, body: dict[str, Any]) -> None:
        self.sent.append(body["t"])


class FakeWorker:
    def __init__(self, gen: int, slot: int, role: str, script: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        self.gen, self.slot, self.role, self.pid = gen, slot, role, 100 * gen + slot
        self.tag = f"gen={gen} worker={slot} pid={self.pid}"
        self.child = FakeChild()
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[str] = loop.create_future()
        self.script = script
        self.asked: list[str] = []
        self.features_ = {"drain", "state", "conns", "patch", "hold"}
        self.channel = FakeChannel()
        self.tail = [f"{self.tag} booting"]
        self.status_text = ""
        self.ready_via: str | None = None
        self.speaks_channel = True

    def features(self) -> set[str]:
        return self.features_

    @property
    def standby(self) -> bool:
        return bool(self.ready.done() and self.ready.result().get("standby"))

    def transition_ready(self) -> None:
        pass

    def tail_text(self) -> str:
        return f"output of {self.tag}"

    def die(self, how: str = "killed by SIGKILL") -> None:
        if not self.exited.done():
            self.child.status = how
            self.exited.set_result(how)

    async def ask(self, request: m.Body, reply: type[Any], timeout: float, what: str,
                  fds: list[int] | None = None, reply_fds: int = 0) -> Answer[Any]:
        name = type(request).__name__
        self.asked.append(name)
        action = self.script.get(name, {})
        body = action(self, request) if callable(action) else action
        if body is HANG:
            await asyncio.sleep(timeout)
            raise RequestFailed(f"{self.tag} {what} failed: no reply within {timeout:g}s",
                                self)  # type: ignore[arg-type]
        if self.exited.done():
            raise RequestFailed(f"{self.tag} {self.exited.result()} during {what}",
                                self)  # type: ignore[arg-type]
        parsed = m.parse_reply(reply, {"ok": True, **body} if "ok" not in body else body)
        if isinstance(parsed, m.Failure):
            raise RequestFailed(f"{self.tag} {what} failed: {parsed.error}", self,  # type: ignore[arg-type]
                                answered=True)
        return Answer(parsed, [])


def dies(how: str = "killed by SIGKILL") -> Script:
    def script(w: FakeWorker, request: m.Body) -> dict[str, Any]:
        w.die(how)
        return {}
    return script


class FakeProcesses:
    def __init__(self) -> None:
        self.killed: list[int] = []
        self.exited: list[Any] = []  # children the kernel says have exited (pidfd)

    def has_exited(self, child: Any) -> bool:
        return any(c is child for c in self.exited)

    def signal_group(self, child: Any, sig: int) -> None:
        self.killed.append(sig)


class FakeFleet:
    """What run_swap asks of the fleet, recorded; the new generation's workers from scripts."""

    def __init__(self, old_workers: int = 1) -> None:
        self.processes = FakeProcesses()
        self.scripts: dict[int, dict[str, Any]] = {}  # slot -> script of the new worker
        self.ready: dict[int, dict[str, Any] | None] = {}  # slot -> ready info (None: never)
        self.old_script: dict[str, Any] = {
            "Quiesce": {"envelope": {"format": 1}, "size": 10, "t_stop": 1.0, "conns": 0}}
        self.retired: list[int] = []
        self.resumed: list[int] = []
        self.active: Generation | None = None
        self.old = self._generation(1, old_workers, "fresh", self.old_script)
        self.old.state = GenState.ACTIVE
        self.active = self.old
        self.new: Generation | None = None
        self.spawn_error: str | None = None
        self.new_features: set[str] = set()  # beyond FakeWorker's defaults

    def _generation(self, gen_id: int, n: int, role: str, script: dict[str, Any]
                    ) -> Generation:
        gen = Generation(gen_id, config())
        for slot in range(n):
            w = FakeWorker(gen_id, slot, role, self.scripts.get(slot, script))
            gen.workers.append(w)  # type: ignore[arg-type]
        return gen

    def start_generation(self, cfg: Config, successor_of: Generation | None,
                         release: str | None = None) -> Generation:
        if self.spawn_error:
            raise SpawnFailed(self.spawn_error)
        role = "successor" if successor_of is not None else "fresh"
        gen = Generation(2, cfg, release=release or "derived")
        for slot in range(cfg.workers):
            w = FakeWorker(2, slot, role, self.scripts.get(slot, {}))
            w.features_ |= self.new_features
            info = self.ready.get(slot, {"standby": role == "successor", "via": "channel"})
            if info is not None:
                w.ready.set_result(info)
            gen.workers.append(w)  # type: ignore[arg-type]
        self.new = gen
        return gen

    async def kill_generation(self, gen: Generation) -> None:
        for w in gen.workers:
            assert isinstance(w, FakeWorker)
            w.die()
        if gen.state in (GenState.STARTING, GenState.STANDBY):
            gen.transition(GenEvent.FAIL)

    def commit(self, new: Generation, old: Generation | None, *, drain_old: bool = True,
               hold: bool = False) -> None:
        new.transition(GenEvent.COMMIT)
        self.active = new
        if old is not None:
            old.transition(GenEvent.HOLD if hold else GenEvent.SUPERSEDE)
            if drain_old and not hold:
                self.retire(old)

    def retire(self, old: Generation) -> None:
        self.retired.append(old.id)

    def kill(self, w: Any) -> None:
        self.processes.signal_group(w.child, 9)

    def after_resume(self, gen: Generation) -> None:
        self.resumed.append(gen.id)


def config(**kw: Any) -> Config:
    base = build({"command": ["app"], "bind": {"http": "127.0.0.1:0"}}, {},
                 environ={"SWAPD_CONTROL": "/nonexistent/ctl.sock"})
    timeouts = Timeouts(ready=0.5, drain=1, quiesce=0.5, restore=0.5)
    return replace(base, timeouts=timeouts, **kw)


def run_in_loop(build_fleet: Callable[[], FakeFleet], cfg: Config, **job_fields: Any
                ) -> tuple[FakeFleet, dict[str, Any] | SwapFailed, SwapJob]:
    """The fakes hold futures: build them inside the loop that runs the swap."""
    async def go() -> tuple[FakeFleet, dict[str, Any] | SwapFailed, SwapJob]:
        fleet = build_fleet()
        job = SwapJob("upgrade", "test", **job_fields)
        try:
            outcome: dict[str, Any] | SwapFailed = await run_swap(fleet, job, cfg)  # type: ignore[arg-type]
        except SwapFailed as e:
            outcome = e
        return fleet, outcome, job
    return asyncio.run(go())


def old_workers(fleet: FakeFleet) -> list[FakeWorker]:
    return [w for w in fleet.old.workers if isinstance(w, FakeWorker)]


def new_workers(fleet: FakeFleet) -> list[FakeWorker]:
    assert fleet.new is not None
    return [w for w in fleet.new.workers if isinstance(w, FakeWorker)]


def assert_untouched(fleet: FakeFleet, failure: Any, reason: str) -> None:
    """The abort promise: old ACTIVE and in charge, new FAILED and dead, reason given."""
    assert isinstance(failure, SwapFailed), failure
    assert reason in failure.reason
    assert fleet.active is fleet.old and fleet.old.state is GenState.ACTIVE
    assert fleet.retired == []
    if fleet.new is not None:
        assert fleet.new.state is GenState.FAILED
        assert all(w.exited.done() for w in new_workers(fleet))


# -- stateless ---------------------------------------------------------------------------


def test_stateless_commit() -> None:
    fleet, outcome, job = run_in_loop(FakeFleet, config())
    assert isinstance(outcome, dict) and outcome["gen"] == 2 and outcome["previous"] == 1
    assert fleet.active is fleet.new and fleet.new.state is GenState.ACTIVE
    assert fleet.old.state is GenState.DRAINING and fleet.retired == [1]
    assert {"spawned", "ready", "committed"} <= set(job.timings)
    assert old_workers(fleet)[0].asked == []  # the old generation is never asked anything


def test_a_new_worker_dead_but_not_yet_reaped_aborts_the_commit() -> None:
    # Ready, then exited: the kernel knows (pidfd) before our bookkeeping does.
    class DiesAfterReady(FakeFleet):
        def start_generation(self, cfg: Config, successor_of: Generation | None,
                             release: str | None = None) -> Generation:
            gen = super().start_generation(cfg, successor_of, release)
            self.processes.exited.append(gen.workers[0].child)
            # ... and the reaper catches up a moment later (the abort waits for its status)
            dead = gen.workers[0]
            assert isinstance(dead, FakeWorker)
            asyncio.get_running_loop().call_later(0.01, dead.die)
            return gen

    fleet, outcome, _ = run_in_loop(DiesAfterReady, config())
    assert_untouched(fleet, outcome, "before commit")


def test_stateless_commit_under_a_watch_window_holds_the_old_generation() -> None:
    fleet, outcome, _ = run_in_loop(FakeFleet, config(), watch=30.0, release="v2")
    assert isinstance(outcome, dict) and fleet.new is not None
    assert fleet.new.release == "v2" and fleet.new.state is GenState.ACTIVE
    assert fleet.old.state is GenState.HELD and fleet.retired == []  # kept, not drained
    assert old_workers(fleet)[0].channel.sent == ["hold"]  # told to stop accepting


def test_spawn_failure() -> None:
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet()
        fleet.spawn_error = "gen=2 worker=0: No such file or directory"
        return fleet
    fleet, failure, _ = run_in_loop(build_fleet, config())
    assert_untouched(fleet, failure, "No such file or directory")


def test_new_worker_exits_before_ready() -> None:
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet()
        fleet.ready[0] = None
        asyncio.get_running_loop().call_soon(lambda: new_workers(fleet)[0].die(
            "exited with status 1"))
        return fleet
    fleet, failure, _ = run_in_loop(build_fleet, config())
    assert_untouched(fleet, failure, "gen=2 worker=0 pid=200 exited with status 1 before it "
                                     "was ready")
    assert isinstance(failure, SwapFailed) and failure.tail == "output of gen=2 worker=0 pid=200"


def test_new_worker_never_ready() -> None:
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet()
        fleet.ready[1] = None
        return fleet
    fleet, failure, _ = run_in_loop(build_fleet, config(workers=2))
    assert_untouched(fleet, failure, "gen=2 worker=1 pid=201 not ready within 0.5s "
                                     "(ready_timeout)")
    assert isinstance(failure, SwapFailed)
    assert "has not called ready()" in failure.reason  # what swapd waited for
    assert "last output: 'gen=2 worker=1 pid=201 booting'" in failure.reason


# -- stateful --------------------------------------------------------------------------


def stateful(**kw: Any) -> Config:
    return config(mode="stateful", **kw)


def test_stateful_commit_under_a_watch_window_holds_after_the_new_one_accepts() -> None:
    fleet, outcome, _ = run_in_loop(FakeFleet, stateful(), watch=5.0)
    assert isinstance(outcome, dict), outcome
    assert new_workers(fleet)[0].asked == ["Restore", "Commit"]
    assert old_workers(fleet)[0].asked == ["Quiesce"]
    assert old_workers(fleet)[0].channel.sent == ["hold"]
    assert fleet.old.state is GenState.HELD and fleet.retired == []


def test_stateful_commit() -> None:
    fleet, outcome, _ = run_in_loop(FakeFleet, stateful())
    assert isinstance(outcome, dict), outcome
    assert old_workers(fleet)[0].asked == ["Quiesce"]
    assert new_workers(fleet)[0].asked == ["Restore", "Commit"]
    assert fleet.old.state is GenState.DRAINING and fleet.retired == [1]
    assert fleet.new is not None and fleet.new.state is GenState.ACTIVE
    assert "pause" in outcome["timings_ms"]


@pytest.mark.parametrize(("where", "script", "reason"), [
    ("old", {"Quiesce": {"ok": False, "error": "OSError: too many open files"}},
     "gen=1 worker=0 pid=100 quiesce and snapshot failed: OSError: too many open files"),
    ("old", {"Quiesce": HANG}, "quiesce and snapshot failed: no reply within 0.5s"),
    ("old", {"Quiesce": {"ok": True, "size": 1}},  # no envelope: a malformed reply
     "missing field 'envelope'"),
    ("new", {"Restore": {"ok": False, "error": "ValueError: state version 3 refused"}},
     "gen=2 worker=0 pid=200 restore failed: ValueError: state version 3 refused"),
    ("new", {"Restore": dies()}, "gen=2 worker=0 pid=200 killed by SIGKILL during restore"),
    ("new", {"Restore": HANG}, "restore failed: no reply within 0.5s"),
])
def test_stateful_abort_resumes_the_old_generation(where: str, script: dict[str, Any],
                                                   reason: str) -> None:
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet()
        if where == "old":
            old_workers(fleet)[0].script = script
        else:
            fleet.scripts[0] = script
        return fleet
    fleet, failure, _ = run_in_loop(build_fleet, stateful())
    assert_untouched(fleet, failure, reason)
    assert old_workers(fleet)[0].asked[-1] == "Resume"  # serves again with its own state
    assert fleet.resumed == [1]
    assert new_workers(fleet)[0].asked[-1:] != ["Commit"]


def test_a_successor_that_does_not_wait_for_state_is_refused() -> None:
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet()
        fleet.ready[0] = {"standby": False, "via": "notify"}
        return fleet
    fleet, failure, _ = run_in_loop(build_fleet, stateful())
    assert_untouched(fleet, failure, "started serving without waiting for state")
    assert old_workers(fleet)[0].asked == []  # never quiesced: nothing to resume


def test_precopy_failure_ends_the_round_without_quiesce() -> None:
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet()
        old_workers(fleet)[0].script = {"PrecopyOut": {"names": ["players"], "size": 5}}
        fleet.scripts[0] = {"PrecopyIn": {"ok": False, "error": "PrecopyError: unknown dict"}}
        return fleet
    fleet, failure, _ = run_in_loop(build_fleet, stateful(precopy=True))
    assert_untouched(fleet, failure, "pre-copy load failed: PrecopyError: unknown dict")
    assert old_workers(fleet)[0].asked == ["PrecopyOut", "Resume"]
    assert fleet.resumed == []  # it never stopped serving: no generation-level resume


@pytest.mark.parametrize(("sent", "received", "reason"), [
    # The sender failed; the receiver only saw the link close under it: the sender's reason.
    ({"ok": False, "error": "OSError: [Errno 9] Bad file descriptor"},
     {"ok": False, "error": f"{m.LINK_CLOSED}: end of stream"},
     "gen=1 worker=0 pid=100 connection pre-send failed: OSError: [Errno 9] Bad file"),
    # The receiver refused on its own (its descriptor budget): its reason, with the figures.
    ({"ok": False, "error": "handoff link closed"},
     {"ok": False, "error": "3000 connections need 3016 descriptors, RLIMIT_NOFILE is 1024"},
     "gen=2 worker=0 pid=200 connection pre-send (receive) failed: 3000 connections need"),
])
def test_a_presend_failure_names_the_worker_that_failed(
    sent: dict[str, Any], received: dict[str, Any], reason: str
) -> None:
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet()
        old = old_workers(fleet)[0]
        old.features_.add("link")
        old.script = {**fleet.old_script, "LinkOut": sent}
        fleet.new_features = {"link"}
        fleet.scripts[0] = {"LinkIn": received}
        return fleet
    fleet, failure, _ = run_in_loop(build_fleet, stateful())
    assert_untouched(fleet, failure, reason)
    # Told to end the pre-send it began; it never stopped serving: no generation-level resume.
    assert old_workers(fleet)[0].asked == ["LinkOut", "Resume"]
    assert fleet.resumed == []
    assert new_workers(fleet)[0].asked == ["LinkIn"]


def test_refused_before_anything_starts() -> None:
    def no_state() -> FakeFleet:
        fleet = FakeFleet()
        old_workers(fleet)[0].features_ = {"drain"}
        return fleet
    fleet, failure, _ = run_in_loop(no_state, stateful())
    assert_untouched(fleet, failure, "cannot hand over state")
    assert fleet.new is None  # nothing was spawned

    fleet, failure, _ = run_in_loop(lambda: FakeFleet(old_workers=2), stateful(workers=1))
    assert_untouched(fleet, failure, "cannot shrink from 2 to 1 workers")
    assert fleet.new is None


def test_commit_failure_in_a_new_worker_is_a_crash_not_an_abort() -> None:
    """After commit nothing is undone: a worker that cannot confirm is killed (restarted in
    its slot by the fleet); one that answers ok: false serves anyway."""
    def build_fleet() -> FakeFleet:
        fleet = FakeFleet(old_workers=2)
        fleet.scripts[0] = {"Commit": {"ok": False, "error": "SharedBuffer commit failed"}}
        fleet.scripts[1] = {"Commit": dies()}
        return fleet
    fleet, outcome, job = run_in_loop(build_fleet, stateful(workers=2))
    assert isinstance(outcome, dict), outcome
    assert fleet.new is not None and fleet.new.state is GenState.ACTIVE
    assert fleet.retired == [1]
    assert len(fleet.processes.killed) == 1  # only the silent one
    # both said as warnings of a success, in the result too
    assert len(outcome["warnings"]) == 2 and outcome["warnings"] == job.warnings
    assert "could not finish its commit" in outcome["warnings"][0]
    assert "did not confirm its commit" in outcome["warnings"][1]


def test_cancelled_swap_resumes_the_quiesced_generation() -> None:
    """A stop during the pause: the old generation gets its state back before anything else."""
    async def go() -> tuple[FakeFleet, BaseException | None]:
        fleet = FakeFleet()
        restoring = asyncio.Event()

        def hang(w: FakeWorker, request: m.Body) -> Any:
            restoring.set()
            return HANG

        fleet.scripts[0] = {"Restore": hang}
        task = asyncio.ensure_future(run_swap(fleet, SwapJob("upgrade", "t"),  # type: ignore[arg-type]
                                              stateful()))
        await asyncio.wait_for(restoring.wait(), 5)
        task.cancel()
        try:
            await task
        except BaseException as e:
            return fleet, e
        return fleet, None

    fleet, error = asyncio.run(go())
    assert isinstance(error, asyncio.CancelledError)
    assert fleet.old.state is GenState.ACTIVE and old_workers(fleet)[0].asked[-1] == "Resume"
    assert fleet.new is not None and fleet.new.state is GenState.FAILED
