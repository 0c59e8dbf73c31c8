"""What every launcher needs: the inherited sockets, READY=1, and a one-line refusal."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

from swapd import systemd

PROBE_LISTENER = "swapd-probe"  # the private per-worker socket of `--readiness probe`


class LaunchError(Exception):
    """A launcher cannot start; the message is one line for the operator."""


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def inherited_sockets(only_fd: int | None = None) -> list[socket.socket]:
    """The listening sockets handed over by swapd (or systemd), in LISTEN_FDS order.

    All of them by default, the private probe socket included (serving it is what makes a
    probe reach this very worker); only `only_fd` when it is given. The LISTEN_* variables are
    removed so that processes the application starts do not believe the fds are theirs.
    """
    try:
        pairs = systemd.listen_fds()
    except systemd.ListenFdsError as e:
        raise LaunchError(str(e)) from None
    systemd.clear_listen_env(os.environ)
    if only_fd is not None:
        if only_fd not in {fd for _, fd in pairs}:
            raise LaunchError(f"fd {only_fd} is not one of the inherited listeners "
                              f"(LISTEN_FDS gave {[fd for _, fd in pairs] or 'none'})")
        pairs = [(name, fd) for name, fd in pairs if fd == only_fd]
    if not pairs:
        raise LaunchError("no inherited listening socket (LISTEN_FDS): run it as a worker of "
                          "`swapd run --bind NAME=ADDR -- ...` (or a systemd socket unit)")
    socks = []
    for _, fd in pairs:
        sock = socket.socket(fileno=fd)  # family, type and protocol read from the fd
        if sock.type != socket.SOCK_STREAM:
            raise LaunchError(f"fd {fd} is not a stream socket")
        sock.setblocking(False)
        socks.append(sock)
    return socks


def notify_ready(status: str) -> None:
    """READY=1 on $NOTIFY_SOCKET (nothing without one: run outside swapd, it just serves)."""
    with systemd.Notifier.from_env() as notifier:
        notifier.ready(status)


def ready_callback(chain: Callable[[], Awaitable[None]] | None,
                   report: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    """A `callback_notify` that reports once (its first call follows startup), then chains."""
    reported = False

    async def callback() -> None:
        nonlocal reported
        if not reported:
            reported = True
            report()
        if chain is not None:
            await chain()

    return callback
