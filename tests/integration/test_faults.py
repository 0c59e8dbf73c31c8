"""Fault injection at every step of both swap kinds: SIGKILL and SIGSTOP of the old and of
the new worker at spawn, ready, pre-copy, quiesce, restore and commit.

Each case asserts what the failure rules promise: the old generation never exits before
commit; a failed swap exits 1 with the reason and leaves the service as it was (in stateful
mode with every acknowledged increment); after the commit a crash is a restart; and the
`swapd upgrade` output says what happened (a worker that died is never announced as
resumed, a committed swap is never reported failed).

Injection is synchronised on events, never on sleeps: the test app (tests/apps/faulty.py)
blocks at an armed hook and prints a line the supervisor forwards, or the supervisor logs
the state change. A case that waits for a deadline (a stopped worker) uses short ones.

The cases of one swap kind share one supervisor (2 workers; the victim is slot 0, slot 1
is the witness): each starts from a healthy service and leaves one behind, which it checks.
Left out as the same case twice: an old worker stopped before its quiesce (at spawn, or
during a pre-copy) is "quiesce-old-stop"; a stateful successor at "ready" (standing by) is
held there by the old worker's quiesce: "quiesce-new-*"; a new worker stopped after the
commit, like one stopped after it said ready, is taken at its word (not covered: swapd has
no liveness probe), and an old one stopped then is "restore-old-stop".
Load: one client doing INCR requests, reconnecting every few, so both slots get traffic;
each slot's counter must only ever go up (an acknowledged increment lost = it goes down or
repeats), unless the case reports that slot's state lost.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.supervised import ROOT, Supervised, wait_pid_gone

FAULTY = [sys.executable, str(ROOT / "tests" / "apps" / "faulty.py")]
STEPS = ("start", "quiesce", "restore", "precopied", "precopy-in")
TIMEOUTS = ["--ready-timeout", "4", "--quiesce-timeout", "1", "--restore-timeout", "2",
            "--drain-timeout", "2"]


class Load(threading.Thread):
    """One client: INCR, INCR, INCR on a connection, then a new one; bounded in time and
    count. Records every acknowledged (slot, count) in order."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.acks: list[tuple[int, int]] = []
        self.errors = 0
        self._halt = threading.Event()
        self._cond = threading.Condition()

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while not self._halt.is_set() and time.monotonic() < deadline and len(self.acks) < 10**6:
            try:
                with socket.create_connection(self.address, timeout=30) as conn:
                    reader = conn.makefile("rb")
                    for _ in range(3):
                        conn.sendall(b"INCR\n")
                        line = reader.readline()
                        if not line:
                            raise ConnectionError("closed")
                        slot, count = map(int, line.split())
                        with self._cond:
                            self.acks.append((slot, count))
                            self._cond.notify_all()
            except (OSError, ValueError):
                self.errors += 1  # a worker killed under it: that request is not acknowledged

    def mark(self) -> int:
        with self._cond:
            return len(self.acks)

    def wait_acks(self, since: int, per_slot: int = 2, timeout: float = 30) -> None:
        """Until each of both slots acknowledged `per_slot` increments after `since`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                slots = [s for s, _ in self.acks[since:]]
                if all(slots.count(s) >= per_slot for s in (0, 1)):
                    return
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no traffic on both slots: {self.acks[since:][-20:]}"
                self._cond.wait(remaining)

    def finish(self) -> list[tuple[int, int]]:
        self._halt.set()
        self.join(60)
        assert not self.is_alive()
        return self.acks

    def assert_kept(self, slots: tuple[int, ...]) -> None:
        """Each of `slots` only ever counted up: no acknowledged increment was lost."""
        for slot in slots:
            counts = [c for s, c in self.acks if s == slot]
            assert counts, f"slot {slot} got no traffic"
            drops = [(a, b) for a, b in itertools.pairwise(counts) if b <= a]
            assert not drops, f"slot {slot} lost acknowledged increments: {drops[:5]}"


@dataclass
class Rig:
    """A supervisor of the faulty counter for one swap kind, shared by its cases."""

    s: Supervised
    hooks: Path
    stopped: set[int] = field(default_factory=set)

    @property
    def stateful(self) -> bool:
        return "stateful" in self.s.argv

    def active(self) -> tuple[int, list[int]]:
        st = self.s.status()
        gen = next(g for g in st["generations"] if g["id"] == st["active"])
        return gen["id"], [w["pid"] for w in sorted(gen["workers"], key=lambda w: w["slot"])]

    def arm(self, step: str, slot: int, min_gen: int) -> None:
        (self.hooks / step).write_text(json.dumps({"slot": slot, "min_gen": min_gen}))

    def hooked(self, step: str, mark: int) -> int:
        m = self.s.wait_log(rf"\| HOOK {step} gen=\d+ slot=\d+ pid=(\d+)", start=mark)
        self.s.worker_pids.add(int(m.group(1)))
        return int(m.group(1))

    def release(self, step: str) -> None:
        """Let the worker holding at `step` go on (it keeps the FIFO open from before it said
        so; non-blocking: it may be stopped)."""
        fd = os.open(self.hooks / f"{step}.go", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)

    def act(self, pid: int, action: str) -> None:
        if action == "kill":
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGSTOP)
            self.stopped.add(pid)

    def resume_stopped(self) -> None:
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped.clear()

    def disarm(self) -> None:
        for path in self.hooks.iterdir():
            if path.name in STEPS or ".claimed-" in path.name:
                path.unlink()

    def spawned(self, gen: int, slot: int, mark: int) -> int:
        m = self.s.wait_log(rf"event=worker.spawn gen={gen} worker={slot} pid=(\d+)", start=mark)
        self.s.worker_pids.add(int(m.group(1)))
        return int(m.group(1))


@contextlib.contextmanager
def _rig(tmp: Path, *args: str) -> Iterator[Rig]:
    hooks = tmp / "hooks"
    hooks.mkdir()
    for step in STEPS:
        os.mkfifo(hooks / f"{step}.go")
    s = Supervised(tmp, FAULTY, args=["--workers", "2", *TIMEOUTS, *args],
                   env={"HOOKS": str(hooks)}, binds=("app=127.0.0.1:0",))
    rig = Rig(s, hooks)
    try:
        s.start()
        yield rig
    finally:
        rig.resume_stopped()
        s.stop()


@pytest.fixture(scope="module")
def stateless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with _rig(tmp_path_factory.mktemp("stateless")) as rig:
        yield rig


@pytest.fixture(scope="module")
def stateful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with _rig(tmp_path_factory.mktemp("stateful"), "--mode", "stateful") as rig:
        yield rig


@pytest.fixture(scope="module")
def precopy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with _rig(tmp_path_factory.mktemp("precopy"), "--mode", "stateful", "--precopy") as rig:
        yield rig


@dataclass
class Case:
    """What one injection must lead to."""

    exit: int  # of `swapd upgrade`
    says: tuple[str, ...] = ()  # regexes its output must match ({old}, {new}, {pid} filled)
    never: tuple[str, ...] = ()  # and must not
    kept: tuple[int, ...] = (0, 1)  # slots whose acknowledged increments must all survive
    then: Callable[[Rig, dict[str, int], int], None] | None = None  # more checks, recovery


RESUMED = r"gen={old} serving again with its state"
LOST = (r"WARNING: gen={old}: worker 0 \(pid={pid}\) killed by SIGKILL during the swap: "
        r"restarted in its slot, its state is lost")
UNCONFIRMED = r"WARNING: gen={old}: worker 0 \(pid={pid}\) did not confirm the resume"


def _respawned(gen_key: str) -> Callable[[Rig, dict[str, int], int], None]:
    def check(rig: Rig, ids: dict[str, int], mark: int) -> None:
        rig.s.wait_log(rf"event=worker.ready gen={ids[gen_key]} worker=0 pid=\d+ restarts=1",
                       start=mark)
    return check


def _drain_killed(rig: Rig, ids: dict[str, int], mark: int) -> None:
    """The stopped old worker cannot drain: SIGKILL at the drain deadline, then it is gone."""
    rig.s.wait_log(rf"event=drain.timeout gen={ids['old']} worker=0 pid={ids['pid']} ",
                   start=mark)
    assert wait_pid_gone(ids["pid"], 10)
    rig.stopped.discard(ids["pid"])


def _exit_not_crash(rig: Rig, ids: dict[str, int], mark: int) -> None:
    """A superseded worker killed: its generation ends, and it is never restarted."""
    rig.s.wait_log(rf"event=worker.(exit|died) gen={ids['old']} worker=0 pid={ids['pid']} "
                   r'status="killed by SIGKILL"', start=mark)
    rig.s.wait_log(rf"event=gen.exited gen={ids['old']}", start=mark)
    since = "\n".join(rig.s.log_lines[mark:])
    assert f"worker.respawn_scheduled gen={ids['old']} " not in since


# (step, victim) -> how to get there; the Case says what must follow, per swap kind and action.
CASES: dict[tuple[str, str, str, str], Case] = {
    # -- stateless ---------------------------------------------------------------------
    ("stateless", "spawn", "new", "kill"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} killed by SIGKILL before it was ready",)),
    ("stateless", "spawn", "new", "stop"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} not ready within 4s \(ready_timeout\)",)),
    ("stateless", "spawn", "old", "kill"): Case(0, (
        r"WARNING: gen={old}: worker 0 \(pid={pid}\) killed by SIGKILL during the swap$",),
        kept=()),
    ("stateless", "spawn", "old", "stop"): Case(0, (r"ok: gen={new} active",), kept=(),
                                                 then=_drain_killed),
    ("stateless", "ready", "new", "kill"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} killed by SIGKILL right after it was ready",)),
    # Not covered, by design: a worker stopped after it said ready is taken at its word.
    ("stateless", "ready", "new", "stop"): Case(0, (r"ok: gen={new} active",), kept=()),
    ("stateless", "committed", "new", "kill"): Case(0, (r"ok: gen={new} active",), kept=(),
                                                     then=_respawned("new")),
    ("stateless", "committed", "old", "kill"): Case(0, (r"ok: gen={new} active",), kept=(),
                                                     then=_exit_not_crash),
    # -- stateful (handoff) ------------------------------------------------------------
    ("stateful", "spawn", "new", "kill"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} killed by SIGKILL before it was ready",)),
    ("stateful", "spawn", "new", "stop"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} not ready within 4s",)),
    ("stateful", "spawn", "old", "kill"): Case(0, (
        r"ok: gen={new} active", r"WARNING: gen={old}: worker 0 \(pid={pid}\) killed by "
        r"SIGKILL during the swap: its state is lost$"), kept=(1,)),
    ("stateful", "quiesce", "old", "kill"): Case(1, (
        r"FAILED: gen={old} worker=0 pid={pid} killed by SIGKILL during quiesce and snapshot",
        LOST), never=(RESUMED,), kept=(1,)),
    ("stateful", "quiesce", "old", "stop"): Case(1, (
        r"FAILED: gen={old} worker=0 pid={pid} quiesce and snapshot failed", UNCONFIRMED),
        never=(RESUMED,)),
    # ("ready" of a stateful successor = standing by: held there by the old worker's quiesce)
    ("stateful", "quiesce", "new", "kill"): Case(1, (r"FAILED: gen={new} worker=0 pid={pid} ",
                                                     RESUMED)),
    ("stateful", "quiesce", "new", "stop"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} restore failed", RESUMED)),
    ("stateful", "restore", "new", "kill"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} killed by SIGKILL during restore", RESUMED)),
    ("stateful", "restore", "new", "stop"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} restore failed", RESUMED)),
    # The old worker handed its state over: its death loses nothing.
    ("stateful", "restore", "old", "kill"): Case(0, (r"ok: gen={new} active",),
                                                 never=(r"state is lost", r"WARNING")),
    ("stateful", "restore", "old", "stop"): Case(0, (r"ok: gen={new} active",),
                                                 never=(r"WARNING",), then=_drain_killed),
    # restored, waiting for the commit: dead -> abort; stopped -> committed, then killed
    ("stateful", "commit", "new", "kill"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} killed by SIGKILL before commit", RESUMED)),
    ("stateful", "commit", "new", "stop"): Case(0, (
        r"ok: gen={new} active", r"WARNING: gen={new} worker=0 pid={pid} did not confirm its "
        r"commit .*: killed and restarted in its slot; the state handed to it is lost"),
        kept=(1,), then=_respawned("new")),
    ("stateful", "committed", "new", "kill"): Case(0, (r"ok: gen={new} active",), kept=(1,),
                                                    then=_respawned("new")),
    ("stateful", "committed", "old", "kill"): Case(0, (r"ok: gen={new} active",),
                                                    never=(r"WARNING",), then=_exit_not_crash),
    # -- stateful with pre-copy --------------------------------------------------------
    ("precopy", "precopy", "old", "kill"): Case(1, (LOST,), never=(RESUMED,), kept=(1,)),
    ("precopy", "precopy", "new", "kill"): Case(1, (
        r"FAILED: gen={new} worker=0 pid={pid} killed by SIGKILL during pre-copy load",)),
}


def _inject(rig: Rig, step: str, victim: str, action: str, cli_mark: int,
            ids: dict[str, int]) -> None:
    """Drive the swap in flight to `step` and do `action` to the victim (slot 0). A hook
    that holds the swap while another process is the victim is released afterwards."""
    s, old, new = rig.s, ids["old"], ids["new"]
    held = None
    if step == "spawn":  # new worker 0 holds before ready
        rig.arm("start", 0, new)
        pid = rig.hooked("start", cli_mark)
        if victim == "old":
            pid, held = ids["old0"], "start"
    elif step == "ready":  # new worker 0 ready; worker 1 holds the swap before its own
        rig.arm("start", 1, new)
        rig.hooked("start", cli_mark)
        pid, held = int(s.wait_log(rf"\| MARK ready gen={new} slot=0 pid=(\d+)",
                                   start=cli_mark).group(1)), "start"
    elif step == "quiesce":  # old worker 0 asked to quiesce (new ones standing by)
        rig.arm("quiesce", 0, old)
        pid = rig.hooked("quiesce", cli_mark)
        if victim == "new":
            pid, held = rig.spawned(new, 0, cli_mark), "quiesce"
    elif step == "restore":  # new worker 0 restoring (old ones quiesced)
        rig.arm("restore", 0, new)
        pid = rig.hooked("restore", cli_mark)
        if victim == "old":
            pid, held = ids["old0"], "restore"
    elif step == "commit":  # new worker 0 restored, waiting for the commit; 1 still restoring
        rig.arm("restore", 1, new)
        rig.hooked("restore", cli_mark)
        pid, held = int(s.wait_log(rf"\| MARK restored gen={new} slot=0 pid=(\d+)",
                                   start=cli_mark).group(1)), "restore"
    elif step == "committed":  # past the point of no return
        s.wait_log(rf"event=gen.state gen={new} from=standby to=active", start=cli_mark)
        pid = ids["old0"] if victim == "old" else rig.spawned(new, 0, cli_mark)
    elif step == "precopy":  # old worker 0 handed its bulk over / new worker 0 loads it
        hook = "precopied" if victim == "old" else "precopy-in"
        rig.arm(hook, 0, old if victim == "old" else new)
        pid = rig.hooked(hook, cli_mark)
    else:
        raise AssertionError(step)
    ids["pid"] = pid
    rig.act(pid, action)
    if action == "kill" and held is not None:
        assert wait_pid_gone(pid, 10)  # dead before the swap moves on
        if victim == "old" and step == "spawn":  # an active worker: restarted first
            s.wait_log(rf"event=worker.ready gen={old} worker=0 pid=\d+ restarts=1",
                       start=cli_mark)
    if held is not None:
        rig.release(held)
    elif action == "stop" and step != "committed":  # it holds in its hook: let it on
        rig.release({"spawn": "start", "precopy": "precopied" if victim == "old"
                     else "precopy-in"}.get(step, step))


def _run(rig: Rig, step: str, victim: str, action: str) -> None:
    kind = "precopy" if "--precopy" in rig.s.argv else (
        "stateful" if rig.stateful else "stateless")
    case = CASES[(kind, step, victim, action)]
    s = rig.s
    old, pids = rig.active()
    last = s.status()["last_swap"]
    ids = {"old": old, "old0": pids[0],
           "new": max(old, (last or {}).get("gen") or 0) + 1}
    load = Load(s.address("app"))
    load.start()
    try:
        load.wait_acks(0)
        cli_mark = s.log_mark()
        cli = s.cli_background("upgrade")
        try:
            _inject(rig, step, victim, action, cli_mark, ids)
            out, err = cli.communicate(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
        output = out + err
        assert cli.returncode == case.exit, output
        for pattern in case.says:
            assert re.search(pattern.format(**ids), output, re.M), (pattern, output)
        for pattern in case.never:
            assert not re.search(pattern.format(**ids), output, re.M), (pattern, output)
        if case.then is not None:
            case.then(rig, ids, cli_mark)
        rig.resume_stopped()
        # Healthy again, both slots serving; the old generation never went before a commit.
        after = load.mark()
        load.wait_acks(after)
        gen, _ = rig.active()
        assert gen == (ids["new"] if case.exit == 0 else old)
        if case.exit != 0:
            since = "\n".join(s.log_lines[cli_mark:])
            assert f"event=gen.state gen={old} from=active to=draining" not in since
    finally:
        load.finish()
        rig.disarm()
    if rig.stateful:
        load.assert_kept(case.kept)


def _params(kind: str) -> list[object]:
    return [pytest.param(step, victim, action, id=f"{step}-{victim}-{action}")
            for (k, step, victim, action) in CASES if k == kind]


@pytest.mark.parametrize(("step", "victim", "action"), _params("stateless"))
def test_stateless_swap(stateless: Rig, step: str, victim: str, action: str) -> None:
    _run(stateless, step, victim, action)


@pytest.mark.slow
@pytest.mark.parametrize(("step", "victim", "action"), _params("stateful"))
def test_stateful_swap(stateful: Rig, step: str, victim: str, action: str) -> None:
    _run(stateful, step, victim, action)


@pytest.mark.slow
@pytest.mark.parametrize(("step", "victim", "action"), _params("precopy"))
def test_stateful_swap_with_precopy(precopy: Rig, step: str, victim: str, action: str) -> None:
    _run(precopy, step, victim, action)

