"""Strays: processes that workers left behind, found, ended and reaped.

A worker is one process to the supervisor, but it may fork: a shell wrapper's helper, a
daemon, a pool. Whatever it leaves behind keeps its copies of the listening sockets (and
so the port) open: after a few upgrades and a stop, the next `swapd run` could not bind.
The supervisor ends them:

- **the worker's process group**, once the worker has exited. The members are read from
  /proc while the exited worker is not reaped yet (its zombie keeps the group id from
  being reused), each is held by a pidfd, sent SIGTERM (and SIGCONT, should it be
  stopped), and SIGKILL after `STRAY_GRACE`. At the drain deadline and at a fast stop the
  group gets SIGKILL with its worker (`Fleet`).
- **descendants that left the group** (setsid, a double fork). The supervisor is a child
  subreaper (or PID 1), so they become its children when their parent exits. Those whose
  environment names a generation (`SWAPD_GENERATION`, inherited from their worker) are
  ended once that generation is over; those without the mark (an environment cleared,
  or, as PID 1, a process that was never a worker's) are left alone until stop.
- **at stop**, every child that is no worker, after the workers are gone.

It also reaps every exited child that is no worker: on SIGCHLD it looks for zombie
children in /proc and reaps each with `waitpid(pid)`. Workers are never reaped here:
their pidfd path does it and reports their exit status; pids are checked against the
live workers first, and a child started outside the process seam (the re-exec
pre-flight) suspends reaping while it runs (`process.foreign_child`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from swapd.supervisor.process import Child, OsProcesses, ProcInfo, reaping_allowed

log = logging.getLogger("swapd")

STRAY_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for what a worker left behind


@dataclass
class Stray:
    child: Child
    origin: str
    gone: asyncio.Future[None]
    timer: asyncio.TimerHandle | None = None


@dataclass
class Strays:
    processes: OsProcesses
    is_worker: Callable[[int], bool]  # a pid of a live (unreaped) worker
    generation_over: Callable[[int], bool]  # that generation is exited, failed, or unknown
    ending: dict[int, Stray] = field(default_factory=dict)
    reaped: int = 0  # exited children that were no worker's, reaped (status shows it)
    _noted: set[int] = field(default_factory=set)  # children left alone for now, logged once
    _scan_pending: bool = False
    _loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def worker_gone(self, tag: str, pgid: int, grace: float = STRAY_GRACE) -> None:
        """The worker leading group `pgid` has exited and is not reaped yet: end its group."""
        for info in self._processes():
            if info.pgid == pgid and info.pid != pgid and not info.zombie:
                self._end(info, f"left in the process group of {tag}", grace)

    def on_sigchld(self) -> None:
        """A child exited or stopped: one scan per loop iteration, however many signals."""
        if not self._scan_pending and self._loop is not None:
            self._scan_pending = True
            self._loop.call_soon(self._scan_now)

    def _scan_now(self) -> None:
        self._scan_pending = False
        self.scan()

    def scan(self, *, final: bool = False, grace: float = STRAY_GRACE) -> None:
        """Reap exited children that are no worker's; end the children whose generation is
        over (with `final`, every child that is no worker)."""
        me = os.getpid()
        children = [p for p in self._processes()
                    if p.ppid == me and p.pid not in self.ending and not self.is_worker(p.pid)]
        self._noted &= {p.pid for p in children}
        for info in children:
            if info.zombie:
                self._reap(info)
                continue
            gen = self.processes.generation_of(info.pid)
            if final or (gen is not None and self.generation_over(gen)):
                why = "stop" if final and (gen is None or not self.generation_over(gen)) else (
                    f"generation {gen} is over")
                self._end(info, f"inherited from a worker ({why})", grace)
            elif info.pid not in self._noted:
                self._noted.add(info.pid)
                log.info("event=stray.found pid=%d gen=%s action=%r", info.pid,
                         gen if gen is not None else "-",
                         "ended with its generation" if gen is not None else "ended at stop")

    def _processes(self) -> list[ProcInfo]:
        # /proc cannot be read at our fd limit: what it would find waits for the next scan
        # (every exit and SIGCHLD makes one); the caller's own work must go on (a reap).
        try:
            return self.processes.processes()
        except OSError as e:
            log.warning("event=strays.scan_failed error=%r", e.strerror or str(e))
            return []

    def _reap(self, info: ProcInfo) -> None:
        if not reaping_allowed():
            return  # a foreign child may be among them; the next scan comes back
        status = self.processes.reap_orphan(info.pid)
        if status is not None:
            self.reaped += 1
            log.info("event=orphan.reaped pid=%d status=%r", info.pid, str(status))

    def _end(self, info: ProcInfo, origin: str, grace: float) -> None:
        assert self._loop is not None
        child = self.processes.open_pidfd(info)
        if child is None:
            return  # gone meanwhile
        stray = Stray(child, origin, self._loop.create_future())
        self.ending[info.pid] = stray
        self._loop.add_reader(child.pidfd, self._on_exit, stray)
        if grace <= 0:
            self._kill(stray)
            return
        log.warning("event=stray.term pid=%d origin=%r grace=%gs", info.pid, origin, grace)
        self.processes.send_signal(child, signal.SIGTERM)
        self.processes.send_signal(child, signal.SIGCONT)
        stray.timer = self._loop.call_later(grace, self._kill, stray)

    def hurry(self) -> None:
        """SIGKILL now what is being ended with a grace (a stop escalated to a fast one)."""
        for stray in list(self.ending.values()):
            if stray.timer is not None:
                stray.timer.cancel()
                self._kill(stray)

    def _kill(self, stray: Stray) -> None:
        stray.timer = None
        if self.processes.send_signal(stray.child, signal.SIGKILL):
            log.warning("event=stray.kill pid=%d origin=%r", stray.child.pid, stray.origin)

    def _on_exit(self, stray: Stray) -> None:
        assert self._loop is not None
        pid = stray.child.pid
        self._loop.remove_reader(stray.child.pidfd)
        if stray.timer is not None:
            stray.timer.cancel()
        # Ours to reap if it was reparented to us; a grandchild is its parent's business.
        status = self.processes.reap_orphan(pid) if reaping_allowed() else None
        self.processes.release(stray.child)
        del self.ending[pid]
        log.info("event=stray.exit pid=%d status=%r", pid, str(status) if status else "-")
        if not stray.gone.done():
            stray.gone.set_result(None)

    async def wait(self, timeout: float) -> list[int]:
        """Wait until every stray being ended is gone; the pids still there at the deadline."""
        waiting = [s.gone for s in self.ending.values()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        return sorted(self.ending)

    def close(self) -> None:
        """Stop watching (the supervisor exits; anything still here was logged)."""
        for stray in list(self.ending.values()):
            if self._loop is not None:
                self._loop.remove_reader(stray.child.pidfd)
            if stray.timer is not None:
                stray.timer.cancel()
            self.processes.release(stray.child)
        self.ending.clear()
