"""What the worker takes from its process: settings from the environment, the listeners
(inherited or bound), the descriptor limit, the drain signals.

Runs in the application's process, once, when the `Worker` starts (`swapd.worker.core`);
nothing here is about a swap. The signal handlers are removed again when the worker
returns: the library is a guest in the application's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from typing import Any

from swapd.sockets import bind, parse_bind
from swapd.worker.errors import WorkerError

log = logging.getLogger("swapd.worker")


def listeners_from_env(env: dict[str, str], default_binds: dict[str, str] | None
               ) -> dict[str, socket.socket]:
    """Listeners from LISTEN_FDS (swapd or systemd), else bound here from SWAPD_BIND/defaults."""
    if env.get("LISTEN_FDS") and env.get("LISTEN_PID") == str(os.getpid()):
        try:
            count = int(env["LISTEN_FDS"])
        except ValueError:
            raise WorkerError(f"bad LISTEN_FDS={env['LISTEN_FDS']!r}") from None
        names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
        result: dict[str, socket.socket] = {}
        for i in range(count):
            name = names[i] if i < len(names) and names[i] else f"fd{3 + i}"
            sock = socket.socket(fileno=3 + i)
            sock.set_inheritable(False)
            result[name] = sock
        return result
    specs = env.get("SWAPD_BIND")
    binds = dict(parse_bind(s) for s in specs.split(",")) if specs else {
        name: parse_bind(f"{name}={addr}")[1] for name, addr in (default_binds or {}).items()
    }
    return {name: bind(address) for name, address in binds.items()}


def env_seconds(env: dict[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise WorkerError(f"{name}={text!r}: expected a number of seconds >= 0")
    return value


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: a handoff takes over every connection of the
    predecessor, and the default soft limit (1024 under systemd) is far below what the
    hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("event=rlimit.nofile soft=%d raised_to=%d", soft, hard)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_signals(loop: asyncio.AbstractEventLoop, drain: Callable[[], None]
                     ) -> dict[int, Any]:
    previous: dict[int, Any] = {}
    for sig in _SIGNALS:
        previous[sig] = signal.getsignal(sig)
        loop.add_signal_handler(sig, drain)
    return previous


def restore_signals(loop: asyncio.AbstractEventLoop, previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        loop.remove_signal_handler(sig)
        with contextlib.suppress(TypeError, ValueError):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
