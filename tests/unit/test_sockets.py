"""Listener addresses: parsing every form, binding (TCP v4/v6, Unix), describing, adopting."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapd.sockets import (
    Address,
    AddressError,
    BindError,
    adopt,
    bind,
    check_name,
    describe,
    parse_address,
    parse_bind,
    same_address,
    unlink_unix,
)

V4, V6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(V6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="swapd-sk-") as d:
        yield Path(d)


def fd_is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


# -- parse_address ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("127.0.0.1:8000", Address(V4, host="127.0.0.1", port=8000), "127.0.0.1:8000"),
        ("0.0.0.0:0", Address(V4, host="0.0.0.0", port=0), "0.0.0.0:0"),
        ("10.1.2.3:65535", Address(V4, host="10.1.2.3", port=65535), "10.1.2.3:65535"),
        ("127.0.0.1:080", Address(V4, host="127.0.0.1", port=80), "127.0.0.1:80"),
        ("[::1]:8000", Address(V6, host="::1", port=8000), "[::1]:8000"),
        ("[::]:0", Address(V6, host="::", port=0), "[::]:0"),
        ("[0:0:0:0:0:0:0:1]:80", Address(V6, host="::1", port=80), "[::1]:80"),
        ("[2001:DB8::A]:443", Address(V6, host="2001:db8::a", port=443), "[2001:db8::a]:443"),
        ("unix:/run/app.sock", Address(UNIX, path="/run/app.sock"), "unix:/run/app.sock"),
        ("unix:/run//x/../app.sock", Address(UNIX, path="/run/app.sock"), "unix:/run/app.sock"),
    ],
)
def test_parse_valid(text: str, expected: Address, canonical: str) -> None:
    address = parse_address(text)
    assert address == expected
    assert str(address) == canonical
    assert parse_address(str(address)) == address


def test_unix_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_address("unix:app.sock") == Address(UNIX, path=str(tmp_path / "app.sock"))
    assert parse_address("unix:./a/../b.sock").path == str(tmp_path / "b.sock")


TRIPLE = "expected HOST:PORT, [IPv6]:PORT or unix:PATH"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", TRIPLE),
        ("8000", TRIPLE),
        (":8000", TRIPLE),
        ("http://127.0.0.1:80", "'http://127.0.0.1' is not an IP address (names are not resolved)"),
        ("localhost:8000", "'localhost' is not an IP address (names are not resolved)"),
        ("127.0.0.1:80:90", "'127.0.0.1:80' is not an IP address (names are not resolved)"),
        ("127.000.0.1:80", "'127.000.0.1' is not an IP address (names are not resolved)"),
        ("[fe80::zz]:80", "'fe80::zz' is not an IP address (names are not resolved)"),
        ("[]:80", "'' is not an IP address (names are not resolved)"),
        ("::1:8000", "IPv6 addresses need brackets, [::1]:PORT"),
        ("[127.0.0.1]:80", "brackets are for IPv6; write 127.0.0.1:PORT"),
        ("[localhost]:80", "'localhost' is not an IP address (names are not resolved)"),
        ("[::1]8000", "expected [IPv6]:PORT"),
        ("[::1]", "expected [IPv6]:PORT"),
        ("[::1:80", "expected [IPv6]:PORT"),
        ("[::1]:", "port must be 0-65535"),
        ("[::1]:65536", "port must be 0-65535"),
        ("127.0.0.1:", "port must be 0-65535"),
        ("127.0.0.1:-1", "port must be 0-65535"),
        ("127.0.0.1:+80", "port must be 0-65535"),
        ("127.0.0.1: 80", "port must be 0-65535"),
        ("127.0.0.1:8o", "port must be 0-65535"),
        ("127.0.0.1:99999999999999999999", "port must be 0-65535"),
        ("unix:", "empty unix socket path"),
        ("unix:/run/a\0b", "NUL in unix socket path"),
    ],
)
def test_parse_invalid(text: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(text)
    assert str(info.value) == f"bad address {text!r}: {reason}"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("port", ["\u00b2", "\u0668\u0660", "\uff18\uff10"],
                         ids=["superscript", "arabic", "fullwidth"])
def test_port_must_be_ascii_digits(port: str) -> None:
    with pytest.raises(AddressError, match="port must be 0-65535"):
        parse_address(f"127.0.0.1:{port}")


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)


@pytest.mark.parametrize(
    ("text", "loopback"),
    [("127.0.0.1:1", True), ("127.8.9.10:1", True), ("[::1]:1", True), ("0.0.0.0:1", False),
     ("[::]:1", False), ("192.0.2.1:1", False), ("unix:/x.sock", True)],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert parse_address(text).is_loopback is loopback


# -- names and --bind ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["http", "a", "A_b-c.d", "0", "x" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a b", "a:b", "a/b", "\u00e9", "a=b", "\na", "a\n", "http\n"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(AddressError) as info:
        check_name(name)
    assert str(info.value) == (
        f"bad listener name {name!r}: use 1-64 letters, digits, '_', '-' or '.'"
    )


def test_parse_bind() -> None:
    assert parse_bind("http=127.0.0.1:80") == ("http", Address(V4, host="127.0.0.1", port=80))
    assert parse_bind("admin=[::1]:0") == ("admin", Address(V6, host="::1", port=0))
    # Only the first '=' separates: a Unix path may contain one.
    assert parse_bind("u=unix:/run/a=b.sock") == ("u", Address(UNIX, path="/run/a=b.sock"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("http", "bad --bind 'http': expected NAME=ADDR, e.g. http=127.0.0.1:8000"),
        ("127.0.0.1:80", "bad --bind '127.0.0.1:80': expected NAME=ADDR, e.g. "
         "http=127.0.0.1:8000"),
        ("=127.0.0.1:80", "bad listener name '': use 1-64 letters, digits, '_', '-' or '.'"),
        ("a:b=127.0.0.1:80", "bad listener name 'a:b': use 1-64 letters, digits, '_', '-' or '.'"),
        ("http=", f"bad address '': {TRIPLE}"),
        ("http=localhost:80",
         "bad address 'localhost:80': 'localhost' is not an IP address (names are not resolved)"),
    ],
)
def test_parse_bind_errors(spec: str, message: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_bind(spec)
    assert str(info.value) == message


# -- bind: TCP ----------------------------------------------------------------------------


def test_bind_tcp_v4_port_zero() -> None:
    sock = bind(parse_address("127.0.0.1:0"))
    try:
        assert sock.family == V4 and sock.type == socket.SOCK_STREAM
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        # The listening socket's status flags are shared with every worker: swapd leaves
        # it blocking, and never leaks it into children it did not mean to give it to.
        assert sock.getblocking() and not sock.get_inheritable()
        bound = describe(sock)
        assert bound.family == V4 and bound.host == "127.0.0.1" and bound.port > 0
        with socket.create_connection(("127.0.0.1", bound.port), timeout=5):
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


@pytest.mark.parametrize("address", ["127.0.0.1:0", pytest.param("[::1]:0", marks=needs_ipv6)])
def test_accepted_connections_inherit_tcp_nodelay(address: str) -> None:
    """A worker that never sets TCP_NODELAY itself (uvicorn on an inherited fd) still gets
    it on every connection: no 40 ms Nagle/delayed-ACK floor under keep-alive responses."""
    sock = bind(parse_address(address))
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        bound = describe(sock)
        with socket.create_connection((bound.host, bound.port), timeout=5):
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


@needs_ipv6
def test_bind_tcp_v6_port_zero_is_v6_only() -> None:
    sock = bind(parse_address("[::1]:0"))
    try:
        assert sock.family == V6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        bound = describe(sock)
        assert bound.family == V6 and bound.host == "::1" and bound.port > 0
        assert str(bound) == f"[::1]:{bound.port}"
    finally:
        sock.close()


def test_bind_port_in_use() -> None:
    first = bind(parse_address("127.0.0.1:0"))
    try:
        taken = describe(first)
        with pytest.raises(BindError) as info:
            bind(taken)
        assert info.value.errno == errno.EADDRINUSE
        assert info.value.strerror == f"cannot bind {taken}: address already in use"
        assert isinstance(info.value.__cause__, OSError)
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        first.close()


def _nonlocal_bind_allowed() -> bool:
    try:
        return Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0"
    except OSError:
        return False


@pytest.mark.skipif(_nonlocal_bind_allowed(), reason="net.ipv4.ip_nonlocal_bind is set")
def test_bind_address_not_on_this_host() -> None:
    address = parse_address("192.0.2.1:0")  # TEST-NET-1: never configured on a test host
    with pytest.raises(BindError) as info:
        bind(address)
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert info.value.strerror == "cannot bind 192.0.2.1:0: address not available on this host"


def test_bind_error_is_an_os_error() -> None:
    assert issubclass(BindError, OSError)


# -- bind: Unix ---------------------------------------------------------------------------


def test_bind_unix(short_dir: Path) -> None:
    address = parse_address(f"unix:{short_dir}/app.sock")
    sock = bind(address)
    try:
        assert stat.S_ISSOCK(os.lstat(address.path).st_mode)
        assert describe(sock) == address
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert not sock.get_inheritable()
    finally:
        sock.close()
        unlink_unix(address)
    assert not os.path.exists(address.path)
    unlink_unix(address)  # already gone: fine


def test_bind_unix_replaces_a_stale_socket(short_dir: Path) -> None:
    address = parse_address(f"unix:{short_dir}/app.sock")
    dead = bind(address)
    dead.close()  # the file stays behind, nobody listens: what a crashed supervisor leaves
    assert stat.S_ISSOCK(os.lstat(address.path).st_mode)
    sock = bind(address)
    try:
        with socket.socket(UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(address.path)
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


def test_bind_unix_refuses_a_live_socket(short_dir: Path) -> None:
    address = parse_address(f"unix:{short_dir}/app.sock")
    live = bind(address)
    try:
        with pytest.raises(BindError) as info:
            bind(address)
        assert info.value.errno == errno.EADDRINUSE
        assert info.value.strerror == f"cannot bind {address}: another process listens on it"
        # The live listener was not touched: its file is there and it still accepts.
        with socket.socket(UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(address.path)
            conn, _ = live.accept()
            conn.close()
    finally:
        live.close()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink-to-socket"])
def test_bind_unix_refuses_a_non_socket(short_dir: Path, kind: str) -> None:
    path = short_dir / "app.sock"
    other: socket.socket | None = None
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        other = bind(parse_address(f"unix:{short_dir}/real.sock"))
        other.close()
        path.symlink_to(short_dir / "real.sock")
    try:
        with pytest.raises(BindError) as info:
            bind(parse_address(f"unix:{path}"))
        assert info.value.errno == errno.EEXIST
        assert info.value.strerror == f"cannot bind unix:{path}: exists and is not a socket"
        assert os.path.lexists(path)
        if kind == "file":
            assert path.read_text() == "precious"
    finally:
        if other is not None:
            other.close()


def test_bind_unix_in_a_missing_directory(short_dir: Path) -> None:
    path = f"{short_dir}/missing/app.sock"
    with pytest.raises(BindError) as info:
        bind(parse_address(f"unix:{path}"))
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror == f"cannot bind unix:{path}: No such file or directory"


def test_bind_unix_path_too_long(short_dir: Path) -> None:
    path = f"{short_dir}/{'x' * 120}.sock"
    with pytest.raises(BindError) as info:
        bind(parse_address(f"unix:{path}"))
    assert info.value.strerror == f"cannot bind unix:{path}: AF_UNIX path too long"


# -- describe and same_address ------------------------------------------------------------


def test_describe_an_unbound_unix_socket() -> None:
    with socket.socket(UNIX, socket.SOCK_STREAM) as s:
        assert describe(s) == Address(UNIX, path="")


@pytest.mark.parametrize(
    ("configured", "actual", "same"),
    [
        ("127.0.0.1:0", "127.0.0.1:4321", True),
        ("127.0.0.1:4321", "127.0.0.1:4321", True),
        ("127.0.0.1:4321", "127.0.0.1:4322", False),
        ("0.0.0.0:80", "127.0.0.1:80", False),
        ("127.0.0.1:0", "[::1]:4321", False),
        ("[::1]:0", "[::1]:80", True),
        ("unix:/run/a.sock", "unix:/run/a.sock", True),
        ("unix:/run/a.sock", "unix:/run/b.sock", False),
        ("unix:/run/a.sock", "127.0.0.1:0", False),
    ],
)
def test_same_address(configured: str, actual: str, same: bool) -> None:
    assert same_address(parse_address(configured), parse_address(actual)) is same


def test_same_address_is_not_symmetric_for_port_zero() -> None:
    # Port 0 is a wish ("any port"), not a description of a bound socket.
    assert not same_address(parse_address("127.0.0.1:80"), parse_address("127.0.0.1:0"))


# -- adopt --------------------------------------------------------------------------------


def test_adopt_a_listening_socket() -> None:
    original = bind(parse_address("127.0.0.1:0"))
    fd = os.dup(original.fileno())
    os.set_inheritable(fd, True)  # as inherited through exec
    try:
        sock = adopt(fd)
        assert sock.fileno() == fd and not os.get_inheritable(fd)
        assert describe(sock) == describe(original)
        sock.close()
        assert not fd_is_open(fd)  # the returned socket owns the fd
    finally:
        original.close()


@pytest.mark.parametrize("kind", ["not-listening", "datagram"])
def test_adopt_refuses_without_closing_the_fd(kind: str) -> None:
    if kind == "datagram":
        held = socket.socket(V4, socket.SOCK_DGRAM)
        message = "is not a stream socket"
    else:
        held = socket.socket(V4, socket.SOCK_STREAM)
        held.bind(("127.0.0.1", 0))  # bound, never listen()
        message = "is not listening"
    try:
        fd = held.fileno()
        with pytest.raises(AddressError) as info:
            adopt(fd)
        assert str(info.value) == f"inherited fd {fd} {message}"
        assert fd_is_open(fd)
        assert held.getsockname()[0] in ("127.0.0.1", "0.0.0.0")  # still the caller's socket
    finally:
        held.close()


def test_adopt_a_non_socket_fd_is_refused_and_left_open() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(AddressError) as info:
            adopt(r)
        assert str(info.value) == (
            f"inherited fd {r} is not a socket (Socket operation on non-socket)"
        )
        assert fd_is_open(r)
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_adopt_a_closed_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(AddressError, match=f"inherited fd {r} is not a socket .Bad file"):
        adopt(r)
