"""Hostile control clients and impostor servers, against the real ControlServer and Client:
strict argument types, idle and half requests, too many connections, the fd limit, a server
run by another uid, a directory or socket path someone else prepared."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swapd.commands import COMMANDS, PatchArgs, StopArgs, UpgradeArgs
from swapd.control import (
    Client,
    ClientError,
    ControlError,
    ControlServer,
    Emit,
    Peer,
    bind_control,
    parse_request,
)
from tests.unit.test_control_protocol import NOBODY, _fork_as, as_root

DEADLINE = 10.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="swapd-hostile-") as d:
        yield Path(d)


def line(args: dict[str, Any], cmd: str = "stop") -> bytes:
    return json.dumps({"v": 1, "cmd": cmd, "args": args}).encode()


# -- strict arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "error"),
    [
        (b'{"v": 1, "cmd": "status", "args": {"n": ' + b"7" * 5000 + b"}}",
         "malformed request: Exceeds the limit (4300 digits)"),
        (b'{"v": ' + b"1" * 5000 + b', "cmd": "status"}', "malformed request: Exceeds the limit"),
        (line({"fast": "no"}), "malformed request: stop argument 'fast': str is not bool"),
        (line({"fast": 1}), "malformed request: stop argument 'fast': int is not bool"),
        (line({"fast": None}), "malformed request: stop argument 'fast': null is not bool"),
        (line({"self": "false"}, "upgrade"),
         "malformed request: upgrade argument 'self': str is not bool"),
        (line({"fats": True}), "malformed request: stop: unknown field 'fats' (known: fast)"),
        (line({"x": 1}, "status"), "malformed request: status: unknown field 'x' (known: none)"),
        (line({"action": "explode"}, "patch"),
         "malformed request: unknown patch action 'explode' (apply, rollback, squash, list)"),
        (line({"module": "m"}, "patch"), "malformed request: patch needs 'module' (a name) and "
                                         "'source' (the new text)"),
        (line({"module": ["m"], "source": ""}, "patch"),
         "malformed request: patch argument 'module': list is not str | None"),
        (line({"dry_run": "true", "module": "m", "source": ""}, "patch"),
         "malformed request: patch argument 'dry_run': str is not bool"),
        # The last of duplicate keys would win in json.loads: a "status" that is a "stop".
        (b'{"v": 1, "cmd": "status", "cmd": "stop"}',
         "malformed request: key 'cmd' given twice"),
        (b'{"v": 1, "cmd": "stop", "args": {"fast": false, "fast": true}}',
         "malformed request: key 'fast' given twice"),
    ],
)
def test_arguments_are_typed_strictly(request_line: bytes, error: str) -> None:
    with pytest.raises(ControlError) as info:
        parse_request(request_line, COMMANDS)
    assert str(info.value).startswith(error), str(info.value)
    assert "\n" not in str(info.value)


def test_the_cli_builds_what_the_supervisor_parses() -> None:
    for args in (StopArgs(fast=True), UpgradeArgs(self_=True),
                 PatchArgs(module="app.rules", source="x = 1\n", name="fix.py", dry_run=True)):
        cmd = type(args).CMD
        assert parse_request(line(args.body(), cmd), COMMANDS) == (cmd, args)
    assert UpgradeArgs(self_=True).body() == {"self": True}


# -- a server with small bounds ---------------------------------------------------------------


class Handler:
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, cmd: str, args: Any, emit: Emit, peer: Peer) -> dict[str, Any]:
        if cmd == "upgrade":  # a long request: announces its deadline, then takes its time
            emit("deadline", "", {"seconds": 30.0})
            self.entered.set()
            await self.release.wait()
        if cmd == "reload":  # a request that announces nothing and never ends
            await asyncio.Event().wait()
        return {"cmd": cmd}


def run_server(path: str, body: Any, **bounds: Any) -> None:
    async def main() -> None:
        sock = bind_control(path)
        handler = Handler()
        server = ControlServer(sock, handler, COMMANDS, **bounds)
        await server.start()
        try:
            await asyncio.wait_for(body(server, handler), DEADLINE)
        finally:
            handler.release.set()
            await server.close(grace=0.2)
            sock.close()

    asyncio.run(main())


def read_all(sock: socket.socket) -> list[dict[str, Any]]:
    sock.settimeout(DEADLINE)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return [json.loads(x) for x in data.splitlines()]


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_idle_and_half_requests_are_closed_but_a_long_request_is_not(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")

    async def body(server: ControlServer, handler: Handler) -> None:
        silent, half, waiting = connect(path), connect(path), connect(path)
        half.sendall(b'{"v": 1, "cmd": "sta')
        waiting.sendall(line({}, "upgrade") + b"\n")  # its result takes longer than the idle
        for s in (silent, half):
            msgs = await asyncio.to_thread(read_all, s)  # ends: the server closed it
            assert msgs == [{"v": 1, "type": "result", "ok": False, "data": {},
                             "error": "no complete request within 0.3s; closing"}]
            s.close()
        handler.release.set()  # the one waiting for its upgrade is still there: answered
        waiting.shutdown(socket.SHUT_WR)
        msgs = await asyncio.to_thread(read_all, waiting)
        assert [m["type"] for m in msgs] == ["deadline", "result"]
        assert msgs[0]["seconds"] == 30.0 and msgs[-1]["ok"] is True
        waiting.close()

    run_server(path, body, idle_timeout=0.3)


def test_connections_are_capped(short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")

    async def body(server: ControlServer, handler: Handler) -> None:
        held = [connect(path) for _ in range(4)]  # accepted in order: the 4th is one too many
        extra = held.pop()
        msgs = await asyncio.to_thread(read_all, extra)
        assert len(msgs) == 1 and msgs[0]["ok"] is False
        assert msgs[0]["error"] == ("too many control connections (3 open, limit 3); "
                                    "retry later")
        extra.close()
        held.pop().close()
        while server.clients > 2:  # the server reads that EOF on this loop (DEADLINE bounds it)
            await asyncio.sleep(0.001)
        msgs = await asyncio.to_thread(lambda: list(Client(path, timeout=DEADLINE)
                                                    .call("status")))
        assert msgs[-1]["ok"] is True, msgs  # a freed slot serves again
        for s in held:
            s.close()

    run_server(path, body, max_clients=3, idle_timeout=DEADLINE)


def test_the_client_waits_as_long_as_the_announced_deadline(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(short_dir / "ctl.sock")
    monkeypatch.setattr("swapd.control.CLIENT_WAIT", 0.2)

    async def body(server: ControlServer, handler: Handler) -> None:
        task = asyncio.ensure_future(asyncio.to_thread(lambda: list(Client(path).call("upgrade"))))
        await handler.entered.wait()
        await asyncio.sleep(0.5)  # the clock passes the client's default wait (0.2 s) ...
        handler.release.set()  # ... but it was told 30 s: it is still there for the result
        msgs = await task
        assert msgs[-1]["ok"] is True and all(m["type"] != "deadline" for m in msgs)
        with pytest.raises(ClientError, match=r"no answer from supervisor within 0.2s"):
            await asyncio.to_thread(lambda: list(Client(path).call("reload")))

    run_server(path, body)


# -- the fd limit -------------------------------------------------------------------------------

EMFILE_SERVER = textwrap.dedent(
    """
    import asyncio, logging, os, resource, sys
    from swapd.commands import COMMANDS
    from swapd.control import ControlServer, bind_control

    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(message)s")

    async def handler(cmd, args, emit, peer):
        return {"cmd": cmd}

    async def stdin_line():  # no thread, no import: nothing that needs a descriptor
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        loop.add_reader(0, lambda: got.done() or got.set_result(os.read(0, 100)))
        await got
        loop.remove_reader(0)

    async def main():
        sock = bind_control(sys.argv[1])
        server = ControlServer(sock, handler, COMMANDS)
        await server.start()
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print("full", flush=True)
        await stdin_line()
        for fd in hog:
            os.close(fd)
        print("free", flush=True)
        await stdin_line()
        await server.close()

    asyncio.run(main())
    """
)


def test_at_the_fd_limit_connections_are_answered_and_the_log_stays_quiet(
        short_dir: Path) -> None:
    path = str(short_dir / "ctl.sock")
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "full\n"
        for _ in range(20):  # every one answered at once, none left waiting
            msgs = list(Client(path, timeout=DEADLINE).call("status"))
            assert msgs[-1]["ok"] is False
            assert msgs[-1]["error"].startswith("the supervisor is out of file descriptors "
                                                "(limit 64, Too many open files)")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "free\n"
        assert list(Client(path, timeout=DEADLINE).call("status"))[-1]["ok"] is True
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
        shed = [x for x in err.splitlines() if "event=control.shed" in x]
        # 20 refusals, one line per 10 s: the rest are counted, not logged
        assert 1 <= len(shed) <= 2 and "accept_failed" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- impostors ----------------------------------------------------------------------------------


def _serve_as_nobody(path: str) -> socket.socket:
    """A listening socket at `path` made by uid NOBODY (its peer credentials say so)."""
    def make(chan: socket.socket) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(4)
        socket.send_fds(chan, [b"l"], [s.fileno()])

    _, fds = _fork_as(NOBODY, make)
    return socket.socket(fileno=fds[0])


@as_root
@pytest.mark.parametrize("layout", ["their directory", "symlinked directory", "sticky /tmp"])
def test_the_client_says_nothing_to_a_server_of_another_uid(short_dir: Path, layout: str
                                                            ) -> None:
    os.chmod(short_dir, 0o755)
    theirs = short_dir / "theirs"
    if layout == "sticky /tmp":
        theirs.mkdir(mode=0o1777)
        os.chmod(theirs, 0o1777)
        path = theirs / "swapd.sock"
    else:
        theirs.mkdir(mode=0o700)
        os.chown(theirs, NOBODY, NOBODY)  # e.g. /tmp/swapd-0, made first by someone else
        path = theirs / "swapd.sock"
        if layout == "symlinked directory":
            (short_dir / "swapd-0").symlink_to(theirs)
            path = short_dir / "swapd-0" / "swapd.sock"
    listener = _serve_as_nobody(str(theirs / "swapd.sock"))
    received: list[bytes] = []

    def impostor() -> None:
        listener.settimeout(DEADLINE)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(DEADLINE)
            while chunk := conn.recv(4096):
                received.append(chunk)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        with pytest.raises(ClientError) as info:
            list(Client(str(path), timeout=DEADLINE).call("stop", {"fast": True}))
        assert str(info.value).startswith(f"refusing to talk to {path}: it is served by uid "
                                          f"{NOBODY} (pid ")
        thread.join(DEADLINE)
        assert not thread.is_alive()
        assert received == [], "the client sent something to the impostor"
    finally:
        listener.close()


@as_root
def test_the_server_refuses_a_socket_path_of_another_uid(short_dir: Path) -> None:
    path = short_dir / "ctl.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))  # a stale socket file ...
    listener.close()
    os.chown(path, NOBODY, NOBODY)  # ... left by someone else: not ours to replace
    with pytest.raises(OSError) as info:
        bind_control(str(path)).close()
    assert str(info.value) == (f"[Errno 1] control socket {path} belongs to uid {NOBODY}, "
                               "not to us: refusing to replace it")
    assert os.lstat(path).st_uid == NOBODY


def test_the_server_refuses_a_symlinked_directory(short_dir: Path) -> None:
    real = short_dir / "real"
    real.mkdir(mode=0o700)
    (short_dir / "link").symlink_to(real)
    with pytest.raises(OSError) as info:
        bind_control(str(short_dir / "link" / "ctl.sock")).close()
    assert "is a symlink" in str(info.value)
    assert list(real.iterdir()) == []


@as_root
def test_the_server_refuses_a_directory_of_another_uid(short_dir: Path) -> None:
    theirs = short_dir / "swapd-0"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(OSError) as info:
        bind_control(str(theirs / "swapd.sock")).close()
    assert f"belongs to uid {NOBODY}, not to us" in str(info.value)
