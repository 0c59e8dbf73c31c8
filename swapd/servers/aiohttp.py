"""aiohttp as a swapd worker: ready once the application is built, its on_startup (and
cleanup_ctx) has run, and it accepts on the inherited sockets.

    swapd run --bind http=127.0.0.1:8000 -- python -m swapd.servers.aiohttp module:factory [args]

`module:factory` is what `python -m aiohttp.web` takes: a function called with the remaining
arguments that returns an `aiohttp.web.Application` (or an awaitable of one); `module:app`
naming an Application works too. SIGTERM or SIGINT stops accepting at once, waits
$SWAPD_IDLE_GRACE seconds (swapd's idle_grace) for requests on connections just accepted,
then runs aiohttp's graceful shutdown (`AppRunner.cleanup`: close idle keep-alive
connections, wait up to `--shutdown-timeout` for handlers in flight, run on_shutdown and
on_cleanup).

Why this way: aiohttp has no readiness notification and no way to serve an inherited fd
from its CLI; its public runner API (`AppRunner.setup()` runs the startup signals, then
`SockSite(runner, sock).start()` accepts) says exactly when both are done.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from swapd.servers._common import LaunchError, fail, inherited_sockets, notify_ready

PROG = "swapd.servers.aiohttp"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("entry", help="module:function returning an Application, or module:app")
    p.add_argument("--shutdown-timeout", type=float,
                   default=float(os.environ.get("SWAPD_DRAIN_TIMEOUT", "60")),
                   help="seconds a draining worker waits for handlers in flight "
                        "(default: swapd's drain timeout)")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    return p


async def _build(entry: str, argv: list[str]) -> Any:
    from aiohttp import web

    module_name, _, attr = entry.partition(":")
    if not module_name or not attr:
        fail(PROG, f"{entry!r} is not in module:function syntax")
    module = importlib.import_module(module_name)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        fail(PROG, f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, web.Application):
        obj = obj(argv)
        if inspect.isawaitable(obj):
            obj = await obj
    if not isinstance(obj, web.Application):
        fail(PROG, f"{entry} gave {type(obj).__name__}, not an aiohttp.web.Application")
    return obj


async def _serve(entry: str, argv: list[str], shutdown_timeout: float, idle_grace: float
                 ) -> None:
    from aiohttp import web

    try:
        sockets = inherited_sockets()
    except LaunchError as e:
        fail(PROG, str(e))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = await _build(entry, argv)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()  # on_startup and cleanup_ctx run here: an exception exits non-zero
    sites = []
    try:
        for sock in sockets:
            site = web.SockSite(runner, sock)
            await site.start()
            sites.append(site)
        notify_ready(f"aiohttp serving, pid {os.getpid()}")
        await stop.wait()
        # Stop accepting first, then give connections just accepted the idle grace to send
        # their request: aiohttp's shutdown closes every connection with no request in
        # progress, and one whose request is still on its way would be cut (an EOF).
        for site in sites:
            await site.stop()
        await asyncio.sleep(idle_grace)
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, "")  # like `python -m aiohttp.web`: the working directory is importable
    coro = _serve(args.entry, rest, args.shutdown_timeout,
                  float(os.environ.get("SWAPD_IDLE_GRACE", "1")))
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
