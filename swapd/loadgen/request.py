"""What the load sends: the connection mode and the kinds of request, validated when built."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

from swapd.loadgen.outcomes import LoadConfigError
from swapd.loadgen.target import Endpoint
from swapd.loadgen.wire import encode_http_request, encode_line_request


class Mode(enum.StrEnum):
    CLOSE = "close"
    KEEPALIVE = "keepalive"


_PATH_RE = re.compile(r"/[\x21-\x7e]*")
_COMMAND_RE = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True)
class Request:
    """One kind of request. Build it with http_get, http_post, http_get_int or line."""

    protocol: Literal["http", "line"]
    method: str = ""  # HTTP only
    path: str = ""  # HTTP only
    command: str = ""  # line protocol only
    expects_int: bool = False  # the reply carries an integer, recorded as the attempt's value
    counts: bool = False  # each ok reply acknowledges one increment

    def __post_init__(self) -> None:
        if self.protocol == "http":
            if self.method not in ("GET", "POST") or not _PATH_RE.fullmatch(self.path):
                raise LoadConfigError(f"invalid HTTP request {self.method!r} {self.path!r}")
        elif self.protocol == "line":
            if not _COMMAND_RE.fullmatch(self.command):
                raise LoadConfigError(f"invalid line command {self.command!r}")
        else:
            raise LoadConfigError(f"unknown protocol {self.protocol!r}")

    def describe(self) -> str:
        return f"line {self.command}" if self.protocol == "line" else f"{self.method} {self.path}"

    def encode(self, endpoint: Endpoint, mode: Mode) -> bytes:
        if self.protocol == "line":
            return encode_line_request(self.command)
        return encode_http_request(self.method, self.path, endpoint.host_header, mode is Mode.CLOSE)


def http_get(path: str = "/") -> Request:
    """GET; ok iff status 200 (the body is read and ignored)."""
    return Request("http", method="GET", path=path)


def http_post(path: str = "/incr") -> Request:
    """POST with an empty body; ok iff 200 and the body is an integer: the counter's new value."""
    return Request("http", method="POST", path=path, expects_int=True, counts=True)


def http_get_int(path: str = "/count") -> Request:
    """GET whose body is an integer (a read of state, e.g. the final count)."""
    return Request("http", method="GET", path=path, expects_int=True)


def line(command: str = "INCR") -> Request:
    """Line protocol: send ``COMMAND\\n``, read one line holding an integer. INCR counts."""
    return Request("line", command=command, expects_int=True, counts=command == "INCR")
