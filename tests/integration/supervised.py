"""Run a real `swapd run` for a test and talk to it like an operator would.

Synchronisation is on events only: readiness arrives as READY=1 on a notify
socket the test binds (swapd's systemd integration), log lines arrive on the
supervisor's stderr pipe, and control requests return when the supervisor has
answered. Every wait has a deadline. Teardown ends the supervisor and every
worker pid it ever reported, by pid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from swapd.control import Client

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SWAPD = [PY, "-P", "-m", "swapd"]  # -P: the installed swapd (or $PYTHONPATH's), not cwd's
HELLO = [PY, str(ROOT / "examples" / "hello.py")]
MISBEHAVE = [PY, str(ROOT / "tests" / "apps" / "misbehave.py")]


class NotifyListener:
    """A fake service manager: collects sd_notify datagrams from the supervisor."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: queue.Queue[dict[str, str]] = queue.Queue()
        self.seen: list[dict[str, str]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.put(fields)

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0
                 ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {key}={value or '*'} notification within {timeout}s; "
                                   f"seen {self.seen}")
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()


class Supervised:
    """One `swapd run` process plus helpers."""

    def __init__(self, tmp_path: Path, command: Sequence[str], *, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, binds: Sequence[str] = ("http=127.0.0.1:0",),
                 control: str | None = None, wrapper: Sequence[str] = ()) -> None:
        self.tmp = tmp_path
        self.control = control or str(tmp_path / "swapd.sock")
        self.notify = NotifyListener(tmp_path)
        # `wrapper` (e.g. unshare into a pid namespace) runs the supervisor; its worker pids
        # are then the namespace's and are not recorded (the namespace dies with its PID 1).
        self.own_pids = not wrapper
        self.argv = [*wrapper, *SWAPD, "run", "--control", self.control,
                     *[f"--bind={b}" for b in binds], *args, "--", *command]
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.env.pop("SWAPD_CONTROL", None)
        self.proc: subprocess.Popen[str] | None = None
        self.log_lines: list[str] = []
        self._log_cond = threading.Condition()
        self.worker_pids: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------

    def launch(self, read_log: bool = True) -> Supervised:
        """Start the process; `start` also waits until it is ready. `read_log=False`: its
        stderr is a pipe nobody reads until `read_log()` (a stalled log sink)."""
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=str(ROOT))
        self._log_thread: threading.Thread | None = None
        if read_log:
            self.read_log()
        return self

    def read_log(self) -> None:
        self._log_thread = threading.Thread(target=self._read_log, daemon=True)
        self._log_thread.start()

    def start(self, timeout: float = 30.0) -> Supervised:
        if self.proc is None:
            self.launch()
        try:
            self.notify.wait_for("READY", "1", timeout)
        except TimeoutError:
            raise AssertionError(f"supervisor not ready; log:\n{self.log_text()}") from None
        self.status()  # records worker pids
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._log_cond:
                self.log_lines.append(line.rstrip("\n"))
                self._log_cond.notify_all()
        with self._log_cond:
            self.log_lines.append("<EOF>")
            self._log_cond.notify_all()

    def log_text(self) -> str:
        with self._log_cond:
            return "\n".join(self.log_lines)

    def wait_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """Wait for a supervisor log line matching `pattern` (from line index `start`)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._log_cond:
            while True:
                for line in self.log_lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.log_lines and self.log_lines[-1] == "<EOF>"):
                    raise AssertionError(f"no log line matching {pattern!r}; log:\n"
                                         + "\n".join(self.log_lines))
                self._log_cond.wait(remaining)

    def log_mark(self) -> int:
        with self._log_cond:
            return len(self.log_lines)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Teardown: TERM, bounded wait, KILL; then every worker pid ever seen, by pid."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.notify.close()
        if self.proc is not None and self.proc.stderr is not None:
            if self._log_thread is not None:
                self._log_thread.join(10)
            self.proc.stderr.close()

    # -- control ---------------------------------------------------------------------

    def call(self, cmd: str, **args: Any) -> list[dict[str, Any]]:
        """All messages of one control request (progress..., result)."""
        return list(Client(self.control, timeout=120).call(cmd, args))

    def result(self, cmd: str, **args: Any) -> dict[str, Any]:
        return self.call(cmd, **args)[-1]

    def status(self) -> dict[str, Any]:
        res = self.result("status")
        assert res["ok"], res
        data: dict[str, Any] = res["data"]
        for g in data["generations"]:
            for w in g["workers"]:
                if self.own_pids:
                    self.worker_pids.add(w["pid"])
        return data

    def cli(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SWAPD, *argv, "--control", self.control], capture_output=True,
                              text=True, timeout=timeout, env=self.env, cwd=str(ROOT))

    def cli_background(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*SWAPD, *argv, "--control", self.control], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=str(ROOT))

    def upgrade(self) -> dict[str, Any]:
        res = self.result("upgrade")
        self.status()
        return res

    # -- facts -----------------------------------------------------------------------

    def address(self, name: str = "http") -> tuple[str, int]:
        for lis in self.status()["listeners"]:
            if lis["name"] == name:
                host, _, port = lis["address"].rpartition(":")
                return host.strip("[]"), int(port)
        raise KeyError(name)

    def active_pids(self) -> list[int]:
        st = self.status()
        gen = next(g for g in st["generations"] if g["id"] == st["active"])
        return [w["pid"] for w in gen["workers"]]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def http_get(address: tuple[str, int], path: str = "/", timeout: float = 10) -> tuple[int, str]:
    """One request on a fresh connection (stdlib client)."""
    import http.client

    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def write_behavior(path: Path, **behavior: Any) -> None:
    path.write_text(json.dumps(behavior))


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait for a process (not our child) to vanish, via pidfd; True if it did."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def children_of(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def zombies_of(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()
                if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def supervised(tmp_path: Path, command: Sequence[str], **kw: Any) -> Iterator[Supervised]:
    s = Supervised(tmp_path, command, **kw)
    try:
        yield s.start()
    finally:
        s.stop()


def open_gate(fifo: str, timeout: float) -> bool:
    """Let a worker waiting at `fifo` through; False if none came to it within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:  # ENXIO: nobody reads it (yet)
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
            continue
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
        return True
