"""Control socket: newline-delimited JSON requests and responses, server and client.

The supervisor listens on a Unix stream socket created mode 0600 in a directory it
creates 0700 if missing; every connection's peer credentials (SO_PEERCRED) must
show the supervisor's own uid or root, otherwise the connection is answered with
an error and closed.

Protocol version 1. One request per line, answered by zero or more progress lines
and exactly one result line; a connection may carry several requests in turn.

    → {"v": 1, "cmd": "upgrade", "args": {}}
    ← {"v": 1, "type": "progress", "event": "spawned",
       "message": "gen=4 started 2 worker(s): pid=812 pid=813"}
    ← {"v": 1, "type": "progress", "event": "ready", "message": "gen=4 all 2 worker(s) ready"}
    ← {"v": 1, "type": "result", "ok": true, "data": {...}}
    ← {"v": 1, "type": "result", "ok": false, "error": "gen=4 worker=0 ...", "data": {...}}

A line that is not a JSON object, names an unknown command or another protocol
version gets an error result; the connection stays usable and the supervisor
keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

PROTOCOL = 1
MAX_LINE = 8 * 1024 * 1024  # a patch source rides in a request
_UCRED = struct.Struct("3i")

log = logging.getLogger("swapd.control")

Emit = Callable[[str, str, dict[str, Any] | None], None]
Handler = Callable[[str, dict[str, Any], Emit, "Peer"], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """A request failed; the message goes back to the client as the result's error."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


class ClientError(Exception):
    """The client could not talk to a supervisor (no socket, refused, broken reply)."""


class Peer:
    """Who is asking (SO_PEERCRED), and the connection's fd (for answers across a re-exec)."""

    def __init__(self, pid: int, uid: int, gid: int, fd: int = -1) -> None:
        self.pid, self.uid, self.gid, self.fd = pid, uid, gid, fd

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid}"


def peer_of(sock: socket.socket) -> Peer:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return Peer(pid, uid, gid, fd=sock.fileno())


def allowed(peer: Peer) -> bool:
    return peer.uid in (0, os.geteuid())


def bind_control(path: str) -> socket.socket:
    """Bind the control socket 0600, replacing a stale one, refusing a live one."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create {directory} for the control socket: "
                          f"{e.strerror}") from e
    _check_directory(directory)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"control path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise OSError(f"control socket {path} is in use by another supervisor")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the supervisor is single-threaded; nobody races the umask
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        message = f"cannot bind control socket {path}: {e.strerror or e}"
        raise (OSError(e.errno, message) if e.errno else OSError(message)) from e
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _check_directory(directory: str) -> None:
    """Refuse a directory where someone else could swap our socket for theirs.

    It must belong to us or root, and be writable by nobody else unless it is sticky
    (like /tmp, where only a file's owner may remove it). A pre-created, world-writable
    /tmp/swapd-UID would otherwise let another user take over the control socket.
    """
    st = os.stat(directory)
    if st.st_uid not in (os.geteuid(), 0):
        raise OSError(errno.EPERM, f"control socket directory {directory} belongs to uid "
                      f"{st.st_uid}, not to us")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise OSError(errno.EPERM, f"control socket directory {directory} is writable by "
                      "others and not sticky")


class ControlServer:
    """Serves requests on an already bound control socket."""

    def __init__(self, sock: socket.socket, handler: Handler, commands: frozenset[str]) -> None:
        self._sock = sock
        self._handler = handler
        self._commands = commands
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._on_client, sock=self._sock, limit=MAX_LINE
        )

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting; give requests in progress `grace` seconds to answer, then cancel."""
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_of(sock)
        if not allowed(peer):
            log.warning("event=control.refused peer_pid=%d peer_uid=%d", peer.pid, peer.uid)
            _write(writer, result(False, error=f"permission denied for uid {peer.uid}"))
            await writer.drain()
            return
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                _write(writer, result(False, error=f"request longer than {MAX_LINE} bytes"))
                await writer.drain()
                return
            except asyncio.IncompleteReadError as e:
                if e.partial.strip():
                    _write(writer, result(False, error="request not terminated by a newline"))
                    await writer.drain()
                return
            await self._one(line, writer, peer)

    async def _one(self, line: bytes, writer: asyncio.StreamWriter, peer: Peer) -> None:
        try:
            cmd, args = parse_request(line, self._commands)
        except ControlError as e:
            _write(writer, result(False, error=str(e)))
            await writer.drain()
            return

        def emit(event: str, message: str, extra: dict[str, Any] | None = None) -> None:
            if not writer.is_closing():
                _write(writer, {"v": PROTOCOL, "type": "progress", "event": event,
                                "message": message, **(extra or {})})

        try:
            data = await self._handler(cmd, args, emit, peer)
        except ControlError as e:
            _write(writer, result(False, error=str(e), data=e.data))
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("event=control.handler_error cmd=%s", cmd)
            _write(writer, result(False, error=f"internal error: {type(e).__name__}: {e}"))
        else:
            _write(writer, result(True, data=data))
        await writer.drain()


def parse_request(line: bytes, commands: frozenset[str]) -> tuple[str, dict[str, Any]]:
    """Validate one request line; every problem is a one-line ControlError."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise ControlError(f"malformed request: not JSON ({e.msg})") from None
    except RecursionError:
        raise ControlError("malformed request: nested too deeply") from None
    except UnicodeDecodeError:
        raise ControlError("malformed request: not UTF-8") from None
    if not isinstance(req, dict):
        raise ControlError("malformed request: expected a JSON object")
    version = req.get("v")
    if type(version) is not int or version != PROTOCOL:  # not True, not 1.0
        raise ControlError(
            f"unsupported protocol version {version!r} (supervisor speaks {PROTOCOL})"
        )
    cmd = req.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError("malformed request: missing 'cmd'")
    if cmd not in commands:
        raise ControlError(f"unknown command {cmd!r} (known: {', '.join(sorted(commands))})")
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("malformed request: 'args' must be an object")
    return cmd, args


def result(ok: bool, *, error: str | None = None, data: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """The result message that ends every request (also written by a re-exec'd image)."""
    msg: dict[str, Any] = {"v": PROTOCOL, "type": "result", "ok": ok, "data": data or {}}
    if error is not None:
        msg["error"] = error
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    """One line of the protocol."""
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _write(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write(encode(msg))


class Client:
    """A blocking client: the CLI's only way to reach the supervisor."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Send one request; yield progress messages, then the result message (last)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except FileNotFoundError:
                raise ClientError(
                    f"no supervisor: control socket {self.path} does not exist"
                ) from None
            except ConnectionRefusedError:
                raise ClientError(
                    f"no supervisor listening on {self.path} (stale socket?)"
                ) from None
            except PermissionError:
                raise ClientError(f"permission denied on control socket {self.path}") from None
            except OSError as e:
                raise ClientError(f"cannot reach control socket {self.path}: "
                                  f"{e.strerror or e}") from None
            request = {"v": PROTOCOL, "cmd": cmd, "args": args or {}}
            # If the supervisor stops reading (e.g. the request is over its limit), its
            # answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as stream:
                for raw in stream:
                    try:
                        msg = json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise ClientError(f"malformed reply from supervisor: {e}") from e
                    yield msg
                    if msg.get("type") == "result":
                        return
            raise ClientError("supervisor closed the connection before answering")
        except TimeoutError:
            raise ClientError(f"no answer from supervisor within {self.timeout:g}s") from None
        except ConnectionResetError:
            raise ClientError("supervisor closed the connection before answering") from None
        finally:
            sock.close()
