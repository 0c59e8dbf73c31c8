"""A user's own gunicorn config file, with swapd's readiness hooks added to it."""

import swapd.servers.gunicorn

worker_class = "gthread"
threads = 4


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    print(f"user post_worker_init pid={worker.pid}", flush=True)


swapd.servers.gunicorn.install(globals())
