"""Helpers for ``test_swapd_unit.py``: the real swapd under the shipped units on a booted systemd.

The shipped ``systemd/swapd@.service`` and ``swapd@.socket`` are installed byte for byte; what the
tests add is kept out of them, so the units under test are the ones users get::

    inside the namespace                         what it is
    /etc/systemd/system/swapd@.service           the shipped file, unchanged
    /etc/systemd/system/swapd@.socket            the shipped file, unchanged
    /usr/local/bin/swapd -> <venv>/bin/swapd     the path the units name, pointing at the checkout
    /etc/swapd/<instance>.toml                   one configuration per test (ports, app, mode)
    /etc/systemd/system/swapd@<i>.service.d/     test-only drop-ins, declared by the test module

Programs inside the namespace are this module run as a script (``python -m
tests.systemd.swapd_units``), so that they are ordinary, linted code:

    load  --connect HOST:PORT ...   a bounded swapd.loadgen run, steered line by line:
          stdout  {"pid": <pid inside>, "started": true}      after the first successes
          stdin   wait <count> <seconds>  ->  {"ok": true} | {"ok": false, "error": "..."}
                  begin <label> | end <label>  ->  {"ok": true}   (a window in the report)
                  stop                     ->  {"report": {...LoadReport.to_dict()...}}; exits
          EOF on stdin is a stop.
    http  --port P [--method M] [--path /p] [--times N]
          stdout  [[status, "body"], ...]  or  {"error": "<exception>"}  (exit 1)

:class:`InnerProcess` is the background variant of ``BootedSystemd.run``: a long-running command
inside the namespace with its stdin and stdout as pipes, bounded by ``timeout(1)`` inside (so it
is reaped there) and ended by its pid in :meth:`InnerProcess.close`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.systemd.harness import CHECKOUT, INNER_ENV, BootedSystemd, HarnessError, WaitTimeout

SHIPPED_DIR = CHECKOUT / "systemd"
SHIPPED_UNITS = ("swapd@.service", "swapd@.socket")
SHIPPED_EXE = "/usr/local/bin/swapd"
PYTHON = str(Path(sys.executable))
VENV_SWAPD = str(Path(sys.executable).with_name("swapd"))
HELLO = str(CHECKOUT / "examples" / "hello.py")
COUNTER = str(CHECKOUT / "examples" / "counter.py")
MISBEHAVE = str(CHECKOUT / "tests" / "apps" / "misbehave.py")
# What a program of this module needs inside: the checkout on sys.path (the venv has swapd).
PROGRAM_ENV = {"PYTHONPATH": str(CHECKOUT)}
_KILL_AFTER = 2  # seconds between timeout(1)'s SIGTERM and its SIGKILL


class InnerProcessError(HarnessError):
    """A background program inside the namespace failed, said something unexpected, or hung."""


def install_shipped_units(sd: BootedSystemd) -> None:
    """The shipped units, unchanged, and ``/usr/local/bin/swapd`` pointing at the venv's."""
    for name in SHIPPED_UNITS:
        sd.install_unit(name, (SHIPPED_DIR / name).read_text(), reload=False)
    bindir = sd.root / "usr/local/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / "swapd"
    if exe.exists() or exe.is_symlink():
        exe.unlink()  # only in the namespace's overlay: the host's /usr/local is the lower layer
    exe.symlink_to(VENV_SWAPD)
    (sd.root / "etc/swapd").mkdir(parents=True, exist_ok=True)
    sd.daemon_reload()


def toml(
    command: Sequence[str],
    *,
    workers: int = 2,
    mode: str = "stateless",
    bind: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeouts: Mapping[str, float] | None = None,
) -> str:
    """A swapd configuration file (``/etc/swapd/<instance>.toml``)."""
    lines = [f"command = {json.dumps(list(command))}", f"workers = {workers}",
             f'mode = "{mode}"']  # fmt: skip
    for table, values in (("bind", bind), ("env", env), ("timeouts", timeouts)):
        if values:
            lines.append(f"[{table}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Swapd:
    """One instance of the shipped template, ``swapd@<name>.service``, driven like an operator."""

    sd: BootedSystemd
    name: str

    @property
    def unit(self) -> str:
        return f"swapd@{self.name}.service"

    @property
    def socket_unit(self) -> str:
        return f"swapd@{self.name}.socket"

    @property
    def control(self) -> str:
        """The control socket the shipped ExecStart= names."""
        return f"/run/swapd/{self.name}/swapd.sock"

    def configure(self, text: str) -> None:
        (self.sd.root / "etc/swapd" / f"{self.name}.toml").write_text(text)

    def drop_in(self, file: str, text: str) -> None:
        directory = self.sd.root / "etc/systemd/system" / f"{self.unit}.d"
        directory.mkdir(exist_ok=True)
        (directory / file).write_text(text)

    # --- systemd's view ----------------------------------------------------------------------

    def show(self, *props: str) -> dict[str, str]:
        return self.sd.show(self.unit, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def unit_pids(self) -> set[int]:
        """The processes in the unit's cgroup now, as pids of the namespace (read inside it)."""
        group = self.show("ControlGroup")["ControlGroup"]
        procs = self.sd.run("cat", f"/sys/fs/cgroup{group}/cgroup.procs").stdout
        return {int(line) for line in procs.split()}

    def systemctl(self, verb: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sd.run("systemctl", verb, self.unit, check=check, timeout=60)

    def wait_for(self, timeout: float = 15.0, **expected: str) -> dict[str, str]:
        return self.sd.wait_for_unit(self.unit, timeout=timeout, **expected)

    def journal(self, lines: int = 400) -> str:
        return self.sd.journal(self.unit, lines=lines)

    def journal_shows(self, *texts: str, timeout: float = 10.0) -> str:
        """Wait until the unit's journal holds every one of ``texts``; return it.

        journald takes stream lines and PID 1's messages asynchronously: a line written just
        before the test looks may not be readable yet, so a positive check waits for it.
        """

        def shows() -> str | None:
            text = self.journal()
            return text if all(t in text for t in texts) else None

        try:
            return self.sd.wait_for(shows, timeout, f"{self.unit}'s journal to show {texts!r}",
                                    interval=0.1)  # fmt: skip
        except WaitTimeout as e:
            tail = "\n".join(self.journal().splitlines()[-80:])
            raise AssertionError(f"{e}; the journal's tail:\n{tail}") from None

    def stop(self) -> None:
        """Stop the service (and its socket unit), forget a failed state; for teardown."""
        self.sd.run("systemctl", "stop", self.socket_unit, self.unit, check=False, timeout=90)
        self.sd.run("systemctl", "reset-failed", self.unit, check=False)

    # --- swapd's view ------------------------------------------------------------------------

    def swapd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``swapd <args> --control <this instance's socket>`` inside the namespace."""
        return self.sd.run(SHIPPED_EXE, *args, "--control", self.control, check=check, timeout=60)

    def status(self) -> dict[str, Any]:
        """``swapd status --json``: the supervisor's own account (generations, listeners...)."""
        return result_of(self.swapd("status", "--json").stdout)

    def worker_pids(self) -> list[int]:
        status = self.status()
        active = next(g for g in status["generations"] if g["id"] == status["active"])
        return sorted(w["pid"] for w in active["workers"])

    def http(self, port: int, method: str = "GET", path: str = "/", times: int = 1
             ) -> list[tuple[int, str]]:  # fmt: skip
        """``times`` requests, one connection each, from inside the namespace."""
        done = self.sd.run(PYTHON, "-m", "tests.systemd.swapd_units", "http", "--port", str(port),
                           "--method", method, "--path", path, "--times", str(times),
                           check=False, env=PROGRAM_ENV)  # fmt: skip
        if done.returncode != 0:
            raise HarnessError(f"http {method} {path}: {done.stdout.strip()} {done.stderr[-2000:]}")
        return [(int(status), body) for status, body in json.loads(done.stdout)]

    def socket_inode(self, pid: int, fd: int) -> str:
        """``socket:[<inode>]``: the identity of the socket behind one fd of one process."""
        return self.sd.run("readlink", f"/proc/{pid}/fd/{fd}").stdout.strip()

    def environ(self, pid: int) -> dict[str, str]:
        """The environment ``pid`` was exec'd with (inside the namespace)."""
        raw = self.sd.run("cat", f"/proc/{pid}/environ").stdout
        return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)

    def http_listener(self, status: Mapping[str, Any]) -> dict[str, Any]:
        return next(lis for lis in status["listeners"] if lis["name"] == "http")


def result_of(stdout: str) -> dict[str, Any]:
    """The ``data`` of the result line of a ``swapd ... --json`` answer."""
    for line in reversed(stdout.splitlines()):
        msg = json.loads(line)
        if msg.get("type") == "result":
            if not msg.get("ok"):
                raise HarnessError(f"swapd answered with a failure: {msg}")
            data: dict[str, Any] = msg["data"]
            return data
    raise HarnessError(f"no result line in {stdout!r}")


def exec_argv(show_value: str) -> str:
    """The ``argv[]`` of an ``ExecStart=``/``ExecReload=`` property (drops the run-time fields)."""
    match = re.search(r"argv\[\]=([^;]*);", show_value)
    if not match:
        raise HarnessError(f"no argv[] in {show_value!r}")
    return match.group(1).strip()


# --- background programs -------------------------------------------------------------------------


class InnerProcess:
    """A program running inside the namespace in the background, talked to in JSON lines."""

    def __init__(self, sd: BootedSystemd, argv: Sequence[str], *, bound: float,
                 env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.sd = sd
        self.argv = list(argv)
        # timeout(1) inside bounds it even if this object is never closed; the pdeathsig takes
        # it down with nsenter if pytest dies.
        cmd = ["nsenter", "-t", str(sd.pid1), "-a", "setpriv", "--pdeathsig", "KILL", "--",
               "timeout", f"--kill-after={_KILL_AFTER}", f"{bound}s", *argv]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**INNER_ENV, **(env or {})},
        )
        self.inner_pid: int | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._lines.put),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr.append),
                             daemon=True),
        ]  # fmt: skip
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line)
        sink(None)

    def stderr(self) -> str:
        return "".join(line for line in self._stderr if line is not None)

    def expect(self, timeout: float) -> dict[str, Any]:
        """The next JSON line on the program's stdout."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise InnerProcessError(
                f"{self.argv[:4]}: no answer within {timeout}s\n{self.stderr()[-3000:]}"
            ) from None
        if line is None:
            self.proc.wait(timeout=10)
            raise InnerProcessError(
                f"{self.argv[:4]}: ended (exit {self.proc.returncode}) without answering\n"
                f"{self.stderr()[-3000:]}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, line: str, timeout: float) -> dict[str, Any]:
        self.send(line)
        return self.expect(timeout)

    def close(self, timeout: float = 15.0) -> None:
        """End it: EOF on stdin first (a clean stop), then SIGKILL by pid. Never leaves it."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if self.inner_pid is not None and self.sd.alive():
                self.sd.run("kill", "-KILL", str(self.inner_pid), check=False)
            try:
                self.proc.wait(timeout=_KILL_AFTER + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # nsenter; its pdeathsig'd child goes with it
                self.proc.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=5)


class InnerLoad(InnerProcess):
    """A bounded swapd.loadgen run inside the namespace, steered from the test.

    Started, it has already seen ``warmup`` successes. :meth:`stop` returns the LoadReport as a
    dict (``failed``, ``failures`` by outcome, ``windows``...).
    """

    def __init__(self, sd: BootedSystemd, port: int, *, kind: str = "http-get",
                 mode: str = "keepalive", clients: int = 8, timeout: float = 2.0,
                 duration: float = 60.0, warmup: int = 50) -> None:  # fmt: skip
        argv = [PYTHON, "-m", "tests.systemd.swapd_units", "load",
                "--connect", f"127.0.0.1:{port}", "--kind", kind, "--mode", mode,
                "--clients", str(clients), "--timeout", str(timeout),
                "--duration", str(duration), "--warmup", str(warmup)]  # fmt: skip
        super().__init__(sd, argv, bound=duration + 30, env=PROGRAM_ENV)
        try:
            hello = self.expect(timeout=20)
            if not hello.get("started"):
                raise InnerProcessError(f"the load did not start: {hello}")
            self.inner_pid = int(hello["pid"])
        except BaseException:
            self.close()
            raise

    def wait_successes(self, count: int, timeout: float = 20.0) -> None:
        """Block until ``count`` more requests succeeded: the service is serving (again)."""
        answer = self.ask(f"wait {count} {timeout}", timeout + 5)
        if not answer.get("ok"):
            raise InnerProcessError(f"load: {answer.get('error')}")

    @contextlib.contextmanager
    def window(self, label: str) -> Any:
        """A labelled window around an operation (reported per window)."""
        self.ask(f"begin {label}", 10)
        try:
            yield
        finally:
            self.ask(f"end {label}", 10)

    def stop(self) -> dict[str, Any]:
        try:
            answer = self.ask("stop", 30)
        finally:
            self.close()
        report: dict[str, Any] = answer["report"]
        return report


# --- the programs, run inside the namespace ------------------------------------------------------


def _load_main(args: argparse.Namespace) -> int:
    from swapd import loadgen

    requests = {"http-get": loadgen.http_get("/"), "http-post": loadgen.http_post("/incr")}
    load = loadgen.BackgroundLoad(
        loadgen.parse_target(args.connect), requests[args.kind], clients=args.clients,
        mode=args.mode, duration=args.duration, timeout=args.timeout,
    )  # fmt: skip

    def say(obj: Mapping[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    load.start()
    try:
        load.wait_for_successes(args.warmup, timeout=15)
        say({"pid": os.getpid(), "started": True})
        for line in sys.stdin:
            verb, _, rest = line.strip().partition(" ")
            if verb == "stop":
                break
            try:
                if verb == "wait":
                    count, timeout = rest.split()
                    load.wait_for_successes(int(count), float(timeout))
                elif verb == "begin":
                    load.begin(rest)
                elif verb == "end":
                    load.end(rest)
                else:
                    raise ValueError(f"unknown command {line!r}")
            except (loadgen.LoadError, ValueError) as e:
                say({"ok": False, "error": str(e)})
                continue
            say({"ok": True})
    finally:
        report = load.stop()
    say({"report": report.to_dict()})
    return 0


def _http_main(args: argparse.Namespace) -> int:
    import http.client

    answers: list[tuple[int, str]] = []
    try:
        for _ in range(args.times):
            conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=10)
            try:
                conn.request(args.method, args.path)
                response = conn.getresponse()
                answers.append((response.status, response.read().decode()))
            finally:
                conn.close()
    except OSError as e:
        print(json.dumps({"error": repr(e), "answered": len(answers)}))
        return 1
    print(json.dumps(answers))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.systemd.swapd_units")
    sub = parser.add_subparsers(dest="program", required=True)
    load = sub.add_parser("load")
    load.add_argument("--connect", required=True)
    load.add_argument("--kind", choices=["http-get", "http-post"], default="http-get")
    load.add_argument("--mode", choices=["keepalive", "close"], default="keepalive")
    load.add_argument("--clients", type=int, default=8)
    load.add_argument("--timeout", type=float, default=2.0)
    load.add_argument("--duration", type=float, default=60.0)
    load.add_argument("--warmup", type=int, default=50)
    http = sub.add_parser("http")
    http.add_argument("--port", type=int, required=True)
    http.add_argument("--method", default="GET")
    http.add_argument("--path", default="/")
    http.add_argument("--times", type=int, default=1)
    args = parser.parse_args(argv)
    return _load_main(args) if args.program == "load" else _http_main(args)


if __name__ == "__main__":
    sys.exit(main())
