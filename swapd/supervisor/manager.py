"""The supervisor's side of the service manager (systemd): notify, watchdog, fd store.

Everything here is a no-op without `$NOTIFY_SOCKET`, so the supervisor calls it
unconditionally. What it tells systemd:

    first generation ready      READY=1, STATUS=gen 1 active, 2 worker(s)
    swap starts                 RELOADING=1, MONOTONIC_USEC=..., EXTEND_TIMEOUT_USEC=<swap bound>
    swap ends (commit or abort) READY=1, STATUS=... [; last reload FAILED: reason]
    stop                        STOPPING=1, EXTEND_TIMEOUT_USEC=<drain bound>
    every WATCHDOG_USEC/2       WATCHDOG=1 (from the event loop: a blocked loop stops pinging)

Fd store (needs FileDescriptorStoreMax= in the unit; systemd drops fds silently
otherwise): every listener is stored as `swapd-listener-<name>`, so after a crash or a
`systemctl restart` the next supervisor gets the very same listening sockets back
through LISTEN_FDS and no connection is refused meanwhile (the prefix tells them from a
socket unit's, so a restart can rebind a listener whose address was changed). In stateful mode a
graceful stop also stores each worker's snapshot, one fd per name
`swapd-state-<slot>-<index>` (stored fds come back in no particular order, so the
index restores it), and the next start hands it to its first generation, then
removes it from the store so that a later crash can never restore stale state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable

from swapd.sockets import STATE_NAME, STORED_LISTENER
from swapd.systemd import Notifier, watchdog_usec

log = logging.getLogger("swapd")



def state_fd_name(slot: int, index: int) -> str:
    return f"swapd-state-{slot}-{index}"


def listener_fd_name(name: str) -> str:
    return STORED_LISTENER + name


Named = list[tuple[str, int]]


def split_inherited(inherited: Iterable[tuple[str, int]]
                    ) -> tuple[Named, Named, dict[int, list[int]]]:
    """Sort what LISTEN_FDS brought: (listeners of a socket unit, listeners swapd stored
    itself (by listener name), {slot: [snapshot fd, ...] in index order})."""
    activated: Named = []
    stored: Named = []
    parts: dict[int, dict[int, int]] = {}
    for name, fd in inherited:
        if name.startswith(STORED_LISTENER):
            stored.append((name[len(STORED_LISTENER):], fd))
            continue
        m = STATE_NAME.match(name)
        if not m:
            activated.append((name, fd))
            continue
        slot, index = int(m.group(1)), int(m.group(2))
        old = parts.setdefault(slot, {}).get(index)
        if old is not None:  # stored twice: keep the later, never leak the other
            log.warning("event=state.duplicate name=%s", name)
            _close(old)
        parts[slot][index] = fd
    state: dict[int, list[int]] = {}
    for slot, fds in parts.items():
        if sorted(fds) != list(range(len(fds))):
            # A part is missing (e.g. the store hit FileDescriptorStoreMax): the snapshot
            # cannot be restored; drop it rather than fail later.
            log.error("event=state.incomplete slot=%d indexes=%s action='start fresh'", slot,
                      sorted(fds))
            for fd in fds.values():
                _close(fd)
            continue
        state[slot] = [fds[i] for i in range(len(fds))]
    return activated, stored, state


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class ServiceManager:
    def __init__(self, notifier: Notifier | None = None, *, fdstore: bool = True) -> None:
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        self.fdstore = fdstore and self.notifier.enabled
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def ready(self, status: str) -> None:
        self.notifier.ready(status)

    def reloading(self, status: str, bound: float) -> None:
        self.notifier.reloading(status)
        self.extend(bound)

    def stopping(self, status: str, bound: float) -> None:
        self.notifier.stopping(status)
        self.extend(bound)

    def status(self, text: str) -> None:
        self.notifier.status(text)

    def extend(self, seconds: float) -> None:
        """Make sure systemd waits at least `seconds` more for the current job."""
        if self.enabled and seconds > 0:
            self.notifier.extend_timeout(seconds)
            if self._watchdog is not None:
                # systemd 252 stretches the *watchdog* timer by the extension too, until the
                # next ping: ping now, or a supervisor that hangs right after this message
                # would escape the watchdog for `seconds` instead of WatchdogSec.
                self.notifier.watchdog()

    # -- watchdog ---------------------------------------------------------------------

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> float | None:
        usec = watchdog_usec()
        if not usec or not self.enabled:
            return None
        self.stop_watchdog()  # one ping chain at most
        interval = usec / 2 / 1_000_000
        self._ping(loop, interval)
        log.info("event=watchdog.enabled interval=%.3fs", interval)
        return interval

    def _ping(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        # Pinging from a loop timer is the health check: if the loop is blocked or dead,
        # the pings stop and systemd's watchdog acts.
        self.notifier.watchdog()
        self._watchdog = loop.call_later(interval, self._ping, loop, interval)

    def ping_watchdog(self) -> None:
        """An extra ping now (before a long gap such as a re-exec), if the watchdog is on."""
        if self._watchdog is not None:
            self.notifier.watchdog()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # -- fd store ---------------------------------------------------------------------

    def store_listener(self, name: str, fd: int) -> None:
        if self.fdstore:
            # FDPOLL stays on: systemd drops a listener that errors, which is right.
            self.notifier.fdstore([fd], listener_fd_name(name))

    def forget_listener(self, name: str) -> None:
        # Removal does not depend on `fdstore`: what an earlier run stored must go even when
        # this one stores nothing (--no-fdstore), or a later restart would bring it back.
        if self.enabled:
            self.notifier.fdstore_remove(listener_fd_name(name))

    def store_state(self, slot: int, fds: list[int]) -> None:
        """Keep one worker's snapshot fds in the store (FDPOLL=0: memfds never 'hang up')."""
        if not self.fdstore:
            return
        for index, fd in enumerate(fds):
            name = state_fd_name(slot, index)
            self.notifier.fdstore([fd], name, poll=False)
        log.info("event=fdstore.state slot=%d fds=%d", slot, len(fds))

    def forget_names(self, names: Iterable[str]) -> None:
        """Remove fds from the store by name (e.g. every stored snapshot part we inherited),
        whether or not this run stores anything itself (see `forget_listener`)."""
        if self.enabled:
            for name in names:
                self.notifier.fdstore_remove(name)
