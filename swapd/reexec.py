"""`swapd upgrade --self`: the supervisor re-execs itself in place.

The PID stays (systemd's MainPID does not change), and so does everything the
supervisor owns: listeners, the control socket, and the running workers, which
remain its children, with their channels, notify sockets, output pipes and
pidfds. All of it crosses `execve` as inherited fds, described by a JSON state
in a memfd:

    SWAPD_REEXEC_STATE=<fd>   a sealed memfd holding
    {"format": 1, "version": "0.1.0", "config": {...}, "config_file": ...,
     "overrides": {...}, "control_fd": 5, "reply_fd": 9, "started": <monotonic>,
     "next_gen": 4, "active": 3, "swaps": {...}, "last_swap": {...},
     "crashes": {"0": [t, ...]},
     "listeners": [{"name", "address", "fd", "source"}],
     "generations": [{"id", "state", "config", "created", "committed", "restarts",
                      "drain_deadline", "workers": [{"slot", "role", "pid", "pidfd",
                      "channel_fd", "notify_fd", "output_fd", "state", "started",
                      "ready_at", "hello", "status", "tail"} | null]}]}

Order of operations, each step undoable until the exec:
1. refuse if a swap (or anything else) is in flight;
2. write the state, make exactly the fds it names inheritable;
3. pre-flight: run the *new* code from disk (`python -m swapd _reexec-check`) on
   a copy of that state; if it cannot parse it, nothing happens and the old
   supervisor keeps running (failure reported with the check's output);
4. block HUP/TERM/INT/QUIT (the new image unblocks them once its handlers are
   installed: a signal in between would otherwise take the default action and
   kill the service) and `execve`. If execve itself fails, every fd goes back to
   close-on-exec, the signals are unblocked, and the error is reported.
The client that asked gets its answer from the new image, on the same
connection (its fd is passed too).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swapd import __version__
from swapd.config import Config, from_overrides, to_overrides

if TYPE_CHECKING:
    from swapd.supervisor import Supervisor

FORMAT = 1
ENV = "SWAPD_REEXEC_STATE"
BLOCKED = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
CHECK_TIMEOUT = 30.0


class ReexecError(Exception):
    """The re-exec did not happen; the running supervisor is unchanged."""

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.tail = tail


@dataclass
class Captured:
    state: dict[str, Any]
    fds: list[int]


def capture(sup: Supervisor, reply_fd: int | None) -> Captured:
    """Describe everything the supervisor owns, and list the fds that must survive exec."""
    from swapd.lifecycle import FINAL

    fds: list[int] = []

    def keep(fd: int) -> int:
        fds.append(fd)
        return fd

    assert sup.control_fd is not None
    gens = []
    for gen in sup.generations.values():
        if gen.state in FINAL:
            continue
        workers: list[dict[str, Any] | None] = []
        for w in gen.workers:
            if w is None or w.child.status is not None or w.child.pidfd < 0:
                workers.append(None if w is None else {"slot": w.slot, "dead": True,
                                                       "state": w.state.value})
                continue
            pipes = w.pipe_fds()
            workers.append({
                "slot": w.slot, "role": w.role, "pid": w.pid, "pidfd": keep(w.child.pidfd),
                "channel_fd": keep(pipes[0]) if pipes[0] is not None else None,
                "notify_fd": keep(pipes[1]) if pipes[1] is not None else None,
                "output_fd": keep(pipes[2]) if pipes[2] is not None else None,
                "state": w.state.value, "started": w.started, "ready_at": w.ready_at,
                "hello": w.hello, "status": w.status_text, "tail": list(w.tail),
                "ready_info": w.ready.result() if w.ready.done() else None,
            })
        gens.append({
            "id": gen.id, "state": gen.state.value, "config": to_overrides(gen.config),
            "config_file": gen.config.config_file, "created": gen.created,
            "committed": gen.committed, "restarts": gen.restarts,
            "drain_deadline": sup.drain_deadlines.get(gen.id), "workers": workers,
        })
    state = {
        "format": FORMAT,
        "version": __version__,
        "config": to_overrides(sup.config),
        "config_file": sup.config.config_file,
        "overrides": sup.overrides,
        "control_fd": keep(sup.control_fd),
        "reply_fd": keep(reply_fd) if reply_fd is not None else None,
        "started": sup.started,
        "next_gen": sup.next_gen,
        "active": sup.active.id if sup.active else None,
        "swaps": sup.swap_counts,
        "last_swap": sup.last_swap,
        "crashes": {str(k): list(v) for k, v in sup.crashes.items()},
        "listeners": [{"name": lis.name, "address": str(lis.address),
                       "fd": keep(lis.sock.fileno()), "source": lis.source}
                      for lis in sup.listeners],
        "generations": gens,
        "journal": sup.journal_state(),
    }
    return Captured(state, fds)


def write_state(state: dict[str, Any]) -> int:
    fd = os.memfd_create("swapd-reexec-state", os.MFD_ALLOW_SEALING)  # inheritable on purpose
    data = json.dumps(state).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


def read_state(fd: int) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    try:
        state = json.loads(data)
    except ValueError as e:
        raise ReexecError(f"re-exec state is not JSON: {e}") from e
    if not isinstance(state, dict):
        raise ReexecError(f"re-exec state is a {type(state).__name__}, not an object")
    if state.get("format") != FORMAT:
        raise ReexecError(f"re-exec state format {state.get('format')!r} is not {FORMAT}")
    return state


def check(fd: int) -> None:
    """What the pre-flight runs in the new code: import all of it, parse the state fully."""
    import swapd.cli
    import swapd.supervisor
    import swapd.worker  # an import error anywhere must stop the re-exec

    _ = swapd.cli.main, swapd.supervisor.Supervisor.from_reexec
    state = read_state(fd)
    config_of(state["config"], state["config_file"])
    for gen in state["generations"]:
        config_of(gen["config"], gen["config_file"])
        for w in gen["workers"]:
            if w is not None and not w.get("dead"):
                for key in ("slot", "pid", "pidfd", "state", "started"):
                    if key not in w:
                        raise ReexecError(f"worker entry without {key!r}")


def config_of(data: dict[str, Any], config_file: str | None) -> Config:
    return from_overrides(data, config_file)


def preflight(state_fd: int) -> None:
    """Run the new code on the state before committing to the exec."""
    argv = [sys.executable, "-P", "-m", "swapd", "_reexec-check", str(state_fd)]
    try:
        proc = subprocess.run(argv, pass_fds=[state_fd], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise ReexecError(f"the new code's pre-flight check hung for {CHECK_TIMEOUT:g}s") from e
    except OSError as e:
        raise ReexecError(f"cannot run the pre-flight check: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise ReexecError(f"the new code refused the supervisor state (exit {proc.returncode})",
                          tail)


def exec_argv() -> list[str]:
    # `-m swapd` with the original arguments works for the console script and for
    # `python -m swapd` alike, and does not depend on argv[0] (gunicorn#3281). `-P` keeps
    # the working directory off sys.path: the new code is the swapd installed (or on
    # PYTHONPATH), never a `swapd/` that happens to sit in the supervisor's cwd.
    return [sys.executable, "-P", "-m", "swapd", *sys.argv[1:]]


def execute(captured: Captured) -> None:
    """Exec the new image. Returns only if execve failed (everything restored)."""
    state_fd = write_state(captured.state)
    try:
        preflight(state_fd)
        for fd in captured.fds:
            os.set_inheritable(fd, True)
        env = {**os.environ, ENV: str(state_fd)}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        try:
            os.execve(sys.executable, exec_argv(), env)
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise ReexecError(f"execve {sys.executable} failed: {e.strerror}") from e
    finally:
        for fd in captured.fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        os.close(state_fd)


def unblock_signals() -> None:
    """In the new image, once its handlers are installed."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
