"""swapd serve's pure parts, `import swapd`'s registry, `--app`, and the worker hooks serve
relies on (pinned connections, full-duplex boundaries) on a real loop with real sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import sys
from typing import Any

import pytest

import swapd
from swapd.config import ConfigError, build, from_overrides, to_overrides
from swapd.serve import loader, proxy
from swapd.serve.options import OptionsError, parse
from swapd.serve.ws import TooLarge, whole_frames
from swapd.worker.connection import Connection, ConnectionHub, HandedOff

# -- import swapd ------------------------------------------------------------------------------


def test_import_swapd_is_cheap() -> None:
    """What an app module imports at top level: no asyncio, no other module of ours."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys; before = set(sys.modules); import swapd; "
         "print(sorted(set(sys.modules) - before))"],
        capture_output=True, text=True, check=True, timeout=30).stdout
    assert out.strip() == "['swapd']"


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> Any:
    fresh = swapd._Hooks()
    monkeypatch.setattr(swapd, "_hooks", fresh)
    return fresh


def test_decorators_only_record(hooks: Any) -> None:
    calls: list[str] = []

    @swapd.on_snapshot
    def save() -> dict[str, int]:
        calls.append("save")
        return {}

    @swapd.on_restore
    def load(state: object, from_version: int) -> None:
        calls.append("load")

    swapd.state_version(3, accept={2, 3})
    assert (hooks.snapshot, hooks.restore, hooks.version, hooks.accept) == \
        (save, load, 3, frozenset({2, 3}))
    assert calls == [], "nothing is called outside swapd serve"
    save2 = save  # the same function again (a module imported twice) replaces it
    assert swapd.on_snapshot(save2) is save


def test_a_second_snapshot_function_is_an_error(hooks: Any) -> None:
    swapd.on_snapshot(lambda: 1)

    def other() -> int:
        return 2

    with pytest.raises(ValueError, match=r"is already registered \(one per process\)"):
        swapd.on_snapshot(other)
    with pytest.raises(ValueError, match="integer >= 0"):
        swapd.state_version(-1)
    with pytest.raises(TypeError):
        swapd.on_quiesce(42)  # type: ignore[arg-type]


def test_connection_view_is_inert_outside_serve_and_live_inside() -> None:
    outside = swapd.connection({"type": "websocket"})
    assert not outside.supported and not outside.resumed and outside.state is None
    outside.save(lambda: 1)  # a no-op
    ext = {"resumed": True, "state": {"name": "a"}, "save": None, "handed_off": False}
    inside = swapd.connection({"type": "websocket", "extensions": {"swapd.handoff": ext}})
    assert inside.supported and inside.resumed and inside.state == {"name": "a"}

    def fn() -> int:
        return 7

    inside.save(fn)
    assert ext["save"] is fn and not inside.handed_off


# -- options, loading -----------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["main"], "APP must be MODULE:ATTRIBUTE"),
    (["main:app", "--threads", "0"], "--threads must be at least 1"),
    (["main:app", "--root-path", "api/"], "--root-path must start with /"),
    (["main:app", "--header", "nocolon"], "bad --header"),
    (["main:app", "--forwarded-allow-ips", "300.1.1.1"], "bad --forwarded-allow-ips"),
    (["main:app", "--interface", "tcp"], "invalid choice"),
])
def test_bad_options_give_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(OptionsError, match=message) as info:
        parse(argv, environ={})
    assert "\n" not in str(info.value)


def test_options_defaults_follow_uvicorn() -> None:
    opts = parse(["main:app"], environ={"FORWARDED_ALLOW_IPS": "10.0.0.0/8, 127.0.0.1"})
    assert opts.timeouts.keep_alive == 5 and opts.proxy_headers and opts.access_log
    assert opts.forwarded_allow_ips == (ipaddress.ip_network("10.0.0.0/8"),
                                        ipaddress.ip_network("127.0.0.1/32"))
    assert parse(["m:a", "--forwarded-allow-ips", "*"], environ={}).forwarded_allow_ips is None


def test_interface_detection() -> None:
    async def asgi3(scope: Any, receive: Any, send: Any) -> None: ...

    class Asgi3:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...

    def asgi2(scope: Any) -> Any: ...

    def wsgi(environ: Any, start_response: Any) -> Any: ...

    from flask import Flask
    from starlette.applications import Starlette

    assert [loader.detect(a) for a in (asgi3, Asgi3(), asgi2, wsgi, Starlette(),
                                       Flask("t"))] == \
        ["asgi3", "asgi3", "asgi2", "wsgi", "asgi3", "wsgi"]
    assert loader.detect(wsgi, "asgi") == "asgi2" and loader.detect(asgi3, "wsgi") == "wsgi"


def test_load_errors_name_the_problem(tmp_path: Any) -> None:
    (tmp_path / "mod_ok.py").write_text("app = 1\nnotcallable = 2\ndef factory():\n"
                                        "    return lambda e, s: []\n")
    with pytest.raises(loader.LoadError, match="cannot import module 'nope'"):
        loader.load("nope:app", app_dir=str(tmp_path))
    with pytest.raises(loader.LoadError, match="has no attribute 'missing'"):
        loader.load("mod_ok:missing", app_dir=str(tmp_path))
    with pytest.raises(loader.LoadError, match="is not an application"):
        loader.load("mod_ok:app", app_dir=str(tmp_path))
    assert callable(loader.load("mod_ok:factory", factory=True, app_dir=str(tmp_path)))


# -- proxy headers, WebSocket framing -------------------------------------------------------------


def test_forwarded_headers_are_believed_only_from_trusted_peers() -> None:
    local = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    fwd = b"198.51.100.7, 10.1.2.3"
    assert proxy.resolve(("127.0.0.1", 5), fwd, b"https", local) == (("198.51.100.7", 0),
                                                                     "https")
    assert proxy.resolve(("192.0.2.1", 5), fwd, b"https", local) == (("192.0.2.1", 5), None)
    # A client cannot pose as another: the rightmost entry not a trusted proxy wins.
    assert proxy.resolve(("127.0.0.1", 5), b"1.2.3.4, 198.51.100.7", None, local)[0] == \
        ("198.51.100.7", 0)
    assert proxy.resolve(("127.0.0.1", 5), None, b"https", local, websocket=True)[1] == "wss"
    assert proxy.resolve(None, b"1.2.3.4", None, local)[0] == ("1.2.3.4", 0)  # unix peer


def _frame(payload_len: int, masked: bool = True) -> bytes:
    if payload_len < 126:
        head = bytes([0x82, (0x80 if masked else 0) | payload_len])
    elif payload_len < 65536:
        head = bytes([0x82, (0x80 if masked else 0) | 126]) + payload_len.to_bytes(2, "big")
    else:
        head = bytes([0x82, (0x80 if masked else 0) | 127]) + payload_len.to_bytes(8, "big")
    return head + (b"mask" if masked else b"") + b"x" * payload_len


def test_whole_frames_cuts_at_the_last_complete_frame() -> None:
    a, b, c = _frame(5), _frame(300), _frame(70000)
    data = bytearray(a + b + c)
    assert whole_frames(data, 1 << 20) == len(data)
    assert whole_frames(bytearray(a + b + c[:-1]), 1 << 20) == len(a + b)
    assert whole_frames(bytearray(a + b[:3]), 1 << 20) == len(a)  # inside a 16-bit length
    assert whole_frames(bytearray(_frame(3, masked=False)), 100) == 5
    with pytest.raises(TooLarge):
        whole_frames(bytearray(c[:10]), 65536)  # known too big from its header alone


# -- swapd run --app -------------------------------------------------------------------------


def test_run_app_builds_the_serve_command_and_survives_a_reexec() -> None:
    cfg = build({}, {"app": "main:app", "command": ["--threads", "4"],
                     "bind": {"http": "127.0.0.1:0"}}, environ={"SWAPD_CONTROL": "/c.sock"})
    assert cfg.command == (sys.executable, "-m", "swapd", "serve", "main:app", "--threads", "4")
    again = from_overrides(to_overrides(cfg), None)
    assert (again.command, again.app, again.app_args) == (cfg.command, "main:app",
                                                          ("--threads", "4"))
    from_file = build({"app": "main:app", "app_args": ["--root-path", "/api"]}, {},
                      environ={"SWAPD_CONTROL": "/c.sock"})
    assert from_file.command[-3:] == ("main:app", "--root-path", "/api")
    with pytest.raises(ConfigError, match="either command or app"):
        build({"app": "main:app", "command": ["x"]}, {}, environ={"SWAPD_CONTROL": "/c"})
    with pytest.raises(ConfigError, match="app must be MODULE:ATTRIBUTE"):
        build({}, {"app": "main"}, environ={"SWAPD_CONTROL": "/c"})


# -- lifespan ----------------------------------------------------------------------------------


def test_a_failed_lifespan_startup_gives_a_one_line_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    """A raw app reports its failure with a whole traceback as the message and does not
    raise: the reason is the exception's line; the message is logged as lines."""
    from swapd.serve.lifespan import Lifespan, LifespanError

    message = ('Traceback (most recent call last):\n  File "app.py", line 3, in start\n'
               '    connect()\nRuntimeError: db unreachable\n')

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.failed", "message": message})
        await receive()  # as the spec allows: waits; the server must not wait for it

    async def start() -> str:
        with pytest.raises(LifespanError) as info:
            await Lifespan(app, "on", {}, timeout=5).startup()
        return str(info.value)

    caplog.set_level("INFO", logger="swapd.serve")
    assert asyncio.run(start()) == "lifespan startup failed: RuntimeError: db unreachable"
    assert any(r.getMessage().endswith(message.rstrip()) for r in caplog.records)


# -- the worker hooks ----------------------------------------------------------------------------


def test_pinned_and_full_duplex_connections_in_quiesce_and_drain() -> None:
    """A pinned connection neither holds a quiesce up nor is handed over: it is served on
    while the quiesce is in flight and after its commit. One whose protocol says it is at a
    boundary (set_boundary) is handed over without waking its handler; an abort serves it
    on, a `detach()` ends its handler and an abort then gives it a fresh call, and a drain
    never times it out."""

    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=0.2)
        conns: list[Connection] = []
        calls: dict[str, int] = {"pinned": 0, "duplex": 0}
        handed_off: dict[str, int] = {"pinned": 0, "duplex": 0}
        ended = asyncio.Event()

        async def handler(conn: Connection) -> None:
            if conn not in conns:
                conns.append(conn)
            name = "pinned" if conn is conns[0] else "duplex"
            calls[name] += 1
            conn.pinned = name == "pinned"
            try:
                while True:
                    conn.set_boundary(True)
                    data = await conn.recv()
                    conn.set_boundary(False)
                    if not data:
                        return
                    await conn.send(data)
            except HandedOff:
                handed_off[name] += 1
                ended.set()
                raise

        lsock = socket.create_server(("127.0.0.1", 0))
        hub.register("x", lsock, handler)
        hub.start_accepting()
        clients = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(*lsock.getsockname())
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
            clients.append((reader, writer))

        async def echo(i: int, data: bytes) -> None:
            reader, writer = clients[i]
            writer.write(data)
            assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data

        pinned, duplex = conns
        hub.stop_accepting()
        # 1. Handed over at once (does not wait for the pinned one), nobody woken; the
        # pinned one is served during the quiesce. An abort: the duplex one echoes on.
        handover = await asyncio.wait_for(hub.quiesce(5, 0), 5)
        assert (handover.count, handover.new) == (1, [duplex])
        assert duplex.handed and not pinned.handed
        await echo(0, b"while quiescing")
        clients[1][1].write(b"later")  # left in the kernel while handed over
        await asyncio.sleep(0)
        hub.resume()
        assert await asyncio.wait_for(clients[1][0].readexactly(5), 5) == b"later"
        assert calls == {"pinned": 1, "duplex": 1} and handed_off == {"pinned": 0, "duplex": 0}
        # 2. detach(): the handler ends now; the abort gives it a fresh handler call.
        await asyncio.wait_for(hub.quiesce(5, 0), 5)
        duplex.detach()
        await asyncio.wait_for(ended.wait(), 5)
        hub.resume()
        await echo(1, b"again")
        assert calls == {"pinned": 1, "duplex": 2} and handed_off["duplex"] == 1
        # 3. Commit: the duplex one goes (its parked handler gets HandedOff, the connection
        # lives on in the successor's copy); the pinned one stays and is served.
        successor = duplex.sock.dup()
        await asyncio.wait_for(hub.quiesce(5, 0), 5)
        assert hub.release_handed() == 1
        assert hub.conns == {pinned} and not hub.quiescing
        await asyncio.wait_for(_until(lambda: handed_off["duplex"] == 2), 5)
        await echo(0, b"after commit")
        clients[1][1].write(b"x")
        successor.settimeout(5)
        assert successor.recv(1) == b"x"
        successor.close()
        hub.begin_drain()
        # An idle=True wait would now get an idle_grace timer; a boundary wait does not
        # (checked on the timer itself rather than by waiting for it not to fire).
        assert all(c._grace is None for c in hub.conns) and len(hub.conns) == 1
        for _, writer in clients:
            writer.close()
        await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll the loop's own state (nothing to wait on from outside it), with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met within 10 s"
        await asyncio.sleep(0.01)
