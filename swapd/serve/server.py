"""`swapd serve MODULE:APP`: load the app, run it on `swapd.worker`, drain it.

    start   import swapd.worker (so patches see the sources), import the app, detect its
            interface; on the worker's loop: lifespan startup (a failure exits 1 before
            ready: the swap fails), install the state hooks, serve every listener, ready()
    serve   one handler call per connection: HTTP/1.1 (h1 + asgi | wsgi), a WebSocket
            upgrade (ws), or a connection handed over by the previous worker
    drain   in-flight requests finish, keep-alive requests get Connection: close, silent
            connections close after idle_grace (swapd.worker), WebSockets get 1012 shortly
            before the drain deadline; once every connection ended: lifespan shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from swapd.serve import loader
from swapd.serve.options import Options, OptionsError, parse

log = logging.getLogger("swapd.serve")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
WS_CLOSE_MARGIN = 2.0  # WebSockets are closed this long (at most 20 %) before the deadline


def setup_logging(level: str) -> None:
    if os.environ.get("SWAPD_CHANNEL_FD") or os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s %(message)s"  # swapd (or journald) adds time and pid
    else:
        fmt = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def main(argv: Sequence[str]) -> int:
    try:
        opts = parse(argv)
    except OptionsError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    setup_logging(opts.log_level)
    # Imported before the app: swapd.worker records the source of every module imported
    # after it, so `swapd patch` diffs against what this process really runs.
    from swapd import worker

    try:
        app = loader.load(opts.app, factory=opts.factory, app_dir=opts.app_dir)
    except loader.LoadError as e:
        print(f"swapd serve: {e}", file=sys.stderr)
        return EXIT_FAILED
    interface = loader.detect(app, opts.interface)
    if interface == "asgi2":
        app = loader.asgi2_to_3(app)
    binds = dict(spec.split("=", 1) for spec in opts.binds) or {"http": "127.0.0.1:8000"}
    server = Server(opts, app, "wsgi" if interface == "wsgi" else "asgi3")
    try:
        worker.run(server.main, default_binds=binds)
    except StartError as e:
        log.error("event=serve.start_failed error=%r", str(e))
        return EXIT_FAILED
    except worker.WorkerError as e:
        print(f"swapd serve: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


class StartError(Exception):
    """The worker cannot become ready (lifespan startup failed, a listener is missing)."""


class Server:
    def __init__(self, options: Options, app: Any, interface: str) -> None:
        self.options = options
        self.app = app
        self.interface = interface

    async def main(self, w: Any) -> None:
        # Imported here: they need the worker's loop, and keep `swapd serve --help` quick.
        from swapd.serve import state
        from swapd.serve.context import Context
        from swapd.serve.lifespan import Lifespan, LifespanError

        opts = self.options
        ctx = Context(opts, self.app, self.interface, w)
        names = list(opts.listeners) or list(w.listeners)
        if not names:
            raise StartError("no listener to serve (run under `swapd run --bind ...`)")
        for name in names:
            if name not in w.listeners:
                raise StartError(f"no listener named {name!r} (have: "
                                 f"{', '.join(w.listeners) or 'none'})")
        if self.interface == "wsgi":
            ctx.pool = ThreadPoolExecutor(opts.threads, thread_name_prefix="swapd-wsgi")
        lifespan = Lifespan(self.app, opts.lifespan if self.interface == "asgi3" else "off",
                            ctx.lifespan_state, opts.timeouts.lifespan)
        try:
            await lifespan.startup()
        except LifespanError as e:
            raise StartError(str(e)) from None
        state.install(ctx, w)
        drained = asyncio.Event()
        w.on_drain(lambda: self._on_drain(ctx, drained))
        handler = self._handler(ctx)
        for name in names:
            await w.serve(name, handler, accept_batch=opts.accept_batch)
        log.info("event=serve.ready app=%s interface=%s listeners=%s gen=%d slot=%d mode=%s "
                 "pid=%d", opts.app, self.interface, ",".join(names), w.generation, w.slot,
                 w.mode, os.getpid())
        await w.ready()
        await drained.wait()
        await self._wait_idle(ctx)
        await lifespan.shutdown()
        if ctx.pool is not None:
            ctx.pool.shutdown(wait=False, cancel_futures=True)

    def _handler(self, ctx: Any) -> Any:
        from swapd.serve import asgi, ws, wsgi
        from swapd.serve.h1 import H1

        dispatch = wsgi.dispatch if self.interface == "wsgi" else asgi.dispatch

        async def handle(conn: Any) -> None:
            ctx.connections += 1
            try:
                session = ctx.ws_handed.pop(conn, None)
                if session is not None and session.state == ws.OPEN:
                    # A handoff aborted before its snapshot: the session goes on.
                    conn.meta.pop(ws.META, None)
                    await session.run(start_app=False)
                    return
                data = conn.meta.pop(ws.META, None)
                if data is not None:
                    await ws.resume(ctx, conn, data)
                    return
                await H1(ctx, conn).run(dispatch)
            finally:
                ctx.connections -= 1
                ctx.changed.set()

        return handle

    def _on_drain(self, ctx: Any, drained: asyncio.Event) -> None:
        w = ctx.worker
        loop = ctx.loop
        deadline = w.drain_deadline if w.drain_deadline is not None else loop.time() + 30
        margin = min(WS_CLOSE_MARGIN, 0.2 * max(0.0, deadline - loop.time()))
        self._deadline = deadline - margin / 2  # lifespan shutdown starts by then at the latest
        ctx.ws_handed.clear()  # after a commit: their sockets belong to the successor
        loop.call_at(deadline - margin, self._close_websockets, ctx, margin / 2)
        log.info("event=serve.drain connections=%d websockets=%d deadline_in=%.1fs",
                 ctx.connections, len(ctx.ws_sessions), deadline - loop.time())
        drained.set()

    def _close_websockets(self, ctx: Any, wait: float) -> None:
        sessions = list(ctx.ws_sessions)
        if sessions:
            log.info("event=ws.close_for_drain connections=%d code=1012", len(sessions))
        for session in sessions:
            session.close_for_drain(wait)

    async def _wait_idle(self, ctx: Any) -> None:
        loop = ctx.loop
        while ctx.busy:
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                log.warning("event=serve.drain_deadline connections=%d tasks=%d",
                            ctx.connections, len(ctx.app_tasks))
                return
            ctx.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.changed.wait(), remaining)
