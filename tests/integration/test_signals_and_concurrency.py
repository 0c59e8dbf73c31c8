"""Signals, and at most one swap in flight: joins, refusals, SIGHUP bursts."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.integration.supervised import (
    HELLO,
    MISBEHAVE,
    SWAPD,
    Supervised,
    http_get,
    supervised,
    wait_pid_gone,
    write_behavior,
)


def test_sighup_reloads(tmp_path: Path) -> None:
    with supervised(tmp_path, HELLO) as s:
        mark = s.log_mark()
        os.kill(s.pid, signal.SIGHUP)
        s.wait_log(r"event=swap.commit kind=reload gen=2", start=mark)
        assert s.status()["active"] == 2
        s.notify.wait_for("RELOADING", "1")
        ready = s.notify.wait_for("READY", "1")
        assert "gen 2 active" in ready["STATUS"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_finishes_requests(tmp_path: Path, sig: signal.Signals) -> None:
    """TERM/INT drain: a request in flight completes, then exit 0."""
    behavior = tmp_path / "b.json"
    write_behavior(behavior, version="v1")
    s = Supervised(tmp_path, [*MISBEHAVE], env={"BEHAVIOR": str(behavior)})
    try:
        s.start()
        pids = s.active_pids()
        addr = s.address()
        results: list[tuple[int, str]] = []
        t = threading.Thread(target=lambda: results.append(http_get(addr, "/slow")))
        t.start()
        s.wait_log(r"\| slow request in flight")
        os.kill(s.pid, sig)
        s.notify.wait_for("STOPPING", "1")
        assert s.wait_exit(60) == 0
        t.join(30)
        assert results == [(200, "slow done")]
        for pid in pids:
            assert wait_pid_gone(pid, 10)
        assert not os.path.exists(s.control)
    finally:
        s.stop()


def test_sigquit_fast_stop(tmp_path: Path) -> None:
    s = Supervised(tmp_path, HELLO)
    try:
        s.start()
        pids = s.active_pids()
        os.kill(s.pid, signal.SIGQUIT)
        assert s.wait_exit(30) == 0
        for pid in pids:
            assert wait_pid_gone(pid, 10)
        s.wait_log(r"event=supervisor.stopping fast=True")
    finally:
        s.stop()


@pytest.fixture
def gated(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A service whose next generation waits at a FIFO gate before ready()."""
    behavior = tmp_path / "b.json"
    gate = tmp_path / "gate"
    for slot in range(2):
        os.mkfifo(f"{gate}-{slot}")
    write_behavior(behavior, version="v1")
    with supervised(tmp_path, MISBEHAVE, args=["--workers", "2"],
                    env={"BEHAVIOR": str(behavior)}) as s:
        write_behavior(behavior, version="v2", gate=str(gate))
        yield s, gate


def _open_gate(gate: Path, workers: int) -> None:
    """Let each gated worker through; open() blocks until that worker waits at its FIFO."""
    for slot in range(workers):
        with open(f"{gate}-{slot}", "w") as f:
            f.write("go\n")


def _start_cli(s: Supervised, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*SWAPD, *argv, "--control", s.control], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_second_upgrade_joins_and_reload_is_refused(gated) -> None:  # type: ignore[no-untyped-def]
    s, gate = gated
    first = _start_cli(s, "upgrade")
    assert first.stdout is not None
    assert "started 2 worker(s)" in first.stdout.readline()  # the swap is in flight
    old_pids = s.active_pids()
    assert s.status()["swap"]["kind"] == "upgrade"
    # the readiness gate holds: old generation serves while the new one is not ready
    assert http_get(s.address())[1].startswith("v1 ")

    second = _start_cli(s, "upgrade")
    assert second.stdout is not None
    assert "joined the upgrade in flight (gen=2)" in second.stdout.readline()

    refused = s.cli("reload")
    assert refused.returncode == 1
    assert "an upgrade is in flight (gen=2" in refused.stderr

    # A SIGHUP is refused the same way; with nobody to answer, the log and the service
    # manager are told (RELOADING=1 then READY=1: systemd >= 253 waits for both).
    mark = s.log_mark()
    os.kill(s.pid, signal.SIGHUP)
    s.wait_log(r"event=signal.refused name=SIGHUP reason='an upgrade is in flight", start=mark)
    s.notify.wait_for("RELOADING", "1")
    ready = s.notify.wait_for("READY", "1")
    assert "SIGHUP reload refused: an upgrade is in flight" in ready["STATUS"]

    _open_gate(gate, 2)
    out1, _ = first.communicate(timeout=60)
    out2, _ = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0
    assert "gen=2 active" in out1 and "gen=2 active" in out2
    st = s.status()
    assert st["active"] == 2 and st["swap"] is None
    assert set(s.active_pids()).isdisjoint(old_pids)


def test_sighup_burst_makes_one_generation(gated) -> None:  # type: ignore[no-untyped-def]
    s, gate = gated
    mark = s.log_mark()
    for _ in range(100):
        os.kill(s.pid, signal.SIGHUP)
    s.wait_log(r"event=swap.start kind=reload", start=mark)
    s.status()  # a round trip: every signal delivered before it has been handled
    _open_gate(gate, 2)
    s.wait_log(r"event=swap.commit kind=reload gen=2", start=mark)
    st = s.status()
    assert st["active"] == 2 and st["swap"] is None
    assert st["swaps"] == {"ok": 1, "failed": 0}
    assert max(g["id"] for g in st["generations"]) == 2
    assert s.log_text().count("event=swap.start") == 1
