"""Stateful swaps: state survives, and every abort path leaves the old state serving."""

from __future__ import annotations

import http.client
import os
import signal
import socket
from pathlib import Path

import pytest

from tests.integration.supervised import (
    MISBEHAVE,
    Supervised,
    wait_pid_gone,
    write_behavior,
)


def post_incr(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/incr")
    resp = conn.getresponse()
    assert resp.status == 200
    return int(resp.read())


def get_count(address: tuple[str, int]) -> int:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", "/count")
        return int(conn.getresponse().read())
    finally:
        conn.close()


@pytest.fixture
def behavior(tmp_path: Path) -> Path:
    path = tmp_path / "b.json"
    write_behavior(path)
    return path


def start(tmp_path: Path, behavior: Path, *args: str) -> Supervised:
    return Supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)},
                      args=["--mode", "stateful", "--quiesce-timeout", "1",
                            "--restore-timeout", "2", *args]).start()


@pytest.mark.slow
def test_state_and_keepalive_connection_survive_swaps(tmp_path: Path, behavior: Path) -> None:
    s = start(tmp_path, behavior)
    try:
        conn = http.client.HTTPConnection(*s.address(), timeout=10)
        assert [post_incr(conn) for _ in range(3)] == [1, 2, 3]
        local = conn.sock.getsockname()
        for _ in range(3):
            res = s.upgrade()
            assert res["ok"], res
            assert "pause" in res["data"]["timings_ms"]
        assert post_incr(conn) == 4
        assert conn.sock.getsockname() == local, "the same TCP connection, handed over"
        assert get_count(s.address()) == 4
    finally:
        s.stop()


def _aborted(s: Supervised, conn: http.client.HTTPConnection, count: int, reason: str,
             old_pids: list[int]) -> None:
    proc = s.cli("upgrade")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert reason in proc.stderr, proc.stderr
    assert "resumed" in proc.stdout or "serving again" in proc.stdout
    assert s.active_pids() == old_pids
    assert [g["id"] for g in s.status()["generations"]] == [1]
    assert post_incr(conn) == count + 1, "the old worker resumed with its exact state"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("behave", "reason"),
    [
        ({"restore_raises": True}, "restore failed: ValueError: simulated restore failure"),
        ({"state_version": 0}, "VersionRefused"),
    ],
    ids=["restore-raises", "version-refused"],
)
def test_restore_failures_abort(tmp_path: Path, behavior: Path, behave: dict[str, object],
                                reason: str) -> None:
    s = start(tmp_path, behavior)
    try:
        conn = http.client.HTTPConnection(*s.address(), timeout=10)
        for _ in range(5):
            post_incr(conn)
        write_behavior(behavior, **behave)
        _aborted(s, conn, 5, reason, s.active_pids())
    finally:
        s.stop()


@pytest.mark.slow
def test_new_worker_killed_mid_restore(tmp_path: Path, behavior: Path) -> None:
    gate = tmp_path / "restore-gate"
    os.mkfifo(gate)
    s = start(tmp_path, behavior)
    try:
        conn = http.client.HTTPConnection(*s.address(), timeout=10)
        for _ in range(7):
            post_incr(conn)
        old = s.active_pids()
        write_behavior(behavior, restore_gate=str(gate))
        mark = s.log_mark()
        proc = s.cli_background("upgrade")
        m = s.wait_log(r"gen=2 worker=0 pid=(\d+)\| restoring", start=mark)
        os.kill(int(m.group(1)), signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "killed by SIGKILL during restore" in err
        assert s.active_pids() == old
        assert post_incr(conn) == 8
    finally:
        s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("behave", [{"snapshot_sleep": 2.0}, {"snapshot_hang": True}],
                         ids=["blocks-loop", "hangs-async"])
def test_old_worker_hanging_in_snapshot(tmp_path: Path, behavior: Path,
                                        behave: dict[str, object]) -> None:
    s = start(tmp_path, behavior)
    try:
        conn = http.client.HTTPConnection(*s.address(), timeout=30)
        for _ in range(4):
            post_incr(conn)
        write_behavior(behavior, **behave)
        # the *old* worker reads its behaviour at start-up: restart it under the new one
        old_pid = s.active_pids()[0]
        mark = s.log_mark()
        os.kill(old_pid, signal.SIGKILL)
        s.wait_log(r"event=worker.ready gen=1 worker=0", start=mark)
        conn = http.client.HTTPConnection(*s.address(), timeout=30)
        for _ in range(4):
            post_incr(conn)
        write_behavior(behavior)
        _aborted(s, conn, 4, "quiesce and snapshot failed: no reply", s.active_pids())
    finally:
        s.stop()


def test_fresh_worker_gets_no_restore(tmp_path: Path, behavior: Path) -> None:
    write_behavior(behavior, restore_raises=True)  # would fail if restore were called
    s = start(tmp_path, behavior)
    try:
        assert get_count(s.address()) == 0
    finally:
        s.stop()


@pytest.mark.slow
def test_client_leaving_before_handoff_is_not_fatal(tmp_path: Path, behavior: Path
                                                          ) -> None:
    """A client that disconnects while its connection is being handed over costs nothing."""
    s = start(tmp_path, behavior)
    try:
        conns = [socket.create_connection(s.address(), timeout=10) for _ in range(5)]
        for c in conns[:3]:
            c.close()
        res = s.upgrade()
        assert res["ok"], res
        for c in conns[3:]:
            c.sendall(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in c.recv(4096)
            c.close()
        assert all(wait_pid_gone(p, 30) for p in s.worker_pids - set(s.active_pids()))
    finally:
        s.stop()
