"""Who holds an address we cannot bind, and waiting for earlier workers to let it go.

After a supervisor crash (no systemd fd store to hand the sockets over), its workers live
on: each got SIGTERM from the kernel (PR_SET_PDEATHSIG), drains, and exits within its own
drain deadline, holding the listening sockets until then. A supervisor started meanwhile
would fail on "address already in use". Instead it looks up who holds the address: psutil
names one process per listening socket, and /proc/*/fd (a bounded scan) every other
process holding the same socket (the supervisor that bound it, each worker, their
children), among the processes it may see (those of its own user, or all as root).

It waits only for orphans: processes with SWAPD_GENERATION in their environment (believed
only of a process of our own uid or root's: anyone can put it in theirs, and would
otherwise make a restart wait for a day instead of failing) none of whose ancestors is a
live swapd supervisor (`swapd run`, `python -m swapd run`). Then it waits, by pidfd, until
they are gone, at most their drain deadline (SWAPD_DRAIN_TIMEOUT, else ours) plus a grace,
logging why and, every few seconds, who is left; and binds. Any other holder fails the
start at once, named in the error: a live supervisor (the second `swapd run` of an
operator who forgot the first) by its pid and control socket. Adopting the orphans'
sockets is not attempted: taking an fd from another process (pidfd_getfd) needs ptrace
rights that most hosts restrict (Yama), and the orphans are draining anyway.
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
PROGRESS = 5.0  # seconds between the log lines of a wait
SCAN_FDS = 1_000_000  # descriptors looked at in /proc/*/fd at most
SCAN_SECONDS = 2.0
ANCESTORS = 32  # how far up a holder's parents a supervisor is looked for


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str
    generation: int | None  # the swapd generation it was a worker of, if it was one
    drain_timeout: float | None
    impostor_uid: int | None = None  # says it is a worker, but runs as another user
    supervisor: int | None = None  # the live swapd supervisor it is, or is a process of
    control: str | None = None  # that supervisor's control socket, if known

    @property
    def orphan(self) -> bool:
        """A worker of an earlier swapd whose supervisor is gone: to be waited for."""
        return self.generation is not None and self.supervisor is None

    def __str__(self) -> str:
        what = f"gen={self.generation} worker of an earlier swapd" if self.generation else ""
        if self.impostor_uid is not None:
            what = (f"runs as uid {self.impostor_uid} with SWAPD_GENERATION in its "
                    "environment: not taken for a worker of ours")
        elif self.supervisor == self.pid:
            what = "a running swapd supervisor"
        elif self.supervisor is not None:
            what = (f"{f'gen={self.generation} worker' if self.generation else 'a process'} "
                    f"of the running swapd pid {self.supervisor}")
        return f"pid {self.pid} ({self.name}{', ' + what if what else ''})"


def named(found: list[Holder]) -> str:
    """What the error of a failed bind adds: who holds the address ("" if unknown)."""
    if not found:
        return ""
    live = {h.supervisor: h.control for h in found if h.supervisor is not None}
    text = ", ".join(f"swapd pid {pid}" + (f" (control {control})" if control else "")
                     for pid, control in sorted(live.items()))
    who = f"the running {text}: " if live else ""
    return f" (held by {who}{', '.join(map(str, found))})"


def holders(address: Address) -> list[Holder]:
    """The processes we can see holding a socket bound to `address` (none if unknown)."""
    kind = "unix" if address.is_unix else "tcp4" if address.family == socket.AF_INET else "tcp6"
    try:
        conns = psutil.net_connections(kind=kind)
    except (psutil.Error, OSError):
        return []
    pids: set[int] = set()
    sockets: set[str] = set()
    for c in conns:
        if not c.pid or not _same(address, c.laddr):
            continue
        if not address.is_unix and c.status != psutil.CONN_LISTEN:
            continue  # a connection accepted on that port does not keep us from binding
        pids.add(c.pid)
        with contextlib.suppress(OSError):
            sockets.add(os.readlink(f"/proc/{c.pid}/fd/{c.fd}"))
    pids |= _pids_holding(sockets)  # psutil names one process per socket: find the others
    pids.discard(os.getpid())
    found = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            found.append(_holder(psutil.Process(pid)))
    return found


def _holder(proc: psutil.Process) -> Holder:
    name = proc.name()
    uid = proc.uids().real
    try:
        env = proc.environ()
    except psutil.AccessDenied:
        env = {}
    supervisor = _live_supervisor(proc)
    control = _control(supervisor) if supervisor is not None else None
    sup = supervisor.pid if supervisor is not None else None
    gen = env.get("SWAPD_GENERATION", "")
    if not gen.isdigit():
        return Holder(proc.pid, name, None, None, supervisor=sup, control=control)
    if uid not in (os.geteuid(), 0):
        return Holder(proc.pid, name, None, None, impostor_uid=uid)
    return Holder(proc.pid, name, int(gen), _seconds(env.get("SWAPD_DRAIN_TIMEOUT", "")),
                  supervisor=sup, control=control)


def _pids_holding(sockets: set[str]) -> set[int]:
    """Every process with one of `sockets` ("socket:[inode]") among its descriptors, as far
    as a bounded scan of /proc/*/fd gets (logged if it is cut short)."""
    found: set[int] = set()
    if not sockets:
        return found
    looked = 0
    deadline = time.monotonic() + SCAN_SECONDS
    with contextlib.suppress(OSError), os.scandir("/proc") as procs:
        for entry in procs:
            if not entry.name.isdigit():
                continue
            try:
                with os.scandir(f"/proc/{entry.name}/fd") as fds:
                    for fd in fds:
                        looked += 1
                        with contextlib.suppress(OSError):
                            if os.readlink(fd.path) in sockets:
                                found.add(int(entry.name))
                                break
            except OSError:  # gone, or not ours to look at
                continue
            if looked > SCAN_FDS or time.monotonic() > deadline:
                log.warning("event=listener.scan_cut pid=%d looked=%d found=%s", os.getpid(),
                            looked, ",".join(map(str, sorted(found))))
                break
    return found


def _live_supervisor(proc: psutil.Process) -> psutil.Process | None:
    """The live `swapd run` that `proc` is, or descends from (None: there is none, e.g.
    it crashed and its workers were reparented)."""
    try:
        chain = [proc, *proc.parents()[:ANCESTORS]]
    except psutil.Error:
        return None
    for p in chain:
        if p.pid == os.getpid():
            continue  # we are not an earlier swapd (only a start waits for holders)
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and is_supervisor(p.cmdline()):
                return p
    return None


def is_supervisor(cmdline: list[str]) -> bool:
    """`swapd run ...`, `python [-P] -m swapd run ...` (how `upgrade --self` re-execs),
    `python /path/to/swapd run ...`."""
    if not cmdline:
        return False
    rest = cmdline[1:]
    if os.path.basename(cmdline[0]) != "swapd":  # an interpreter: its options, then -m/script
        i = 1
        while i < len(cmdline) and cmdline[i].startswith("-") and cmdline[i] != "-m":
            i += 2 if cmdline[i] in ("-X", "-W") else 1
        if cmdline[i:i + 2] == ["-m", "swapd"]:
            rest = cmdline[i + 2:]
        elif i < len(cmdline) and os.path.basename(cmdline[i]) == "swapd":
            rest = cmdline[i + 1:]
        else:
            return False
    return next((a for a in rest if not a.startswith("-")), None) == "run"


def _control(supervisor: psutil.Process) -> str | None:
    """A supervisor's control socket: the Unix socket with a path that it holds and none
    of its children (its workers, who hold the Unix listeners) does."""
    try:
        ours = _unix_paths(supervisor)
        for child in supervisor.children():
            with contextlib.suppress(psutil.Error):
                ours -= _unix_paths(child)
    except psutil.Error:
        return None
    return sorted(ours)[0] if len(ours) == 1 else None


def _unix_paths(proc: psutil.Process) -> set[str]:
    connections = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    return {c.laddr for c in connections(kind="unix")
            if isinstance(c.laddr, str) and c.laddr.startswith("/")}


def wait_for(found: list[Holder], address: Address, drain_timeout: float,
             progress: float = PROGRESS) -> list[Holder]:
    """Wait until the holders (orphans: workers of an earlier swapd whose supervisor is
    gone) are gone, at most their drain deadline + GRACE, saying every `progress` seconds
    who is left; the ones still there."""
    wait = wait_time(found, drain_timeout)
    log.warning("event=listener.busy address=%s holders=%s reason='workers of an earlier "
                "swapd are draining (their supervisor is gone)' action='wait up to %gs'",
                address, ",".join(str(h.pid) for h in found), wait)
    pidfds: dict[int, int] = {}
    try:
        for h in found:
            with contextlib.suppress(ProcessLookupError):
                pidfds[os.pidfd_open(h.pid)] = h.pid
        start = time.monotonic()
        deadline = start + wait
        report = start + progress
        while pidfds:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= report:
                log.info("event=listener.waiting address=%s holders=%s waited=%.0fs left=%.0fs",
                         address, ",".join(map(str, sorted(pidfds.values()))), now - start,
                         deadline - now)
                report = now + progress
            ready, _, _ = select.select(list(pidfds), [], [], min(deadline, report) - now)
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
