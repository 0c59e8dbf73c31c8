"""A scripted control socket for client tests: real Unix sockets, a thread, no supervisor.

Each connection reads one request line, records it, writes the scripted reply lines, then
either closes or holds the connection open (answering nothing more) until `close()`, so
that a client's own deadline is what ends the wait. A `threading.Event` among the replies
holds the rest back until the test sets it (so that they arrive in a later read).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from typing import Any


class FakeSupervisor:
    def __init__(self, path: Path, replies: list[Any], *, hold: bool = False) -> None:
        self.path = str(path)
        self.replies = [r if isinstance(r, bytes | threading.Event)
                        else json.dumps(r).encode() + b"\n" for r in replies]
        self.hold = hold
        self.requests: list[dict[str, Any]] = []
        self.received = threading.Event()  # a request arrived
        self.answered = threading.Event()  # the replies of a connection were written
        self._closing = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    self.requests.append(json.loads(data))
                    self.received.set()
                for line in self.replies:
                    if isinstance(line, threading.Event):
                        line.wait(10)
                    else:
                        conn.sendall(line)
            self.answered.set()
            if not self.hold:
                conn.close()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(10)
        for conn in self._conns:
            conn.close()
        self._sock.close()


def progress(message: str, event: str = "spawned") -> dict[str, Any]:
    return {"v": 1, "type": "progress", "event": event, "message": message}


def deadline(seconds: float) -> dict[str, Any]:
    return {"v": 1, "type": "deadline", "seconds": seconds}


def result(ok: bool = True, **data: Any) -> dict[str, Any]:
    return {"v": 1, "type": "result", "ok": ok, "data": data}
