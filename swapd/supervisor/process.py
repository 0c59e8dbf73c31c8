"""The one place that spawns, signals and reaps processes.

Everything the supervisor does to the OS about children goes through `OsProcesses`
(the seam, as tableflip's `env`): tests can drive the supervisor's logic with a
fake, and there is exactly one fork/exec path to audit.

Why not `subprocess`: the socket-activation contract wants `LISTEN_PID` to be the
*child's* pid in its environment, which is only known after fork; `subprocess`
fixes the environment before forking. So this module forks and execs itself, and
keeps the child side of the fork tiny: dup2 the passed fds into 3.., set the
process group, arm the parent-death signal, restore signal dispositions, exec. If
anything in the child fails before exec, the errno travels back on a close-on-exec
pipe and the child `_exit`s: it never returns into the supervisor's code (the
failure mode of gunicorn's unguarded `execvpe`).

Children are watched by pidfd (readable when the child exits) and reaped with
`waitpid(pid)` for that pid only, never `waitpid(-1)`.

The supervisor is a child subreaper (or PID 1): what a worker leaves behind is
reparented to it, not to init. `processes()` reads /proc so that the supervisor can
find those (`Strays`); a pid read there is only signalled through a pidfd opened on
it and checked against the start time read with it, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_EXEC_ERR = struct.Struct("=ii")  # (stage, errno)
_STAGES = {1: "dup2", 2: "chdir", 3: "exec", 4: "setup"}

# Signals the supervisor handles; a child must not inherit their handlers (before
# exec) or an ignored disposition (after exec).
RESET_SIGNALS = (
    signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGXFSZ,
)


class SpawnError(OSError):
    """The child could not be started (exec failed: missing program, permissions...)."""


@dataclass(frozen=True)
class SpawnSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    pass_fds: Sequence[int] = ()  # placed at 3, 4, ... in this order
    cwd: str | None = None
    output_fd: int | None = None  # stdout and stderr; None = inherit ours
    set_listen_pid: bool = True


@dataclass
class ExitStatus:
    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.waitstatus_to_exitcode(status))

    @property
    def ok(self) -> bool:
        return self.code == 0

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        if self.code is None:
            return "exited (status unknown: reaped elsewhere)"
        return f"exited with status {self.code}"


@dataclass
class Child:
    pid: int
    pidfd: int
    started: float = field(default_factory=time.monotonic)
    status: ExitStatus | None = None


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc/PID/stat shows it; (pid, starttime) names it uniquely."""

    pid: int
    ppid: int
    pgid: int
    state: str  # "R", "S", "Z" (exited, not reaped)...
    starttime: int  # clock ticks after boot

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


class OsProcesses:
    """The real implementation of the process seam."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def become_subreaper(self) -> bool:
        """Inherit orphaned descendants (what a worker forked and left), instead of init.
        PID 1 inherits them anyway; True if we now do."""
        if os.getpid() == 1:
            return True
        return bool(self._libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)

    def spawn(self, spec: SpawnSpec) -> Child:
        argv = list(spec.argv)
        if not argv:
            raise ValueError("cannot spawn an empty command")
        env = dict(spec.env)
        parent = os.getpid()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        # Block every signal across fork: a signal landing in the child before
        # exec would run the parent's Python handler there (and poke the parent's
        # wakeup fd, which the child shares).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, reported via the pipe
                self._child(spec, argv, env, parent, err_w, old_mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(err_w)
        try:
            report = _read_all(err_r)
        finally:
            os.close(err_r)
        if report:
            stage, err = _EXEC_ERR.unpack(report[: _EXEC_ERR.size])
            os.waitpid(pid, 0)
            what = _STAGES.get(stage, "setup")
            target = {"exec": repr(argv[0]), "chdir": repr(spec.cwd),
                      "dup2": f"the passed fds {list(spec.pass_fds)}"}.get(what, "the child")
            raise SpawnError(err, f"cannot {what} {target}: {os.strerror(err)}")
        return Child(pid=pid, pidfd=os.pidfd_open(pid))

    def _child(  # pragma: no cover - child side of fork
        self,
        spec: SpawnSpec,
        argv: list[str],
        env: dict[str, str],
        parent: int,
        err_w: int,
        old_mask: set[int | signal.Signals],
    ) -> None:
        stage = 4
        try:
            signal.set_wakeup_fd(-1)
            for sig in RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.setpgid(0, 0)
            # Die with the supervisor: a worker orphaned by a crashed supervisor
            # drains and exits instead of holding the listeners forever.
            self._libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)
            stage = 1
            err_w = _place_fds(list(spec.pass_fds), spec.output_fd, err_w)
            stage = 2
            if spec.cwd:
                os.chdir(spec.cwd)
            stage = 3
            if spec.set_listen_pid:
                env["LISTEN_PID"] = str(os.getpid())
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.execvpe(argv[0], argv, env)
        except BaseException as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            with contextlib.suppress(BaseException):
                os.write(err_w, _EXEC_ERR.pack(stage, code))
        finally:
            os._exit(127)

    def send_signal(self, child: Child, sig: int) -> bool:
        """Signal the child itself; False if it has already exited (pidfd: no pid reuse race)."""
        if child.status is not None or self.has_exited(child):
            return False
        try:
            signal.pidfd_send_signal(child.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    @staticmethod
    def has_exited(child: Child) -> bool:
        # A pidfd is readable once its process has exited, reaped or not; signalling a
        # zombie "succeeds" and would be reported as delivered.
        if child.pidfd < 0:
            return True
        return bool(select.select([child.pidfd], [], [], 0)[0])

    def signal_group(self, child: Child, sig: int) -> None:
        """Signal the child's whole process group (it and anything it forked).

        Only while the child is not reaped: until then its pid (alive or zombie) keeps the
        group id from naming anyone else. After the reap its group is `Strays`' business."""
        if child.status is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    def reap(self, child: Child) -> ExitStatus | None:
        """Collect the exit status if the child has exited; never blocks."""
        if child.status is not None:
            return child.status
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            child.status = ExitStatus(code=None, signal=None)
            return child.status
        if pid == 0:
            return None
        child.status = ExitStatus.from_wait(status)
        return child.status

    def release(self, child: Child) -> None:
        with contextlib.suppress(OSError):
            os.close(child.pidfd)
        child.pidfd = -1

    def trim_heap(self) -> None:
        """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

        Worker output passes through the supervisor in transient buffers; freed, they stay
        in the heap, pinned by long-lived objects allocated between them, and a 500-swap
        soak with chatty workers grew the RSS by 3.4 MB while Python's own allocations
        (tracemalloc) stayed flat. Called once a generation is over."""
        trim = getattr(self._libc, "malloc_trim", None)
        if trim is not None:
            trim(0)

    # -- processes we did not spawn: what workers left behind --------------------------

    def processes(self) -> list[ProcInfo]:
        """Every process /proc shows (our pid namespace); OSError (EMFILE: at our fd limit)
        is the caller's to handle."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                info = proc_info(int(entry))
                if info is not None:
                    found.append(info)
        return found

    def open_pidfd(self, info: ProcInfo) -> Child | None:
        """A pidfd on the process `info` describes, or None if it is gone (or its pid now
        names another process: the start time differs)."""
        try:
            pidfd = os.pidfd_open(info.pid)
        except OSError:
            return None
        now = proc_info(info.pid)
        if now is None or now.starttime != info.starttime:
            os.close(pidfd)
            return None
        return Child(pid=info.pid, pidfd=pidfd)

    @staticmethod
    def generation_of(pid: int) -> int | None:
        """The SWAPD_GENERATION in a process's environment (what its worker passed on)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read(1 << 20)
        except OSError:
            return None
        for item in env.split(b"\0"):
            if item.startswith(b"SWAPD_GENERATION="):
                value = item.partition(b"=")[2]
                return int(value) if value.isdigit() and len(value) < 12 else None
        return None

    def reap_orphan(self, pid: int) -> ExitStatus | None:
        """Reap an exited child that is none of our workers (checked by the caller)."""
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        return ExitStatus.from_wait(status) if got else None


def proc_info(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    fields = text[text.rindex(b")") + 2:].split()
    try:
        return ProcInfo(pid, int(fields[1]), int(fields[2]), fields[0].decode(),
                        int(fields[19]))
    except (IndexError, ValueError):
        return None


# Children started outside this seam (subprocess, in a thread: the re-exec pre-flight) are
# reaped by their own waitpid. While one runs, strays are not reaped: an exited child that
# is not a worker could be it, and reaping it would steal its exit status.
_foreign = 0
_foreign_lock = threading.Lock()


@contextlib.contextmanager
def foreign_child() -> Iterator[None]:
    global _foreign
    with _foreign_lock:
        _foreign += 1
    try:
        yield
    finally:
        with _foreign_lock:
            _foreign -= 1


def reaping_allowed() -> bool:
    with _foreign_lock:
        return _foreign == 0


def _place_fds(fds: list[int], output_fd: int | None, keep: int) -> int:  # pragma: no cover
    """dup2 `fds` to 3.. and output to 1, 2; stdin from /dev/null; close the rest.

    `keep` (the exec-error pipe) survives, moved out of the way; its new number is
    returned. Sources are first moved above the target range with F_DUPFD_CLOEXEC,
    which picks free numbers, so no dup2 can clobber a source not yet placed.
    """
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    if output_fd is not None:
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
    high = 3 + len(fds)
    keep = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, high)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high) for fd in fds]
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i, inheritable=True)
    os.closerange(high, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    return keep


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
