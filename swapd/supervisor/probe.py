"""The health probe of a watch window: one HTTP/1.1 GET through a listener.

The probe connects to the listener's own address, as a client would, and so reaches the
generation that accepts: during a watch window that is the watched (new) one only, since
the held generation accepts nothing. It cannot aim at one worker of a multi-worker
generation (the kernel picks who accepts); a worker can judge itself and report over
the channel (`w.report_health(False, reason)`), which a watch window also acts on.

    → GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1:8000\\r\\nUser-Agent: swapd-health\\r\\n
      Connection: close\\r\\n\\r\\n
    ← HTTP/1.1 200 OK\\r\\n...      healthy: a 2xx status; anything else is the reason

Only the status line is read (at most 8 KiB); the connection is then closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket

from swapd.supervisor.listeners import Listener, Listeners

_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?\r?\n")
_MAX_LINE = 8192


class NotHttp(Exception):
    """The listener answered, but not with HTTP: a configuration error, not ill health."""


def pick(listeners: Listeners, name: str | None) -> Listener:
    """The listener a probe goes through: `name`, or the first one; KeyError if none."""
    for lis in listeners:
        if name is None or lis.name == name:
            return lis
    raise KeyError(name)


def target(lis: Listener) -> tuple[int, str | tuple[str, int], str]:
    """(family, connect address, Host header) of a listener, wildcards made loopback."""
    bound = lis.sock.getsockname()
    if lis.sock.family == socket.AF_UNIX:
        return socket.AF_UNIX, bound, "localhost"
    host, port = bound[0], bound[1]
    if lis.sock.family == socket.AF_INET6:
        host = "::1" if host in ("::", "") else host
        return socket.AF_INET6, (host, port), f"[{host}]:{port}"
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return socket.AF_INET, (host, port), f"{host}:{port}"


async def probe(lis: Listener, path: str, timeout: float) -> str | None:
    """None if the listener answers `GET path` with a 2xx status, else why not.
    NotHttp if what answered does not speak HTTP."""
    family, address, host = target(lis)
    try:
        return await asyncio.wait_for(_get(family, address, host, path), timeout)
    except TimeoutError:
        return f"GET {path}: no answer within {timeout:g}s"
    except OSError as e:
        return f"GET {path}: {e.strerror or e}"


async def _get(family: int, address: str | tuple[str, int], host: str, path: str
               ) -> str | None:
    if isinstance(address, str):
        reader, writer = await asyncio.open_unix_connection(address, limit=_MAX_LINE)
    else:
        reader, writer = await asyncio.open_connection(*address, limit=_MAX_LINE)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: swapd-health\r\n"
                     "Connection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return f"GET {path}: connection closed without an answer"
            raise NotHttp(f"answered {e.partial[:60]!r}, not HTTP") from None
        except asyncio.LimitOverrunError:
            raise NotHttp("answered a line over 8 KiB, not an HTTP status line") from None
        found = _STATUS.fullmatch(line)
        if found is None:
            raise NotHttp(f"answered {line[:60]!r}, not an HTTP status line")
        status = int(found.group(1))
        if 200 <= status < 300:
            return None
        return f"GET {path}: status {status}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
