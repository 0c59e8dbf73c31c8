"""The process seam with real, short-lived children: fd placement, environment, process group,
signals, exit statuses and exec errors. Every child is waited for by pidfd with a deadline and
killed by its pid if a test fails before it exits."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from swapd.supervisor.process import Child, ExitStatus, OsProcesses, SpawnError, SpawnSpec

DEADLINE = 10.0  # seconds; only reached when something is broken
PY = [sys.executable, "-I", "-S", "-c"]

# Prints {fd: what it points to} for every open fd of the child itself.
FD_REPORT = """
import json, os, sys
out = {}
for name in os.listdir("/proc/self/fd"):
    try:
        out[int(name)] = os.readlink("/proc/self/fd/" + name)
    except OSError:
        pass  # the directory fd listdir used, closed again
os.write(int(sys.argv[1]) if len(sys.argv) > 1 else 1, json.dumps(out).encode())
"""


class Runner:
    """OsProcesses plus bookkeeping so that no child outlives its test."""

    def __init__(self) -> None:
        self.procs = OsProcesses()
        self.children: list[Child] = []

    def spawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              pass_fds: Sequence[int] = (), cwd: str | None = None,
              output_fd: int | None = None, set_listen_pid: bool = True) -> Child:
        spec = SpawnSpec(argv=list(argv), env={} if env is None else env, pass_fds=pass_fds,
                         cwd=cwd, output_fd=output_fd, set_listen_pid=set_listen_pid)
        child = self.procs.spawn(spec)
        self.children.append(child)
        return child

    def run(self, argv: Sequence[str], **kwargs: object) -> tuple[Child, ExitStatus, str]:
        """Spawn with stdout/stderr on a pipe; return the exit status and all the output."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            child = self.spawn(argv, output_fd=w, **kwargs)  # type: ignore[arg-type]
        finally:
            os.close(w)
        try:
            output = read_to_eof(r)
        finally:
            os.close(r)
        return child, self.wait(child), output

    def wait(self, child: Child) -> ExitStatus:
        ready, _, _ = select.select([child.pidfd], [], [], DEADLINE)
        assert ready, f"child {child.pid} did not exit within {DEADLINE}s"
        status = self.procs.reap(child)
        assert status is not None  # pidfd readable: the child has exited
        return status

    def cleanup(self) -> None:
        for child in self.children:
            if child.status is None and child.pidfd >= 0:
                self.procs.send_signal(child, signal.SIGKILL)
                select.select([child.pidfd], [], [], DEADLINE)
                self.procs.reap(child)
            self.procs.release(child)


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner()
    try:
        yield r
    finally:
        r.cleanup()


def read_to_eof(fd: int) -> str:
    deadline = time.monotonic() + DEADLINE
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "no EOF on the child's output within the deadline"
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks).decode()
        chunks.append(chunk)


def link(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def zombie_children() -> set[int]:
    """Our children that have exited and not been reaped."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        if int(ppid) == os.getpid() and state == "Z":
            found.add(int(entry))
    return found


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def memfds(count: int) -> Iterator[list[int]]:
    fds = [os.memfd_create(f"swapd-test-{i}") for i in range(count)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


# -- what the child gets ------------------------------------------------------------------


def test_listen_pid_is_the_child_and_it_leads_its_own_group(runner: Runner) -> None:
    script = 'read -r _ _ _ _ pgrp _ < /proc/$$/stat; echo "$LISTEN_PID $$ $pgrp"'
    child, status, out = runner.run(["sh", "-c", script])
    assert status.ok
    listen_pid, shell_pid, pgrp = (int(x) for x in out.split())
    assert listen_pid == shell_pid == pgrp == child.pid
    assert pgrp != os.getpgid(0)


def test_environment_is_exactly_the_given_one(runner: Runner) -> None:
    env = {"A": "1", "B": "two words", "LISTEN_PID": "1"}
    child, _, out = runner.run(["env"], env=env)
    assert sorted(out.splitlines()) == ["A=1", "B=two words", f"LISTEN_PID={child.pid}"]


def test_listen_pid_can_be_left_out(runner: Runner) -> None:
    _, _, out = runner.run(["env"], env={"A": "1"}, set_listen_pid=False)
    assert out.splitlines() == ["A=1"]
    _, _, out = runner.run(["env"], env={"LISTEN_PID": "1"}, set_listen_pid=False)
    assert out.splitlines() == ["LISTEN_PID=1"]  # given explicitly: passed as is


def test_program_is_found_on_the_given_path(runner: Runner, tmp_path: Path) -> None:
    tool = tmp_path / "swapd-test-tool"
    tool.write_text("#!/bin/sh\necho found-it\n")
    tool.chmod(0o755)
    _, status, out = runner.run(["swapd-test-tool"], env={"PATH": f"/nonexistent:{tmp_path}"})
    assert status.ok and out == "found-it\n"


def test_cwd(runner: Runner, tmp_path: Path) -> None:
    _, _, out = runner.run(["sh", "-c", "pwd -P"], cwd=str(tmp_path))
    assert out.strip() == os.path.realpath(tmp_path)


def test_passed_fds_land_at_3_in_order_and_nothing_else_leaks(runner: Runner) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_r, True)  # inheritable on purpose: spawn must still close it
    try:
        with memfds(3) as (a, b, c):
            expected = {0: "/dev/null", 1: link(w), 2: link(w), 3: link(c), 4: link(a),
                        5: link(b)}
            _, status, out = _run_with_output(runner, [c, a, b], r, w)
    finally:
        for fd in (r, stray_r, stray_w):
            os.close(fd)
    assert status.ok, out
    assert {int(k): v for k, v in json.loads(out).items()} == expected


def _run_with_output(runner: Runner, pass_fds: list[int], r: int, w: int
                     ) -> tuple[Child, ExitStatus, str]:
    try:
        child = runner.spawn([*PY, FD_REPORT], pass_fds=pass_fds, output_fd=w)
    finally:
        os.close(w)
    return child, runner.wait(child), read_to_eof(r)


def test_passed_fds_that_overlap_the_target_range(runner: Runner) -> None:
    # Enough fds that some of ours already sit at numbers in 3..3+n (targets of *other*
    # fds): naive dup2 in order would clobber a source before it is placed.
    first = os.memfd_create("swapd-probe")
    count = first + 4
    os.close(first)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with memfds(count) as fds:
            order = list(reversed(fds))
            overlapping = [fd for i, fd in enumerate(order) if 3 <= fd < 3 + count and fd != 3 + i]
            assert overlapping, "test precondition: sources inside the target range"
            expected = {3 + i: link(fd) for i, fd in enumerate(order)}
            _, status, out = _run_with_output(runner, order, r, w)
    finally:
        os.close(r)
    assert status.ok, out
    got = {int(k): v for k, v in json.loads(out).items() if int(k) >= 3}
    assert got == expected


def test_output_defaults_to_ours(runner: Runner) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        child = runner.spawn([*PY, FD_REPORT, "3"], pass_fds=[w])
        os.close(w)
        w = -1
        out = read_to_eof(r)
        assert runner.wait(child).ok
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    fds = {int(k): v for k, v in json.loads(out).items()}
    assert fds[0] == "/dev/null"  # never our stdin, even when output is shared
    assert fds[1] == link(1) and fds[2] == link(2)


def test_signal_dispositions_and_mask_are_reset(runner: Runner) -> None:
    # Python ignores SIGPIPE and SIGXFSZ; a supervisor may ignore more. Ignored dispositions
    # survive exec, so the child must get them back to default. The all-signals block held
    # across fork must not leak either.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGHUP, signal.SIGUSR2)}
    try:
        _, _, out = runner.run(["cat", "/proc/self/status"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    fields = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
    ignored, blocked = int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)
    for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} still ignored in the child"
    parent_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert blocked == sum(1 << (s - 1) for s in parent_mask)


def test_spawn_restores_the_parent_signal_mask(runner: Runner) -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    runner.run(["true"])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


# -- watching, signalling, reaping --------------------------------------------------------


@contextlib.contextmanager
def blocked_child(runner: Runner, script: str = "read x <&3; exit 7"
                  ) -> Iterator[tuple[Child, int]]:
    """A child blocked reading fd 3 until the yielded write end is written or closed."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        child = runner.spawn(["sh", "-c", script], pass_fds=[r])
    finally:
        os.close(r)
    try:
        yield child, w
    finally:
        with contextlib.suppress(OSError):
            os.close(w)


def test_reap_never_blocks_and_pidfd_signals_exit(runner: Runner) -> None:
    with blocked_child(runner) as (child, w):
        assert runner.procs.reap(child) is None
        assert select.select([child.pidfd], [], [], 0)[0] == []
        assert child.status is None
        os.close(w)  # EOF: `read` fails, the script exits 7
        status = runner.wait(child)
    assert status == ExitStatus(code=7) and not status.ok
    assert runner.procs.reap(child) is status  # idempotent, no second waitpid


def test_send_signal_and_exit_by_signal(runner: Runner) -> None:
    with blocked_child(runner) as (child, _):
        assert runner.procs.send_signal(child, signal.SIGTERM) is True
        status = runner.wait(child)
    assert status == ExitStatus(signal=signal.SIGTERM)
    assert str(status) == "killed by SIGTERM" and not status.ok
    assert runner.procs.send_signal(child, signal.SIGTERM) is False


def test_send_signal_to_an_exited_but_unreaped_child(runner: Runner) -> None:
    child = runner.spawn(["true"])
    assert select.select([child.pidfd], [], [], DEADLINE)[0]
    assert runner.procs.send_signal(child, signal.SIGTERM) is False


def test_signal_group_reaches_grandchildren(runner: Runner) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    grandchild_fd = -1
    grandchild = 0
    try:
        child = runner.spawn(["sh", "-c", "sleep 1000 & echo $!; wait"], output_fd=w)
        os.close(w)
        w = -1
        line = b""
        while not line.endswith(b"\n"):
            assert select.select([r], [], [], DEADLINE)[0], "no grandchild pid"
            chunk = os.read(r, 64)
            assert chunk
            line += chunk
        grandchild = int(line)
        grandchild_fd = os.pidfd_open(grandchild)
        assert os.getpgid(grandchild) == child.pid
        runner.procs.signal_group(child, signal.SIGKILL)
        assert runner.wait(child) == ExitStatus(signal=signal.SIGKILL)
        assert select.select([grandchild_fd], [], [], DEADLINE)[0], "grandchild survived"
        grandchild = 0
        runner.procs.signal_group(child, signal.SIGKILL)  # group gone: no error
    finally:
        if grandchild:
            signal.pidfd_send_signal(grandchild_fd, signal.SIGKILL)
        if grandchild_fd >= 0:
            os.close(grandchild_fd)
        os.close(r)
        if w >= 0:
            os.close(w)


def test_reap_after_someone_else_reaped(runner: Runner) -> None:
    child = runner.spawn(["true"])
    assert select.select([child.pidfd], [], [], DEADLINE)[0]
    os.waitpid(child.pid, 0)  # the status is gone: reap must not fail or block
    assert runner.procs.reap(child) == ExitStatus(code=None, signal=None)
    assert runner.procs.send_signal(child, signal.SIGTERM) is False


def test_release_closes_the_pidfd(runner: Runner) -> None:
    _, _, _ = runner.run(["true"])
    child = runner.children[-1]
    pidfd = child.pidfd
    runner.procs.release(child)
    assert child.pidfd == -1 and pidfd not in open_fds()
    runner.procs.release(child)  # twice: harmless


def test_exit_codes(runner: Runner) -> None:
    _, status, _ = runner.run(["sh", "-c", "exit 3"])
    assert status == ExitStatus(code=3) and str(status) == "exited with status 3"
    _, status, _ = runner.run(["true"])
    assert status.ok and str(status) == "exited with status 0"


# -- exec errors --------------------------------------------------------------------------


def _spawn_error(runner: Runner, argv: list[str], **kwargs: object) -> SpawnError:
    zombies, fds = zombie_children(), open_fds()
    with pytest.raises(SpawnError) as info:
        runner.spawn(argv, **kwargs)  # type: ignore[arg-type]
    assert zombie_children() == zombies, "the failed child was not reaped"
    assert open_fds() == fds, "spawn leaked an fd"
    message = str(info.value)
    assert "\n" not in message
    return info.value


def test_missing_program(runner: Runner) -> None:
    err = _spawn_error(runner, ["swapd-no-such-program", "--flag"])
    assert err.errno == errno.ENOENT
    assert err.strerror == "cannot exec 'swapd-no-such-program': No such file or directory"
    assert isinstance(err, OSError)


def test_missing_program_by_path(runner: Runner, tmp_path: Path) -> None:
    err = _spawn_error(runner, [str(tmp_path / "app")])
    assert err.strerror == f"cannot exec '{tmp_path / 'app'}': No such file or directory"


def test_program_not_executable(runner: Runner, tmp_path: Path) -> None:
    script = tmp_path / "app.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    err = _spawn_error(runner, [str(script)])
    assert err.errno == errno.EACCES
    assert err.strerror == f"cannot exec '{script}': Permission denied"


def test_missing_cwd(runner: Runner, tmp_path: Path) -> None:
    cwd = str(tmp_path / "gone")
    err = _spawn_error(runner, ["true"], cwd=cwd)
    assert err.errno == errno.ENOENT
    assert err.strerror == f"cannot chdir '{cwd}': No such file or directory"


def test_cwd_is_a_file(runner: Runner, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    err = _spawn_error(runner, ["true"], cwd=str(tmp_path / "f"))
    assert err.errno == errno.ENOTDIR
    assert err.strerror == f"cannot chdir '{tmp_path / 'f'}': Not a directory"


def closed_fd() -> int:
    # Not a just-closed number: spawn's own pipe would reuse that one.
    return max(open_fds()) + 100


def test_a_closed_fd_to_pass(runner: Runner) -> None:
    err = _spawn_error(runner, ["true"], pass_fds=[closed_fd()])
    assert err.errno == errno.EBADF
    assert err.strerror is not None and err.strerror.startswith("cannot dup2 ")


def test_a_closed_fd_to_pass_is_named(runner: Runner, tmp_path: Path) -> None:
    err = _spawn_error(runner, ["true"], pass_fds=[closed_fd()], cwd=str(tmp_path))
    assert str(tmp_path) not in str(err) and "''" not in str(err)


def test_empty_argv(runner: Runner) -> None:
    with pytest.raises((SpawnError, ValueError)) as info:
        runner.spawn([])
    assert not isinstance(info.value, IndexError)


def test_runner_survives_many_failed_spawns(runner: Runner) -> None:
    # No fd or zombie accumulates over repeated failures (the pipe and the child each time).
    for _ in range(20):
        _spawn_error(runner, ["swapd-no-such-program"])


# -- ExitStatus ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "text", "ok"),
    [
        (0, ExitStatus(code=0), "exited with status 0", True),
        (3 << 8, ExitStatus(code=3), "exited with status 3", False),
        (255 << 8, ExitStatus(code=255), "exited with status 255", False),
        (signal.SIGKILL, ExitStatus(signal=signal.SIGKILL), "killed by SIGKILL", False),
        (signal.SIGSEGV | 0x80, ExitStatus(signal=signal.SIGSEGV), "killed by SIGSEGV", False),
        (40, ExitStatus(signal=40), "killed by 40", False),
    ],
    ids=["zero", "three", "255", "sigkill", "sigsegv-core", "realtime"],
)
def test_exit_status_from_wait(status: int, expected: ExitStatus, text: str, ok: bool) -> None:
    got = ExitStatus.from_wait(status)
    assert got == expected and str(got) == text and got.ok is ok


def test_unknown_exit_status_text() -> None:
    assert "None" not in str(ExitStatus())
