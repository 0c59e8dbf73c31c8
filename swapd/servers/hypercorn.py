"""hypercorn as a swapd worker: ready once the app is imported, its lifespan startup is done,
and hypercorn accepts on the inherited sockets.

    swapd run --bind http=127.0.0.1:8000 -- python -m swapd.servers.hypercorn [--config CFG] app:app

`--config` takes what hypercorn's own `--config` takes (a TOML file, `file:config.py` or
`python:module`), so every hypercorn setting keeps its meaning; `bind`, `insecure_bind` and
`workers` are swapd's (the launcher serves every inherited listener, in this one process).
`--worker-class uvloop` runs on uvloop (default asyncio).

Why a launcher: plain `hypercorn --bind fd://3` never sends READY=1. Readiness uses
hypercorn's public programmatic API, `hypercorn.asyncio.serve(app, config,
shutdown_trigger=...)`: hypercorn awaits `shutdown_trigger` only after the lifespan startup
has completed and a server accepts on every socket, so its first call is the moment to send
READY=1 (and then wait for SIGTERM/SIGINT, which start hypercorn's graceful shutdown, after
the process stopped accepting and gave connections just accepted $SWAPD_IDLE_GRACE seconds to
send their request). An ImportError, or a failed lifespan startup, makes the process exit
non-zero before READY=1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from swapd.servers._common import LaunchError, fail, inherited_sockets, notify_ready

PROG = "swapd.servers.hypercorn"


def load_app(path: str) -> Any:
    """`module:attr` (`module` alone means `module:app`), imported like hypercorn does."""
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in (attr or "app").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            fail(PROG, f"module {module_name!r} has no attribute {attr or 'app'!r}")
    return obj


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("application", help="module:app, an ASGI or WSGI application")
    p.add_argument("--config", help="hypercorn's config: TOML file, file:PATH.py or python:MOD")
    p.add_argument("--worker-class", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--fd", type=int, help="serve only this inherited fd (default: all)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.config is None:
        config = Config()
    elif args.config.startswith("python:"):
        config = Config.from_object(args.config[len("python:"):])
    elif args.config.startswith("file:"):
        config = Config.from_pyfile(args.config[len("file:"):])
    else:
        config = Config.from_toml(args.config)
    try:
        sockets = inherited_sockets(args.fd)
    except LaunchError as e:
        fail(PROG, str(e))
    # hypercorn builds its sockets from `bind`: fd://N takes each inherited fd as it is.
    fds = [s.detach() for s in sockets]
    config.bind = [f"fd://{fd}" for fd in fds]
    config.insecure_bind = []
    sys.path.insert(0, "")  # like `hypercorn app:app`: the working directory is importable
    app = load_app(args.application)
    if args.worker_class == "uvloop":
        import uvloop

        uvloop.run(_serve(serve, app, config, fds))
    else:
        asyncio.run(_serve(serve, app, config, fds))


async def _serve(serve: Any, app: Any, config: Any, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pid = os.getpid()
    grace = float(os.environ.get("SWAPD_IDLE_GRACE", "1"))

    async def shutdown_trigger() -> None:
        # Awaited by hypercorn only once the lifespan startup is done and it accepts.
        notify_ready(f"hypercorn serving, pid {pid}")
        await stop.wait()
        # hypercorn's shutdown closes every connection with no request in progress, one
        # accepted an instant ago whose request is on its way included (an EOF for that
        # client). So stop accepting first and give such connections the idle grace. On
        # asyncio's own loop a listening socket is served by a reader on its fd; removing it
        # stops this process's accepts and nothing else (the socket stays open, shared with
        # the other generation). uvloop serves it another way: there, no grace.
        if any([loop.remove_reader(fd) for fd in fds]):
            await asyncio.sleep(grace)

    await serve(app, config, shutdown_trigger=shutdown_trigger)


if __name__ == "__main__":
    main()
