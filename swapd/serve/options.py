"""`swapd serve` options: the command line, validated into one frozen `Options`.

Names follow uvicorn (and gunicorn for the request limits) where the meaning is the same;
defaults too, so an app moved from uvicorn behaves the same.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

INTERFACES = ("auto", "asgi3", "asgi2", "asgi", "wsgi")
LIFESPAN = ("auto", "on", "off")


class OptionsError(ValueError):
    """A bad option; the message is one line for the operator."""


@dataclass(frozen=True)
class Limits:
    request_line: int = 8190          # bytes of the request target -> 414
    request_fields: int = 100         # header fields -> 431
    request_head: int = 65536         # bytes of request line + headers -> 431
    request_body: int = 16 * 2**20    # bytes of a request body -> 413
    concurrency: int | None = None    # open connections; more get 503
    ws_max_size: int = 16 * 2**20     # bytes of one WebSocket message -> close 1009
    ws_queue: int = 16                # messages received and not yet read by the app


@dataclass(frozen=True)
class Timeouts:
    keep_alive: float = 5.0           # an idle keep-alive connection is closed after this
    request_head: float = 10.0        # the whole request head must arrive within (slowloris)
    read: float = 30.0                # no byte of a request body for this long -> 408 and close
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float | None = 20.0
    ws_close: float = 5.0             # how long to wait for the peer's close frame
    lifespan: float = 60.0            # startup / shutdown


@dataclass(frozen=True)
class Options:
    app: str
    interface: str = "auto"
    factory: bool = False
    app_dir: str = "."
    listeners: tuple[str, ...] = ()   # serve these listeners (default: every one passed)
    binds: tuple[str, ...] = ()       # NAME=ADDR when run without swapd
    root_path: str = ""
    proxy_headers: bool = True
    forwarded_allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = (
        ipaddress.ip_network("127.0.0.1/32"),)  # None: trust every peer ("*")
    trust_unix_peers: bool = True     # a peer on a Unix socket is the local proxy
    access_log: bool = True
    server_header: bool = True
    date_header: bool = True
    headers: tuple[tuple[bytes, bytes], ...] = ()
    lifespan: str = "auto"
    threads: int = 8
    accept_batch: int = 4
    ws: bool = True
    ws_per_message_deflate: bool = False
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise OptionsError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="swapd serve", description=(
        "Host an ASGI or WSGI app as a swapd worker: exact drains, state and live connections "
        "across swaps. Run it under `swapd run` (or `swapd run --app MODULE:APP`), or alone."))
    p.add_argument("app", metavar="MODULE:APP", help="e.g. main:app, or pkg.mod:make_app")
    a = p.add_argument_group("application")
    a.add_argument("--interface", choices=INTERFACES, default="auto",
                   help="auto-detected: ASGI 3 for an async callable, WSGI otherwise")
    a.add_argument("--factory", action="store_true",
                   help="APP is a function returning the application")
    a.add_argument("--app-dir", default=".", help="put this directory on sys.path (default .)")
    a.add_argument("--lifespan", choices=LIFESPAN, default="auto",
                   help="ASGI lifespan: auto = use it if the app supports it")
    a.add_argument("--root-path", default="", help="mount point behind a proxy (ASGI root_path, "
                   "WSGI SCRIPT_NAME)")
    a.add_argument("--threads", type=int, default=8, help="WSGI: worker threads (default 8)")
    n = p.add_argument_group("listeners")
    n.add_argument("--listener", action="append", default=[], metavar="NAME",
                   help="serve only this listener (repeatable; default: every one)")
    n.add_argument("--bind", action="append", default=[], metavar="NAME=ADDR",
                   help="without swapd: bind this (default http=127.0.0.1:8000)")
    n.add_argument("--accept-batch", type=int, default=4, metavar="N",
                   help="connections taken per wakeup (default 4; 1 spreads long-lived "
                        "connections most evenly over workers)")
    h = p.add_argument_group("HTTP")
    h.add_argument("--proxy-headers", action=argparse.BooleanOptionalAction, default=True,
                   help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips (default on)")
    h.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                   help="comma-separated IPs or networks, or '*' (default $FORWARDED_ALLOW_IPS "
                   "or 127.0.0.1)")
    h.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    h.add_argument("--server-header", action=argparse.BooleanOptionalAction, default=True)
    h.add_argument("--date-header", action=argparse.BooleanOptionalAction, default=True)
    h.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="a header added to every response (repeatable)")
    lim = Limits()
    h.add_argument("--limit-request-line", type=int, default=lim.request_line, metavar="BYTES")
    h.add_argument("--limit-request-fields", type=int, default=lim.request_fields, metavar="N")
    h.add_argument("--limit-request-head", type=int, default=lim.request_head, metavar="BYTES")
    h.add_argument("--limit-request-body", type=int, default=lim.request_body, metavar="BYTES")
    h.add_argument("--limit-concurrency", type=int, default=None, metavar="N",
                   help="open connections; requests beyond get 503")
    t = Timeouts()
    h.add_argument("--timeout-keep-alive", type=float, default=t.keep_alive, metavar="SECONDS")
    h.add_argument("--timeout-request-head", type=float, default=t.request_head,
                   metavar="SECONDS", help="a request head must arrive within (slowloris)")
    h.add_argument("--timeout-read", type=float, default=t.read, metavar="SECONDS",
                   help="longest silence inside a request body")
    h.add_argument("--timeout-lifespan", type=float, default=t.lifespan, metavar="SECONDS")
    w = p.add_argument_group("WebSocket")
    w.add_argument("--ws", action=argparse.BooleanOptionalAction, default=True,
                   help="serve WebSocket upgrades (default on)")
    w.add_argument("--ws-max-size", type=int, default=lim.ws_max_size, metavar="BYTES")
    w.add_argument("--ws-ping-interval", type=float, default=t.ws_ping_interval,
                   metavar="SECONDS", help="0 disables pings")
    w.add_argument("--ws-ping-timeout", type=float, default=t.ws_ping_timeout, metavar="SECONDS")
    w.add_argument("--ws-per-message-deflate", action=argparse.BooleanOptionalAction,
                   default=False, help="compression (such connections do not move at a swap)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse(argv: Sequence[str], environ: dict[str, str] | None = None) -> Options:
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(list(argv))
    if ":" not in args.app or not all(args.app.partition(":")[::2]):
        raise OptionsError(f"swapd serve: APP must be MODULE:ATTRIBUTE, not {args.app!r}")
    for name in ("threads", "limit_request_line", "limit_request_fields", "limit_request_head",
                 "ws_max_size", "accept_batch"):
        if getattr(args, name) < 1:
            raise OptionsError(f"swapd serve: --{name.replace('_', '-')} must be at least 1")
    if args.limit_request_body < 0:
        raise OptionsError("swapd serve: --limit-request-body must not be negative")
    if args.limit_concurrency is not None and args.limit_concurrency < 1:
        raise OptionsError("swapd serve: --limit-concurrency must be at least 1")
    for name in ("timeout_keep_alive", "timeout_request_head", "timeout_read",
                 "timeout_lifespan"):
        if not getattr(args, name) > 0:
            raise OptionsError(f"swapd serve: --{name.replace('_', '-')} must be positive")
    if args.root_path and (not args.root_path.startswith("/") or args.root_path.endswith("/")):
        raise OptionsError(f"swapd serve: --root-path must start with / and not end with one: "
                           f"{args.root_path!r}")
    headers = []
    for spec in args.header:
        name, sep, value = spec.partition(":")
        if not sep or not name.strip() or any(c in spec for c in "\r\n\0"):
            raise OptionsError(f"swapd serve: bad --header {spec!r}: expected NAME:VALUE")
        headers.append((name.strip().lower().encode("latin-1"),
                        value.strip().encode("latin-1")))
    for spec in args.bind:
        if "=" not in spec:
            raise OptionsError(f"swapd serve: bad --bind {spec!r}: expected NAME=ADDR")
    ips = args.forwarded_allow_ips or env.get("FORWARDED_ALLOW_IPS") or "127.0.0.1"
    ping = args.ws_ping_interval if args.ws_ping_interval and args.ws_ping_interval > 0 else None
    pong = args.ws_ping_timeout if args.ws_ping_timeout and args.ws_ping_timeout > 0 else None
    return Options(
        app=args.app, interface=args.interface, factory=args.factory, app_dir=args.app_dir,
        listeners=tuple(args.listener), binds=tuple(args.bind), root_path=args.root_path,
        proxy_headers=args.proxy_headers, forwarded_allow_ips=parse_networks(ips),
        access_log=args.access_log, server_header=args.server_header,
        date_header=args.date_header, headers=tuple(headers), lifespan=args.lifespan,
        threads=args.threads, accept_batch=args.accept_batch, ws=args.ws,
        ws_per_message_deflate=args.ws_per_message_deflate,
        log_level=args.log_level,
        limits=Limits(request_line=args.limit_request_line,
                      request_fields=args.limit_request_fields,
                      request_head=args.limit_request_head,
                      request_body=args.limit_request_body,
                      concurrency=args.limit_concurrency, ws_max_size=args.ws_max_size),
        timeouts=Timeouts(keep_alive=args.timeout_keep_alive,
                          request_head=args.timeout_request_head, read=args.timeout_read,
                          ws_ping_interval=ping, ws_ping_timeout=pong,
                          lifespan=args.timeout_lifespan),
    )


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """'*' (None: every peer), or comma-separated addresses and networks."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if "*" in items:
        return None
    try:
        return tuple(ipaddress.ip_network(s, strict=False) for s in items)
    except ValueError as e:
        raise OptionsError(f"swapd serve: bad --forwarded-allow-ips: {e}") from None
