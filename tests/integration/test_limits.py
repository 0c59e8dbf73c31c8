"""At the fd limit: the supervisor that cannot start a worker, a new worker that cannot take
the handed-over descriptors, an old worker that cannot build its snapshot. Each fails only
the swap (exit 1, the reason), leaves the service as it was, and recovers once fds are
there again. Limits are set from outside with prlimit(2), by pid."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.supervised import HELLO, http_get, supervised
from tests.integration.test_faults import Rig, _rig

NOFILE = resource.RLIMIT_NOFILE


def _limit_leaving(pid: int, free: int) -> int:
    """The RLIMIT_NOFILE under which `pid` can open exactly `free` more fds (the limit caps
    fd numbers, and a new fd takes the lowest free number)."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit = 0
    while limit - len([fd for fd in used if fd < limit]) < free or limit in used:
        limit += 1
    return limit


@contextlib.contextmanager
def _limited(pid: int, free: int) -> Iterator[None]:
    """`pid` at its fd limit but `free` descriptors; restored afterwards."""
    before = resource.prlimit(pid, NOFILE)
    resource.prlimit(pid, NOFILE, (_limit_leaving(pid, free), before[1]))
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, NOFILE, before)


def test_supervisor_at_its_fd_limit(tmp_path: Path) -> None:
    """No fd for a new worker: the upgrade fails cleanly and leaks nothing; a crashed
    worker's restart keeps being retried until fds are there again."""
    with supervised(tmp_path, HELLO, args=["--workers", "2"]) as s:
        baseline = s.status()["open_fds"]
        old = s.active_pids()
        with _limited(s.pid, 3):  # the control connection, a socketpair, and no more
            proc = s.cli("upgrade")
        assert proc.returncode == 1, proc.stderr
        assert re.search(r"FAILED: gen=2 worker=0: Too many open files", proc.stderr)
        assert s.active_pids() == old and http_get(s.address())[0] == 200
        mark = s.log_mark()
        with _limited(s.pid, 0):
            os.kill(old[0], signal.SIGKILL)
            s.wait_log(r'event=worker.respawn_failed gen=1 worker=0 error="Too many open '
                       r'files"', start=mark)
            s.wait_log(r"event=worker.respawn_scheduled gen=1 worker=0 delay=0.2s", start=mark)
        s.wait_log(r"event=worker.ready gen=1 worker=0 pid=\d+ restarts=1", start=mark)
        assert s.status()["open_fds"] == baseline  # nothing leaked on the failed paths
        res = s.upgrade()
        assert res["ok"], res
        assert http_get(s.address())[0] == 200


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with _rig(tmp_path, "--mode", "stateful") as r:
        yield r


def _idle_connections(rig: Rig, n: int) -> list[socket.socket]:
    """`n` keep-alive connections at a request boundary (handed over by a handoff)."""
    conns = []
    for _ in range(n):
        conn = socket.create_connection(rig.s.address("app"), timeout=30)
        conn.sendall(b"INCR\n")
        assert conn.recv(64).endswith(b"\n")
        conns.append(conn)
    return conns


def _incr(conns: list[socket.socket]) -> list[tuple[int, int]]:
    """One INCR on each connection: (slot, count) of each answer."""
    answers = []
    for conn in conns:
        conn.sendall(b"INCR\n")
        slot, count = map(int, conn.recv(64).split())
        answers.append((slot, count))
    return answers


@pytest.mark.parametrize("side", ["new", "old"])
def test_worker_at_its_fd_limit_fails_the_handoff_only(rig: Rig, side: str) -> None:
    """new: a successor that cannot take the 20 connections (its descriptor budget, checked
    on the handoff link before anything paused: refused with the figures); old: a worker
    that cannot even receive its end of the link. Either way the swap aborts before the
    pause, named after the worker that failed, and the old generation serves on, every
    connection and every increment kept."""
    s = rig.s
    gen, pids = rig.active()
    conns = _idle_connections(rig, 20)
    try:
        before = _incr(conns)
        mark = s.log_mark()
        rig.arm("start", 0, gen + 1)
        cli = s.cli_background("upgrade")
        try:
            new0 = rig.hooked("start", mark)
            victim = new0 if side == "new" else pids[0]
            with _limited(victim, 2 if side == "new" else 0):  # new: not 20 connections
                rig.release("start")
                out, err = cli.communicate(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
        assert cli.returncode == 1, out + err
        assert re.search(rf"FAILED: gen={gen + 1 if side == 'new' else gen} worker=0 pid=\d+ "
                         r"connection pre-send", err), err
        if side == "new":
            assert re.search(r"handoff needs \d+ descriptors in .*, limit is \d+", err), err
        assert "state is lost" not in out + err
        assert rig.active() == (gen, pids)
        # The same connections, on the same slots, whose counters went on from where they
        # were: one more increment per connection, none lost.
        after = _incr(conns)
        assert [slot for slot, _ in after] == [slot for slot, _ in before]
        for slot in {slot for slot, _ in before}:
            added = sum(1 for x, _ in after if x == slot)
            high = max(c for x, c in before if x == slot)
            assert max(c for x, c in after if x == slot) == high + added
    finally:
        for conn in conns:
            conn.close()
        rig.disarm()
