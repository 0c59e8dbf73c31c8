"""The supervisor's side of systemd: fd-store names, and what ServiceManager sends to a fake
notify socket (readiness, reloads, stop, fd store, watchdog pings from a running loop)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid

import pytest

from swapd.supervisor.manager import STATE_NAME, ServiceManager, split_inherited, state_fd_name
from swapd.systemd import Notifier, SystemdError, monotonic_usec
from tests.unit.notify_fake import DEADLINE, FakeNotifySocket, manager


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# -- fd store names -----------------------------------------------------------------------


def test_state_fd_name() -> None:
    assert state_fd_name(3, 1) == "swapd-state-3-1"
    m = STATE_NAME.match(state_fd_name(12, 0))
    assert m is not None and m.groups() == ("12", "0")


def test_split_inherited_separates_and_orders_state() -> None:
    inherited = [
        ("http", 3),
        ("swapd-state-0-1", 4),
        ("admin", 5),
        ("swapd-state-1-1", 6),
        ("swapd-listener-http", 10),
        ("swapd-state-0-0", 7),
        ("swapd-state-1-2", 8),
        ("swapd-state-1-0", 9),
    ]
    activated, stored, state = split_inherited(inherited)
    assert activated == [("http", 3), ("admin", 5)]
    assert stored == [("http", 10)]
    assert state == {0: [7, 4], 1: [9, 6, 8]}


def test_split_inherited_orders_indexes_numerically() -> None:
    names = [(f"swapd-state-0-{i}", 100 + i) for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)]
    assert split_inherited(names)[2] == {0: [100 + i for i in range(11)]}  # 2 before 10


def test_split_inherited_drops_incomplete_state_and_duplicates_without_leaking() -> None:
    pipes = [os.pipe() for _ in range(4)]
    try:
        gap = [("swapd-state-1-0", pipes[0][0]), ("swapd-state-1-2", pipes[1][0])]
        dup = [("swapd-state-0-0", pipes[2][0]), ("swapd-state-0-0", pipes[3][0])]
        activated, stored, state = split_inherited(gap + dup)
        assert activated == stored == [] and state == {0: [pipes[3][0]]}
        for fd in (pipes[0][0], pipes[1][0], pipes[2][0]):  # closed, not leaked
            with pytest.raises(OSError):
                os.fstat(fd)
        os.fstat(pipes[3][0])
    finally:
        for r, w in pipes:
            for fd in (r, w):
                with contextlib.suppress(OSError):
                    os.close(fd)


@pytest.mark.parametrize(
    "name",
    ["swapd-state-0", "swapd-state-a-0", "swapd-state-0-0-0", "swapd-state--1-0",
     "xswapd-state-0-0", "swapd-state-0-", "unknown", "stored", "connection"],
)
def test_names_that_are_not_state_are_listeners(name: str) -> None:
    assert split_inherited([(name, 3)]) == ([(name, 3)], [], {})


def test_split_nothing() -> None:
    assert split_inherited([]) == ([], [], {})
    assert split_inherited(iter([("http", 3)])) == ([("http", 3)], [], {})


# -- without a service manager ------------------------------------------------------------


def test_everything_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    mgr = ServiceManager(fdstore=True)
    assert not mgr.enabled and not mgr.fdstore and mgr.notifier.address is None
    r, w = os.pipe()
    loop = asyncio.new_event_loop()
    try:
        mgr.ready("x")
        mgr.reloading("x", 30)
        mgr.stopping("x", 30)
        mgr.status("x")
        mgr.extend(5)
        mgr.store_listener("http", r)
        mgr.forget_listener("http")
        mgr.store_state(0, [r, w])
        mgr.forget_names(["swapd-state-0-0"])
        assert mgr.start_watchdog(loop) is None
        mgr.stop_watchdog()
    finally:
        loop.close()
        os.close(r)
        os.close(w)


def test_notify_socket_comes_from_the_environment(notify: FakeNotifySocket) -> None:
    mgr = ServiceManager()
    assert mgr.enabled and mgr.fdstore and mgr.notifier.address == notify.address
    mgr.ready("gen 1 active, 2 worker(s)")
    assert notify.payload() == b"READY=1\nSTATUS=gen 1 active, 2 worker(s)"


def test_a_vanished_manager_does_not_raise() -> None:
    gone = f"@swapd-test-gone-{uuid.uuid4().hex}"
    mgr = ServiceManager(Notifier(gone))
    mgr.ready("x")
    mgr.reloading("x", 1)
    mgr.store_listener("http", 0)


# -- messages -----------------------------------------------------------------------------


def test_reloading_sends_reloading_monotonic_and_extension(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    before = monotonic_usec()
    mgr.reloading("upgrade to gen 2", 42.5)
    after = monotonic_usec()
    first = notify.fields()
    assert list(first) == ["RELOADING", "MONOTONIC_USEC", "STATUS"]
    assert first["RELOADING"] == "1" and first["STATUS"] == "upgrade to gen 2"
    assert before <= int(first["MONOTONIC_USEC"]) <= after
    assert notify.payload() == b"EXTEND_TIMEOUT_USEC=42500000"
    assert notify.pending() == []  # no watchdog running: no ping


def test_reloading_without_a_bound_does_not_extend(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    mgr.reloading("x", 0)
    assert "RELOADING" in notify.fields()
    assert notify.pending() == []


def test_stopping(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    mgr.stopping("stopping gen 3", 12.5)
    assert notify.payload() == b"STOPPING=1\nSTATUS=stopping gen 3"
    assert notify.payload() == b"EXTEND_TIMEOUT_USEC=12500000"


def test_status_is_one_line(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    mgr.status("gen 4 active\nlast reload FAILED: boom")
    assert notify.payload() == b"STATUS=gen 4 active last reload FAILED: boom"


def test_extend_rounds_up_and_ignores_non_positive(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    mgr.extend(0.0000001)
    assert notify.payload() == b"EXTEND_TIMEOUT_USEC=1"
    mgr.extend(0)
    mgr.extend(-3)
    assert notify.pending() == []


def test_store_listener_and_forget_it(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        mgr.store_listener("http", listener.fileno())
        data, fds = notify.recv()
        try:
            # FDPOLL stays on for listeners: systemd should drop one that errors.
            assert data == b"FDSTORE=1\nFDNAME=swapd-listener-http"
            assert len(fds) == 1 and same_file(fds[0], listener.fileno())
        finally:
            for fd in fds:
                os.close(fd)
        mgr.forget_listener("http")
        assert notify.payload() == b"FDSTOREREMOVE=1\nFDNAME=swapd-listener-http"
    finally:
        listener.close()


def test_store_state_one_fd_per_name_without_poll(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    parts = [os.memfd_create(f"part{i}") for i in range(3)]
    try:
        mgr.store_state(2, parts)
        for index, part in enumerate(parts):
            data, fds = notify.recv()
            try:
                assert data == f"FDSTORE=1\nFDNAME=swapd-state-2-{index}\nFDPOLL=0".encode()
                assert len(fds) == 1 and same_file(fds[0], part)
            finally:
                for fd in fds:
                    os.close(fd)
        assert notify.pending() == []
    finally:
        for fd in parts:
            os.close(fd)


def test_forget_names_removes_every_stored_name(notify: FakeNotifySocket) -> None:
    mgr = manager(notify)
    mgr.forget_names(["swapd-state-2-0", "swapd-state-2-1", "swapd-state-0-0"])
    removed = {notify.payload() for _ in range(3)}
    assert removed == {
        b"FDSTOREREMOVE=1\nFDNAME=swapd-state-2-0",
        b"FDSTOREREMOVE=1\nFDNAME=swapd-state-2-1",
        b"FDSTOREREMOVE=1\nFDNAME=swapd-state-0-0",
    }
    assert notify.pending() == []


def test_fdstore_off_stores_nothing_but_still_removes(notify: FakeNotifySocket) -> None:
    """--no-fdstore: nothing is stored, but what an earlier run stored is still removed
    once used, or a later restart would restore it again."""
    mgr = manager(notify, fdstore=False)
    assert mgr.enabled and not mgr.fdstore
    r, w = os.pipe()
    try:
        mgr.store_listener("http", r)
        mgr.store_state(0, [r])
        mgr.forget_listener("http")
        mgr.forget_names(["swapd-state-0-0"])
        mgr.ready("still talks")
        assert notify.pending() == [b"FDSTOREREMOVE=1\nFDNAME=swapd-listener-http",
                                    b"FDSTOREREMOVE=1\nFDNAME=swapd-state-0-0",
                                    b"READY=1\nSTATUS=still talks"]
    finally:
        os.close(r)
        os.close(w)


# -- watchdog -----------------------------------------------------------------------------


def test_watchdog_pings_on_a_running_loop_and_stops(
    notify: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    mgr = manager(notify)
    wanted = 5

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pings: list[bytes] = []
        enough = asyncio.Event()

        def on_readable() -> None:
            pings.extend(notify.pending())
            if len(pings) >= wanted:
                enough.set()

        loop.add_reader(notify.sock.fileno(), on_readable)
        try:
            interval = mgr.start_watchdog(loop)
            assert interval is not None and interval == pytest.approx(0.01)
            await asyncio.wait_for(enough.wait(), DEADLINE)
            mgr.stop_watchdog()
            count = len(pings)
            await asyncio.sleep(5 * interval)  # the loop's own timer: five missed pings
            on_readable()
            assert len(pings) == count, "pings continued after stop_watchdog()"
            assert set(pings) == {b"WATCHDOG=1"}
        finally:
            loop.remove_reader(notify.sock.fileno())
            mgr.stop_watchdog()

    asyncio.run(main())


def test_watchdog_pings_only_from_a_running_loop(
    notify: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ping is a loop timer: a loop that does not run (blocked, dead) stops pinging.
    monkeypatch.setenv("WATCHDOG_USEC", "2000")
    mgr = manager(notify)
    loop = asyncio.new_event_loop()
    try:
        assert mgr.start_watchdog(loop) == pytest.approx(0.001)
        assert notify.pending() == [b"WATCHDOG=1"]  # the first ping is immediate
        mgr.extend(5)  # an extension stretches the watchdog too: ping right after it
        assert notify.pending() == [b"EXTEND_TIMEOUT_USEC=5000000", b"WATCHDOG=1"]
        mgr.ping_watchdog()  # e.g. right before a re-exec
        assert notify.pending() == [b"WATCHDOG=1"]
        mgr.stop_watchdog()
        mgr.extend(5)
        mgr.ping_watchdog()
        assert notify.pending() == [b"EXTEND_TIMEOUT_USEC=5000000"]
    finally:
        mgr.stop_watchdog()
        loop.close()


@pytest.mark.parametrize(
    "environ",
    [{}, {"WATCHDOG_USEC": "20000", "WATCHDOG_PID": "1"}],
    ids=["not-set", "meant-for-another-process"],
)
def test_no_watchdog(
    notify: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]
) -> None:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    mgr = manager(notify)
    loop = asyncio.new_event_loop()
    try:
        assert mgr.start_watchdog(loop) is None
        mgr.stop_watchdog()
        assert notify.pending() == []
    finally:
        loop.close()


def test_malformed_watchdog_usec_is_an_error(
    notify: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    mgr = manager(notify)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(SystemdError, match="WATCHDOG_USEC='soon'"):
            mgr.start_watchdog(loop)
        assert notify.pending() == []
    finally:
        loop.close()
