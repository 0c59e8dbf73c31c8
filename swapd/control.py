"""Control socket: newline-delimited JSON requests and responses, server and client.

The supervisor listens on a Unix stream socket created mode 0600 in a directory that
must be its own (or root's), no symlink, and writable by nobody else; a socket path
left there by another uid is refused, not replaced. Every connection's peer
credentials (SO_PEERCRED) must show the supervisor's own uid or root, otherwise the
connection is answered with an error and closed. The client checks the same of the
server before it sends a byte: a socket answered by another uid is an impostor.

Protocol version 1, specified once in docs/architecture.md, "Wire formats": one request
per line, answered by zero or more progress lines and exactly one result line (built by
`result()`); a connection may carry several requests in turn.

A `deadline` line says the result will come within that many seconds (the
supervisor's own worst case for the request: a swap with every deadline run out);
a client waits that long plus a grace, and otherwise its default (`CLIENT_WAIT`).
Arguments are typed per command (`swapd.commands`). A line that is not a JSON
object, names an unknown command or another protocol version, or has an argument
of the wrong type gets an error result; the connection stays usable and the
supervisor keeps running.

Bounds: a request line is at most `MAX_LINE` bytes; at most `MAX_CLIENTS`
connections at once (one more is answered "too many" and closed); a connection
that sends no complete request within `IDLE_TIMEOUT` (nothing, or half a line) is
answered and closed, but one waiting for its result is not idle. A descriptor is
held in reserve so that at the fd limit a connection is still accepted, answered
"out of file descriptors" and closed (logged at most once per interval), instead
of staying queued with its client waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from swapd import strictjson
from swapd.commands import Args
from swapd.messages import MessageError
from swapd.throttle import Throttle

PROTOCOL = 1
MAX_LINE = 8 * 1024 * 1024  # a patch source rides in a request
MAX_REPLY_LINE = 64 * 1024 * 1024  # what the client accepts in one line from the server
MAX_CLIENTS = 32
IDLE_TIMEOUT = 10.0  # seconds for a complete request line (and for a client to read a reply)
CLIENT_WAIT = 10.0  # the client's default wait for an answer or a deadline line
DEADLINE_GRACE = 10.0  # the client's wait beyond the deadline the server announced
# The longest the client waits for anything (about three years): a deadline beyond it
# (from an unbounded timeout in some supervisor's configuration, or a hostile server) would
# overflow the socket timeout; NaN or a negative one is ignored.
MAX_WAIT = 1e8
DEADLINE = "deadline"  # an `emit` of this event is written as a deadline line
_ACCEPT_BATCH = 16  # connections accepted per wakeup: bounded work under a flood
_UCRED = struct.Struct("3i")

log = logging.getLogger("swapd.control")

Emit = Callable[[str, str, dict[str, Any] | None], None]
Handler = Callable[[str, Args, Emit, "Peer"], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """A request failed; the message goes back to the client as the result's error."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


class ClientError(Exception):
    """The client could not talk to a supervisor (no socket, refused, broken reply)."""


class ClientTimeout(ClientError):
    """No result within the client's deadline (whether or not the supervisor said anything)."""


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


# -- binding --------------------------------------------------------------------------------


def bind_control(path: str) -> socket.socket:
    """Bind the control socket 0600, replacing a stale one of ours, refusing a live one."""
    directory = os.path.dirname(path) or "."
    try:
        os.lstat(directory)
    except (FileNotFoundError, NotADirectoryError):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create {directory} for the control socket: "
                          f"{e.strerror}") from e
    except OSError as e:
        raise OSError(e.errno, f"cannot use {directory} for the control socket: "
                      f"{e.strerror}") from e
    _check_directory(directory)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"control path {path} exists and is not a socket")
        if st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"control socket {path} belongs to uid {st.st_uid}, "
                          "not to us: refusing to replace it")
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

    lstat, not stat: a symlink (whoever made it could point it elsewhere later) is
    refused. The directory must belong to us or root, and be writable by nobody else
    unless it is sticky (like /tmp, where only a file's owner may remove it). A
    /tmp/swapd-UID pre-created by another user is refused, whatever its mode.
    """
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.EPERM, f"control socket directory {directory} is a symlink; "
                      "give the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"control socket directory {directory} is not a directory")
    check_owned(st, f"control socket directory {directory}")


def check_owned(st: os.stat_result, what: str) -> None:
    """Ours or root's, and writable by nobody else unless sticky: the rule for a directory
    (or file) swapd trusts what it finds in. OSError names `what` and says why."""
    if st.st_uid not in (os.geteuid(), 0):
        raise OSError(errno.EPERM, f"{what} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise OSError(errno.EPERM, f"{what} is writable by others and not sticky")


# -- the server -------------------------------------------------------------------------------


class ControlServer:
    """Serves requests on an already bound control socket (the socket stays the caller's)."""

    def __init__(self, sock: socket.socket, handler: Handler,
                 commands: Mapping[str, type[Args]], *, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._sock = sock
        self._handler = handler
        self._commands = commands
        self._max_clients = max_clients
        self._idle = idle_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reserve = -1  # a descriptor to give up when accept() meets EMFILE
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None
        self._throttles = {k: Throttle() for k in ("busy", "fds", "refused", "accept")}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._reserve = _open_reserve()
        self._listen()

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting; give requests in progress `grace` seconds to answer, then cancel."""
        self._unlisten()
        if self._retry is not None:
            self._retry.cancel()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    @property
    def clients(self) -> int:
        return len(self._tasks)

    # -- accepting ------------------------------------------------------------------------

    def _listen(self) -> None:
        assert self._loop is not None
        if not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)
            self._reading = True

    def _unlisten(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _on_acceptable(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                # accept() takes a descriptor before it looks for a connection: at the limit
                # it fails even with none queued, so _shed says whether one was there.
                shed = self._shed(e) if e.errno in (errno.EMFILE, errno.ENFILE) else None
                if shed is None:
                    self._pause(e)
                if shed:
                    continue
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        if not allowed(peer):
            if self._throttles["refused"].allow():
                log.warning("event=control.refused peer_pid=%d peer_uid=%d suppressed=%d",
                            peer.pid, peer.uid, self._throttles["refused"].take_suppressed())
            _answer_and_close(conn, f"permission denied for uid {peer.uid}")
            return
        if len(self._tasks) >= self._max_clients:
            if self._throttles["busy"].allow():
                log.warning("event=control.busy clients=%d limit=%d peer_pid=%d peer_uid=%d "
                            "suppressed=%d", len(self._tasks), self._max_clients, peer.pid,
                            peer.uid,
                            self._throttles["busy"].take_suppressed())
            _answer_and_close(conn, f"too many control connections ({len(self._tasks)} open, "
                                    f"limit {self._max_clients}); retry later")
            return
        conn.setblocking(False)
        task = asyncio.ensure_future(self._on_client(conn, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _shed(self, error: OSError) -> bool | None:
        """At the fd limit: free the reserve, accept, answer, close, re-take the reserve.

        True: one connection was shed (there may be more); False: none was queued; None:
        it did not work (no reserve, or accept failed anyway)."""
        if self._reserve < 0:
            return None
        os.close(self._reserve)
        self._reserve = -1
        conn: socket.socket | None = None
        outcome: bool | None = None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            outcome = False
        except OSError:
            outcome = None
        if conn is not None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            _answer_and_close(conn, f"the supervisor is out of file descriptors (limit {soft}, "
                                    f"{error.strerror}); retry later")
            outcome = True
            if self._throttles["fds"].allow():
                log.warning("event=control.shed reason=%r action='answered and closed' "
                            "suppressed=%d", error.strerror,
                            self._throttles["fds"].take_suppressed())
        self._reserve = _open_reserve()
        return outcome if self._reserve >= 0 else None

    def _pause(self, error: OSError) -> None:
        """accept() keeps failing (no reserve left): stop polling for a second, not spin."""
        if self._throttles["accept"].allow():
            log.warning("event=control.accept_failed error=%r action='retry in 1s' "
                        "suppressed=%d", error.strerror or str(error),
                        self._throttles["accept"].take_suppressed())
        assert self._loop is not None
        self._unlisten()
        self._retry = self._loop.call_later(1.0, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._retry = None
        if self._reserve < 0:
            self._reserve = _open_reserve()
        self._listen()

    # -- one connection -------------------------------------------------------------------

    async def _on_client(self, conn: socket.socket, peer: Peer) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_LINE)
            await self._serve(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), self._idle)
            else:
                conn.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: Peer) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self._idle)
            except TimeoutError:
                # Nothing, or half a request, in all that time: a client that forgot us
                # (or holds a slot on purpose). One waiting for its result is not here.
                _write(writer, result(False, error=f"no complete request within "
                                                   f"{self._idle:g}s; closing"))
                await self._drain(writer)
                return
            except asyncio.LimitOverrunError:
                _write(writer, result(False, error=f"request longer than {MAX_LINE} bytes"))
                await self._drain(writer)
                return
            except asyncio.IncompleteReadError as e:
                if e.partial.strip():
                    _write(writer, result(False, error="request not terminated by a newline"))
                    await self._drain(writer)
                return
            await self._one(line, writer, peer)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """Flush, but not forever: a client that never reads its replies is let go."""
        await asyncio.wait_for(writer.drain(), self._idle)

    async def _one(self, line: bytes, writer: asyncio.StreamWriter, peer: Peer) -> None:
        try:
            cmd, args = parse_request(line, self._commands)
        except ControlError as e:
            _write(writer, result(False, error=str(e)))
            await self._drain(writer)
            return

        def emit(event: str, message: str, extra: dict[str, Any] | None = None) -> None:
            if writer.is_closing():
                return
            if event == DEADLINE:
                seconds = float((extra or {}).get("seconds", 0.0))
                _write(writer, {"v": PROTOCOL, "type": "deadline", "seconds": round(seconds, 1)})
                return
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
        await self._drain(writer)


def _open_reserve() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _answer_and_close(conn: socket.socket, error: str) -> None:
    """One result line to a connection we will not serve; never blocks (it fits the buffer)."""
    with conn:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.send(encode(result(False, error=error)))


def parse_request(line: bytes, commands: Mapping[str, type[Args]]) -> tuple[str, Args]:
    """Validate one request line; every problem is a one-line ControlError."""
    try:
        req = strictjson.loads(line)
    except json.JSONDecodeError as e:
        raise ControlError(f"malformed request: not JSON ({e.msg})") from None
    except RecursionError:
        raise ControlError("malformed request: nested too deeply") from None
    except UnicodeDecodeError:
        raise ControlError("malformed request: not UTF-8") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ControlError(f"malformed request: {str(e)[:200]}") from None
    if not isinstance(req, dict):
        raise ControlError("malformed request: expected a JSON object")
    version = req.get("v")
    if type(version) is not int or version != PROTOCOL:  # not True, not 1.0
        raise ControlError(
            f"unsupported protocol version {_short(version)} (supervisor speaks {PROTOCOL})"
        )
    cmd = req.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError("malformed request: missing 'cmd'")
    kind = commands.get(cmd)
    if kind is None:
        raise ControlError(f"unknown command {cmd[:64]!r} (known: {', '.join(sorted(commands))})")
    raw = req.get("args", {})
    if not isinstance(raw, dict):
        raise ControlError("malformed request: 'args' must be an object")
    try:
        args = kind.parse(raw)
        args.validate()
    except MessageError as e:
        raise ControlError(f"malformed request: {e}") from None
    return cmd, args


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


# -- the client -------------------------------------------------------------------------------


class Client:
    """A blocking client: the CLI's only way to reach the supervisor.

    `timeout`: the whole request must be answered within it. Without one, the client
    waits `CLIENT_WAIT` for the first line, and a deadline line from the supervisor
    extends the wait to that deadline plus `DEADLINE_GRACE`.
    """

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout
        # Of the last call: the request was sent (the supervisor may act on it), and the
        # supervisor said something back (a deadline or a progress line: it took the request
        # on). After either, giving up on the wait is not "no supervisor": the outcome is
        # unknown and the operation may go on without us.
        self.sent = False
        self.answered = False

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Send one request; yield progress messages, then the result message (last)."""
        self.sent = self.answered = False
        wait = _clamp(self.timeout if self.timeout is not None else CLIENT_WAIT)
        deadline = time.monotonic() + wait
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(wait)
        try:
            self._connect(sock)
            request = {"v": PROTOCOL, "cmd": cmd, "args": args or {}}
            # If the supervisor stops reading (e.g. the request is over its limit), its
            # answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                self.sent = True  # (as good as: part of it may be on its way)
                sock.sendall(json.dumps(request).encode() + b"\n")
            buf = bytearray()
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_REPLY_LINE:
                        raise ClientError(f"reply line from supervisor longer than "
                                          f"{MAX_REPLY_LINE} bytes")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        raise ClientError("supervisor closed the connection before answering")
                    buf += chunk
                    continue
                raw = bytes(buf[:nl])
                del buf[: nl + 1]
                try:
                    msg = json.loads(raw)
                except ValueError as e:
                    raise ClientError(f"malformed reply from supervisor: {e}") from e
                if not isinstance(msg, dict):
                    raise ClientError("malformed reply from supervisor: not a JSON object")
                self.answered = True
                if msg.get("type") == DEADLINE:
                    seconds = msg.get("seconds")
                    if (self.timeout is None and isinstance(seconds, int | float)
                            and seconds == seconds):  # not NaN
                        wait = _clamp(float(seconds) + DEADLINE_GRACE)
                        deadline = time.monotonic() + wait
                    continue
                yield msg
                if msg.get("type") == "result":
                    return
        except TimeoutError:
            what = "no result" if self.answered else "no answer"
            raise ClientTimeout(f"{what} from supervisor within {wait:g}s") from None
        except ConnectionResetError:
            raise ClientError("supervisor closed the connection before answering") from None
        finally:
            sock.close()

    def _connect(self, sock: socket.socket) -> None:
        """Connect, then make sure the server is our supervisor before saying anything."""
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            raise ClientError(
                f"no supervisor: control socket {self.path} does not exist"
            ) from None
        except ConnectionRefusedError:
            if (why := _not_a_socket(self.path)) is not None:
                raise ClientError(why) from None
            raise ClientError(
                f"no supervisor listening on {self.path} (stale socket?)"
            ) from None
        except PermissionError:
            raise ClientError(f"permission denied on control socket {self.path}") from None
        except OSError as e:
            if (why := _not_a_socket(self.path)) is not None:
                raise ClientError(why) from None
            raise ClientError(f"cannot reach control socket {self.path}: "
                              f"{e.strerror or e}") from None
        peer = peer_of(sock)
        if not allowed(peer):
            # The rule stays (a socket of another uid may be anyone's); the way to manage a
            # service that runs as a user of its own is to ask as that user.
            user = _user_name(peer.uid)
            raise ClientError(
                f"refusing to talk to {self.path}: it is served by uid {peer.uid} (pid "
                f"{peer.pid}), not by uid {os.geteuid()} or root; it is not our supervisor. "
                f"If it is a service running as {user}, ask as that user: "
                f"runuser -u {user} -- swapd ..."
            )


def _clamp(seconds: float) -> float:
    return min(max(seconds, 0.001), MAX_WAIT)


def _not_a_socket(path: str) -> str | None:
    """Why a connect failed, if the path is not a socket at all (None: it is, or is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISSOCK(st.st_mode):
        return None
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a file"
    return f"{path} is not a socket ({kind}): not a control socket"


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
