"""Listeners: parsing addresses, binding, and describing bound sockets.

A listener is bound once (by swapd, or handed in by systemd socket activation or
swapd's own fd store) and never closed while any generation may still accept on
it. Workers receive listeners as fds 3.. in the order of `names` with
`LISTEN_FDNAMES`, so the order is only a transport detail: consumers look them up
by name.

Address syntax (one per `--bind NAME=ADDR`):

    127.0.0.1:8000      IPv4
    [::1]:8000          IPv6 (brackets required)
    0.0.0.0:8000        all IPv4 interfaces (must be asked for explicitly)
    unix:/run/app.sock  Unix stream socket

Socket options of the listeners swapd binds (sockets handed in by systemd are used as
the socket unit made them: `NoDelay=`, `ReusePort=`... are the unit's business):

- `SO_REUSEADDR`: a restarted supervisor binds its port while connections of the last
  run are still in TIME_WAIT.
- `IPV6_V6ONLY` on IPv6 listeners: `[::]:80` is IPv6 only; IPv4 is bound explicitly.
- `TCP_NODELAY`: Linux copies it to every accepted connection. Services behind swapd
  answer requests, and Nagle's algorithm with delayed ACKs puts a 40 ms floor under a
  keep-alive response written in two parts. Servers that set it themselves on each
  connection (asyncio, uvloop) do not care; one that believes its inherited fd is a
  Unix socket (uvicorn `--fd`) never sets it and was held to ~360 requests/s. A worker
  that wants Nagle clears it per connection.
- not `SO_REUSEPORT`: one socket and one kernel queue shared by every generation is
  what makes a swap lose no connection; per-process queues would drop what is queued
  on a worker that exits.
- the listen backlog: `--backlog` (1024).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass

# Names travel in LISTEN_FDNAMES (colon separated) and systemd's FDNAME=, which
# forbids ':' and control characters; keep them identifier-like.
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_BACKLOG = 1024
# What swapd keeps in systemd's fd store is named swapd-*: listener names may not start so.
RESERVED_PREFIX = "swapd-"
STATE_NAME = re.compile(r"^swapd-state-(\d+)-(\d+)$")  # snapshot parts
STORED_LISTENER = "swapd-listener-"  # + the listener's name


class AddressError(ValueError):
    """An address or listener name that cannot be used; the message is one line."""


class BindError(OSError):
    """Binding a listener failed (port in use, permission, missing directory)."""


@dataclass(frozen=True)
class Address:
    """A parsed listener address: TCP (host, port) or a Unix path."""

    family: socket.AddressFamily
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.family == socket.AF_UNIX

    @property
    def is_loopback(self) -> bool:
        if self.is_unix:
            return True
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.path}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise AddressError(
            f"bad listener name {name!r}: use 1-64 letters, digits, '_', '-' or '.'"
        )
    return name


def parse_address(text: str) -> Address:
    """Parse one address; raise AddressError with a one-line reason."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise AddressError(f"bad address {text!r}: empty unix socket path")
        if "\0" in path:
            raise AddressError(f"bad address {text!r}: NUL in unix socket path")
        return Address(socket.AF_UNIX, path=os.path.abspath(path))
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"bad address {text!r}: expected [IPv6]:PORT")
        if "." in host and ":" not in host:
            raise AddressError(f"bad address {text!r}: brackets are for IPv6; write {host}:PORT")
        family = socket.AF_INET6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AddressError(
                f"bad address {text!r}: expected HOST:PORT, [IPv6]:PORT or unix:PATH"
            )
        family = socket.AF_INET
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(
            f"bad address {text!r}: {host!r} is not an IP address (names are not resolved)"
        ) from None
    if (ip.version == 6) != (family == socket.AF_INET6):
        raise AddressError(f"bad address {text!r}: IPv6 addresses need brackets, [::1]:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"bad address {text!r}: port must be 0-65535")
    return Address(family, host=str(ip), port=int(port_text))


def parse_bind(spec: str) -> tuple[str, Address]:
    """Parse `NAME=ADDR`."""
    name, sep, addr = spec.partition("=")
    if not sep:
        raise AddressError(f"bad --bind {spec!r}: expected NAME=ADDR, e.g. http=127.0.0.1:8000")
    return check_name(name), parse_address(addr)


def bind(address: Address, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """Bind and listen; the socket is blocking and close-on-exec.

    The listening socket's file status flags are shared by every process that
    holds it, so swapd never makes it non-blocking itself: each worker decides.
    """
    if address.is_unix:
        return _bind_unix(address.path, backlog)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see the module docstring
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(e.errno, f"cannot bind {address}: {_reason(e)}") from e
    return sock


def _bind_unix(path: str, backlog: int) -> socket.socket:
    _remove_stale_unix(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(e.errno, f"cannot bind unix:{path}: {_reason(e)}") from e
    return sock


def _remove_stale_unix(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(errno.EEXIST, f"cannot bind unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise BindError(errno.EADDRINUSE, f"cannot bind unix:{path}: another process listens on it")


def _reason(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "address already in use"
    if e.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    if e.errno == errno.EACCES:
        return "permission denied"
    return e.strerror or str(e)


def describe(sock: socket.socket) -> Address:
    """The address a bound socket really has (port 0 resolved)."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return Address(socket.AF_UNIX, path=name if isinstance(name, str) else name.decode())
    host, port = sock.getsockname()[:2]
    return Address(sock.family, host=host, port=port)


def same_address(a: Address, b: Address) -> bool:
    """True if binding `a` would give `b` (port 0 matches any port)."""
    if a.family != b.family:
        return False
    if a.is_unix:
        return a.path == b.path
    return a.host == b.host and (a.port == 0 or a.port == b.port)


def adopt(fd: int) -> socket.socket:
    """Wrap an inherited listening fd, checking it really is a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise AddressError(f"inherited fd {fd} is not a socket ({e.strerror})") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise AddressError(f"inherited fd {fd} is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise AddressError(f"inherited fd {fd} is not listening")
    except BaseException:
        sock.detach()
        raise
    sock.set_inheritable(False)
    return sock


def unlink_unix(address: Address) -> None:
    if address.is_unix:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
