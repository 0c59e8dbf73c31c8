"""`swapd upgrade --self`, the supervisor's side of it (this runs in the supervisor process,
the old image and then the new one): when the re-exec runs, what the history records of
it, and the answer to the client. The mechanics (the state, its capture, the pre-flight,
the exec itself) are reexec.py's.

The old image: pre-flight the new code on a capture (off the loop, which keeps serving),
then capture again and exec with no await in between. The new image: adopt the listeners,
the control socket and the patch journal before its loop runs (`adopt`), then the workers
once it runs (`resume`); record the re-exec and answer the client on the connection the
old image passed along.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from swapd import __version__, control, logsink
from swapd.control import ControlError, Emit, Peer
from swapd.supervisor import reexec
from swapd.supervisor.deploys import Deploys
from swapd.supervisor.fleet import Fleet
from swapd.supervisor.journal import Journal
from swapd.supervisor.listeners import Listener, Listeners
from swapd.supervisor.manager import ServiceManager
from swapd.supervisor.metrics import MetricsUnavailable
from swapd.supervisor.ops import Operations, Who, who_control

log = logging.getLogger("swapd")


class SelfExec:
    """The re-exec in flight (one at a time) and the two images' sides of it.

    `owned()`: what the supervisor owns besides the fleet and its listeners, as it is at
    the moment of the call; `stopping()`: no re-exec any more; `status_line()` for the
    service manager.
    """

    def __init__(self, fleet: Fleet, listeners: Listeners, journal: Journal,
                 manager: ServiceManager, ops: Operations, deploys: Deploys,
                 owned: Callable[[], reexec.Owned], stopping: Callable[[], bool],
                 status_line: Callable[[], str]) -> None:
        self._fleet = fleet
        self._listeners = listeners
        self._journal = journal
        self._manager = manager
        self._ops = ops
        self._deploys = deploys
        self._owned = owned
        self._stopping = stopping
        self._status_line = status_line
        self.in_flight = False
        self._who: Who = {}  # who asked for the re-exec in flight

    # -- the old image ------------------------------------------------------------------

    async def run(self, emit: Emit, peer: Peer) -> dict[str, Any]:
        """Re-exec in place; the caller has refused it if another change is in flight.

        Returns only by raising ControlError (the running supervisor unchanged): on success
        the exec does not return, and the new image answers the client."""
        self.in_flight = True
        self._who = who_control(peer)
        try:
            state = self.capture(None).state
            emit("reexec", f"checking that the new code on disk takes over "
                 f"{len(self._fleet.generations)} generation(s), then exec'ing in place", None)
            log.info("event=reexec.begin version=%s argv=%r", __version__, reexec.exec_argv())
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, reexec.check_state, state)
                if self._stopping():
                    raise reexec.ReexecError("supervisor is stopping; no re-exec")
                reply_fd = os.dup(peer.fd)
                try:
                    # No await from here to the exec: the capture is what we own at the exec.
                    captured = self.capture(reply_fd)
                    self._manager.ping_watchdog()  # the new image's start-up is a long gap
                    log.info("event=reexec.exec pid=%d", os.getpid())
                    logsink.stop_queue()  # the exec ends the writer thread: drain it first
                    try:
                        reexec.execute(captured)
                    finally:  # execve failed: back to the queue
                        logsink.start_queue()
                finally:
                    os.close(reply_fd)
            except (reexec.ReexecError, OSError) as e:
                tail = e.tail if isinstance(e, reexec.ReexecError) else ""
                log.error("event=reexec.failed reason=%r", str(e))
                self._ops.reexec(False, who_control(peer), str(e), __version__, __version__)
                raise ControlError(str(e), data={"tail": tail, "worker": "pre-flight check"}
                                   ) from e
        finally:
            self.in_flight = False
            self._fleet.strays.scan()  # reaping waited while the pre-flight ran
        raise ControlError("re-exec returned without an error")  # not reached

    def capture(self, reply_fd: int | None) -> reexec.Captured:
        captured = reexec.capture(self._fleet, self._listeners, self._owned(), reply_fd)
        # For the new image's history entry: who asked, and when.
        captured.state["ops"] = {"who": self._who, "asked": time.time(),
                                 "last_rollback": self._deploys.last_rollback,
                                 "last_swap": self._ops.last_swap}
        return captured

    # -- the new image ------------------------------------------------------------------

    def adopt(self, state: reexec.State) -> socket.socket:
        """Before the loop runs: the journal, the listeners and the last rollback the old
        image had, the history file and metrics port again; returns the control socket."""
        self._journal.records[:] = state.journal
        self._journal.serial = max((r.id for r in state.journal), default=0)
        for item in state.listeners:
            sock = socket.socket(fileno=item.fd)
            sock.set_inheritable(False)
            self._listeners.add(Listener(item.name, item.address, sock, item.source))
        control_sock = socket.socket(fileno=state.control_fd)
        control_sock.set_inheritable(False)
        self._deploys.last_rollback = state.ops.get("last_rollback")
        last = state.ops.get("last_swap")
        if (isinstance(last, list) and len(last) == 2 and isinstance(last[0], int | float)
                and isinstance(last[1], bool)):
            self._ops.last_swap = (float(last[0]), last[1])
        try:  # the history file again; the metrics port, which the exec closed, again
            self._ops.prepare()
        except (OSError, MetricsUnavailable) as e:  # workers are running: no exit for this
            log.error("event=metrics.failed address=%s error=%r action='running without "
                      "metrics'", state.config.metrics, str(e))
        return control_sock

    def resume(self, state: reexec.State) -> None:
        """On the loop: the workers adopted, the re-exec recorded, the client answered."""
        reexec.unblock_signals()
        self._fleet.adopt(state.generations, state.active, state.next_gen, state.crashes)
        log.info("event=reexec.done version=%s previous=%s generations=%d", __version__,
                 state.version, len(self._fleet.generations))
        ops = state.ops  # what the previous image said about it
        asked = ops.get("asked")
        self._ops.reexec(True, ops.get("who") or {"via": "control"}, None, state.version,
                         __version__, round((time.time() - asked) * 1000, 1)
                         if isinstance(asked, int | float) else None)
        self._manager.status(f"re-exec'd swapd {__version__}; {self._status_line()}")
        if state.reply_fd is not None:
            _answer(state.reply_fd, {"reexec": True, "pid": os.getpid(),
                                     "version": __version__, "previous": state.version})


def _answer(fd: int, data: dict[str, Any]) -> None:
    """The result line of `upgrade --self`, written by the new image to the old connection."""
    try:
        os.write(fd, control.encode(control.result(True, data=data)))
    except OSError as e:
        log.warning("event=reexec.reply_failed error=%r", str(e))
    finally:
        os.close(fd)
