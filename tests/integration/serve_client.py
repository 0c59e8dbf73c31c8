"""Raw-socket HTTP and WebSocket helpers for the `swapd serve` tests.

http.client parses the responses (status line, headers, Content-Length or chunked bodies);
the requests are written by hand because the tests need what well-behaved clients never
send: pipelined requests, partial heads, malformed input, oversized headers.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import struct
from typing import Any


class _Unclosable:
    """One buffered reader shared by consecutive responses (pipelining)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def close(self) -> None:
        pass


class RawHTTP:
    """A TCP connection speaking raw bytes, reading responses with http.client."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = _Unclosable(self.sock.makefile("rb"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        resp = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]
        resp.begin()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def makefile(self, mode: str) -> Any:  # what HTTPResponse asks its "socket" for
        return self.file

    def at_eof(self) -> bool:
        """True once the server has closed the connection (reads nothing more)."""
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.raw.close()  # the socket's fd stays open while a makefile() reader lives
        self.sock.close()


def get(path: str = "/", *extra: str, host: str = "t") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *extra, "", ""]
    return "\r\n".join(lines).encode()


def frame(opcode: int, payload: bytes, *, masked: bool = True, fin: bool = True) -> bytes:
    """One WebSocket frame as a client sends it (masked), or as it must not (unmasked)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if masked:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


class RawWebSocket:
    """A WebSocket client that can also send what a correct client never would."""

    def __init__(self, address: tuple[str, int], path: str = "/ws", early: bytes = b"") -> None:
        """`early`: bytes sent in the same write as the upgrade request (frames a client
        pipelines behind its handshake)."""
        self.http = RawHTTP(address)
        key = base64.b64encode(os.urandom(16)).decode()
        self.http.send(get(path, "Upgrade: websocket", "Connection: Upgrade",
                           f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13") + early)
        status, _, _ = self.http.response()
        assert status == 101, status

    def send_frame(self, opcode: int, payload: bytes, *, masked: bool = True,
                   fin: bool = True) -> None:
        self.http.send(frame(opcode, payload, masked=masked, fin=fin))
    def read_frame(self) -> tuple[int, bytes]:
        f = self.http.file
        b0, b1 = f.read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", f.read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", f.read(8))[0]
        return b0 & 0x0F, f.read(n)

    def close_code(self) -> int:
        """Read frames until a close frame; its status code."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005

    def close(self) -> None:
        self.http.close()
