"""The gunicorn server hooks behind `swapd.servers.gunicorn` (kept apart so that the config
module exposes nothing but hook names: gunicorn reads every global of a config module whose
name is a setting).

    arbiter                                      worker (forked; one per --workers)
    on_starting: take NOTIFY_SOCKET out of the
      environment (gunicorn's own READY=1, sent
      before any worker exists, becomes a no-op);
      open a datagram socketpair; start a thread
      that counts booted workers
                                                 post_worker_init (app imported), or for a
                                                 uvicorn worker its first callback_notify
                                                 (lifespan startup done, accepting):
                                       ◀──────── "B <pid>"
    child_exit ("X <pid>"): a booted worker
      that exits no longer counts
    thread: booted workers >= num_workers
      ─▶ READY=1 on the saved NOTIFY_SOCKET

A worker that fails to boot (ImportError, an exception in the app factory, a failed
lifespan startup) exits with gunicorn's WORKER_BOOT_ERROR or APP_LOAD_ERROR; gunicorn's
arbiter then halts and exits non-zero, before READY=1: that is how swapd learns of it.
With --preload the app is imported in the arbiter before on_starting; an import error
exits the arbiter at once, and READY=1 still waits for every forked worker.

The thread only reads a socket and sends one datagram: it holds no lock a forked worker
could inherit locked, and it logs nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

from swapd import systemd
from swapd.servers._common import ready_callback

_MSG_MAX = 64


class _Gate:
    """Arbiter side: counts booted workers and sends READY=1 once all have booted."""

    def __init__(self, arbiter: Any, address: str) -> None:
        self.arbiter = arbiter
        self.notifier = systemd.Notifier(address)
        self.recv, self.send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.send.settimeout(1.0)  # a wedged arbiter must not hang a worker's boot forever
        # Progress shows in `swapd status` and in a ready_timeout message (a worker that
        # keeps dying by a signal while booting is respawned by gunicorn, never reported).
        self.notifier.status(f"gunicorn: 0 of {int(arbiter.num_workers)} worker(s) booted")
        self.thread = threading.Thread(target=self._run, name="swapd-readiness", daemon=True)
        self.thread.start()

    def report(self, kind: bytes, pid: int) -> None:
        with contextlib.suppress(OSError):  # after READY=1 the receiving end is closed
            self.send.send(b"%s %d" % (kind, pid))

    def _run(self) -> None:
        booted: set[int] = set()
        try:
            while True:
                data = self.recv.recv(_MSG_MAX)
                kind, _, pid_text = data.partition(b" ")
                if not pid_text.isdigit():
                    continue
                pid = int(pid_text)
                if kind == b"B":
                    booted.add(pid)
                elif kind == b"X":
                    booted.discard(pid)
                wanted = int(self.arbiter.num_workers)
                if len(booted) >= wanted:
                    self.notifier.ready(f"gunicorn: {len(booted)} worker(s) booted")
                    return
                self.notifier.status(f"gunicorn: {len(booted)} of {wanted} worker(s) booted")
        finally:
            self.recv.close()
            self.notifier.close()


_gate: _Gate | None = None


def on_starting(server: Any) -> None:
    global _gate
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if address:
        _gate = _Gate(server, address)


def post_worker_init(worker: Any) -> None:
    gate = _gate
    if gate is None:
        return
    pid = os.getpid()
    config: Any = getattr(worker, "config", None)
    if type(config).__module__.startswith("uvicorn") and hasattr(config, "callback_notify"):
        # uvicorn's worker imports the app here but runs the lifespan startup later, in
        # run(); uvicorn calls callback_notify first on the tick after its startup.
        config.callback_notify = ready_callback(config.callback_notify,
                                                lambda: gate.report(b"B", pid))
        return
    gate.report(b"B", pid)


def child_exit(server: Any, worker: Any) -> None:
    if _gate is not None and isinstance(worker.pid, int):
        _gate.report(b"X", worker.pid)


HOOKS: dict[str, Callable[..., None]] = {
    "on_starting": on_starting,
    "post_worker_init": post_worker_init,
    "child_exit": child_exit,
}


def install(namespace: MutableMapping[str, Any]) -> None:
    """Add swapd's hooks to a gunicorn config module's globals, keeping the user's own.

    Call it at the end of your config file: ``swapd.servers.gunicorn.install(globals())``.
    A hook the file defines runs first, then swapd's (so READY=1 follows your
    post_worker_init too).
    """
    for name, ours in HOOKS.items():
        theirs = namespace.get(name)
        if theirs is None or theirs is ours:
            namespace[name] = ours
        elif not getattr(theirs, "_swapd_composed", False):
            namespace[name] = _compose(theirs, ours)


def _compose(theirs: Callable[..., None], ours: Callable[..., None]) -> Callable[..., None]:
    # gunicorn checks a hook's arity, so the composed hook keeps the exact signature.
    if ours is on_starting:
        def composed1(server: Any) -> None:
            theirs(server)
            ours(server)
        hook: Callable[..., None] = composed1
    elif ours is post_worker_init:
        def composed2(worker: Any) -> None:
            theirs(worker)
            ours(worker)
        hook = composed2
    else:
        def composed3(server: Any, worker: Any) -> None:
            theirs(server, worker)
            ours(server, worker)
        hook = composed3
    hook._swapd_composed = True  # type: ignore[attr-defined]
    return hook
