"""Promises that broke under a careless release or operator: a listener shut down by a
worker, a restart after a supervisor crash, SIGHUP bursts, stateful mode with a worker that
cannot hand over state."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.integration.supervised import (
    MISBEHAVE,
    ROOT,
    SWAPD,
    Supervised,
    http_get,
    supervised,
    wait_pid_gone,
    write_behavior,
)


def _refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=10):
            return False
    except ConnectionRefusedError:
        return True


def test_listener_shut_down_by_a_release_is_reported_and_rebound(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior, shutdown_on_drain=True)  # release 1 shuts fd 3 down on its way out
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)}) as s:
        address = s.address()
        # Release 2 accepts on nothing: the dead socket makes it spin in no accept loop.
        write_behavior(behavior, serve=False)
        mark = s.log_mark()
        assert s.upgrade()["ok"]
        s.wait_log(r"\| shutting down listener fd=3", start=mark)
        s.wait_log(r"event=listener.dead name=http address=127\.0\.0\.1:\d+ gen=2 ", start=mark)
        assert _refused(address)  # the kernel refuses: the one shared socket is dead
        st = s.status()
        assert any("listener http" in w and "does not listen" in w for w in st["warnings"])
        assert st["listeners"][0]["listening"] is False
        # The next release gets a new socket at the same address and serves.
        write_behavior(behavior, version="v3")
        mark = s.log_mark()
        assert s.upgrade()["ok"]
        s.wait_log(r"event=listener.rebound name=http ", start=mark)
        assert s.address() == address
        status, body = http_get(address)
        assert (status, body.split()[0]) == (200, "v3")
        st = s.status()
        assert st["listeners"][0]["listening"] is True
        assert not any("listener http" in w for w in st["warnings"])


NOTIFY_ONLY = [sys.executable, str(ROOT / "tests" / "apps" / "notify_only.py")]


def test_stateful_mode_refuses_a_worker_without_swapd_worker(tmp_path: Path) -> None:
    """gunicorn & co. cannot hand over state: refused at once (exit 2, one line), not
    SIGKILLed 30 s after start with a late READY and a `swapd stop` hanging meanwhile."""
    control = tmp_path / "ctl.sock"
    proc = subprocess.run(
        [*SWAPD, "run", "--control", str(control), "--bind", "http=127.0.0.1:0",
         "--mode", "stateful", "--ready-timeout", "600", "--restore-timeout", "600", "--",
         *NOTIFY_ONLY], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--mode stateful needs workers that use swapd.worker" in last
    assert "reported ready via notify and never spoke the channel" in last
    assert "run it with --mode stateless" in last
    pid = int(re.search(r"gen=1 worker=0 pid=(\d+)", last).group(1))  # type: ignore[union-attr]
    assert wait_pid_gone(pid, 10)
    assert not control.exists()


def test_stop_during_start_does_not_wait_for_readiness(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior, never_ready=True)
    s = Supervised(tmp_path, MISBEHAVE, args=["--ready-timeout", "600"],
                   env={"BEHAVIOR": str(behavior)})
    try:
        s.proc = subprocess.Popen(s.argv, env=s.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  cwd=str(ROOT))
        s._log_thread = threading.Thread(target=s._read_log, daemon=True)
        s._log_thread.start()
        m = s.wait_log(r"gen=1 worker=0 pid=(\d+)\| never getting ready, as told")
        worker = int(m.group(1))
        s.worker_pids.add(worker)
        stop = s.cli("stop", timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert s.wait_exit(30) == 0
        s.wait_log(r"event=start.cancelled reason='stop requested'")
        assert wait_pid_gone(worker, 10)
        assert s.notify.seen == [] or all("READY" not in m for m in s.notify.seen)
    finally:
        s.stop()
