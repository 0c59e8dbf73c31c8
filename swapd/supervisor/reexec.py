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
     "crashes": {"0": [t, ...]}, "ops": {"who": {...}, "asked": <time>, ...},
     "listeners": [{"name", "address", "fd", "source"}],
     "generations": [{"id", "state", "config", "created", "committed", "restarts",
                      "drain_deadline", "workers": [{"slot", "role", "pid", "pidfd",
                      "channel_fd", "notify_fd", "output_fd", "state", "started",
                      "ready_at", "hello", "status", "tail", "ready_info",
                      "probe_fd"} | null]}]}

A worker not ready yet (a restart in progress) keeps its deadline: the new image watches
its readiness for what is left of `ready_timeout`, and resumes its readiness probe on the
probe's private listener (`probe_fd`) if it had one.

Order of operations, each step undoable until the exec:
1. refuse if a swap (or anything else) is in flight, and refuse new ones meanwhile;
2. pre-flight: run the *new* code from disk (`python -m swapd _reexec-check`) on
   a state of this supervisor, in a thread so that the event loop keeps serving
   (watchdog pings, pidfds, control); if it cannot take the state over, nothing
   happens and the old supervisor keeps running (failure reported with the
   check's output);
3. capture the state again (what changed during the check, e.g. a restarted
   worker, is in it), write it, make exactly the fds it names inheritable, ping
   the watchdog;
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
from typing import Any

from swapd import __version__
from swapd.config import Config, ConfigError, from_overrides, to_overrides
from swapd.sockets import Address, AddressError, parse_address
from swapd.supervisor import process, readiness
from swapd.supervisor.fleet import Fleet
from swapd.supervisor.generation import GenerationRecord, WorkerRecord
from swapd.supervisor.journal import PatchRecord
from swapd.supervisor.lifecycle import FINAL, GenState, SlotState
from swapd.supervisor.listeners import Listeners

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


@dataclass(frozen=True)
class Owned:
    """What the supervisor owns besides the fleet and its listeners."""

    config: Config
    overrides: dict[str, Any]
    control_fd: int
    started: float
    swaps: dict[str, int]
    last_swap: dict[str, Any] | None


def capture(fleet: Fleet, listeners: Listeners, owned: Owned, reply_fd: int | None
            ) -> Captured:
    """Describe everything the supervisor owns, and list the fds that must survive exec."""
    fds: list[int] = []

    def keep(fd: int) -> int:
        fds.append(fd)
        return fd

    gens = []
    for gen in fleet.generations.values():
        if gen.state in FINAL:
            continue
        workers: list[dict[str, Any] | None] = []
        for w in gen.workers:
            if w is None or w.child.status is not None or w.child.pidfd < 0:
                workers.append(None if w is None else {"slot": w.slot, "dead": True,
                                                       "state": w.state.value})
                continue
            pipes = w.pipe_fds()
            probe = readiness.probing(w)
            workers.append({
                "slot": w.slot, "role": w.role, "pid": w.pid, "pidfd": keep(w.child.pidfd),
                "channel_fd": keep(pipes[0]) if pipes[0] is not None else None,
                "notify_fd": keep(pipes[1]) if pipes[1] is not None else None,
                "output_fd": keep(pipes[2]) if pipes[2] is not None else None,
                "state": w.state.value, "started": w.started, "ready_at": w.ready_at,
                "hello": w.hello, "status": w.status_text, "tail": list(w.tail),
                "ready_info": w.ready.result() if w.ready.done() else None,
                "probe_fd": keep(probe.fileno()) if probe is not None else None,
            })
        gens.append({
            "id": gen.id, "state": gen.state.value, "config": to_overrides(gen.config),
            "config_file": gen.config.config_file, "created": gen.created,
            "committed": gen.committed, "restarts": gen.restarts,
            "drain_deadline": fleet.drain_deadlines.get(gen.id), "workers": workers,
            "release": gen.release, "root": gen.root,
        })
    state = {
        "format": FORMAT,
        "version": __version__,
        "config": to_overrides(owned.config),
        "config_file": owned.config.config_file,
        "overrides": owned.overrides,
        "control_fd": keep(owned.control_fd),
        "reply_fd": keep(reply_fd) if reply_fd is not None else None,
        "started": owned.started,
        "next_gen": fleet.next_gen,
        "active": fleet.active.id if fleet.active else None,
        "swaps": owned.swaps,
        "last_swap": owned.last_swap,
        "crashes": {str(k): list(v) for k, v in fleet.crashes.items()},
        "listeners": [{"name": lis.name, "address": str(lis.address),
                       "fd": keep(lis.sock.fileno()), "source": lis.source}
                      for lis in listeners],
        "generations": gens,
        "journal": fleet.journal.state(),
    }
    return Captured(state, fds)


# -- the new image's side: the state, parsed and checked once -----------------------------


@dataclass(frozen=True)
class ListenerRecord:
    name: str
    address: Address
    fd: int
    source: str


@dataclass(frozen=True)
class State:
    version: str
    config: Config
    overrides: dict[str, Any]
    control_fd: int
    reply_fd: int | None
    started: float
    next_gen: int
    active: int | None
    swaps: dict[str, int]
    last_swap: dict[str, Any] | None
    crashes: dict[int, list[float]]
    listeners: list[ListenerRecord]
    generations: list[GenerationRecord]
    journal: list[PatchRecord]
    ops: dict[str, Any]  # for the history: who asked for this re-exec, and when


def parse(state: dict[str, Any]) -> State:
    """Every value the new image needs, typed, or ReexecError naming what is wrong.

    The pre-flight runs exactly this on the state (in the new code), so a state the new
    code cannot take over fails there, before the exec, not after it."""
    try:
        return State(
            version=_get(state, "version", str),
            config=config_of(_get(state, "config", dict), state.get("config_file")),
            overrides=_get(state, "overrides", dict),
            control_fd=_get(state, "control_fd", int),
            reply_fd=_get(state, "reply_fd", int, optional=True),
            started=float(_get(state, "started", (int, float))),
            next_gen=_get(state, "next_gen", int),
            active=_get(state, "active", int, optional=True),
            swaps=_get(state, "swaps", dict),
            last_swap=_get(state, "last_swap", dict, optional=True),
            crashes={int(k): [float(t) for t in v]
                     for k, v in _get(state, "crashes", dict).items()},
            listeners=[ListenerRecord(_get(i, "name", str),
                                      parse_address(_get(i, "address", str)),
                                      _get(i, "fd", int), _get(i, "source", str))
                       for i in _get(state, "listeners", list)],
            generations=[_generation(g) for g in _get(state, "generations", list)],
            journal=[PatchRecord(**r) for r in state.get("journal", [])],
            ops=_get(state, "ops", dict, optional=True) or {},
        )
    except ReexecError:
        raise
    except (AddressError, ConfigError, TypeError, ValueError, AttributeError) as e:
        raise ReexecError(f"re-exec state: {type(e).__name__}: {e}") from e


def _generation(g: dict[str, Any]) -> GenerationRecord:
    workers: list[WorkerRecord | None] = []
    for w in _get(g, "workers", list):
        if w is None or w.get("dead"):
            workers.append(None)
            continue
        workers.append(WorkerRecord(
            slot=_get(w, "slot", int), role=_get(w, "role", str), pid=_get(w, "pid", int),
            pidfd=_get(w, "pidfd", int),
            channel_fd=_get(w, "channel_fd", int, optional=True),
            notify_fd=_get(w, "notify_fd", int, optional=True),
            output_fd=_get(w, "output_fd", int, optional=True),
            state=SlotState(_get(w, "state", str)),
            started=float(_get(w, "started", (int, float))),
            ready_at=_get(w, "ready_at", (int, float), optional=True),
            hello=_get(w, "hello", dict, optional=True),
            status=str(w.get("status", "")),
            tail=[str(line) for line in w.get("tail", [])],
            ready_info=_get(w, "ready_info", dict, optional=True),
            probe_fd=_get(w, "probe_fd", int, optional=True),
        ))
    return GenerationRecord(
        id=_get(g, "id", int), state=GenState(_get(g, "state", str)),
        config=config_of(_get(g, "config", dict), g.get("config_file")),
        created=float(_get(g, "created", (int, float))),
        committed=_get(g, "committed", (int, float), optional=True),
        restarts=[int(n) for n in _get(g, "restarts", list)],
        drain_deadline=_get(g, "drain_deadline", (int, float), optional=True),
        workers=workers,
        release=_get(g, "release", str, optional=True) or "",
        root=_get(g, "root", str, optional=True),
    )


def _get(obj: Any, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise ReexecError(f"re-exec state: an entry is a {type(obj).__name__}, not an object")
    if key not in obj:
        if optional:
            return None
        raise ReexecError(f"re-exec state: an entry without {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ReexecError(f"re-exec state: {key!r} is {value!r}, of the wrong type")
    return value


def write_state(state: dict[str, Any]) -> int:
    data = json.dumps(state).encode()  # first: a state that does not serialise leaks no fd
    fd = os.memfd_create("swapd-reexec-state", os.MFD_ALLOW_SEALING)  # inheritable on purpose
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
    """The pre-flight in the new code: the state must parse (the caller, `swapd
    _reexec-check`, has imported all of swapd first: an import error stops the re-exec)."""
    parse(read_state(fd))


def config_of(data: dict[str, Any], config_file: str | None) -> Config:
    return from_overrides(data, config_file)


def check_state(state: dict[str, Any]) -> None:
    """The pre-flight on a state of this supervisor (blocking: run it off the event loop)."""
    fd = write_state(state)
    try:
        preflight(fd)
    finally:
        os.close(fd)


def preflight(state_fd: int) -> None:
    """Run the new code on the state before committing to the exec."""
    argv = [sys.executable, "-P", "-m", "swapd", "_reexec-check", str(state_fd)]
    try:
        with process.foreign_child():  # its exit status is subprocess's to collect
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
    """Exec the new image. Returns only if execve failed (everything restored).

    No pre-flight here: `check_state` ran it (off the loop) on an earlier capture, and
    `captured` must be taken right before this call, with no await in between, so that
    it describes exactly what the supervisor owns at the exec."""
    state_fd = write_state(captured.state)
    try:
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
