"""`swapd status`: the report the supervisor gives of itself (it runs in the supervisor
process, on its event loop, and answers the control request at once).

It only reads: the fleet (generations, workers and their resource use, crash loops,
strays reaped), the patch journal, the listeners, the open watch window and last rollback
(deploys.py), the history and metrics endpoint (ops.py), and the swap record (the swap in
flight, the last one, the counts). The one thing it updates is the crash-loop bookkeeping:
crashes older than the window are forgotten before the report says who is in a loop.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

import psutil

from swapd import __version__
from swapd.config import Config
from swapd.supervisor.deploys import Deploys
from swapd.supervisor.fleet import CRASH_WINDOW, Fleet
from swapd.supervisor.generation import WorkerProcess
from swapd.supervisor.journal import Journal
from swapd.supervisor.listeners import Listeners
from swapd.supervisor.ops import Operations
from swapd.supervisor.swapjob import SwapJob


class Reported(Protocol):
    """What the report reads (the supervisor's attributes, read-only here)."""

    @property
    def config(self) -> Config: ...

    @property
    def started(self) -> float: ...  # time.monotonic() at start (kept across a re-exec)

    @property
    def fleet(self) -> Fleet: ...

    @property
    def journal(self) -> Journal: ...

    @property
    def listeners(self) -> Listeners: ...

    @property
    def deploys(self) -> Deploys: ...

    @property
    def ops(self) -> Operations: ...

    @property
    def swap(self) -> SwapJob | None: ...  # in flight

    @property
    def last_swap(self) -> dict[str, Any] | None: ...

    @property
    def swap_counts(self) -> dict[str, int]: ...


def report(sup: Reported) -> dict[str, Any]:
    """The answer to `swapd status` (the CLI and the tests read these keys)."""
    fleet = sup.fleet
    for slot in list(fleet.crash_loop):
        fleet.recent_crashes(slot)
    described = []
    for g in fleet.live_generations():
        d = g.describe()
        for wd, w in zip(d["workers"], [w for w in g.workers if w is not None], strict=True):
            wd.update(_usage(w))
            if w.slot in fleet.crash_loop and g is fleet.active:
                wd["crash_loop"] = True
        described.append(d)
    warnings = []
    for slot in sorted(fleet.crash_loop):
        warnings.append(f"worker {slot} is in a crash loop ({len(fleet.crashes[slot])} "
                        f"crashes in {CRASH_WINDOW:g}s)")
    warnings += sup.journal.warnings()
    warnings += sup.ops.warnings()
    warnings += sup.listeners.check(fleet.active.id if fleet.active else None)
    return {
        "patches": sup.journal.summaries(),
        "pid": os.getpid(),
        "version": __version__,
        "uptime": round(time.monotonic() - sup.started, 3),
        "mode": sup.config.mode,
        "control": sup.config.control,
        "active": fleet.active.id if fleet.active else None,
        "listeners": sup.listeners.describe(),
        "generations": described,
        "ended": list(fleet.history),  # bounded: the last fleet.HISTORY generations that ended
        "generations_held": len(fleet.generations),
        "orphans_reaped": fleet.strays.reaped,
        "swap": sup.swap.describe() if sup.swap else None,
        "last_swap": sup.last_swap,
        "swaps": dict(sup.swap_counts),
        "open_fds": _open_fds(),
        "warnings": warnings,
        **sup.deploys.describe(),
    }


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # at the fd limit: listing them needs one
        return None


def _usage(w: WorkerProcess) -> dict[str, Any]:
    if w.child.status is not None:
        return {}
    try:
        p = psutil.Process(w.pid)
        with p.oneshot():
            mem = p.memory_info().rss
            cpu = p.cpu_times()
            children = p.children(recursive=True)
        return {"rss": mem, "cpu_seconds": round(cpu.user + cpu.system, 3),
                "children": len(children)}
    except psutil.Error:
        return {}
