"""swapd.systemd against a fake service manager, plus the real systemd-notify and
systemd-socket-activate binaries as independent peers (no PID 1 systemd needed)."""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from swapd.systemd import (
    ListenFdsError,
    Notifier,
    NotifyAddressError,
    NotifyMessageError,
    SystemdError,
    WatchdogEnvError,
    clear_listen_env,
    fds_by_name,
    is_valid_fdname,
    listen_env,
    listen_fds,
    monotonic_usec,
    watchdog_usec,
)

DEADLINE = 10.0  # seconds; generous, only reached when something is broken


@dataclass
class Message:
    payload: bytes
    pid: int
    uid: int
    gid: int
    fds: list[int] = field(default_factory=list)

    @property
    def fields(self) -> list[tuple[str, str]]:
        pairs = [line.split("=", 1) for line in self.payload.decode().split("\n")]
        return [(k, v) for k, v in pairs]

    def get(self, key: str) -> str:
        return dict(self.fields)[key]


class FakeManager:
    """The receiving end of sd_notify, as systemd sets it up: SOCK_DGRAM + SO_PASSCRED."""

    def __init__(self, address: str) -> None:
        self.address = address  # NOTIFY_SOCKET syntax
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._open_fds: list[int] = []

    def recv(self, timeout: float = DEADLINE) -> Message:
        self.sock.settimeout(timeout)
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(4 * 253) + socket.CMSG_SPACE(12)
            )
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout}s") from None
        creds = (-1, -1, -1)
        fds: list[int] = []
        for level, kind, blob in anc:
            assert level == socket.SOL_SOCKET
            if kind == socket.SCM_CREDENTIALS:
                creds = struct.unpack("iII", blob[:12])
            elif kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(blob[: len(blob) - len(blob) % got.itemsize])
                fds.extend(got)
        self._open_fds.extend(fds)
        return Message(data, *creds, fds=fds)

    def pending(self) -> bool:
        self.sock.settimeout(0)
        try:
            self.sock.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True

    def close_fd(self, fd: int) -> None:
        self._open_fds.remove(fd)
        os.close(fd)

    def close(self) -> None:
        for fd in self._open_fds:
            os.close(fd)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="sdn."))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(params=["abstract", "path"])
def manager(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[FakeManager]:
    if request.param == "abstract":
        address = f"@swapd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    else:
        address = str(short_dir / "notify")
    fake = FakeManager(address)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def notifier(manager: FakeManager) -> Iterator[Notifier]:
    with Notifier.from_env({"NOTIFY_SOCKET": manager.address}) as n:
        yield n


# --- sd_notify ------------------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier.from_env(), Notifier.from_env({"NOTIFY_SOCKET": ""}), Notifier(None)):
        assert not n.enabled and not n and n.address is None
        assert n.ready("x") is False
        assert n.reloading() is False
        assert n.send(X_ANY=1) is False
        assert n.barrier(timeout=0) is False
        r, w = os.pipe()
        try:
            assert n.fdstore([r], "http") is False
        finally:
            os.close(r)
            os.close(w)


def test_notify_socket_is_left_in_the_environment(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    with Notifier.from_env() as n:
        assert n.address == manager.address
        assert n.ready()
    assert os.environ["NOTIFY_SOCKET"] == manager.address
    assert manager.recv().fields == [("READY", "1")]


@pytest.mark.parametrize(
    "address", ["relative/notify", "vsock:2:1234", "@", "/" + "x" * 120, "@" + "y" * 120]
)
def test_unusable_address_is_a_typed_error(address: str) -> None:
    with pytest.raises(NotifyAddressError, match="NOTIFY_SOCKET="):
        Notifier(address)


def test_ready_carries_status_and_the_senders_credentials(
    manager: FakeManager, notifier: Notifier
) -> None:
    assert notifier.ready("serving generation 1") is True
    msg = manager.recv()
    assert msg.payload == b"READY=1\nSTATUS=serving generation 1"
    assert (msg.pid, msg.uid, msg.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert msg.fds == []


def test_mainpid_comes_before_ready(manager: FakeManager, notifier: Notifier) -> None:
    notifier.ready("gen 2", mainpid=4242)
    assert manager.recv().fields == [("MAINPID", "4242"), ("READY", "1"), ("STATUS", "gen 2")]


def test_messages_arrive_in_order(manager: FakeManager, notifier: Notifier) -> None:
    notifier.ready()
    notifier.reloading("swap to generation 2")
    notifier.status("generation 2 starting")
    notifier.ready("generation 2")
    notifier.stopping("draining")
    firsts = [manager.recv().fields[0] for _ in range(5)]
    assert firsts == [
        ("READY", "1"),
        ("RELOADING", "1"),
        ("STATUS", "generation 2 starting"),
        ("READY", "1"),
        ("STOPPING", "1"),
    ]
    assert not manager.pending()


def test_reloading_always_carries_monotonic_usec(manager: FakeManager, notifier: Notifier) -> None:
    before = monotonic_usec()
    notifier.reloading()
    after = monotonic_usec()
    fields = manager.recv().fields
    assert [k for k, _ in fields] == ["RELOADING", "MONOTONIC_USEC"]
    assert before <= int(dict(fields)["MONOTONIC_USEC"]) <= after


def test_monotonic_usec_is_clock_monotonic() -> None:
    a = time.monotonic_ns() // 1000
    b = monotonic_usec()
    c = time.monotonic_ns() // 1000
    assert a <= b <= c


def test_status_is_flattened_to_one_line(manager: FakeManager, notifier: Notifier) -> None:
    notifier.stopping("swap failed:\nTraceback ...\r\n  boom")
    assert manager.recv().fields == [
        ("STOPPING", "1"),
        ("STATUS", "swap failed: Traceback ...   boom"),
    ]


def test_watchdog_extend_timeout_errno(manager: FakeManager, notifier: Notifier) -> None:
    notifier.watchdog()
    notifier.watchdog_trigger()
    notifier.extend_timeout(1.5)
    notifier.extend_timeout(0.0000001)
    notifier.errno(32)
    got = [manager.recv().payload for _ in range(5)]
    assert got == [
        b"WATCHDOG=1",
        b"WATCHDOG=trigger",
        b"EXTEND_TIMEOUT_USEC=1500000",
        b"EXTEND_TIMEOUT_USEC=1",
        b"ERRNO=32",
    ]
    with pytest.raises(NotifyMessageError):
        notifier.extend_timeout(0)


def test_generic_send_keeps_field_order(manager: FakeManager, notifier: Notifier) -> None:
    assert notifier.send(X_GENERATION=3, STATUS="ok", X_PIDS="1 2")
    assert manager.recv().payload == b"X_GENERATION=3\nSTATUS=ok\nX_PIDS=1 2"
    assert notifier.send_raw("READY=1\n")
    assert manager.recv().payload == b"READY=1\n"


@pytest.mark.parametrize(
    "fields",
    [{"ready": 1}, {"X-Y": 1}, {"1X": 1}, {"STATUS": "two\nlines"}, {"STATUS": "nul\0"}],
)
def test_malformed_fields_are_refused_before_sending(
    manager: FakeManager, notifier: Notifier, fields: dict[str, Any]
) -> None:
    with pytest.raises(NotifyMessageError) as info:
        notifier.send(**fields)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SystemdError)
    assert not manager.pending()


def test_fdstore_fds_arrive_and_are_usable(manager: FakeManager, notifier: Notifier) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert notifier.fdstore([theirs.fileno()], "http") is True
        msg = manager.recv()
        assert msg.fields == [("FDSTORE", "1"), ("FDNAME", "http")]
        assert len(msg.fds) == 1 and msg.fds[0] != theirs.fileno()
        # The manager's copy is the same socket: what it writes, we read.
        stored = socket.socket(fileno=os.dup(msg.fds[0]))
        with stored:
            stored.sendall(b"through the store")
        assert ours.recv(100) == b"through the store"

    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        notifier.fdstore([r1, r2], poll=False)
        msg = manager.recv()
        assert msg.fields == [("FDSTORE", "1"), ("FDPOLL", "0")]
        assert len(msg.fds) == 2
        os.write(w2, b"2")
        assert os.read(msg.fds[1], 1) == b"2"
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_fdstore_remove(manager: FakeManager, notifier: Notifier) -> None:
    notifier.fdstore_remove("http")
    assert manager.recv().fields == [("FDSTOREREMOVE", "1"), ("FDNAME", "http")]


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256, "caf\u00e9", "tab\there", "nl\n"])
def test_invalid_fd_names_are_refused(notifier: Notifier, name: str) -> None:
    assert not is_valid_fdname(name)
    r, w = os.pipe()
    try:
        with pytest.raises(NotifyMessageError, match="invalid fd name"):
            notifier.fdstore([r], name)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(NotifyMessageError):
        notifier.fdstore_remove(name)
    with pytest.raises(NotifyMessageError):
        listen_env(1, [name])


def test_fdstore_without_fds_is_refused(notifier: Notifier) -> None:
    with pytest.raises(NotifyMessageError):
        notifier.fdstore([], "http")


def test_credentials_are_those_of_the_sending_process(manager: FakeManager) -> None:
    code = "from swapd.systemd import Notifier; assert Notifier.from_env().ready('child')"
    env = {**os.environ, "NOTIFY_SOCKET": manager.address}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        msg = manager.recv()
        assert child.wait(timeout=DEADLINE) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert msg.pid == child.pid
    assert msg.get("STATUS") == "child"


@pytest.mark.skipif(os.geteuid() != 0, reason="speaking for another pid needs root")
def test_pid_override_sends_explicit_credentials(manager: FakeManager, notifier: Notifier) -> None:
    parent = os.getppid()
    assert notifier.send(pid=parent, MAINPID=parent)
    msg = manager.recv()
    assert msg.pid == parent
    assert msg.fields == [("MAINPID", str(parent))]


def test_send_failures_return_false_and_log_once_per_outage(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = str(short_dir / "later")
    caplog.set_level(logging.DEBUG, logger="swapd.systemd")
    with Notifier(address) as n:
        assert n.ready() is False  # nobody bound there yet: ENOENT
        assert n.watchdog() is False
        levels = [r.levelno for r in caplog.records]
        assert levels == [logging.WARNING, logging.DEBUG]
        assert "sd_notify send failed" in caplog.records[0].getMessage()

        fake = FakeManager(address)
        try:
            caplog.clear()
            assert n.ready() is True
            assert fake.recv().fields == [("READY", "1")]
            assert [r.levelno for r in caplog.records] == [logging.INFO]
            fake.close()
            caplog.clear()
            assert n.watchdog() is False  # ECONNREFUSED: a new outage warns again
            assert [r.levelno for r in caplog.records] == [logging.WARNING]
        finally:
            with contextlib.suppress(OSError):
                fake.close()


def test_send_to_a_full_queue_gives_up_after_the_timeout(short_dir: Path) -> None:
    fake = FakeManager(str(short_dir / "full"))
    try:
        with Notifier(fake.address, timeout=0.05) as n:
            # Nobody reads: the receive queue fills (net.unix.max_dgram_qlen), then a send must
            # time out instead of blocking the caller.
            results = []
            for _ in range(100_000):
                results.append(n.send_raw(b"X=" + b"x" * 1024))
                if not results[-1]:
                    break
        assert results[0] is True
        assert results[-1] is False
    finally:
        fake.close()


def test_barrier_returns_once_the_manager_closes_the_fd(
    manager: FakeManager, notifier: Notifier
) -> None:
    outcome: list[bool] = []
    sender = threading.Thread(target=lambda: outcome.append(notifier.barrier(timeout=DEADLINE)))
    sender.start()
    try:
        msg = manager.recv()
        assert msg.payload == b"BARRIER=1" and len(msg.fds) == 1
        assert outcome == []  # still waiting: the manager holds the fd
        manager.close_fd(msg.fds[0])
    finally:
        sender.join(DEADLINE)
    assert outcome == [True]


def test_barrier_times_out_if_the_fd_is_kept(manager: FakeManager, notifier: Notifier) -> None:
    assert notifier.barrier(timeout=0.01) is False
    assert len(manager.recv().fds) == 1  # still open in the manager: no POLLHUP was possible


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="systemd-notify not installed")
def test_payload_matches_real_systemd_notify(manager: FakeManager, notifier: Notifier) -> None:
    env = {"NOTIFY_SOCKET": manager.address, "PATH": os.environ["PATH"]}
    tool = subprocess.Popen(
        ["systemd-notify", "--ready", "--status=generation 7"],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        theirs = manager.recv()
        # Without --no-block it waits on a BARRIER fd until we close it.
        barrier = manager.recv()
        assert barrier.payload == b"BARRIER=1" and len(barrier.fds) == 1
        manager.close_fd(barrier.fds[0])
        _, err = tool.communicate(timeout=DEADLINE)
        assert tool.returncode == 0, err
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    notifier.ready("generation 7")
    ours = manager.recv()
    assert ours.payload == theirs.payload
    # As root systemd-notify speaks for its parent (us); otherwise the credentials are its own.
    assert theirs.pid in (os.getpid(), tool.pid)


# --- socket activation ----------------------------------------------------------------------------

CHILD_LISTEN = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from swapd.systemd import ListenFdsError, listen_fds

    spec = json.loads(sys.argv[1])
    for i in range(spec["open"]):
        fd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()
        if fd != 3 + i:
            os.dup2(fd, 3 + i)
            os.close(fd)
        os.set_inheritable(3 + i, True)  # as a manager hands them over: listen_fds must undo it
    env = dict(spec["env"])
    if env.get("LISTEN_PID") == "self":
        env["LISTEN_PID"] = str(os.getpid())
    try:
        pairs = listen_fds(env)
    except ListenFdsError as e:
        print(json.dumps({"error": str(e)}))
    else:
        cloexec = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for _, fd in pairs]
        print(json.dumps({"pairs": pairs, "cloexec": cloexec}))
    """
)


def run_listen_child(open_fds: int, env: dict[str, str]) -> dict[str, object]:
    """Run listen_fds() in a fresh interpreter whose fds 3.. are sockets (pytest's are not)."""
    spec = json.dumps({"open": open_fds, "env": env})
    done = subprocess.run(
        [sys.executable, "-c", CHILD_LISTEN, spec],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_listen_fds_maps_names_and_sets_cloexec() -> None:
    got = run_listen_child(
        3, {"LISTEN_PID": "self", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "http:admin:stored"}
    )
    assert got == {
        "pairs": [["http", 3], ["admin", 4], ["stored", 5]],
        "cloexec": [True, True, True],
    }


def test_listen_fds_without_names_says_unknown() -> None:
    got = run_listen_child(2, {"LISTEN_PID": "self", "LISTEN_FDS": "2"})
    assert got["pairs"] == [["unknown", 3], ["unknown", 4]]
    got = run_listen_child(2, {"LISTEN_PID": "self", "LISTEN_FDS": "2", "LISTEN_FDNAMES": ":x"})
    assert got["pairs"] == [["unknown", 3], ["x", 4]]


def test_listen_fds_refuses_closed_fds() -> None:
    got = run_listen_child(1, {"LISTEN_PID": "self", "LISTEN_FDS": "2"})
    assert got == {"error": "LISTEN_FDS=2 but fd 4 is not open"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "2"},
        {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
    ],
    ids=["unset", "no-pid", "other-pid", "zero"],
)
def test_listen_fds_not_for_us_is_empty(env: dict[str, str]) -> None:
    if env.get("LISTEN_PID") == "self":
        env = {**env, "LISTEN_PID": str(os.getpid())}
    assert listen_fds(env) == []


def test_listen_fds_other_pid_leaves_fds_alone() -> None:
    got = run_listen_child(1, {"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert got == {"pairs": [], "cloexec": []}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_FDS": "abc"}, "LISTEN_FDS='abc' is not an integer >= 0"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not an integer >= 0"),
        ({"LISTEN_FDS": " 2"}, "LISTEN_FDS=' 2' is not an integer >= 0"),
        ({"LISTEN_FDS": ""}, "LISTEN_FDS='' is not an integer >= 0"),
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID='x' is not an integer >= 1"),
        ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID='0' is not an integer >= 1"),
        (
            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http"},
            "LISTEN_FDNAMES='http' has 1 names for LISTEN_FDS=2",
        ),
    ],
)
def test_malformed_listen_env_is_a_clear_one_line_error(env: dict[str, str], message: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), **env}
    with pytest.raises(ListenFdsError) as info:
        listen_fds(env)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_listen_env_round_trip_and_clearing() -> None:
    made = listen_env(1234, ["http", "admin"])
    assert made == {"LISTEN_PID": "1234", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:admin"}
    child_env = {"PATH": "/bin", "NOTIFY_SOCKET": "@x", **made}
    clear_listen_env(child_env)
    assert child_env == {"PATH": "/bin", "NOTIFY_SOCKET": "@x"}
    clear_listen_env(child_env)  # idempotent

    got = run_listen_child(2, {**listen_env(1, ["http", "admin"]), "LISTEN_PID": "self"})
    assert got["pairs"] == [["http", 3], ["admin", 4]]


def test_fds_by_name_groups_shared_names() -> None:
    pairs = [("http", 3), ("admin", 4), ("http", 5), ("stored", 6)]
    assert fds_by_name(pairs) == {"http": [3, 5], "admin": [4], "stored": [6]}


CHILD_ACTIVATED = textwrap.dedent(
    """
    import fcntl, json, os, socket
    from swapd.systemd import Notifier, fds_by_name, listen_fds

    pairs = listen_fds()
    report = {
        "pairs": pairs,
        "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for _, fd in pairs],
        "bound": [socket.socket(fileno=os.dup(fd)).getsockname() for _, fd in pairs],
    }
    Notifier.from_env().ready(json.dumps(report))
    listener = socket.socket(fileno=fds_by_name(pairs)["http"][0])
    conn, _ = listener.accept()
    conn.sendall(b"hello from %d\\n" % os.getpid())
    conn.close()
    """
)


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing"
)
def test_real_systemd_socket_activate_hands_named_fds(
    manager: FakeManager, short_dir: Path
) -> None:
    http, admin = str(short_dir / "http.sock"), str(short_dir / "admin.sock")
    argv = ["systemd-socket-activate", "-l", http, "-l", admin, "--fdname=http:admin"]
    argv += ["-E", f"NOTIFY_SOCKET={manager.address}", sys.executable, "-c", CHILD_ACTIVATED]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        # It reports each bind on stderr before waiting for the first connection.
        listening = [proc.stderr.readline() for _ in range(2)]
        assert listening == [f"Listening on {http} as 3.\n", f"Listening on {admin} as 4.\n"]
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(DEADLINE)
            client.connect(http)  # queued in the backlog; triggers the exec
            msg = manager.recv()
            assert client.makefile("rb").readline() == b"hello from %d\n" % proc.pid
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    # systemd-socket-activate execs in place: LISTEN_PID and the sender are its own pid.
    assert msg.pid == proc.pid
    report = json.loads(msg.get("STATUS"))
    assert report == {
        "pairs": [["http", 3], ["admin", 4]],
        "cloexec": [True, True],
        "bound": [http, admin],
    }


# --- watchdog -------------------------------------------------------------------------------------


def test_watchdog_usec_rules() -> None:
    me = str(os.getpid())
    assert watchdog_usec({}) is None
    assert watchdog_usec({"WATCHDOG_USEC": "2000000"}) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me}) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_usec({"WATCHDOG_PID": me}) is None


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "1.5"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "100", "WATCHDOG_PID": "me"},
    ],
)
def test_malformed_watchdog_env_is_an_error(env: dict[str, str]) -> None:
    with pytest.raises(WatchdogEnvError, match="WATCHDOG_"):
        watchdog_usec(env)
