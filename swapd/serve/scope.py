"""What an ASGI scope is built from, for HTTP and WebSocket alike: the request target split
and prefixed with root_path, and the client and scheme (behind a trusted proxy, from its
headers)."""

from __future__ import annotations

from urllib.parse import unquote

import httptools

from swapd.serve import proxy
from swapd.serve.h1 import H1, Reject, Request

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}


def split_target(req: Request, root_path: str) -> tuple[str, bytes, bytes]:
    """(path, raw_path, query_string) of the request target, root_path prepended."""
    url = req.url
    if url[:1] == b"/" and b"?" not in url and b"%" not in url:
        raw, query = url, b""
    else:
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise Reject(400, "invalid request target") from None
        raw, query = parsed.path or b"/", parsed.query or b""
    path = raw.decode("utf-8", "replace")
    if "%" in path:
        path = unquote(path)
    if root_path:
        return root_path + path, root_path.encode() + raw, query
    return path, raw, query


def client_and_scheme(h: H1, req: Request, *, websocket: bool = False
                      ) -> tuple[tuple[str, int] | None, str]:
    opts = h.ctx.options
    plain = "ws" if websocket else "http"
    if opts.proxy_headers and (req.forwarded_for is not None or req.forwarded_proto is not None):
        client, scheme = proxy.resolve(h.client, req.forwarded_for, req.forwarded_proto,
                                       opts.forwarded_allow_ips, websocket=websocket,
                                       unix_trusted=opts.trust_unix_peers)
        return client, scheme or plain
    return h.client, plain
