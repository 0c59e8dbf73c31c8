"""The supervisor's listeners: what comes back from systemd at start-up, and reload plans."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapd.sockets import Address, bind, parse_address
from swapd.supervisor.listeners import Listeners
from tests.unit.notify_fake import FakeNotifySocket, manager


@pytest.fixture
def listeners(notify: FakeNotifySocket) -> Iterator[Listeners]:
    lis = Listeners(manager(notify))
    try:
        yield lis
    finally:
        lis.close_all()


def _listening(address: str = "127.0.0.1:0") -> socket.socket:
    return bind(parse_address(address), 16)


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_stored_listener_kept_when_still_configured_at_its_address(
    listeners: Listeners, notify: FakeNotifySocket
) -> None:
    sock = _listening()
    port = _port(sock)
    fd = sock.detach()
    listeners.adopt_inherited([], [("http", fd)], {"http": parse_address("127.0.0.1:0")})
    assert listeners.by_name["http"].sock.fileno() == fd
    assert listeners.by_name["http"].source == "stored"
    assert _port(listeners.by_name["http"].sock) == port  # port 0: keep the port we had
    assert notify.pending() == []


@pytest.mark.parametrize("configured", [{}, {"http": "127.0.0.1:1"}], ids=["gone", "moved"])
def test_stored_listener_dropped_when_config_changed(
    listeners: Listeners, notify: FakeNotifySocket, configured: dict[str, str]
) -> None:
    """A `systemctl restart` after an address was edited serves the new address."""
    fd = _listening().detach()
    listeners.adopt_inherited([], [("http", fd)],
                              {n: parse_address(a) for n, a in configured.items()})
    assert "http" not in listeners.by_name
    assert not _is_open(fd)
    assert notify.pending() == [b"FDSTOREREMOVE=1\nFDNAME=swapd-listener-http"]


def test_socket_unit_listener_wins_over_the_stored_copy(
    listeners: Listeners, notify: FakeNotifySocket
) -> None:
    sock = _listening()
    unit_fd = sock.detach()
    stored_fd = os.dup(unit_fd)  # what swapd stored of it last time
    listeners.adopt_inherited([("http", unit_fd)], [("http", stored_fd)],
                              {"http": parse_address("127.0.0.1:0")})
    assert listeners.by_name["http"].sock.fileno() == unit_fd
    assert listeners.by_name["http"].source == "systemd"
    assert not _is_open(stored_fd)
    assert notify.pending() == [b"FDSTOREREMOVE=1\nFDNAME=swapd-listener-http"]


def test_reload_with_a_new_port_0_listener_binds_its_own_socket(listeners: Listeners) -> None:
    http = ("http", parse_address("127.0.0.1:0"))
    listeners.bind_missing([http], 16)
    plan = listeners.prepare([http, ("metrics", parse_address("127.0.0.1:0"))], 16)
    try:
        assert listeners.by_name["metrics"].sock is not listeners.by_name["http"].sock
        assert _port(listeners.by_name["metrics"].sock) != _port(listeners.by_name["http"].sock)
    finally:
        listeners.settle(plan, committed=False, binds=())


def test_reload_reuses_a_socket_by_its_explicit_address(listeners: Listeners) -> None:
    listeners.bind_missing([("http", parse_address("127.0.0.1:0"))], 16)
    port = _port(listeners.by_name["http"].sock)
    moved = [("web", parse_address(f"127.0.0.1:{port}"))]
    plan = listeners.prepare(moved, 16)
    assert listeners.by_name["web"].sock is listeners.by_name["http"].sock
    listeners.settle(plan, committed=True, binds=moved)
    assert list(listeners.by_name) == ["web"]


def test_close_all_can_keep_unix_paths(listeners: Listeners, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listeners.bind_missing([("u", Address(socket.AF_UNIX, path=str(path)))], 16)
    listeners.close_all(unlink=False)  # the fd store keeps the socket for the next supervisor
    assert path.exists()
    listeners.bind_missing([("u", Address(socket.AF_UNIX, path=str(path)))], 16)  # stale: fine
    listeners.close_all()
    assert not path.exists()
