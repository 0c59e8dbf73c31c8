"""Readiness that is true for third-party servers run as swapd workers.

These modules run *inside* the third-party server's process (gunicorn's arbiter and
workers, a uvicorn, hypercorn or aiohttp process). They only speak the worker contract
(``LISTEN_FDS`` in, ``READY=1`` on ``$NOTIFY_SOCKET`` out), stay light, and never import
``swapd.supervisor``. Each reports ready only once the application has been imported and its
startup (ASGI lifespan, aiohttp ``on_startup``, gunicorn worker boot) has completed, and the
server accepts on the inherited sockets; a release that fails there exits non-zero before
``READY=1``, so swapd refuses it and the old generation keeps serving.

    gunicorn   gunicorn -c python:swapd.servers.gunicorn app:wsgi       (server hooks)
    uvicorn    python -m swapd.servers.uvicorn app:app [uvicorn options]
    hypercorn  python -m swapd.servers.hypercorn [--config FILE] app:app
    aiohttp    python -m swapd.servers.aiohttp module:app_or_factory [args]

See docs/servers.md for the recipes and why each mechanism was chosen.
"""
