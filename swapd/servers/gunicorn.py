"""gunicorn config module: READY=1 only once every worker has booted.

    swapd run --bind http=127.0.0.1:8000 -- gunicorn -c python:swapd.servers.gunicorn app:wsgi

With a config file of your own, end it with::

    import swapd.servers.gunicorn
    swapd.servers.gunicorn.install(globals())

It uses gunicorn's public server hooks only (on_starting, post_worker_init, child_exit);
see `swapd.servers._gunicorn_hooks` for how, and docs/servers.md for why. Correct with and
without --preload, for the sync, gthread and uvicorn worker classes.
"""

from swapd.servers._gunicorn_hooks import child_exit, install, on_starting, post_worker_init

__all__ = ["child_exit", "install", "on_starting", "post_worker_init"]
