"""swapd.serve: any ASGI or WSGI app as a swapd worker (`swapd serve MODULE:APP`).

Built on `swapd.worker`: its Connection API marks request boundaries, which is what makes
drains exact (no keep-alive request lost) and lets a stateful swap hand connections over.

    server.py    the command: load the app, lifespan, serve the listeners, drain
    options.py   command-line options (uvicorn's and gunicorn's names where they fit)
    loader.py    import MODULE:APP, detect ASGI 3 / ASGI 2 / WSGI
    context.py   what the connections of one process share
    h1.py        HTTP/1.1: httptools parsing, bounds, timeouts, boundaries, writes
    asgi.py      the ASGI HTTP cycle (scope, receive, send)
    wsgi.py      PEP 3333 on a bounded thread pool
    filewrapper.py  wsgi.file_wrapper, sent with os.sendfile
    ws.py        WebSockets (wsproto), and their handoff between workers
    lifespan.py  ASGI lifespan
    state.py     @swapd.on_snapshot / on_restore wired to the worker's handoff
    proxy.py     X-Forwarded-* from trusted proxies

See docs/serve.md.
"""

from swapd.serve.server import main

__all__ = ["main"]
