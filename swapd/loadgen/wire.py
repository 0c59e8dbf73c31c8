r"""The client side of the wire formats: requests encoded, replies read strictly and bounded.

    HTTP/1.1 request                         HTTP/1.1 response (parsed strictly)
    GET /path HTTP/1.1\r\n                   HTTP/1.1 200 OK\r\n
    Host: 127.0.0.1:8000\r\n                 Content-Length: 2\r\n     or chunked, or neither:
    User-Agent: swapd-loadgen\r\n                                     body until EOF, not reusable
    Connection: keep-alive | close\r\n       [Connection: close\r\n]   ends a keep-alive conn.
    [Content-Length: 0\r\n]       (POST)     \r\n
    \r\n                                     42                         int body for counters

    line protocol    client "INCR\n"  ->  server "42\n"   (the counter's new value)
                     client "GET\n"   ->  server "42\n"   (the value, unchanged)

A reply that breaks the protocol raises ResponseError (outcome ``bad-response``), one cut short
raises ConnectionClosed (``eof``, saying whether any byte had come). Every size read is bounded:
the head and a line reply by HEAD_LIMIT, a body by MAX_BODY, header and trailer fields by
MAX_HEADERS.

The response parser is hand-written rather than httptools (the parser of ``swapd serve``): an
instrument must not share the parser of the server it measures, or one bug would hide on both
ends, and its failure texts, which the reports print, are part of its output; ``swapd demo``
also needs nothing beyond what ``pip install .`` brings.
"""

from __future__ import annotations

import asyncio
import re
from typing import NamedTuple

from swapd.loadgen.outcomes import NO_VALUE, ConnectionClosed, ResponseError

HEAD_LIMIT = 64 * 1024  # response head (and line reply) size limit
MAX_BODY = 4 * 1024 * 1024
MAX_HEADERS = 100


def encode_http_request(method: str, path: str, host_header: str, close: bool) -> bytes:
    """The request as drawn above (method, path and host already validated)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host_header}",
        "User-Agent: swapd-loadgen",
        f"Connection: {'close' if close else 'keep-alive'}",
    ]
    if method == "POST":
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def encode_line_request(command: str) -> bytes:
    return f"{command}\n".encode("ascii")


class HttpResponse(NamedTuple):
    status: int
    body: bytes
    reusable: bool  # the connection may carry another request


_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9]{2})(?: [\x09\x20-\x7e\x80-\xff]*)?")
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE_RE = re.compile(rb"[\x09\x20-\x7e\x80-\xff]*")
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,8}")
_INT_RE = re.compile(rb"[ \t\r\n]*(-?[0-9]{1,19})[ \t\r\n]*")


async def _read_until(reader: asyncio.StreamReader, separator: bytes, first: bool) -> bytes:
    try:
        return await reader.readuntil(separator)
    except asyncio.IncompleteReadError as exc:
        where = "before any response byte" if first and not exc.partial else "mid-response"
        raise ConnectionClosed(f"closed {where}") from exc
    except asyncio.LimitOverrunError as exc:
        raise ResponseError(f"no {separator!r} within {HEAD_LIMIT} bytes") from exc


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed("closed mid-response") from exc


def parse_int(data: bytes) -> int:
    match = _INT_RE.fullmatch(data)
    value = int(match.group(1)) if match else None
    if value is None or not NO_VALUE < value < 2**63:
        raise ResponseError(f"not an integer: {data[:40]!r}")
    return value


def _parse_head(head: bytes) -> tuple[int, int, dict[bytes, list[bytes]]]:
    """(status, minor version, lower-cased field name -> values) from a head ending in CRLFCRLF."""
    status_line, *field_lines = head[:-4].split(b"\r\n")
    match = _STATUS_RE.fullmatch(status_line)
    if match is None:
        raise ResponseError(f"bad status line {status_line[:60]!r}")
    if len(field_lines) > MAX_HEADERS:
        raise ResponseError(f"more than {MAX_HEADERS} header fields")
    fields: dict[bytes, list[bytes]] = {}
    for field_line in field_lines:
        name, colon, value = field_line.partition(b":")
        # Whitespace before the colon and obs-fold are rejected, as RFC 9112 asks of clients.
        value = value.strip(b" \t")
        if not colon or not _TOKEN_RE.fullmatch(name) or not _FIELD_VALUE_RE.fullmatch(value):
            raise ResponseError(f"bad header field {field_line[:60]!r}")
        fields.setdefault(name.lower(), []).append(value)
    return int(match.group(2)), int(match.group(1)), fields


def _tokens(fields: dict[bytes, list[bytes]], name: bytes) -> list[bytes]:
    return [t.strip().lower() for v in fields.get(name, []) for t in v.split(b",") if t.strip()]


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = (await _read_until(reader, b"\r\n", first=False))[:-2]
        size_text = size_line.split(b";", 1)[0].strip(b" \t")
        if not _CHUNK_SIZE_RE.fullmatch(size_text):
            raise ResponseError(f"bad chunk size line {size_line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > MAX_BODY:
            raise ResponseError(f"body larger than {MAX_BODY} bytes")
        parts.append(await _read_exactly(reader, size))
        if await _read_exactly(reader, 2) != b"\r\n":
            raise ResponseError("chunk not followed by CRLF")
    for _ in range(MAX_HEADERS + 1):  # trailer fields, ignored
        if await _read_until(reader, b"\r\n", first=False) == b"\r\n":
            return b"".join(parts)
    raise ResponseError(f"more than {MAX_HEADERS} trailer fields")


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while chunk := await reader.read(65536):
        total += len(chunk)
        if total > MAX_BODY:
            raise ResponseError(f"body larger than {MAX_BODY} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def read_http_response(reader: asyncio.StreamReader) -> HttpResponse:
    """Read one HTTP/1.x response (interim 1xx responses skipped) and decide on reuse."""
    first = True
    while True:
        head = await _read_until(reader, b"\r\n\r\n", first)
        first = False
        status, minor, fields = _parse_head(head)
        if status == 101:
            raise ResponseError("unexpected 101 Switching Protocols")
        if status >= 200:
            break
    connection = _tokens(fields, b"connection")
    reusable = b"keep-alive" in connection if minor == 0 else b"close" not in connection
    coding = _tokens(fields, b"transfer-encoding")
    lengths = {v.strip() for v in fields.get(b"content-length", [])}
    if coding and lengths:
        raise ResponseError("both Transfer-Encoding and Content-Length")
    if status in (204, 304):
        body = b""
    elif coding:
        if coding[-1] != b"chunked":
            raise ResponseError(f"unsupported Transfer-Encoding {b', '.join(coding)!r}")
        body = await _read_chunked(reader)
    elif lengths:
        text = lengths.pop()
        if lengths or not text.isdigit() or int(text) > MAX_BODY:
            raise ResponseError(f"bad Content-Length {sorted({text, *lengths})!r}")
        body = await _read_exactly(reader, int(text))
    else:
        body = await _read_to_eof(reader)  # framed by the close: the connection is spent
        reusable = False
    return HttpResponse(status, body, reusable)


async def read_line_reply(reader: asyncio.StreamReader) -> int:
    """Read one ``<integer>\\n`` reply of the line protocol."""
    return parse_int(await _read_until(reader, b"\n", first=True))
