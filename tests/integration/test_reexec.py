"""`swapd upgrade --self`: the supervisor re-execs new code in place; PID, sockets, workers stay."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from swapd.loadgen import BackgroundLoad, http_get
from tests.integration.supervised import (
    HELLO,
    MISBEHAVE,
    ROOT,
    Supervised,
    open_gate,
    write_behavior,
)

LOAD = {"clients": 8, "duration": 60.0, "max_requests": 500_000}


@pytest.fixture
def code(tmp_path: Path) -> Path:
    """A private copy of the swapd package: 'the new version on disk' the test can edit."""
    root = tmp_path / "code"
    shutil.copytree(ROOT / "swapd", root / "swapd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def set_version(code: Path, version: str) -> None:
    init = code / "swapd" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace('__version__ = "0.1.0"', f'__version__ = "{version}"'))


def start(tmp_path: Path, code: Path) -> Supervised:
    return Supervised(tmp_path, HELLO, args=["--workers", "2"],
                      env={"PYTHONPATH": str(code)}).start()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["close", "keepalive"])
def test_upgrade_self_keeps_pid_listeners_and_workers(tmp_path: Path, code: Path,
                                                      mode: str) -> None:
    s = start(tmp_path, code)
    try:
        before = s.status()
        set_version(code, "0.2.0")
        with BackgroundLoad(s.address(), http_get("/"), mode=mode, **LOAD) as load:
            load.wait_for_successes(300, timeout=60)
            with load.window("re-exec"):
                proc = s.cli("upgrade", "--self")
            load.wait_for_successes(300, timeout=60)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "swapd 0.1.0 -> 0.2.0; workers kept" in proc.stdout
            # the re-exec'd supervisor can swap workers under the same load
            assert s.result("upgrade")["ok"]
            load.wait_for_successes(300, timeout=60)
        assert load.report is not None and load.report.failed == 0, load.report.format()
        s.wait_log(r"event=gen.exited gen=1")  # the drained generation's fds are closed
        after = s.status()
        assert after["pid"] == before["pid"] == s.pid
        assert after["version"] == "0.2.0"
        assert after["listeners"] == before["listeners"]
        assert after["active"] == 2 and after["swaps"]["ok"] == 1
        assert after["open_fds"] == before["open_fds"]
        s.wait_log(r"event=reexec.done version=0.2.0 previous=0.1.0 generations=1")
        assert s.result("stop")["ok"]
        assert s.wait_exit(30) == 0
    finally:
        s.stop()


@pytest.mark.slow
def test_workers_survive_reexec_unchanged(tmp_path: Path, code: Path) -> None:
    s = start(tmp_path, code)
    try:
        pids = s.active_pids()
        assert s.cli("upgrade", "--self").returncode == 0
        assert s.active_pids() == pids
        # The old image's log queue was written out before its execve: its last line is
        # there, before the new image's first.
        exec_line = s.wait_log(r"event=reexec.exec pid=(\d+)")
        assert int(exec_line.group(1)) == s.pid
        text = s.log_text()
        assert text.index("event=reexec.exec") < text.index("event=reexec.done")
        # and they are still our children: a killed one is noticed (pidfd) and restarted
        import os
        import signal

        mark = s.log_mark()
        os.kill(pids[0], signal.SIGKILL)
        s.wait_log(rf"event=worker.died gen=1 worker=0 pid={pids[0]}", start=mark)
        s.wait_log(r"event=worker.ready gen=1 worker=0 pid=\d+ restarts=1", start=mark)
    finally:
        s.stop()


def test_failed_reexec_leaves_old_supervisor_running(tmp_path: Path, code: Path) -> None:
    s = start(tmp_path, code)
    try:
        before = s.status()
        # the new code on disk cannot even be imported
        (code / "swapd" / "supervisor" / "core.py").write_text("def broken(:\n")
        proc = s.cli("upgrade", "--self")
        assert proc.returncode == 1
        assert "the new code refused the supervisor state" in proc.stderr
        assert "SyntaxError" in proc.stderr, "the pre-flight's output is shown"
        after = s.status()
        assert after["pid"] == before["pid"] and after["version"] == "0.1.0"
        assert s.active_pids() == [w["pid"] for w in before["generations"][0]["workers"]]
        s.wait_log(r"event=reexec.failed")
    finally:
        s.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("readiness", "gets_ready"), [
    ("notify", True), ("probe", True), ("probe", False)])
def test_a_restart_in_progress_keeps_its_readiness_watch_across_a_reexec(
    tmp_path: Path, code: Path, readiness: str, gets_ready: bool
) -> None:
    """A worker restarted just before `upgrade --self` is still starting when the new image
    takes over: that image must mark it ready when it is (resuming its readiness probe), or
    kill it when what is left of its ready_timeout runs out, as the old image would have."""
    behavior, gate = tmp_path / "behavior.json", tmp_path / "gate"
    os.mkfifo(f"{gate}-0")
    write_behavior(behavior, version="v1")
    args = ["--workers", "1", "--ready-timeout", "8"]
    if readiness == "probe":
        args += ["--readiness", "probe", "--probe", "http:/"]
    s = Supervised(tmp_path, MISBEHAVE, args=args,
                   env={"PYTHONPATH": str(code), "BEHAVIOR": str(behavior)}).start()
    try:
        [first] = s.active_pids()
        write_behavior(behavior, version="v1", serve_gate=str(gate))
        mark = s.log_mark()
        os.kill(first, signal.SIGKILL)
        restarted = int(s.wait_log(r"gen=1 worker=0 pid=(\d+)\| waiting at the serve gate",
                                   start=mark)[1])
        assert s.status()["generations"][0]["workers"][0]["state"] == "starting"

        reexec = s.cli("upgrade", "--self")
        assert reexec.returncode == 0, reexec.stdout + reexec.stderr
        mark = s.log_mark()
        assert s.active_pids() == [restarted]
        assert s.status()["generations"][0]["workers"][0]["state"] == "starting"
        if gets_ready:
            assert open_gate(f"{gate}-0", timeout=10)
            s.wait_log(rf"event=worker.ready gen=1 worker=0 pid={restarted} restarts=1",
                       start=mark)
            assert s.status()["generations"][0]["workers"][0]["state"] == "ready"
        else:
            line = s.wait_log(rf"event=worker.ready_timeout gen=1 worker=0 pid={restarted} "
                              r"timeout=8s action=SIGKILL reason=(.*)", start=mark)
            # The resumed probe's own account: it went on trying after the re-exec.
            assert "private probe socket" in line[1] and "attempt(s)" in line[1], line[1]
            s.wait_log(rf"event=worker.died gen=1 worker=0 pid={restarted}", start=mark)
    finally:
        write_behavior(behavior, version="v1")
        open_gate(f"{gate}-0", timeout=0)  # a worker still waiting there may go
        s.stop()
