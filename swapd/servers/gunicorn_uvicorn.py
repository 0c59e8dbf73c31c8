"""gunicorn's uvicorn worker, with the drain of swapd's uvicorn launcher.

    gunicorn -c python:swapd.servers.gunicorn \
             -k swapd.servers.gunicorn_uvicorn.UvicornWorker app:app

The same worker as uvicorn's own (`uvicorn_worker.UvicornWorker` when that package is
installed, else `uvicorn.workers.UvicornWorker`), except for SIGTERM: it stops accepting at
once and leaves connections it has just accepted $SWAPD_IDLE_GRACE seconds to send their
request before uvicorn's graceful shutdown, which would otherwise close them unanswered (a
reset for that client; see `swapd.servers.uvicorn.draining_server`). Readiness needs nothing
from this class: `swapd.servers.gunicorn` handles every uvicorn worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

try:  # the maintained home of the worker; uvicorn.workers is deprecated
    from uvicorn_worker import UvicornWorker as _Base  # type: ignore[import-not-found]
except ImportError:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from uvicorn.workers import UvicornWorker as _Base

from swapd.servers.uvicorn import draining_server

_WORKER_BOOT_ERROR = 3  # gunicorn.arbiter.Arbiter.WORKER_BOOT_ERROR: the arbiter halts


class UvicornWorker(_Base):  # type: ignore[misc]
    def run(self) -> None:
        self.config.app = self.wsgi
        server = draining_server(self.config, float(os.environ.get("SWAPD_IDLE_GRACE", "1")))

        async def serve() -> None:
            # As uvicorn's worker does: SIGQUIT (gunicorn's quick stop) exits at once.
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGQUIT, self.handle_exit, signal.SIGQUIT, None)
            await server.serve(sockets=self.sockets)
            if not server.started:
                sys.exit(_WORKER_BOOT_ERROR)

        factory: Any = self.config.get_loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve())
