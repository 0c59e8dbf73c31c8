"""A new generation that fails leaves the old one serving, untouched; the caller learns why."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from tests.integration.supervised import (
    MISBEHAVE,
    Supervised,
    http_get,
    supervised,
    write_behavior,
)


@pytest.fixture
def behavior(tmp_path: Path) -> Path:
    path = tmp_path / "behavior.json"
    write_behavior(path, version="v1")
    return path


def _assert_untouched(s: Supervised, old_pids: list[int]) -> None:
    st = s.status()
    assert st["active"] == 1
    assert s.active_pids() == old_pids
    live = [g for g in st["generations"]]
    assert [g["id"] for g in live] == [1], "the failed generation must be gone"
    status, body = http_get(s.address())
    assert status == 200 and body.startswith("v1 ")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("behave", "reason", "tail"),
    [
        # the one-line reason ends with what the worker said last (operator review L5)
        ({"import_error": True}, r"exited with status 1 before it was ready: RuntimeError: "
         r"simulated import failure in the new code$", "simulated import failure in the new code"),
        ({"exit_before_ready": 3}, r"exited with status 3 before it was ready: exiting before "
         r"ready, as told$", "exiting before ready, as told"),
        ({"never_ready": True}, r"not ready within 3s \(ready_timeout\): .*; last output: "
         r"'never getting ready, as told'$", "never getting ready, as told"),
    ],
    ids=["crash-on-import", "exit-before-ready", "never-ready"],
)
def test_failed_upgrade_keeps_old_generation(
    tmp_path: Path, behavior: Path, behave: dict[str, object], reason: str, tail: str
) -> None:
    # Only the never-ready case waits out its ready timeout; the others get a generous one so
    # that a busy machine does not fail the first generation's start instead.
    timeout = "3" if "never_ready" in behave else "20"
    with supervised(tmp_path, MISBEHAVE, args=["--workers", "2", "--ready-timeout", timeout],
                    env={"BEHAVIOR": str(behavior)}) as s:
        old = s.active_pids()
        write_behavior(behavior, **behave)
        proc = s.cli("upgrade")
        assert proc.returncode == 1, proc
        assert "FAILED" in proc.stderr
        import re

        assert re.search(reason, proc.stderr, re.M), proc.stderr
        assert tail in proc.stderr, "the failed worker's output tail is shown"
        _assert_untouched(s, old)
        last = s.status()["last_swap"]
        assert last["ok"] is False and re.search(reason, last["error"])

        # and the service can still be upgraded once the code is fixed
        write_behavior(behavior, version="v2")
        res = s.upgrade()
        assert res["ok"], res
        status, body = http_get(s.address())
        assert status == 200 and body.startswith("v2 ")


def test_missing_executable_in_new_generation(tmp_path: Path, behavior: Path) -> None:
    """A reload whose new command cannot be exec'd fails cleanly."""
    cfg = tmp_path / "swapd.toml"
    cfg.write_text(f'command = {list(MISBEHAVE)!r}\n'.replace("'", '"'))
    with supervised(tmp_path, [], args=["--config", str(cfg)],
                    env={"BEHAVIOR": str(behavior)}) as s:
        old = s.active_pids()
        cfg.write_text('command = ["/nonexistent/worker"]\n')
        proc = s.cli("reload")
        assert proc.returncode == 1
        assert "cannot exec '/nonexistent/worker'" in proc.stderr
        _assert_untouched(s, old)


def test_failed_worker_whose_child_keeps_its_output_open(tmp_path: Path, behavior: Path) -> None:
    """A worker that exits while a process it started still holds its stdout: the failure is
    reported at once and the supervisor stays responsive (it must not wait for that EOF)."""
    pidfile = tmp_path / "left-child.pid"
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)}) as s:
        old = s.active_pids()
        write_behavior(behavior, exit_before_ready=3, leave_child=str(pidfile))
        try:
            proc = s.cli("upgrade")
            assert proc.returncode == 1, proc
            assert "exited with status 3 before it was ready" in proc.stderr
            assert "exiting before ready, as told" in proc.stderr
            _assert_untouched(s, old)
            # The process it left (in a session of its own) goes with its failed generation.
            left = int(pidfile.read_text())
            s.wait_log(rf"event=stray.exit pid={left} ")
        finally:
            if pidfile.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)
