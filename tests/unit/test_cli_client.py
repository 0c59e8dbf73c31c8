"""The CLI's side of the control socket: how long it waits, and what it says when it stops
waiting (against a scripted socket: real sockets and processes, no supervisor)."""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swapd.control import Client, ClientError
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


# -- a client that stops waiting (M4) ----------------------------------------------------

STARTED = progress("gen=2 started 1 worker(s): pid=4242", "spawned")


def cli(sock_path: Path, *argv: str, stdout: Any = subprocess.PIPE
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SWAPD, *argv, "--control", str(sock_path)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60)


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of the child's stdout, without blocking past `timeout`."""
    assert proc.stdout is not None
    fd, data, end = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        assert ready, f"no line within {timeout}s (so far {data!r})"
        chunk = os.read(fd, 1)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def test_a_timeout_after_the_request_was_taken_on_is_outcome_unknown(sock_path: Path) -> None:
    """It was exit 3, "no answer from supervisor", while the swap went on and committed."""
    fake = FakeSupervisor(sock_path, [deadline(60), STARTED], hold=True)
    try:
        out = cli(sock_path, "upgrade", "--timeout", "1")
    finally:
        fake.close()
    assert out.returncode == 4, out
    assert out.stdout == "swapd: gen=2 started 1 worker(s): pid=4242\n"
    assert out.stderr.splitlines() == [
        "swapd upgrade: no result from supervisor within 1s; stopped waiting; the upgrade "
        "(gen=2) continues in the supervisor: see `swapd status`"]


def test_an_answer_is_what_tells_unknown_from_unreachable(sock_path: Path) -> None:
    """A deadline line alone says the supervisor took the request on; silence does not."""
    fake = FakeSupervisor(sock_path, [deadline(60)], hold=True)
    try:
        out = cli(sock_path, "stop", "--timeout", "1")
    finally:
        fake.close()
    assert out.returncode == 4, out
    assert "the stop continues in the supervisor: see `swapd status`" in out.stderr
    silent = FakeSupervisor(tmp := sock_path.with_name("silent.sock"), [], hold=True)
    try:
        out = cli(tmp, "stop", "--timeout", "0.5")
    finally:
        silent.close()
    assert out.returncode == 3, out
    assert out.stderr == "swapd stop: no answer from supervisor within 0.5s\n"


def test_a_connection_lost_after_progress_is_outcome_unknown(sock_path: Path) -> None:
    fake = FakeSupervisor(sock_path, [deadline(60), STARTED])  # then closes: no result
    try:
        out = cli(sock_path, "upgrade")
    finally:
        fake.close()
    assert out.returncode == 4, out
    assert out.stderr.splitlines() == [
        "swapd upgrade: supervisor closed the connection before answering; stopped waiting; "
        "the outcome of the upgrade (gen=2) is unknown: see `swapd status`"]


@pytest.mark.parametrize("replies", [[deadline(60), STARTED], []], ids=["taken-on", "silent"])
def test_ctrl_c_says_what_goes_on_and_exits_130(sock_path: Path, replies: list[Any]) -> None:
    """Ctrl-C printed nothing and exited 1 while the upgrade went on and committed."""
    go = threading.Event()
    fake = FakeSupervisor(sock_path, [*replies, go], hold=True)
    proc = subprocess.Popen([*SWAPD, "upgrade", "--control", str(sock_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if replies:
            assert read_line(proc, 30) == b"swapd: gen=2 started 1 worker(s): pid=4242\n"
        else:
            assert fake.received.wait(30)  # the request arrived (and nothing came back)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        go.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        fake.close()
    assert proc.returncode == 130
    fate = ("the upgrade (gen=2) continues in the supervisor" if replies
            else "the supervisor may still carry out the upgrade")
    assert err.decode().splitlines() == [
        f"swapd upgrade: stopped waiting (interrupted); {fate}: see `swapd status`"]


def test_ctrl_c_on_status_is_quiet(sock_path: Path) -> None:
    go = threading.Event()
    fake = FakeSupervisor(sock_path, [go], hold=True)
    proc = subprocess.Popen([*SWAPD, "status", "--control", str(sock_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert fake.received.wait(30)  # the request arrived
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        go.set()
        fake.close()
    assert (proc.returncode, out, err) == (130, b"", b"")


@pytest.fixture
def broken_stdout() -> Iterator[int]:
    """A pipe whose reader is gone (`swapd status | true`): every write gets EPIPE."""
    read, write = os.pipe()
    os.close(read)
    yield write
    os.close(write)


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["upgrade"],
                                  ["upgrade", "--json"]])
def test_a_reader_that_went_away_changes_nothing(sock_path: Path, broken_stdout: int,
                                                 argv: list[str]) -> None:
    """`swapd status | head` died with a BrokenPipeError traceback (exit 1); an upgrade whose
    progress line met a closed pipe stopped waiting for its outcome."""
    status = {"version": "0", "pid": 1, "uptime": 1.0, "mode": "stateless", "control": "x",
              "listeners": [], "generations": [], "warnings": []}
    replies = ([result(**status)] if argv[0] == "status" else
               [deadline(60), STARTED, result(gen=2, previous=1, timings_ms={"ready": 5.0})])
    fake = FakeSupervisor(sock_path, replies)
    try:
        out = cli(sock_path, *argv, stdout=broken_stdout)
    finally:
        fake.close()
    assert (out.returncode, out.stderr) == (0, "")
    assert fake.requests[0]["cmd"] == argv[0]


def test_a_failed_upgrade_keeps_its_exit_code_with_no_reader(sock_path: Path,
                                                             broken_stdout: int) -> None:
    fake = FakeSupervisor(sock_path, [deadline(60), STARTED,
                                      {**result(False, gen=2), "error": "gen=2 crashed"}])
    try:
        out = cli(sock_path, "upgrade", stdout=broken_stdout)
    finally:
        fake.close()
    assert out.returncode == 1
    assert out.stderr == "swapd upgrade: FAILED: gen=2 crashed\n"


# -- what the client says about a control path that is no supervisor (L9, M8) -----------


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_control_path_that_is_not_a_socket_says_so(tmp_path: Path, kind: str) -> None:
    """`--control /etc/passwd` said "no supervisor listening ... (stale socket?)"."""
    path = tmp_path / "not-a-socket"
    if kind == "file":
        path.write_text("root:x:0:0\n")
    else:
        path.mkdir()
    with pytest.raises(ClientError) as info:
        list(Client(str(path)).call("status"))
    assert str(info.value) == f"{path} is not a socket (a {kind}): not a control socket"
    out = cli(path, "status")
    assert (out.returncode, out.stderr) == (3, f"swapd status: {info.value}\n")
    stale = tmp_path / "stale.sock"  # bound, never listening: what a dead supervisor leaves
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    with pytest.raises(ClientError, match=r"no supervisor listening on .* \(stale socket\?\)"):
        list(Client(str(stale)).call("status"))


def test_a_supervisor_of_another_user_is_refused_with_the_way_to_ask() -> None:
    """Root managing a `User=` service: the rule stays (the client talks to its own uid or
    root only), and the refusal says how to ask (docs/systemd.md)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a server as another uid")
    shared = Path(tempfile.mkdtemp(prefix="swapd-other-uid-"))
    os.chown(shared, 65534, 65534)
    shared.chmod(0o755)
    path = shared / "swapd.sock"
    script = ("import socket, sys\n"
              "s = socket.socket(socket.AF_UNIX)\n"
              "s.bind(sys.argv[1])\n"
              "s.listen()\n"
              "print('listening', flush=True)\n"
              "while True:\n"
              "    c, _ = s.accept()\n"
              "    c.recv(1)\n"  # the client hangs up without a word
              "    c.close()\n")
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    server = subprocess.Popen([python, "-c", script, str(path)], stdout=subprocess.PIPE,
                              user=65534, group=65534)
    try:
        assert read_line(server, 30) == b"listening\n"
        user = pwd.getpwuid(65534).pw_name
        with pytest.raises(ClientError) as info:
            list(Client(str(path)).call("status"))
        assert str(info.value) == (
            f"refusing to talk to {path}: it is served by uid 65534 (pid {server.pid}), not "
            f"by uid 0 or root; it is not our supervisor. If it is a service running as "
            f"{user}, ask as that user: runuser -u {user} -- swapd ...")
        out = cli(path, "upgrade")
        assert (out.returncode, out.stderr) == (3, f"swapd upgrade: {info.value}\n")
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(shared, ignore_errors=True)


# -- `swapd status` for a human (L6) ------------------------------------------------------


def _status(**over: Any) -> dict[str, Any]:
    """A report with the keys and shapes of swapd.supervisor.status.report()."""
    worker = {"slot": 0, "pid": 11919, "state": "backoff", "role": "fresh", "uptime": 8.2,
              "speaks_channel": True, "exit": "exited with status 1", "crash_loop": True}
    ended = [{"id": i, "state": "exited", "lived": 61.5, "restarts": 0,
              "workers": [{"slot": 0, "pid": 100 + i, "exit": "exited with status 0"},
                          {"slot": 1, "pid": 200 + i, "exit": "killed by SIGKILL"}]}
             for i in range(1, 8)]
    return {"version": "0.1.0", "pid": 4000, "uptime": 600.0, "mode": "stateless",
            "control": "/run/x.sock", "active": 8,
            "listeners": [{"name": "http", "address": "127.0.0.1:8000", "configured":
                           "127.0.0.1:8000", "fd": 5, "source": "bound", "listening": False},
                          {"name": "admin", "address": "127.0.0.1:8001", "configured":
                           "127.0.0.1:8001", "fd": 6, "source": "bound", "listening": True}],
            "generations": [{"id": 8, "state": "active", "mode": "stateless", "release": "v8",
                             "command": ["python", "app.py"], "age": 30.0, "restarts": [5, 0],
                             "workers": [worker, {**worker, "slot": 1, "pid": 12000,
                                                  "state": "ready", "uptime": 30.0,
                                                  "rss": 2**24, "cpu_seconds": 0.5,
                                                  "exit": None, "crash_loop": False}]}],
            "ended": ended, "warnings": ["worker 0 is in a crash loop (5 crashes in 60s)",
                                         "listener http (127.0.0.1:8000) does not listen"],
            **over}


def test_human_status_tells_only_what_is_true(sock_path: Path) -> None:
    """Warnings were printed twice; `ended` (promised by the README) never shown; a dead
    listener looked like a live one; a worker in backoff showed its dead pid, up 8s."""
    status = _status()
    del status["generations"][0]["workers"][1]["exit"]  # a live worker has no "exit"
    fake = FakeSupervisor(sock_path, [result(**status)])
    try:
        out = cli(sock_path, "status")
    finally:
        fake.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line for line in lines if "WARNING" in line] == [
        "WARNING: worker 0 is in a crash loop (5 crashes in 60s)",
        "WARNING: listener http (127.0.0.1:8000) does not listen"]
    assert f"  http       {'127.0.0.1:8000':<28} (bound)  listening: no" in lines
    assert f"  admin      {'127.0.0.1:8001':<28} (bound)" in lines
    assert ("    worker 0  pid -       backoff   (pid 11919 exited with status 1)  restarts 5"
            "  CRASH-LOOP") in lines
    assert not any("11919" in line and "up " in line for line in lines)
    assert "    worker 1  pid 12000   ready     up 30s  rss 16.0 MiB  cpu 0.50s  restarts 0" \
        in lines
    at = lines.index("ended: (2 earlier: swapd status --json)")
    assert lines[at + 1:at + 6] == [
        f"  gen {i:<4} EXITED    lived 1m01s  restarts 0  worker(s): 1 exited with status 0, "
        "1 killed by SIGKILL" for i in range(3, 8)]
