"""The CLI's side of the control socket: how long it waits, and what it says when it stops
waiting (against a scripted socket: real sockets and processes, no supervisor)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapd.control import Client
from tests.unit.fake_supervisor import FakeSupervisor, deadline, progress, result

SWAPD = [sys.executable, "-m", "swapd"]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "ctl.sock"


@pytest.mark.parametrize("seconds", [1e300, float("inf"), float("nan"), -5.0, 1e12])
def test_any_announced_deadline_is_waited_without_overflow(sock_path: Path,
                                                           seconds: float) -> None:
    """A supervisor with `ready = inf` in its file announced an infinite deadline, and every
    long command died with OverflowError (after the swap had been started)."""
    go = threading.Event()
    fake = FakeSupervisor(sock_path, [deadline(seconds), progress("gen=2 started"), go,
                                      result(gen=2)])
    try:
        call = Client(str(sock_path)).call("upgrade")
        assert next(call) == progress("gen=2 started")  # the deadline line is behind us
        go.set()  # the result comes in a later read, under the deadline's timeout
        assert list(call) == [result(gen=2)]
    finally:
        go.set()
        fake.close()


def test_cli_upgrade_against_an_infinite_deadline_prints_the_outcome(sock_path: Path) -> None:
    fake = FakeSupervisor(sock_path, [deadline(float("inf")), progress("gen=2 started"),
                                      result(gen=2, previous=1, timings_ms={"ready": 5.0})])
    try:
        out = subprocess.run([*SWAPD, "upgrade", "--control", str(sock_path)],
                             capture_output=True, text=True, timeout=60)
    finally:
        fake.close()
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines()[-1].startswith("swapd upgrade: ok: gen=2 active")
