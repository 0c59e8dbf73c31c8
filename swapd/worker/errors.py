"""`WorkerError`, the worker library's own exception (`swapd.worker.WorkerError`).

Its own module because every part of the library raises it (the `Worker`, its handoff
side, the process set-up) and none of them is below the others.
"""


class WorkerError(RuntimeError):
    """Misuse of the worker API, or an environment the worker cannot run in."""
