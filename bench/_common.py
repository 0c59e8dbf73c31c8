"""Helpers shared by the benchmark scripts in bench/ (not part of swapd, not imported by it).

    NotifySocket     an sd_notify datagram socket the benchmark binds and hands to a service
                     as $NOTIFY_SOCKET, so "ready" is an event (READY=1), never a sleep
    wait_or_kill     wait for one process with a deadline, SIGKILL it after
    ProcessGroup     the processes a benchmark started, ended by PID (SIGTERM, a deadline,
                     then SIGKILL), never by name
    cpu_seconds      CPU time of one process, from /proc/<pid>/schedstat (ns) or stat
    CpuMeter         CPU time used over an interval by this process tree and by everything
                     else on the machine (other people's jobs disturb a benchmark: say so)
    wait_quiet       wait, with a deadline, until everything else leaves the CPUs alone
    listening_port   the TCP port a process listens on (it bound port 0 itself)
    machine_info     uname, nproc, CPU model, Python, load average: the header of every report
    md_table         a Markdown pipe table with aligned columns, for stdout and docs/ alike

Every wait here has a deadline and raises BenchError when it passes.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psutil

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
sys.path.insert(0, str(ROOT))
from swapd.control import Client, ClientError  # noqa: E402  (swapd from this checkout)

# What our own environment may carry from a service manager or a supervisor: never passed on.
FOREIGN_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
               "SWAPD_CHANNEL_FD", "SWAPD_BIND", "SWAPD_CONTROL", "WATCHDOG_USEC")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not measure what it set out to (a service never ready, ...)."""


class NotifySocket:
    """An AF_UNIX datagram socket speaking the receiving end of sd_notify.

    The kernel queues at most net.unix.max_dgram_qlen (often 10) datagrams; a sender that
    finds the queue full blocks. Call ``drain()`` after each operation that makes the service
    notify (swapd sends RELOADING=1 and READY=1 per swap), so it never waits on us.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(str(path))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (monotonic time, fields)

    def _receive(self) -> dict[str, str] | None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        fields = dict(
            line.partition("=")[::2] for line in data.decode("utf-8", "replace").splitlines()
        )
        self.messages.append((time.monotonic(), fields))
        return fields

    def drain(self) -> None:
        while self._receive() is not None:
            pass

    def wait_ready(
        self, count: int, timeout: float, procs: Sequence[subprocess.Popen[bytes]], what: str
    ) -> None:
        """Wait for ``count`` READY=1 datagrams; BenchError if one of ``procs`` exits first."""
        deadline = time.monotonic() + timeout
        pidfds = {os.pidfd_open(p.pid): p for p in procs}
        try:
            got = 0
            while got < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{what}: {got} of {count} READY=1 within {timeout:g} s")
                readable, _, _ = select.select([self.sock.fileno(), *pidfds], [], [], remaining)
                for fd in readable:
                    if fd == self.sock.fileno():
                        while (fields := self._receive()) is not None:
                            got += fields.get("READY") == "1"
                    else:
                        proc = pidfds[fd]
                        raise BenchError(
                            f"{what}: pid {proc.pid} exited ({proc.wait(timeout)}) before ready"
                        )
        finally:
            for fd in pidfds:
                os.close(fd)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class ProcessGroup:
    """Processes started by a benchmark (and their descendants), ended by PID.

    Descendants are remembered as psutil.Process objects, which notice PID reuse, so a late
    kill can never hit a stranger that inherited the number.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._known: dict[int, psutil.Process] = {}

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def remember_descendants(self) -> None:
        """Note every live descendant of our processes (call before asking them to stop)."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        self._known.setdefault(child.pid, child)

    def end(self, grace: float = 10.0) -> list[str]:
        """SIGTERM whatever still runs, wait up to ``grace`` s, SIGKILL the rest.

        Returns one line per process that had to be signalled (empty when all had exited).
        """
        self.remember_descendants()
        notes: list[str] = []
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            notes.append(f"pid {proc.pid} still running: SIGTERM")
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                notes.append(f"pid {proc.pid} ignored SIGTERM for {grace:g} s: SIGKILL")
                proc.kill()
                proc.wait(5.0)
        stray = [c for c in self._known.values() if _alive(c)]
        for child in stray:
            notes.append(f"descendant pid {child.pid} outlived its parent: SIGKILL")
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(stray, timeout=5.0)
        return notes


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """Wait up to ``timeout`` s for a process to exit, then SIGKILL it. None: it was killed."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)
        return None


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) one process has used, not counting its children.

    /proc/<pid>/schedstat counts nanoseconds; /proc/<pid>/stat (the fallback, for kernels
    without schedstats) counts clock ticks of 10 ms, too coarse for an idle supervisor.
    """
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (FileNotFoundError, IndexError, ValueError):
        pass
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


class CpuUse(NamedTuple):
    wall_s: float
    ours_s: float  # this process and its reaped descendants
    other_s: float  # user + system time of the machine minus ours (never below 0)
    steal_s: float  # taken by the hypervisor from this VM


class CpuMeter:
    """Measures CPU use from construction to ``stop()``.

    Descendants count once they have been reaped (RUSAGE_CHILDREN), so call ``stop()`` after
    every process of the measured interval has been waited for.
    """

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            cpu = f.readline().split()
        user, nice, system, steal = (int(cpu[i]) for i in (1, 2, 3, 8))
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return (user + nice + system) / _CLK_TCK, steal / _CLK_TCK, ours

    def stop(self) -> CpuUse:
        busy, steal, ours = (b - a for a, b in zip(self._start, self._sample(), strict=True))
        return CpuUse(time.monotonic() - self._wall, ours, max(0.0, busy - ours), steal)


def wait_quiet(limit: float, timeout: float, sample: float = 2.0) -> float:
    """Wait until other processes use at most ``limit`` of one core over ``sample`` seconds.

    Gives up after ``timeout`` s; returns the last share measured (0.5 = half a core).
    """
    deadline = time.monotonic() + timeout
    while True:
        meter = CpuMeter()
        time.sleep(sample)  # the measurement interval itself, not a wait for an event
        use = meter.stop()
        share = use.other_s / use.wall_s
        if share <= limit or time.monotonic() >= deadline:
            return share


def listening_port(pid: int, timeout: float = 5.0) -> int:
    """The TCP port the process listens on, once it does (it bound port 0 itself)."""
    deadline = time.monotonic() + timeout
    proc = psutil.Process(pid)
    while True:
        ports = {c.laddr.port for c in proc.net_connections("tcp") if c.status == "LISTEN"}
        if len(ports) == 1:
            return int(ports.pop())
        if len(ports) > 1:
            raise BenchError(f"pid {pid} listens on several ports: {sorted(ports)}")
        if time.monotonic() > deadline:
            raise BenchError(f"pid {pid} listens on no TCP port after {timeout:g} s")
        # Only reached when called before the process was ready, which callers avoid.
        time.sleep(0.01)


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    load1, load5, load15 = os.getloadavg()
    return {
        "uname": " ".join(os.uname()),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "loadavg": f"{load1:.2f} {load5:.2f} {load15:.2f}",
    }


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown pipe table, columns padded so it also reads as plain text."""
    text = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(text[0]), rule, *(line(r) for r in text[1:])])


def median(values: Sequence[float]) -> float:
    """Median; of two values their midpoint (the method's median of two runs)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of nothing")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(extra)
    return env


class SwapdProcess:
    """One `swapd run` in `workdir`, ready-gated on a notify socket, driven through its
    control socket; its log goes to `workdir/swapd.log`."""

    def __init__(self, workdir: Path, run_args: Sequence[str], *, ready_timeout: float,
                 stop_timeout: float) -> None:
        self.workdir = workdir
        self.control = str(workdir / "control.sock")
        self.log_path = workdir / "swapd.log"
        self.argv = [PYTHON, "-P", "-m", "swapd", "run", "--control", self.control, *run_args]
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.group = ProcessGroup()
        self.notify: NotifySocket | None = None
        self.sup: subprocess.Popen[bytes] | None = None
        self.address = ("127.0.0.1", 0)  # the first listener's, once started

    def start(self) -> None:
        self.notify = NotifySocket(self.workdir / "notify")
        with open(self.log_path, "wb") as log:
            self.sup = self.group.spawn(
                self.argv, cwd=ROOT, env=clean_env(NOTIFY_SOCKET=str(self.notify.path)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.notify.wait_ready(1, self.ready_timeout, [self.sup], "swapd run")
        status = self.call("status", 10.0)["data"]
        host, _, port = status["listeners"][0]["address"].rpartition(":")
        self.address = (host.strip("[]"), int(port))

    def call(self, cmd: str, timeout: float) -> dict[str, Any]:
        """One control request; returns the result line with the progress lines under
        `progress` (the result of a failed upgrade too: it says why)."""
        progress: list[dict[str, Any]] = []
        try:
            for msg in Client(self.control, timeout=timeout).call(cmd, {}):
                if msg.get("type") == "result":
                    msg["progress"] = progress
                    return msg
                progress.append(msg)
        except ClientError as e:
            raise BenchError(f"swapd {cmd}: {e}") from e
        raise BenchError(f"swapd {cmd}: no result line")

    def log_problems(self) -> list[str]:
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]

    def close(self) -> list[str]:
        notes: list[str] = []
        try:
            if self.sup is not None and self.sup.poll() is None:
                self.group.remember_descendants()
                try:
                    self.call("stop", self.stop_timeout)
                    self.sup.wait(self.stop_timeout)
                except (BenchError, subprocess.TimeoutExpired) as e:
                    notes.append(f"swapd stop: {e}")
        finally:
            notes += self.group.end()
            if self.notify is not None:
                self.notify.close()
        return notes
