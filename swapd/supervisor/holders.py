"""Who holds an address we cannot bind, and waiting for earlier workers to let it go.

After a supervisor crash (no systemd fd store to hand the sockets over), its workers live
on: each got SIGTERM from the kernel (PR_SET_PDEATHSIG), drains, and exits within its own
drain deadline, holding the listening sockets until then. A supervisor started meanwhile
would fail on "address already in use". Instead it looks up who holds the address
(psutil: the sockets of each process it may see, so those of its own user or all as
root). If every holder is a worker of an earlier swapd it waits, by pidfd, until they
are gone, at most their drain deadline (SWAPD_DRAIN_TIMEOUT, else ours) plus a grace,
logging why, and binds then. A worker is known by SWAPD_GENERATION in its environment,
believed only of a process of our own uid or root's: anyone can put it in theirs, and
would otherwise make a restart wait for a day instead of failing. Any other holder
fails the start at once, named in the error. Adopting the orphans' sockets is not
attempted: taking an fd from another process (pidfd_getfd) needs ptrace rights that
most hosts restrict (Yama), and the orphans are draining anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from dataclasses import dataclass

import psutil

from swapd.sockets import Address

log = logging.getLogger("swapd")

GRACE = 5.0  # beyond the holders' drain deadline: the kernel's SIGKILL and exit


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str
    generation: int | None  # the swapd generation it was a worker of, if it was one
    drain_timeout: float | None
    impostor_uid: int | None = None  # says it is a worker, but runs as another user

    def __str__(self) -> str:
        what = f"gen={self.generation} worker of an earlier swapd" if self.generation else ""
        if self.impostor_uid is not None:
            what = (f"runs as uid {self.impostor_uid} with SWAPD_GENERATION in its "
                    "environment: not taken for a worker of ours")
        return f"pid {self.pid} ({self.name}{', ' + what if what else ''})"


def holders(address: Address) -> list[Holder]:
    """The processes we can see holding a socket bound to `address` (none if unknown)."""
    kind = "unix" if address.is_unix else "tcp4" if address.family == socket.AF_INET else "tcp6"
    try:
        conns = psutil.net_connections(kind=kind)
    except (psutil.Error, OSError):
        return []
    pids = sorted({c.pid for c in conns if c.pid and c.pid != os.getpid()
                   and _same(address, c.laddr)})
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            env = proc.environ()
            uid = proc.uids().real
        except psutil.Error:
            continue
        gen = env.get("SWAPD_GENERATION", "")
        if not gen.isdigit():
            found.append(Holder(pid, name, None, None))
        elif uid not in (os.geteuid(), 0):
            found.append(Holder(pid, name, None, None, impostor_uid=uid))
        else:
            found.append(Holder(pid, name, int(gen),
                                _seconds(env.get("SWAPD_DRAIN_TIMEOUT", ""))))
    return found


def wait_for(found: list[Holder], address: Address, drain_timeout: float) -> list[Holder]:
    """Wait until the holders (workers of an earlier swapd) are gone, at most their drain
    deadline + GRACE; the ones still there."""
    wait = wait_time(found, drain_timeout)
    log.warning("event=listener.busy address=%s holders=%s reason='workers of an earlier "
                "swapd (a crashed supervisor?) are draining' action='wait up to %gs'",
                address, ",".join(str(h.pid) for h in found), wait)
    pidfds: dict[int, int] = {}
    try:
        for h in found:
            with contextlib.suppress(ProcessLookupError):
                pidfds[os.pidfd_open(h.pid)] = h.pid
        deadline = time.monotonic() + wait
        while pidfds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(pidfds), [], [], remaining)
            for fd in ready:
                log.info("event=listener.holder_exited address=%s pid=%d", address, pidfds[fd])
                os.close(fd)
                del pidfds[fd]
        return [h for h in found if h.pid in pidfds.values()]
    finally:
        for fd in pidfds:
            os.close(fd)


def wait_time(found: list[Holder], drain_timeout: float) -> float:
    return max((h.drain_timeout or drain_timeout) for h in found) + GRACE


def _same(address: Address, laddr: object) -> bool:
    if address.is_unix:
        return laddr == address.path
    if not isinstance(laddr, tuple) or len(laddr) < 2:
        return False
    host, port = laddr[0], laddr[1]
    wildcard = {"0.0.0.0", "::"}
    return bool(port == address.port and (host == address.host or host in wildcard
                                           or address.host in wildcard))


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < 86400 else None
