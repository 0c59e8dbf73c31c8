"""Readiness the supervisor observes from outside a worker: probes, and why a worker is late.

`readiness = "probe"` is for servers that cannot say READY=1. The catch is that every
generation shares the public listeners, so a probe sent there would be answered by the old
workers. Each worker therefore gets a listener of its own: a loopback socket swapd binds
(127.0.0.1, a port from the kernel) and passes after the configured ones, named
`swapd-probe` in LISTEN_FDNAMES (also in $SWAPD_PROBE_FD and $SWAPD_PROBE_ADDR). Servers
that serve every LISTEN_FDS socket (gunicorn, swapd's launchers) need nothing more; others
are told to serve that fd too. Only that worker accepts on it, so a probe that passes there
has reached the new worker:

    http:/PATH   connect, send one request, read the status line:
                   GET PATH HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nUser-Agent: swapd-probe\r\n
                   Connection: close\r\n\r\n          ->  HTTP/1.x NNN ...   (2xx, 3xx: ready)
                 The request waits in the socket's backlog until the worker accepts, so a
                 probe made before the server listens is answered as soon as it does.
    tcp          connect, then watch the probe listener's accept queue (TCP_INFO on
                 swapd's own copy: tcpi_unacked is the queue length of a listener); ready
                 when the worker has taken the connection. No byte is sent: any protocol.

Each attempt has its own deadline (`timeouts.probe`); a failed attempt is retried after
PROBE_RETRY, a timed-out one at once (the previous connection still waits in the backlog),
until the worker is ready, exits, or `ready_timeout` passes. Nothing the worker sends is
trusted beyond one bounded status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from swapd.config import Config


class WorkerProcess(Protocol):
    """What readiness needs of a worker (generation.WorkerProcess; a Protocol because
    generation imports this module)."""

    @property
    def tag(self) -> str: ...

    ready: asyncio.Future[dict[str, Any]]
    exited: asyncio.Future[Any]
    ready_via: str | None
    status_text: str
    tail: deque[str]

    @property
    def speaks_channel(self) -> bool: ...

    def mark_ready(self, info: dict[str, Any]) -> None: ...

log = logging.getLogger("swapd")

PROBE_LISTENER = "swapd-probe"
PROBE_RETRY = 0.1  # seconds between two probe attempts after a failed one
_TCP_POLL = 0.01  # seconds between two looks at the accept queue (tcp probe)
_STATUS_LINE_MAX = 4096
_BACKLOG = 16
_STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: |\r\n)")
_TCPI_UNACKED = struct.Struct("8xIIIII")  # state..options (8 bytes), rto, ato, mss x2, unacked


@dataclass
class Probe:
    """One worker's probe: its private listener and what the last attempt saw."""

    sock: socket.socket
    spec: str
    attempt_timeout: float
    last: str = "no attempt yet"
    attempts: int = 0
    task: asyncio.Task[None] | None = None
    address: str = field(init=False)  # kept: the socket is closed once the probe is over

    def __post_init__(self) -> None:
        host, port = self.sock.getsockname()[:2]
        self.address = f"{host}:{port}"

    def describe(self) -> str:
        if self.spec == "tcp":
            what = "the worker to accept a connection"
        else:
            what = f"GET {self.spec[len('http:'):]} to answer 2xx or 3xx"
        return (f"{what} on its private probe socket {self.address} (LISTEN_FDNAMES "
                f"{PROBE_LISTENER}; readiness=probe)")


_probes: WeakKeyDictionary[WorkerProcess, Probe] = WeakKeyDictionary()


def open_probe(config: Config) -> socket.socket | None:
    """The private listener of a worker about to be spawned; None unless readiness=probe."""
    if config.readiness != "probe":
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def probe_env(sock: socket.socket, fd_number: int) -> dict[str, str]:
    host, port = sock.getsockname()[:2]
    return {"SWAPD_PROBE_FD": str(fd_number), "SWAPD_PROBE_ADDR": f"{host}:{port}"}


def start_probe(worker: WorkerProcess, config: Config, sock: socket.socket,
                bound: float | None = None) -> None:
    """Probe `worker` until it is ready, exits or `bound` (`ready_timeout`) passes; owns
    `sock`. A re-exec'd supervisor resumes a probe with what is left of the bound."""
    assert config.probe is not None
    probe = Probe(sock, config.probe, config.timeouts.probe)
    worker.ready_via = "probe"  # a READY=1 (gunicorn's arbiter sends one early) must not win
    _probes[worker] = probe
    probe.task = asyncio.ensure_future(
        _run(worker, probe, config.timeouts.ready if bound is None else bound))


def probing(worker: WorkerProcess) -> socket.socket | None:
    """The private listener of a probe still running (for a re-exec to carry over)."""
    probe = _probes.get(worker)
    if probe is None or probe.task is None or probe.task.done():
        return None
    return probe.sock


async def _run(worker: WorkerProcess, probe: Probe, bound: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    try:
        while not worker.ready.done() and not worker.exited.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            probe.attempts += 1
            attempt = asyncio.ensure_future(_attempt(probe))
            waiting: set[asyncio.Future[Any]] = {attempt, worker.exited}
            done, _ = await asyncio.wait(waiting,
                                         timeout=min(probe.attempt_timeout, remaining),
                                         return_when=asyncio.FIRST_COMPLETED)
            if attempt not in done:
                attempt.cancel()
                with contextlib.suppress(BaseException):
                    await attempt
                if not worker.exited.done():
                    probe.last = f"no answer within {probe.attempt_timeout:g}s (probe timeout)"
                continue
            ok, probe.last = attempt.result()
            if ok:
                log.debug("event=probe.passed %s attempts=%d", worker.tag, probe.attempts)
                worker.mark_ready({"standby": False, "via": "probe"})
                return
            await asyncio.wait({worker.exited}, timeout=PROBE_RETRY)
    finally:
        probe.sock.close()


async def _attempt(probe: Probe) -> tuple[bool, str]:
    host, _, port = probe.address.rpartition(":")
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=_STATUS_LINE_MAX)
    except OSError as e:
        return False, f"connect failed: {e.strerror or e}"
    try:
        if probe.spec == "tcp":
            return await _accepted(probe.sock)
        path = probe.spec[len("http:"):]
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: swapd-probe"
                     f"\r\nConnection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as e:
            return False, ("connection closed before an answer" if not e.partial
                           else f"answer cut short: {_show(e.partial)}")
        except asyncio.LimitOverrunError:
            return False, f"status line longer than {_STATUS_LINE_MAX} bytes"
        m = _STATUS_RE.match(line)
        if m is None:
            return False, f"not an HTTP/1.x status line: {_show(line)}"
        code = int(m.group(1))
        return 200 <= code < 400, f"GET {path} answered {code}"
    except OSError as e:
        return False, f"connection failed: {e.strerror or e}"
    finally:
        writer.close()


async def _accepted(listener: socket.socket) -> tuple[bool, str]:
    """Wait until the accept queue of `listener` is empty: the worker took our connection.

    On loopback the connection is queued before connect() returns, so an empty queue seen
    after it means accepted, not yet to arrive. Polled: the kernel has no event for it.
    """
    while True:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED.size)
        if _TCPI_UNACKED.unpack(info[:_TCPI_UNACKED.size])[4] == 0:
            return True, "connection accepted"
        await asyncio.sleep(_TCP_POLL)


def _show(data: bytes) -> str:
    return repr(data[:80].decode("latin-1"))


def waiting_for(worker: WorkerProcess, config: Config) -> str:
    """What readiness swapd waits for from `worker`, and what it saw so far: one line."""
    probe = _probes.get(worker)
    if probe is not None:
        return (f"waiting for {probe.describe()}; {probe.attempts} attempt(s), "
                f"last: {probe.last}")
    if config.readiness == "exec":
        return "readiness=exec: ready once exec'd"
    what = "READY=1 on its NOTIFY_SOCKET or `ready` on the swapd channel (readiness=notify)"
    if worker.speaks_channel:
        seen = "it opened the channel (swapd.worker) but has not called ready()"
    elif worker.status_text:
        seen = f"it sent STATUS={worker.status_text!r} but not READY=1"
    else:
        seen = ("it sent nothing: a server that never sends READY=1 (uvicorn, hypercorn, "
                "aiohttp) needs `python -m swapd.servers.NAME` or --readiness probe, see "
                "docs/servers.md")
    return f"waiting for {what}; {seen}"


LAST_WORDS_MAX = 200  # characters of a worker's last output line in a failure reason
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # colours and cursor moves (CSI)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def last_words(worker: WorkerProcess) -> str | None:
    """The last non-blank line `worker` printed, as one bounded line of plain text (None:
    it printed nothing, or its output is not captured): what a one-line failure reason
    needs to say why (`RuntimeError: db url missing`)."""
    for line in reversed(worker.tail):
        text = " ".join(_CONTROL.sub(" ", _ESCAPES.sub("", line)).split())
        if text:
            if len(text) > LAST_WORDS_MAX:
                text = text[:LAST_WORDS_MAX - 1] + "…"
            return text
    return None


def exited_reason(worker: WorkerProcess, when: str) -> str:
    """`gen=2 worker=0 pid=81 exited with status 1 before it was ready: <its last words>`."""
    reason = f"{worker.tag} {worker.exited.result()} {when}"
    last = last_words(worker)
    return f"{reason}: {last}" if last is not None else reason


def not_ready_reason(worker: WorkerProcess, config: Config, timeout: float) -> str:
    """The failure reason when `ready_timeout` passes: what was awaited, what was printed."""
    last = last_words(worker)
    printed = f"last output: {last!r}" if last is not None else "it printed nothing"
    return (f"{worker.tag} not ready within {timeout:g}s (ready_timeout): "
            f"{waiting_for(worker, config)}; {printed}")

