"""The supervisor's file descriptors: how many are open, its limit, what a handoff needs.

A stateful swap brings every connection of the old generation through the supervisor
as a descriptor: it holds each snapshot's fds from the quiesce reply until commit, and
while a restore is being sent it holds a duplicate of each as well. Running out half
way (EMFILE, MSG_CTRUNC on the reply) fails the swap cleanly, but a swap that cannot
fit is refused before it starts, with the figures.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable

RESERVE = 64  # kept free for the rest of the supervisor's work: control clients, respawns


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:  # EMFILE itself
        return limit()


def limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def headroom() -> int:
    """Descriptors the supervisor may still take in (for one reply), the reserve kept."""
    return max(0, limit() - open_fds() - RESERVE)


def worker_fds(pid: int) -> int | None:
    """How many descriptors a worker holds: a bound on what its snapshot can carry (its
    connections, plus memfds that stand in for its listeners, pipes and the like)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def handoff_shortfall(pids: Iterable[int], what: str) -> str | None:
    """Why a handoff from these workers does not fit under the limit (None: it does)."""
    counts = [worker_fds(pid) for pid in pids]
    snapshots = sum(c for c in counts if c is not None)
    opened, soft = open_fds(), limit()
    need = opened + 2 * snapshots + RESERVE
    if need <= soft:
        return None
    return (f"handoff needs {need} descriptors, limit is {soft} (RLIMIT_NOFILE of the "
            f"supervisor: {opened} open, 2 x {snapshots} for the snapshots of {what} and their "
            f"connections, {RESERVE} in reserve); raise the limit (LimitNOFILE=, ulimit -n) "
            "or retry with fewer connections")
