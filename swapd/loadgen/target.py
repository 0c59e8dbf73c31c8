"""The target of a run: an Endpoint to connect to, and parse_target() for its text form."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from dataclasses import dataclass

from swapd.loadgen.outcomes import LoadConfigError
from swapd.loadgen.wire import HEAD_LIMIT


@dataclass(frozen=True)
class Endpoint:
    """Where the load goes: a TCP address given as an IP literal, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def of(cls, target: Target) -> Endpoint:
        if isinstance(target, Endpoint):
            return target
        if isinstance(target, tuple):
            host, port = target
            return cls.tcp(host, port)
        path = os.fspath(target)
        if "/" not in path:
            # "127.0.0.1:8000" passed as a string would otherwise be tried as a file name.
            raise LoadConfigError(
                f"{path!r}: a Unix socket path must contain '/'; for TCP pass (host, port) "
                "or use parse_target()"
            )
        return cls(path=path)

    @classmethod
    def tcp(cls, host: str, port: int) -> Endpoint:
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            # A name would be resolved on every connect, and "localhost" may mean v4 or v6.
            raise LoadConfigError(f"{host!r} is not an IP literal (use 127.0.0.1 or ::1)") from exc
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise LoadConfigError(f"invalid TCP port {port!r}")
        return cls(host=host, port=port)

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def host_header(self) -> str:
        if self.is_unix:
            return "localhost"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.is_unix else self.host_header

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.is_unix:
            return await asyncio.open_unix_connection(self.path, limit=HEAD_LIMIT)
        return await asyncio.open_connection(self.host, self.port, limit=HEAD_LIMIT)


Target = tuple[str, int] | str | os.PathLike[str] | Endpoint

_V6_RE = re.compile(r"\[([0-9A-Fa-f:.%\w]+)\]:([0-9]{1,5})")
_V4_RE = re.compile(r"([^:\[\]]+):([0-9]{1,5})")


def parse_target(text: str) -> Endpoint:
    """Parse ``127.0.0.1:8000``, ``[::1]:8000``, ``unix:/run/app.sock`` or ``/run/app.sock``."""
    if text.startswith("unix:"):
        return Endpoint.of(text.removeprefix("unix:"))
    if text.startswith(("/", "./")):
        return Endpoint.of(text)
    match = _V6_RE.fullmatch(text) or _V4_RE.fullmatch(text)
    if match is None:
        raise LoadConfigError(f"{text!r}: expected HOST:PORT, [V6]:PORT, unix:PATH or /PATH")
    return Endpoint.tcp(match.group(1), int(match.group(2)))
