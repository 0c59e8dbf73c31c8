"""uvicorn as a swapd worker: ready once the app is imported and its lifespan startup is done.

    swapd run --bind http=127.0.0.1:8000 -- python -m swapd.servers.uvicorn app:app [options]

The options are uvicorn's own, parsed by uvicorn's own command-line definition, so they
mean what they mean for `uvicorn`; those that would make uvicorn bind its own socket or fork
(`--host`, `--port`, `--uds`, `--reload`, `--workers` > 1) are refused: swapd holds the
sockets and runs the processes. It serves every inherited listener (or `--fd N` only).

Why a launcher: plain `uvicorn --fd 3` never sends READY=1. Readiness uses uvicorn's public
`Config(callback_notify=...)`: `Server.main_loop` calls it on its first tick, which comes
after `Server.startup` has imported the app (`Config.load`), completed the lifespan startup
and started accepting on the sockets. A release that fails in any of those steps exits with
uvicorn's status 3 before READY=1. The sockets go to `Server.serve(sockets=...)` (what
gunicorn's uvicorn worker does) rather than `--fd`, which rebuilds the socket as AF_UNIX and so
loses TCP_NODELAY on TCP listeners. SIGTERM stops accepting at once, then leaves connections
just accepted $SWAPD_IDLE_GRACE seconds to send their request before uvicorn's own graceful
shutdown (see `draining_server`).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

from swapd.servers._common import (
    LaunchError,
    fail,
    inherited_sockets,
    notify_ready,
    ready_callback,
)

PROG = "swapd.servers.uvicorn"
_REFUSED = {  # option -> why swapd's worker cannot take it
    "host": "swapd binds the listeners: use `swapd run --bind`",
    "port": "swapd binds the listeners: use `swapd run --bind`",
    "uds": "swapd binds the listeners: use `swapd run --bind NAME=unix:/path`",
    "reload": "swapd reloads: `swapd upgrade`",
    "workers": "swapd runs the processes: `swapd run --workers N`",
}


def _parse(argv: Sequence[str]) -> tuple[str, dict[str, Any], int | None]:
    import click
    from click.core import ParameterSource
    from uvicorn.config import LOGGING_CONFIG, Config
    from uvicorn.main import main as uvicorn_command

    try:
        ctx = uvicorn_command.make_context(PROG, list(argv))
    except click.exceptions.Exit as e:  # --help, --version
        raise SystemExit(e.exit_code) from None
    except click.ClickException as e:
        fail(PROG, e.format_message())
    params = dict(ctx.params)
    for name, why in _REFUSED.items():
        source = ctx.get_parameter_source(name)
        given = source not in (None, ParameterSource.DEFAULT)
        if given and not (name == "workers" and params[name] in (None, 1)):
            fail(PROG, f"--{name} is not for a swapd worker: {why}")
    app = params.pop("app")
    fd = params.pop("fd")
    app_dir = params.pop("app_dir")
    if app_dir is not None:
        sys.path.insert(0, app_dir)  # as uvicorn.run() does ("" = the working directory)
    # The same adjustments uvicorn's own `main` makes before calling `run`.
    if params.get("log_config") is None:
        params["log_config"] = LOGGING_CONFIG
    for key in ("reload_dirs", "reload_includes", "reload_excludes"):
        params[key] = params.get(key) or None
    accepted = set(inspect.signature(Config.__init__).parameters)
    for name in ("host", "port", "uds", "reload", "workers"):
        params.pop(name, None)
    unknown = sorted(k for k in params if k not in accepted)
    for key in unknown:  # an option this uvicorn has but its Config lacks: say so if used
        if ctx.get_parameter_source(key) not in (None, ParameterSource.DEFAULT):
            fail(PROG, f"--{key.replace('_', '-')} is not supported by this launcher")
        params.pop(key)
    return app, params, fd


def draining_server(config: Any, grace: float) -> Any:
    """uvicorn's Server, but SIGTERM first stops accepting, then waits `grace` seconds before
    uvicorn's own shutdown.

    uvicorn's shutdown closes every connection that has no request in progress, including
    one it has just accepted whose request has not been read yet: in close mode that client
    gets a reset (measured on uvicorn's own HUP: 0-9 per swap). Closing the listening
    sockets first and leaving such connections `grace` seconds (swapd's idle_grace) to
    deliver their request turns them into requests in flight, which uvicorn's shutdown lets
    finish.
    """
    import asyncio
    import signal
    from types import FrameType

    from uvicorn.server import Server

    class DrainingServer(Server):
        draining = False
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: list[Any] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.draining or not self.started or self.loop is None or sig != signal.SIGTERM:
                super().handle_exit(sig, frame)
                return
            self.draining = True  # a signal handler: act in the loop, not here
            self.loop.call_soon_threadsafe(self._stop_accepting, sig)

        def _stop_accepting(self, sig: int) -> None:
            for server in self.servers:
                server.close()  # this process's copy of the listener; others keep theirs
            assert self.loop is not None
            self.loop.call_later(grace, super().handle_exit, sig, None)

    return DrainingServer(config=config)


def main(argv: Sequence[str] | None = None) -> None:
    from uvicorn.config import STARTUP_FAILURE, Config

    app, params, fd = _parse(sys.argv[1:] if argv is None else argv)
    try:
        sockets = inherited_sockets(fd)
    except LaunchError as e:
        fail(PROG, str(e))
    pid = os.getpid()
    config = Config(app, **params, callback_notify=ready_callback(
        None, lambda: notify_ready(f"uvicorn serving, pid {pid}")))
    server = draining_server(config, float(os.environ.get("SWAPD_IDLE_GRACE", "1")))
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
