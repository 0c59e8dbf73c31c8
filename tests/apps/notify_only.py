"""A worker that does not use swapd.worker, as gunicorn or uvicorn: socket activation
(LISTEN_FDS), READY=1 on $NOTIFY_SOCKET, SIGTERM to stop. Answers every connection with
one line, "notify-only <pid>", and closes it."""

from __future__ import annotations

import os
import signal
import socket

from swapd.systemd import Notifier

signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
listener = socket.socket(fileno=3)
with Notifier.from_env() as notifier:
    notifier.ready()
while True:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(f"notify-only {os.getpid()}\n".encode())
