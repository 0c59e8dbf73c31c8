"""Workers that die while active are restarted; crash loops are reported; drains are bounded."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.integration.supervised import (
    HELLO,
    MISBEHAVE,
    http_get,
    supervised,
    wait_pid_gone,
    write_behavior,
)


@pytest.mark.slow
def test_killed_worker_is_restarted_in_its_slot(tmp_path: Path) -> None:
    with supervised(tmp_path, HELLO, args=["--workers", "2"]) as s:
        victim, survivor = s.active_pids()
        mark = s.log_mark()
        os.kill(victim, signal.SIGKILL)
        s.wait_log(rf'event=worker.died gen=1 worker=0 pid={victim} status="killed by SIGKILL"',
                   start=mark)
        m = s.wait_log(r"event=worker.ready gen=1 worker=0 pid=(\d+) restarts=1", start=mark)
        replacement = int(m.group(1))
        st = s.status()
        gen = st["generations"][0]
        assert [w["pid"] for w in gen["workers"]] == [replacement, survivor]
        assert gen["restarts"] == [1, 0]
        assert http_get(s.address())[0] == 200


@pytest.mark.slow
def test_crash_loop_is_reported(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior, version="v1")
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)}) as s:
        write_behavior(behavior, crash_after_ready=True)  # every restart crashes again
        os.kill(s.active_pids()[0], signal.SIGKILL)
        s.wait_log(r"event=worker.crash_loop gen=1 worker=0 crashes=5", timeout=60)
        st = s.status()
        assert any("crash loop" in w for w in st["warnings"])
        text = s.cli("status").stdout
        assert "CRASH-LOOP" in text and "WARNING: worker 0 is in a crash loop" in text
        assert text.count("crash loop") == 1, text  # each warning once
        # backoff grows: the delays logged double
        delays = [float(x) for x in __import__("re").findall(
            r"respawn_scheduled gen=1 worker=0 delay=([\d.]+)s", s.log_text())]
        assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]


@pytest.mark.slow
def test_drain_deadline_kills_stuck_worker(tmp_path: Path) -> None:
    """A connection busy forever cannot hold the old generation past drain_timeout: the
    worker's own deadline cancels its handler, and one that ignores that (here) is killed
    by the supervisor."""
    behavior = tmp_path / "b.json"
    write_behavior(behavior, version="v1")
    with supervised(tmp_path, MISBEHAVE, args=["--drain-timeout", "1"],
                    env={"BEHAVIOR": str(behavior)}) as s:
        (old,) = s.active_pids()
        host, port = s.address()
        stuck = socket.create_connection((host, port), timeout=10)
        try:
            stuck.sendall(b"GET /stubborn HTTP/1.1\r\nHost: x\r\n\r\n")
            s.wait_log(r"\| stubborn request in flight")
            mark = s.log_mark()
            assert s.upgrade()["ok"]
            s.wait_log(rf"event=drain.timeout gen=1 worker=0 pid={old} timeout=1s action=SIGKILL",
                       start=mark)
            assert wait_pid_gone(old, 10)
            s.wait_log(r"event=gen.exited gen=1", start=mark)
            assert [g["id"] for g in s.status()["generations"]] == [2]
        finally:
            stuck.close()
