"""The control protocol: request parsing, the control socket, a ControlServer with a fake handler
driven through the real blocking Client, and every error the CLI can show."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import select
import socket
import stat
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swapd.commands import Args
from swapd.control import (
    MAX_LINE,
    PROTOCOL,
    Client,
    ClientError,
    ControlError,
    ControlServer,
    Emit,
    Peer,
    allowed,
    bind_control,
    parse_request,
)

DEADLINE = 10.0  # seconds; only reached when something is broken


@dataclasses.dataclass(frozen=True)
class EchoArgs(Args):
    CMD = "echo"
    a: list[Any] | None = None
    s: str | None = None
    x: list[Any] | None = None
    n: int | None = None


@dataclasses.dataclass(frozen=True)
class SizeArgs(Args):
    CMD = "size"
    s: str = dataclasses.field(default="", metadata={"max_len": MAX_LINE})


def _no_args(name: str) -> type[Args]:
    return dataclasses.dataclass(frozen=True)(type(f"{name}Args", (Args,), {"CMD": name}))


COMMANDS: dict[str, type[Args]] = {
    "echo": EchoArgs, "size": SizeArgs,
    **{name: _no_args(name) for name in ("progress", "fail", "crash", "block")},
}


def given(args: Args) -> dict[str, Any]:
    """The arguments a request gave (the others are at their default, None)."""
    return {k: v for k, v in args.body().items() if v is not None}

KNOWN = "block, crash, echo, fail, progress, size"
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="swapd-ctl-") as d:
        yield Path(d)


# -- parse_request ------------------------------------------------------------------------


def test_parse_a_request() -> None:
    line = b'{"v": 1, "cmd": "echo", "args": {"a": [1, 2]}}\n'
    assert parse_request(line, COMMANDS) == ("echo", EchoArgs(a=[1, 2]))
    assert parse_request(b'{"v": 1, "cmd": "echo"}', COMMANDS) == ("echo", EchoArgs())
    assert parse_request('{"v":1,"cmd":"echo","args":{"s":"é"}}'.encode(), COMMANDS) == (
        "echo", EchoArgs(s="é"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "malformed request: not JSON (Expecting value)"),
        (b"\n", "malformed request: not JSON (Expecting value)"),
        (b"status\n", "malformed request: not JSON (Expecting value)"),
        (b'{"v": 1, "cmd": "echo"', "malformed request: not JSON (Expecting ',' delimiter)"),
        (b'{"v": 1} {"v": 1}', "malformed request: not JSON (Extra data)"),
        (b'{"v": 1, "cmd": "\xff"}', "malformed request: not UTF-8"),
        (b"[1, 2]", "malformed request: expected a JSON object"),
        (b'"status"', "malformed request: expected a JSON object"),
        (b"null", "malformed request: expected a JSON object"),
        (b'{"cmd": "echo"}', "unsupported protocol version None (supervisor speaks 1)"),
        (b'{"v": 2, "cmd": "echo"}', "unsupported protocol version 2 (supervisor speaks 1)"),
        (b'{"v": "1", "cmd": "echo"}', "unsupported protocol version '1' (supervisor speaks 1)"),
        (b'{"v": 1}', "malformed request: missing 'cmd'"),
        (b'{"v": 1, "cmd": 5}', "malformed request: missing 'cmd'"),
        (b'{"v": 1, "cmd": null}', "malformed request: missing 'cmd'"),
        (b'{"v": 1, "cmd": "launch"}', f"unknown command 'launch' (known: {KNOWN})"),
        (b'{"v": 1, "cmd": "ECHO"}', f"unknown command 'ECHO' (known: {KNOWN})"),
        (b'{"v": 1, "cmd": "echo", "args": []}', "malformed request: 'args' must be an object"),
        (b'{"v": 1, "cmd": "echo", "args": null}',
         "malformed request: 'args' must be an object"),
        (b'{"v": 1, "cmd": "echo", "args": "x"}', "malformed request: 'args' must be an object"),
    ],
)
def test_parse_malformed(line: bytes, message: str) -> None:
    with pytest.raises(ControlError) as info:
        parse_request(line, COMMANDS)
    assert str(info.value) == message
    assert info.value.data == {}


def test_parse_deeply_nested_json() -> None:
    with pytest.raises(ControlError, match="malformed request"):
        parse_request(b"[" * 100_000 + b"]" * 100_000, COMMANDS)


def test_control_error_carries_data() -> None:
    err = ControlError("boom", data={"tail": "x"})
    assert str(err) == "boom" and err.data == {"tail": "x"}
    assert ControlError("plain").data == {}


# -- peers --------------------------------------------------------------------------------


def test_allowed_peers() -> None:
    me = os.geteuid()
    assert allowed(Peer(pid=1, uid=0, gid=0))
    assert allowed(Peer(pid=1, uid=me, gid=0))
    assert not allowed(Peer(pid=1, uid=NOBODY if me != NOBODY else 12345, gid=0))
    assert str(Peer(pid=812, uid=1000, gid=1000, fd=7)) == "pid=812 uid=1000"


# -- bind_control -------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_bind_control_creates_a_private_directory_and_socket(short_dir: Path) -> None:
    path = short_dir / "run" / "swapd" / "ctl.sock"
    before = _umask()
    sock = bind_control(str(path))
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert _umask() == before  # the temporary umask did not leak
    finally:
        sock.close()


def test_bind_control_in_an_existing_directory(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)
    sock = bind_control(str(short_dir / "ctl.sock"))
    try:
        # An existing directory is the operator's: its mode is left alone.
        assert stat.S_IMODE(os.stat(short_dir).st_mode) == 0o755
        assert stat.S_IMODE(os.lstat(short_dir / "ctl.sock").st_mode) == 0o600
    finally:
        sock.close()


def test_bind_control_relative_path(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(short_dir)
    sock = bind_control("ctl.sock")
    try:
        assert stat.S_ISSOCK(os.lstat(short_dir / "ctl.sock").st_mode)
    finally:
        sock.close()


def test_bind_control_replaces_a_stale_socket(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    bind_control(path).close()  # a crashed supervisor leaves the file behind
    sock = bind_control(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(DEADLINE)
            c.connect(path)
    finally:
        sock.close()


def test_bind_control_refuses_a_live_socket(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    live = bind_control(path)
    try:
        with pytest.raises(OSError) as info:
            bind_control(path)
        assert str(info.value) == f"control socket {path} is in use by another supervisor"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(DEADLINE)
            c.connect(path)  # still the first supervisor's
            conn, _ = live.accept()
            conn.close()
    finally:
        live.close()


def test_bind_control_refuses_a_non_socket(short_dir: Path) -> None:
    path = short_dir / "ctl.sock"
    path.write_text("precious")
    with pytest.raises(OSError) as info:
        bind_control(str(path))
    assert str(info.value) == f"control path {path} exists and is not a socket"
    assert path.read_text() == "precious"


def test_bind_control_cannot_create_the_directory(short_dir: Path) -> None:
    (short_dir / "file").write_text("")
    path = short_dir / "file" / "sub" / "ctl.sock"
    with pytest.raises(OSError) as info:
        bind_control(str(path))
    assert info.value.errno == errno.ENOTDIR
    assert info.value.strerror == (
        f"cannot create {path.parent} for the control socket: Not a directory"
    )


def test_bind_control_path_too_long(short_dir: Path) -> None:
    path = f"{short_dir}/{'x' * 120}.sock"
    with pytest.raises(OSError) as info:
        bind_control(path)
    assert "None" not in str(info.value)
    assert "too long" in str(info.value)


def test_bind_control_refuses_a_world_writable_directory(short_dir: Path) -> None:
    run = short_dir / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    with pytest.raises(OSError):
        bind_control(str(run / "ctl.sock")).close()


# -- a server with a fake handler ---------------------------------------------------------


class FakeHandler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], int]] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, cmd: str, args: Args, emit: Emit, peer: Peer) -> dict[str, Any]:
        self.calls.append((cmd, given(args), peer.uid))
        if cmd == "echo":
            return {"args": given(args), "uid": peer.uid, "pid": peer.pid}
        if isinstance(args, SizeArgs):
            return {"len": len(args.s)}
        if cmd == "progress":
            emit("spawned", "gen=4 worker=0 pid=812", None)
            emit("ready", "gen=4 all 2 workers ready", {"gen": 4})
            return {"gen": 4}
        if cmd == "fail":
            emit("spawned", "gen=4 worker=0 pid=812", None)
            raise ControlError("gen=4 worker=0 exited with status 3", data={"tail": "Traceback"})
        if cmd == "block":
            self.entered.set()
            await self.release.wait()
            return {"released": True}
        raise RuntimeError("a bug in the handler")


@contextlib.asynccontextmanager
async def serving(sock: socket.socket, handler: FakeHandler) -> AsyncIterator[ControlServer]:
    server = ControlServer(sock, handler, COMMANDS)
    await server.start()
    try:
        yield server
    finally:
        await server.close(grace=0.0)
        sock.close()  # the socket is its owner's (the supervisor's), as is closing it


def run(coro_fn: Callable[[], Any]) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro_fn(), DEADLINE)

    asyncio.run(main())


async def call(path: str, cmd: str, args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await asyncio.to_thread(lambda: list(Client(path, timeout=DEADLINE).call(cmd, args)))


async def client_error(path: str, cmd: str) -> str:
    def go() -> str:
        with pytest.raises(ClientError) as info:
            list(Client(path, timeout=DEADLINE).call(cmd))
        return str(info.value)

    return await asyncio.to_thread(go)


def raw_exchange(sock: socket.socket, payload: bytes) -> list[dict[str, Any]]:
    """Send bytes as they are, end our side, read every reply line until the server closes."""
    with sock:
        sock.settimeout(DEADLINE)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the server refused the request before reading all of it: read why
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                # The server closed with part of our request unread (it refused it): the
                # kernel resets us, after every byte it did send has been read.
                break
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def raw(path: str, payload: bytes) -> list[dict[str, Any]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return await asyncio.to_thread(raw_exchange, sock, payload)


def request(cmd: str, args: dict[str, Any] | None = None, v: Any = PROTOCOL) -> bytes:
    return json.dumps({"v": v, "cmd": cmd, "args": args or {}}).encode() + b"\n"


def result(ok: bool, data: dict[str, Any] | None = None, error: str | None = None
           ) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": 1, "type": "result", "ok": ok, "data": data or {}}
    if error is not None:
        msg["error"] = error
    return msg


def test_a_request_and_its_result(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    handler = FakeHandler()

    async def main() -> None:
        async with serving(bind_control(path), handler):
            msgs = await call(path, "echo", {"x": [1, "two"]})
        assert msgs == [result(True, {"args": {"x": [1, "two"]}, "uid": os.geteuid(),
                                      "pid": os.getpid()})]

    run(main)
    assert handler.calls == [("echo", {"x": [1, "two"]}, os.geteuid())]


def test_progress_then_result(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")

    async def main() -> None:
        async with serving(bind_control(path), FakeHandler()):
            msgs = await call(path, "progress")
        assert msgs == [
            {"v": 1, "type": "progress", "event": "spawned", "message": "gen=4 worker=0 pid=812"},
            {"v": 1, "type": "progress", "event": "ready", "message": "gen=4 all 2 workers ready",
             "gen": 4},
            result(True, {"gen": 4}),
        ]

    run(main)


def test_a_failed_request_is_ok_false_with_its_data(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")

    async def main() -> None:
        async with serving(bind_control(path), FakeHandler()):
            msgs = await call(path, "fail")
            again = await call(path, "echo")  # the server is unharmed
        assert [m["type"] for m in msgs] == ["progress", "result"]
        assert msgs[-1] == result(False, {"tail": "Traceback"},
                                  "gen=4 worker=0 exited with status 3")
        assert again[-1]["ok"] is True

    run(main)


def test_unknown_command_through_the_client(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    handler = FakeHandler()

    async def main() -> None:
        async with serving(bind_control(path), handler):
            msgs = await call(path, "launch")
        assert msgs == [result(False, error=f"unknown command 'launch' (known: {KNOWN})")]

    run(main)
    assert handler.calls == []  # refused before the handler


def test_several_requests_on_one_connection(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    handler = FakeHandler()
    payload = (request("echo", {"n": 1}) + b"not json\n" + request("echo", v=2)
               + request("progress") + b"\n" + request("echo", {"n": 2}))

    async def main() -> None:
        async with serving(bind_control(path), handler):
            msgs = await raw(path, payload)
        me = {"uid": os.geteuid(), "pid": os.getpid()}
        assert msgs == [
            result(True, {"args": {"n": 1}, **me}),
            result(False, error="malformed request: not JSON (Expecting value)"),
            result(False, error="unsupported protocol version 2 (supervisor speaks 1)"),
            {"v": 1, "type": "progress", "event": "spawned", "message": "gen=4 worker=0 pid=812"},
            {"v": 1, "type": "progress", "event": "ready", "message": "gen=4 all 2 workers ready",
             "gen": 4},
            result(True, {"gen": 4}),
            result(False, error="malformed request: not JSON (Expecting value)"),
            result(True, {"args": {"n": 2}, **me}),
        ]

    run(main)
    assert [c[0] for c in handler.calls] == ["echo", "progress", "echo"]


def test_a_request_without_its_newline(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    handler = FakeHandler()

    async def main() -> None:
        async with serving(bind_control(path), handler):
            cut = await raw(path, request("echo")[:-1])
            blank = await raw(path, b"  ")  # only whitespace before EOF: just a close
        assert cut == [result(False, error="request not terminated by a newline")]
        assert blank == []

    run(main)
    assert handler.calls == []


_HEAD, _TAIL = b'{"v":1,"cmd":"size","args":{"s":"', b'"}}'


def _sized_request(length: int) -> bytes:
    return _HEAD + b"x" * (length - len(_HEAD) - len(_TAIL)) + _TAIL


def test_a_request_of_exactly_the_limit_is_served(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    line = _sized_request(MAX_LINE)
    assert len(line) == MAX_LINE

    async def main() -> None:
        async with serving(bind_control(path), FakeHandler()):
            msgs = await raw(path, line + b"\n")
        assert msgs == [result(True, {"len": MAX_LINE - len(_HEAD) - len(_TAIL)})]

    run(main)


@pytest.mark.parametrize("newline", [False, True], ids=["unterminated", "terminated"])
def test_a_request_longer_than_the_limit(short_dir: Path, newline: bool) -> None:
    # MAX_LINE is fixed (8 MiB, a patch source rides in a request): send the real thing.
    path = str(short_dir / "ctl.sock")
    handler = FakeHandler()
    line = _sized_request(MAX_LINE + 1) + (b"\n" if newline else b"")

    async def main() -> None:
        async with serving(bind_control(path), handler):
            msgs = await raw(path, line)
            after = await call(path, "echo")
        assert msgs == [result(False, error=f"request longer than {MAX_LINE} bytes")]
        assert after[-1]["ok"] is True

    run(main)
    assert [c[0] for c in handler.calls] == ["echo"]


def test_client_sending_far_more_than_the_limit(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")

    async def main() -> None:
        async with serving(bind_control(path), FakeHandler()):
            msgs = await call(path, "size", {"s": "x" * (2 * MAX_LINE)})
        assert msgs == [result(False, error=f"request longer than {MAX_LINE} bytes")]

    run(main)


def test_an_unexpected_handler_error_is_answered(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")

    async def main() -> None:
        async with serving(bind_control(path), FakeHandler()):
            msgs = await call(path, "crash")
        assert msgs[-1]["ok"] is False and "a bug in the handler" in msgs[-1]["error"]

    run(main)


def test_an_unexpected_handler_error_leaves_the_server_serving(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")

    async def main() -> None:
        async with serving(bind_control(path), FakeHandler()):
            crashed = await call(path, "crash")
            assert crashed[-1]["ok"] is False and "internal error" in crashed[-1]["error"]
            assert (await call(path, "echo"))[-1]["ok"] is True

    run(main)


def test_close_lets_a_request_in_progress_finish(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    handler = FakeHandler()

    async def main() -> None:
        sock = bind_control(path)
        server = ControlServer(sock, handler, COMMANDS)
        await server.start()
        pending = asyncio.ensure_future(call(path, "block"))
        await handler.entered.wait()
        closing = asyncio.ensure_future(server.close(grace=DEADLINE))
        await asyncio.sleep(0)  # let close() stop accepting before the handler returns
        handler.release.set()
        await closing
        sock.close()
        assert (await pending) == [result(True, {"released": True})]
        with pytest.raises(ClientError, match="no supervisor listening"):
            await asyncio.to_thread(lambda: list(Client(path, timeout=DEADLINE).call("echo")))

    run(main)


def test_close_cancels_a_request_past_its_grace(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    handler = FakeHandler()

    async def main() -> None:
        sock = bind_control(path)
        server = ControlServer(sock, handler, COMMANDS)
        await server.start()
        pending = asyncio.ensure_future(client_error(path, "block"))
        await handler.entered.wait()
        await server.close(grace=0.05)
        sock.close()
        assert await pending == "supervisor closed the connection before answering"

    run(main)


# -- peer credentials (root only: needs a second uid) -------------------------------------


def _fork_as(uid: int, body: Callable[[socket.socket], None]) -> tuple[bytes, list[int]]:
    """Run `body` in a forked child with uid/gid `uid`; return what it sent (bytes, fds)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ours.close()
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            body(theirs)
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    pidfd = os.pidfd_open(pid)
    try:
        ours.settimeout(DEADLINE)
        data, fds, _, _ = socket.recv_fds(ours, 4096, 4)
        assert select.select([pidfd], [], [], DEADLINE)[0], "child did not exit"
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        pid = 0
        return data, fds
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(pidfd)
        ours.close()


@as_root
def test_another_uid_is_refused() -> None:
    # An abstract address, so that file permissions do not stop the other uid first: this
    # is the server's own check behind the 0600 socket.
    address = f"\0swapd-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)

    def connect(chan: socket.socket) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(address)
        socket.send_fds(chan, [b"c"], [s.fileno()])

    _, fds = _fork_as(NOBODY, connect)  # peer credentials are fixed at connect()
    conn = socket.socket(fileno=fds[0])
    handler = FakeHandler()

    async def main() -> None:
        async with serving(listener, handler):
            # Nothing sent: the refusal comes first, and a request could race with the close.
            msgs = await asyncio.to_thread(raw_exchange, conn, b"")
        assert msgs == [result(False, error=f"permission denied for uid {NOBODY}")]

    run(main)
    assert handler.calls == []


@as_root
def test_client_permission_denied(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")  # in a 0700 root directory
    sock = bind_control(path)

    def attempt(chan: socket.socket) -> None:
        try:
            list(Client(path, timeout=DEADLINE).call("status"))
            chan.sendall(b"no error")
        except ClientError as e:
            chan.sendall(str(e).encode())

    try:
        data, _ = _fork_as(NOBODY, attempt)
    finally:
        sock.close()
    assert data.decode() == f"permission denied on control socket {path}"


# -- Client errors against hand-made peers ------------------------------------------------


def test_client_no_socket(short_dir: Path) -> None:
    path = str(short_dir / "missing.sock")
    with pytest.raises(ClientError) as info:
        list(Client(path).call("status"))
    assert str(info.value) == f"no supervisor: control socket {path} does not exist"
    assert info.value.__suppress_context__


@pytest.mark.parametrize("kind", ["stale-socket", "regular-file"])
def test_client_refused(short_dir: Path, kind: str) -> None:
    path = short_dir / "ctl.sock"
    if kind == "stale-socket":
        bind_control(str(path)).close()
    else:
        path.write_text("")
    with pytest.raises(ClientError) as info:
        list(Client(str(path)).call("status"))
    if kind == "stale-socket":
        assert str(info.value) == f"no supervisor listening on {path} (stale socket?)"
    else:  # not "no supervisor listening (stale socket?)": a file is no socket at all
        assert str(info.value) == f"{path} is not a socket (a file): not a control socket"
    assert info.value.__suppress_context__


@pytest.mark.parametrize("kind", ["parent-is-a-file", "path-too-long"])
def test_client_unusable_path(short_dir: Path, kind: str) -> None:
    if kind == "parent-is-a-file":
        (short_dir / "file").write_text("")
        path = str(short_dir / "file" / "ctl.sock")
    else:
        path = f"{short_dir}/{'x' * 120}.sock"
    with pytest.raises(ClientError):
        list(Client(path).call("status"))


class OneShotPeer:
    """A listening socket that answers one connection with canned bytes from a thread."""

    def __init__(self, path: str, reply: bytes | None, *, accept: bool = True,
                 linger: bool = True) -> None:
        self.path = path
        self.linger = linger
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.reply = reply
        self.request = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        if accept:
            self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(DEADLINE)
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(DEADLINE)
            while not self.request.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                self.request += chunk
            if self.reply is not None:
                conn.sendall(self.reply)
                if not self.linger:
                    return
                # Stay connected until the client hangs up: the client must stop at the
                # result line by itself, not wait for EOF.
                conn.recv(1)

    def __enter__(self) -> OneShotPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        self.sock.close()


def test_client_request_format_and_stop_at_result(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    progress = {"v": 1, "type": "progress", "event": "e", "message": "m"}
    reply = (json.dumps(progress) + "\n" + json.dumps(result(True)) + "\n").encode()
    with OneShotPeer(path, reply) as peer:
        msgs = list(Client(path, timeout=DEADLINE).call("status"))
    assert msgs == [progress, result(True)]
    assert json.loads(peer.request) == {"v": 1, "cmd": "status", "args": {}}
    assert peer.request.count(b"\n") == 1 and peer.request.endswith(b"\n")


def test_client_closed_before_answering(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    with OneShotPeer(path, None), pytest.raises(ClientError) as info:
        list(Client(path, timeout=DEADLINE).call("status"))
    assert str(info.value) == "supervisor closed the connection before answering"


def test_client_progress_then_close(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    got: list[dict[str, Any]] = []
    line = json.dumps({"v": 1, "type": "progress", "event": "e", "message": "m"}) + "\n"
    with OneShotPeer(path, line.encode(), linger=False), pytest.raises(ClientError) as info:
        for msg in Client(path, timeout=DEADLINE).call("status"):
            got.append(msg)
    assert [m["type"] for m in got] == ["progress"]
    assert str(info.value) == "supervisor closed the connection before answering"


def test_client_malformed_reply(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    reply = b"HTTP/1.1 400 Bad Request\r\n\r\n"
    with OneShotPeer(path, reply), pytest.raises(ClientError) as info:
        list(Client(path, timeout=DEADLINE).call("status"))
    message = str(info.value)
    assert message.startswith("malformed reply from supervisor: Expecting value")
    assert "\n" not in message


def test_client_timeout(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    # Listens, never accepts: a wedged supervisor.
    with OneShotPeer(path, None, accept=False), pytest.raises(ClientError) as info:
        list(Client(path, timeout=0.2).call("status"))
    assert str(info.value) == "no answer from supervisor within 0.2s"
