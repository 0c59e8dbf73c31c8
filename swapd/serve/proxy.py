"""X-Forwarded-For / X-Forwarded-Proto from trusted proxies (uvicorn's --proxy-headers rules).

Only a peer in --forwarded-allow-ips (or on a Unix socket: the local proxy) is believed. The
client is the rightmost X-Forwarded-For entry that is not itself a trusted proxy, so a client
cannot pose as another by sending the header itself.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None


@lru_cache(maxsize=1024)
def _trusted(host: str, networks: Networks) -> bool:
    if networks is None:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def resolve(client: tuple[str, int] | None, forwarded_for: bytes | None,
            forwarded_proto: bytes | None, networks: Networks, *, websocket: bool = False,
            unix_trusted: bool = True) -> tuple[tuple[str, int] | None, str | None]:
    """(client, scheme or None) after applying the headers, if the peer may send them."""
    trusted = unix_trusted if client is None else _trusted(client[0], networks)
    if not trusted:
        return client, None
    scheme = None
    if forwarded_proto is not None:
        proto = forwarded_proto.decode("latin-1").split(",")[-1].strip().lower()
        if proto in ("http", "https", "ws", "wss"):
            scheme = proto.replace("http", "ws") if websocket else proto.replace("ws", "http")
    if forwarded_for is not None:
        hosts = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        for host in reversed(hosts):
            if not _trusted(host, networks):
                return (host, 0), scheme
        if hosts:  # every hop is trusted: the leftmost is the client
            return (hosts[0], 0), scheme
    return client, scheme
