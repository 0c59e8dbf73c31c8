"""What workers leave behind: helpers in their process group, daemons that left it, and
orphaned grandchildren (zombies). None of them may outlive its worker's generation holding
the listeners, and none may stay a zombie, whether swapd is a subreaper or PID 1."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.supervised import (
    HELLO,
    MISBEHAVE,
    Supervised,
    http_get,
    wait_pid_gone,
    write_behavior,
    zombies_of,
)

# A helper that holds the listeners the shell passed on (fds 3..) and reports its pid on the
# worker's output. "stubborn" ignores SIGTERM: only the SIGKILL after the grace ends it.
HELPER = ("import os, signal, sys, time\n"
          "if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          # one write per line: the two helpers share the pipe, and print() may write a line
          # and its newline separately, interleaving them
          "os.write(1, f'helper {sys.argv[1]} pid={os.getpid()} pgid={os.getpgid(0)}\\n'"
          ".encode())\n"
          "time.sleep(600)\n")


def _wrapper(directory: Path) -> list[str]:
    """A shell wrapper, as in many deployments: it starts helpers, then execs the server.
    One helper stays in the worker's process group (and ignores SIGTERM); one leaves it
    (setsid) and is inherited by swapd when the worker exits."""
    helper = directory / "helper.py"
    helper.write_text(HELPER)
    py, hello = sys.executable, " ".join(HELLO[1:])
    script = (f"{py} {helper} stubborn & setsid {py} {helper} escaped & "
              f"exec {py} {hello}")
    return ["sh", "-c", script]


@pytest.mark.slow
def test_helpers_of_workers_are_ended_and_the_port_is_free_again(tmp_path: Path) -> None:
    helpers: list[int] = []
    s = Supervised(tmp_path, _wrapper(tmp_path))
    try:
        s.start()
        host, port = s.address()
        for gen in (1, 2, 3):
            if gen > 1:
                assert s.upgrade()["ok"]
            for kind in ("stubborn", "escaped"):
                m = s.wait_log(rf"gen={gen} worker=0 pid=\d+\| helper {kind} pid=(\d+)")
                helpers.append(int(m.group(1)))
        # Generations 1 and 2 are over: their helpers were ended, the stubborn ones by SIGKILL.
        for pid in helpers[:4]:
            s.wait_log(rf"event=stray.exit pid={pid} ")
            assert wait_pid_gone(pid, 10)
        log = s.log_text()
        assert re.search(rf'event=stray.kill pid={helpers[0]} origin="left in the process group '
                         rf'of gen=1 worker=0 pid=\d+"', log)
        assert re.search(rf'event=stray.term pid={helpers[1]} origin="inherited from a worker '
                         r'\(generation 1 is over\)"', log)
        # At stop, those of the last generation go too, before swapd exits.
        assert s.cli("stop").returncode == 0
        assert s.wait_exit(60) == 0
        for pid in helpers:
            assert wait_pid_gone(pid, 1), f"helper {pid} outlived swapd"
        # Nothing holds the port: a new supervisor binds it at once.
        (tmp_path / "again").mkdir()
        again = Supervised(tmp_path / "again", HELLO, binds=(f"http={host}:{port}",))
        with contextlib.closing(_Stopper(again)):
            again.start()
            assert http_get((host, port))[0] == 200
    finally:
        s.stop()
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _Stopper:
    def __init__(self, s: Supervised) -> None:
        self.s = s

    def close(self) -> None:
        self.s.stop()


def _unshare() -> list[str] | None:
    """A new pid namespace (and /proc for it) in which swapd is PID 1, if this machine can."""
    tool = shutil.which("unshare")
    if tool is None:
        return None
    argv = [tool, "--pid", "--fork", "--mount-proc", "--kill-child"]
    probe = subprocess.run([*argv, "true"], capture_output=True, timeout=30)
    return argv if probe.returncode == 0 else None


@pytest.mark.parametrize("as_pid1", [False, True], ids=["subreaper", "pid1"])
def test_orphaned_grandchildren_are_reaped(tmp_path: Path, as_pid1: bool) -> None:
    """A worker's grandchild whose parent exits is inherited by swapd and reaped when it
    exits, while each worker's exit is still reported with its own status (never stolen
    by a waitpid on any child)."""
    wrapper: list[str] = []
    if as_pid1:
        found = _unshare()
        if found is None:
            pytest.skip("cannot make a pid namespace here (unshare --pid --mount-proc)")
        wrapper = found
    behavior = tmp_path / "b.json"
    write_behavior(behavior, orphan=True)
    s = Supervised(tmp_path, MISBEHAVE, args=["--workers", "2"], env={"BEHAVIOR": str(behavior)},
                   wrapper=wrapper)
    with contextlib.closing(_Stopper(s)):
        s.start()
        st = s.status()
        supervisor = s.pid
        if as_pid1:
            assert st["pid"] == 1
            (supervisor,) = [c.pid for c in __import__("psutil").Process(s.pid).children()]
        for slot in (0, 1):
            m = s.wait_log(rf"gen=1 worker={slot} pid=\d+\| orphan pid=(\d+) exiting")
            s.wait_log(rf'event=orphan.reaped pid={m.group(1)} status="exited with status 0"')
        assert s.status()["orphans_reaped"] == 2
        assert zombies_of(supervisor) == []
        # A worker's own exit goes through its pidfd, with its real status.
        mark = s.log_mark()
        victim = s.active_pids()[0]
        victim_ns = next(w["pid"] for w in s.status()["generations"][0]["workers"])
        if as_pid1:
            victim = _host_pid(supervisor, 0)
        os.kill(victim, signal.SIGKILL)
        s.wait_log(rf'event=worker.died gen=1 worker=0 pid={victim_ns} status="killed by SIGKILL"',
                   start=mark)
        m = s.wait_log(r"gen=1 worker=0 pid=\d+\| orphan pid=(\d+) exiting", start=mark)
        s.wait_log(rf"event=orphan.reaped pid={m.group(1)} ", start=mark)
        assert zombies_of(supervisor) == []
        assert s.cli("stop").returncode == 0
        assert s.wait_exit(60) == 0


def _host_pid(supervisor: int, slot: int) -> int:
    """The host pid of a worker of a supervisor running in its own pid namespace."""
    import psutil

    for child in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.Error):
            if child.environ().get("SWAPD_SLOT") == str(slot):
                return int(child.pid)
    raise AssertionError(f"no worker in slot {slot}")
