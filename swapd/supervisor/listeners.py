"""The supervisor's listeners by name, and the changes a reload makes to them.

A reload may add, move or drop listeners. Nothing is closed before the swap
commits: `prepare()` binds what the new configuration adds (reusing sockets it
keeps, by name and then by address), and `settle()` either undoes that (abort)
or closes what nobody names any more (commit). Every change is mirrored in
systemd's fd store, so a restarted supervisor gets the current set back.

A listener is one socket shared by the supervisor and every worker: a worker that
calls shutdown() on its copy (some servers do on exit) stops it for everyone, and
the kernel then refuses connections. `check()` finds such a TCP listener (its
SO_ACCEPTCONN is 0; it is checked whenever a worker exits and by `status`) and says
so loudly; `heal()`, run before any worker is started, binds a new socket at the
address the dead one had, so every later generation (and restart) serves again. The
generation already running keeps the dead one: swapd never swaps on its own, so the
log and `status` ask for a `swapd upgrade`. (A Unix listener shut down this way is
not detected: nothing in its socket options shows it.)
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from swapd.sockets import Address, BindError, adopt, bind, describe, same_address, unlink_unix
from swapd.supervisor import holders
from swapd.supervisor.manager import ServiceManager

log = logging.getLogger("swapd")


class ListenerError(Exception):
    """A listener the new configuration needs could not be bound."""


@dataclass
class Listener:
    name: str
    address: Address  # the address as configured (port 0 allowed)
    sock: socket.socket
    # "bound" by swapd; "stored": bound by an earlier swapd, back from the fd store;
    # "systemd": from a socket unit (socket activation), which swapd never closes for good.
    source: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "address": str(describe(self.sock)),
                "configured": str(self.address), "fd": self.sock.fileno(), "source": self.source,
                "listening": bool(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))}


@dataclass
class ListenerPlan:
    """What a swap did to the listeners, so it can be undone or completed."""

    bound: list[Listener] = field(default_factory=list)  # sockets this swap bound
    previous: dict[str, Listener | None] = field(default_factory=dict)  # name -> replaced


class Listeners:
    def __init__(self, manager: ServiceManager) -> None:
        self.by_name: dict[str, Listener] = {}
        self.manager = manager
        self._reported: set[str] = set()  # dead listeners already logged

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def __iter__(self) -> Iterator[Listener]:
        return iter(list(self.by_name.values()))

    def add(self, listener: Listener) -> None:
        self.by_name[listener.name] = listener

    # -- start-up ----------------------------------------------------------------------

    def adopt_inherited(self, activated: Iterable[tuple[str, int]],
                        stored: Iterable[tuple[str, int]],
                        configured: dict[str, Address]) -> None:
        """Sockets from systemd, matched by name: a socket unit's are used as they are;
        those an earlier swapd stored are kept only while the configuration still names
        them at the same address (else `bind_missing` binds what is configured now)."""
        for name, fd in activated:
            sock = adopt(fd)
            actual = describe(sock)
            if name in configured and not same_address(configured[name], actual):
                log.warning("event=listener.mismatch name=%s configured=%s inherited=%s",
                            name, configured[name], actual)
            self.add(Listener(name, configured.get(name) or actual, sock, "systemd"))
        for name, fd in stored:
            sock = adopt(fd)
            actual = describe(sock)
            if name in configured and name not in self.by_name and same_address(
                    configured[name], actual):
                self.add(Listener(name, configured[name], sock, "stored"))
                continue
            # Superseded by a socket unit's socket of that name (usually the very same
            # socket), or no longer configured as it was: drop it from the store too.
            why = ("socket unit" if name in self.by_name
                   else "not configured" if name not in configured else "address changed")
            log.info("event=listener.stored_dropped name=%s address=%s reason=%r", name,
                     actual, why)
            self.manager.forget_listener(name)
            sock.close()

    def bind_missing(self, binds: Sequence[tuple[str, Address]], backlog: int,
                     drain_timeout: float = 30.0) -> None:
        for name, address in binds:
            if name not in self.by_name:
                self.add(Listener(name, address, self._bind(address, backlog, drain_timeout),
                                  "bound"))

    def _bind(self, address: Address, backlog: int, drain_timeout: float) -> socket.socket:
        """Bind; if workers of an earlier swapd whose supervisor is gone still hold the
        address (after a crash), wait for them to drain (see `holders`); any other holder,
        a live supervisor first, is named in the error."""
        try:
            return bind(address, backlog)
        except BindError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            found = holders.holders(address)
            if not found or not all(h.orphan for h in found):
                raise BindError(e.errno, f"{e.strerror}{holders.named(found)}") from e
            self.manager.extend(holders.wait_time(found, drain_timeout))
            left = holders.wait_for(found, address, drain_timeout)
            if left:
                raise BindError(e.errno, f"{e.strerror} (still held by "
                                         f"{', '.join(map(str, left))})") from e
        return bind(address, backlog)

    def store_all(self) -> None:
        for lis in self:
            self.manager.store_listener(lis.name, lis.sock.fileno())

    def fds_for(self, binds: Sequence[tuple[str, Address]]) -> tuple[list[int], list[str]]:
        """What a worker gets: the configured names in order, then socket-activated extras."""
        names = [n for n, _ in binds] or list(self.by_name)
        names += [lis.name for lis in self if lis.source == "systemd" and lis.name not in names]
        return [self.by_name[n].sock.fileno() for n in names], names

    # -- reload ------------------------------------------------------------------------

    def prepare(self, binds: Sequence[tuple[str, Address]], backlog: int) -> ListenerPlan:
        """Bind what the new configuration adds; reuse what it keeps (by name, then address)."""
        plan = ListenerPlan()
        try:
            for name, address in binds:
                current = self.by_name.get(name)
                if current is not None and same_address(address, describe(current.sock)):
                    continue
                # Port 0 asks for a new port: it must not take over another name's socket.
                alias = None if address.port == 0 and not address.is_unix else next(
                    (lis for lis in self if same_address(address, describe(lis.sock))), None)
                if alias is not None:
                    new = Listener(name, address, alias.sock, alias.source)
                else:
                    try:
                        new = Listener(name, address, bind(address, backlog), "bound")
                    except OSError as e:
                        raise ListenerError(f"listener {name}: {e.strerror or e}") from e
                    plan.bound.append(new)
                plan.previous[name] = current
                self.by_name[name] = new
        except BaseException:
            self.settle(plan, committed=False, binds=())
            raise
        return plan

    def settle(self, plan: ListenerPlan, *, committed: bool,
               binds: Sequence[tuple[str, Address]]) -> None:
        """After a swap: undo what it bound (abort), or close what `binds` no longer names."""
        if not committed:
            for name, previous in plan.previous.items():
                if previous is None:
                    self.by_name.pop(name, None)
                else:
                    self.by_name[name] = previous
            doomed = plan.bound
        else:
            keep = {n for n, _ in binds} | {lis.name for lis in self if lis.source == "systemd"}
            doomed = [lis for lis in plan.previous.values() if lis is not None]
            for name in [n for n in self.by_name if n not in keep]:
                doomed.append(self.by_name.pop(name))
                self.manager.forget_listener(name)
            # Names whose socket changed: drop what the store holds under them, store the new.
            for name, previous in plan.previous.items():
                if previous is not None:
                    self.manager.forget_listener(name)
                if name in self.by_name:
                    self.manager.store_listener(name, self.by_name[name].sock.fileno())
        in_use = {id(lis.sock) for lis in self}
        for lis in doomed:
            if id(lis.sock) not in in_use and lis.sock.fileno() >= 0:
                log.info("event=listener.close name=%s address=%s", lis.name, describe(lis.sock))
                _close(lis)

    # -- health ------------------------------------------------------------------------

    def dead(self) -> list[Listener]:
        """TCP listeners that no longer listen (a worker shut its copy down)."""
        found = []
        for lis in self:
            if lis.sock.family == socket.AF_UNIX or lis.sock.fileno() < 0:
                continue
            try:
                listening = lis.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError:
                listening = 0
            if not listening:
                found.append(lis)
        return found

    def check(self, active_gen: int | None) -> list[str]:
        """One warning per dead listener (for `status`); each is logged once, as an error."""
        warnings = []
        for lis in self.dead():
            address = describe(lis.sock)
            warnings.append(f"listener {lis.name} ({address}) does not listen any more (a "
                            f"worker shut it down): connections are refused; `swapd upgrade` "
                            f"gives the next generation a new socket")
            if lis.name not in self._reported:
                self._reported.add(lis.name)
                log.error("event=listener.dead name=%s address=%s gen=%s reason='shut down by a "
                          "worker; connections are refused' action='the next generation or "
                          "restart gets a new socket: swapd upgrade'", lis.name, address,
                          active_gen)
        return warnings

    def heal(self, backlog: int) -> None:
        """Bind a new socket in place of each dead listener, at the address it had (port 0
        resolved), so that the workers started next can accept again."""
        for lis in self.dead():
            address = describe(lis.sock)
            try:
                fresh = bind(address, backlog)
            except BindError as e:
                log.error("event=listener.rebind_failed name=%s address=%s error=%r", lis.name,
                          address, str(e))
                continue
            old, lis.sock, lis.source = lis.sock, fresh, "bound"
            self.manager.forget_listener(lis.name)
            self.manager.store_listener(lis.name, fresh.fileno())
            self._reported.discard(lis.name)
            log.warning("event=listener.rebound name=%s address=%s fd=%d", lis.name, address,
                        fresh.fileno())
            old.close()  # the workers that shut it down (or hold it) keep their copies

    def describe(self) -> list[dict[str, Any]]:
        return [lis.describe() for lis in self]

    def close_all(self, *, unlink: bool = True) -> None:
        """Close every listener. `unlink=False` keeps unix socket paths: when the fd store
        holds the sockets, the next supervisor serves on them and needs the paths."""
        for lis in self:
            if lis.sock.fileno() >= 0:
                _close(lis, unlink=unlink)
        self.by_name.clear()


def _close(lis: Listener, *, unlink: bool = True) -> None:
    if unlink and lis.source != "systemd":  # a socket unit's path belongs to systemd
        unlink_unix(lis.address)
    lis.sock.close()
