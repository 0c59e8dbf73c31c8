"""swapd.worker: the library a Python application imports to run under swapd.

A guest in the application's process: it never calls `sys.exit`, never configures
logging (it logs to the `swapd.worker` logger), and removes the signal handlers
it installed when it returns. Without swapd it still works: under systemd socket
activation (LISTEN_FDS + NOTIFY_SOCKET), or standalone, binding `default_binds`
(or `$SWAPD_BIND`, e.g. `http=127.0.0.1:8000`) itself.

    from swapd import worker

    async def main(w: worker.Worker) -> None:
        w.on_snapshot(lambda: {"count": counter.value})      # stateful apps only
        w.on_restore(lambda state, version: counter.load(state))
        await w.serve("http", handle)        # handler(conn) per connection
        await w.ready()                      # serving from here on

    worker.run(main)

Lifecycle inside the worker (driven by the supervisor over the channel):

    fresh:      serve() registered → ready() → accepting … drain → exit
    successor:  serve() registered → ready() sends "standby" → restore(state)
                → commit → accepting (handed-over connections resume) … → exit
    old worker in a stateful swap: quiesce (stop accepting, wait for every
                connection to reach a request boundary, detach them, snapshot)
                → drain (commit: exit) or resume (abort: serve again, same state)
"""

from swapd.worker.core import (
    Connection,
    HandedOff,
    SharedBuffer,
    TrackedDict,
    Worker,
    WorkerError,
    current,
    run,
)

__all__ = [
    "Connection",
    "HandedOff",
    "SharedBuffer",
    "TrackedDict",
    "Worker",
    "WorkerError",
    "current",
    "run",
]
