r"""systemd's process protocols: sd_notify, socket activation (LISTEN_FDS), watchdog, fd store.

Standard library only; no libsystemd, no systemd Python package. Behaviour follows systemd 252
(docs/systemd.md says what swapd relies on) and stays compatible with 253+ (``MONOTONIC_USEC``).

sd_notify
---------
One ``AF_UNIX``/``SOCK_DGRAM`` datagram per message, sent to ``$NOTIFY_SOCKET``: an absolute path,
or ``@name`` for the abstract namespace (sent as ``\0name``)::

    datagram to $NOTIFY_SOCKET
    +-----------+------------------------------------------------------+
    | payload   | KEY=value\nKEY=value...     UTF-8, no trailing \n    |
    |           | e.g. MAINPID=812\nREADY=1\nSTATUS=generation 3       |
    +-----------+------------------------------------------------------+
    | cmsg      | SCM_CREDENTIALS (pid, uid, gid): added by the kernel |
    |           | because the manager set SO_PASSCRED; sent explicitly |
    |           | only with pid= (sd_pid_notify: root speaks for pid)  |
    | cmsg      | SCM_RIGHTS fd, fd, ...: only FDSTORE=1 and BARRIER=1 |
    +-----------+------------------------------------------------------+

The sender's credentials decide which unit and process the message is credited to; fields the
unit does not accept are dropped by the manager without an answer. Messages this module sends:

    ready()            [MAINPID=<pid>]  READY=1  [STATUS=<text>]
    reloading()        RELOADING=1  MONOTONIC_USEC=<CLOCK_MONOTONIC µs>  [STATUS=<text>]
    stopping()         STOPPING=1  [STATUS=<text>]
    status()           STATUS=<one line of text>
    watchdog()         WATCHDOG=1            watchdog_trigger()   WATCHDOG=trigger
    extend_timeout()   EXTEND_TIMEOUT_USEC=<µs>
    fdstore()          FDSTORE=1  [FDNAME=<name>]  [FDPOLL=0]     + SCM_RIGHTS fds
    fdstore_remove()   FDSTOREREMOVE=1  FDNAME=<name>
    errno()            ERRNO=<n>
    barrier()          BARRIER=1                                   + SCM_RIGHTS one pipe fd

``RELOADING=1`` always carries ``MONOTONIC_USEC``: 252 ignores it, 253+ (``Type=notify-reload``)
requires it. ``NOTIFY_SOCKET`` is never removed from the environment: swapd's children and an
in-place re-exec need it.

Send errors are never raised. Like the C API, a message that cannot be sent is lost: the method
returns False, the first failure after a success is logged at WARNING and repeats at DEBUG, so a
vanished manager costs one log line, not one per watchdog ping. A send waits at most ``timeout``
seconds for room in the manager's queue, so a wedged manager cannot stall an event loop for
longer. Malformed *input* (a field name that is not ``[A-Z_][A-Z0-9_]*``, a newline in a value,
an invalid fd name) is a programming error and raises :class:`NotifyMessageError`; ``STATUS``
text is flattened to one line instead, because it often carries error messages.

Socket activation and fd store
------------------------------
::

    LISTEN_PID=<pid of the process meant to use the fds>
    LISTEN_FDS=<n>                  fds 3 .. 3+n-1, in the socket unit's Listen*= order,
                                    fd-store fds last
    LISTEN_FDNAMES=name:name:...    n names: FileDescriptorName= (default: the socket unit's
                                    name), FDNAME= of stored fds; ``unknown`` when the variable
                                    is absent, ``stored`` for stored fds without FDNAME=,
                                    ``connection`` for Accept=yes

Map fds by name, never by position: several sockets may share a name, and stored fds come back
in no particular order. Names are ASCII printable, without ``:``, at most 255 characters.

Watchdog
--------
``WATCHDOG_USEC=<µs>`` (and ``WATCHDOG_PID=<pid>``) are set for the main process when the unit
has ``WatchdogSec=``; ping with ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2``.
"""

from __future__ import annotations

import array
import errno as errno_mod
import fcntl
import logging
import math
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from types import TracebackType

__all__ = [
    "LISTEN_ENV",
    "SD_LISTEN_FDS_START",
    "ListenFdsError",
    "Notifier",
    "NotifyAddressError",
    "NotifyMessageError",
    "SystemdError",
    "WatchdogEnvError",
    "clear_listen_env",
    "fds_by_name",
    "is_valid_fdname",
    "listen_env",
    "listen_fds",
    "monotonic_usec",
    "watchdog_usec",
]

log = logging.getLogger("swapd.systemd")

SD_LISTEN_FDS_START = 3
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

_FDNAME_MAX = 255
_FIELD_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
# sun_path is 108 bytes; a path needs its terminating NUL, an abstract name does not.
_SUN_PATH_MAX = 108


class SystemdError(Exception):
    """Base class of this module's errors."""


class NotifyAddressError(SystemdError):
    """``NOTIFY_SOCKET`` holds an address this module cannot send to."""


class NotifyMessageError(SystemdError, ValueError):
    """A notification field or fd name is malformed (a caller bug, not a transport failure)."""


class ListenFdsError(SystemdError):
    """``LISTEN_PID``, ``LISTEN_FDS`` or ``LISTEN_FDNAMES`` is malformed or names closed fds."""


class WatchdogEnvError(SystemdError):
    """``WATCHDOG_USEC`` or ``WATCHDOG_PID`` is malformed."""


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def is_valid_fdname(name: str) -> bool:
    """True if systemd accepts ``name`` as FDNAME=/FileDescriptorName= (its fdname_is_valid)."""
    return 0 < len(name) <= _FDNAME_MAX and all(" " <= c <= "~" and c != ":" for c in name)


def _check_fdname(name: str) -> str:
    if not is_valid_fdname(name):
        raise NotifyMessageError(
            f"invalid fd name {name!r}: need 1-{_FDNAME_MAX} printable ASCII characters, no ':'"
        )
    return name


def _one_line(text: str) -> str:
    # STATUS is a single line by definition and usually carries an error text from elsewhere:
    # flattening beats raising into the caller's failure path.
    return " ".join(text.replace("\0", " ").splitlines())


def _encode(fields: Iterable[tuple[str, str | int]]) -> bytes:
    lines = []
    for key, value in fields:
        if not _FIELD_NAME.fullmatch(key):
            raise NotifyMessageError(f"invalid notify field name {key!r}")
        text = str(value)
        if "\n" in text or "\0" in text:
            raise NotifyMessageError(f"notify field {key} has a newline or NUL: {text!r}")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def _parse_address(address: str) -> str:
    """Turn a ``NOTIFY_SOCKET`` value into a Python ``AF_UNIX`` address."""
    if address.startswith("@"):
        name = "\0" + address[1:]
        if len(address) < 2 or len(name.encode()) > _SUN_PATH_MAX:
            raise NotifyAddressError(f"NOTIFY_SOCKET={address!r}: bad abstract socket name")
        return name
    if address.startswith("/"):
        if len(address.encode()) >= _SUN_PATH_MAX:
            raise NotifyAddressError(f"NOTIFY_SOCKET={address!r}: path longer than sun_path")
        return address
    # systemd 254+ may hand VMs a vsock: address; no service manager gives it to a service.
    raise NotifyAddressError(
        f"NOTIFY_SOCKET={address!r}: neither an absolute path nor an @abstract name"
    )


class Notifier:
    """Sends sd_notify messages to one address; a no-op (every send returns False) without one.

    Thread-safe. Every method returns True when the datagram was handed to the kernel; that
    says nothing about whether the manager accepted it (systemd never answers).
    """

    def __init__(self, address: str | None, *, timeout: float = 1.0) -> None:
        self._address = address or None
        self._target = _parse_address(address) if address else None
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, *, timeout: float = 1.0) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``; the variable is left in place for children."""
        return cls(environ.get("NOTIFY_SOCKET"), timeout=timeout)

    @property
    def address(self) -> str | None:
        """The address as given (``@name`` or a path), or None when disabled."""
        return self._address

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def __bool__(self) -> bool:
        return self.enabled

    def __repr__(self) -> str:
        return f"Notifier({self._address!r})"

    # --- the protocol's messages -------------------------------------------------------------

    def ready(self, status: str | None = None, *, mainpid: int | None = None) -> bool:
        """Start-up finished, or a reload finished when it follows :meth:`reloading`."""
        fields: list[tuple[str, str | int]] = []
        if mainpid is not None:
            fields.append(("MAINPID", mainpid))
        fields.append(("READY", 1))
        return self._send_fields(fields, status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload (swap) began; must be followed by :meth:`ready` (or :meth:`stopping`)."""
        return self._send_fields([("RELOADING", 1), ("MONOTONIC_USEC", monotonic_usec())], status)

    def stopping(self, status: str | None = None) -> bool:
        return self._send_fields([("STOPPING", 1)], status)

    def status(self, text: str) -> bool:
        return self._send_fields([], text)

    def watchdog(self) -> bool:
        """Keep-alive ping; due every ``watchdog_usec() / 2`` microseconds."""
        return self.send(WATCHDOG=1)

    def watchdog_trigger(self) -> bool:
        """Ask the manager to act as if the watchdog timeout had passed."""
        return self.send(WATCHDOG="trigger")

    def extend_timeout(self, seconds: float) -> bool:
        """Push the current start/reload/stop timeout ``seconds`` from now; repeat in time."""
        if not seconds > 0:
            raise NotifyMessageError(f"extend_timeout needs a positive duration, got {seconds!r}")
        return self.send(EXTEND_TIMEOUT_USEC=math.ceil(seconds * 1_000_000))

    def errno(self, code: int) -> bool:
        """Report the errno-style cause of a failure."""
        return self.send(ERRNO=code)

    def fdstore(self, fds: Sequence[int], name: str | None = None, *, poll: bool = True) -> bool:
        """Store ``fds`` in the manager; they return via ``LISTEN_FDS`` on the next start.

        Needs ``FileDescriptorStoreMax=`` > 0 in the unit, or the manager drops them silently.
        With ``poll=False`` the manager keeps them even after EPOLLHUP/EPOLLERR.
        """
        if not fds:
            raise NotifyMessageError("fdstore needs at least one fd")
        fields: list[tuple[str, str | int]] = [("FDSTORE", 1)]
        if name is not None:
            fields.append(("FDNAME", _check_fdname(name)))
        if not poll:
            fields.append(("FDPOLL", 0))
        return self.send_raw(_encode(fields), fds=fds)

    def fdstore_remove(self, name: str) -> bool:
        """Drop every stored fd called ``name``."""
        return self.send(FDSTOREREMOVE=1, FDNAME=_check_fdname(name))

    def barrier(self, timeout: float = 5.0) -> bool:
        """Block until the manager has processed every earlier message (sd_notify_barrier).

        Use it before exiting right after a message: a message from a process that has already
        exited may not be credited to the unit. Blocks up to ``timeout`` seconds, so call it
        from a thread or just before exit, not from a busy event loop.
        """
        if not self.enabled:
            return False
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                sent = self.send_raw(b"BARRIER=1", fds=[wfd])
            finally:
                os.close(wfd)
            if not sent:
                return False
            # The manager closes its copy of wfd once earlier messages are handled: POLLHUP.
            poller = select.poll()
            poller.register(rfd, select.POLLHUP)
            if poller.poll(max(0, int(timeout * 1000))):
                return True
            log.warning(
                "sd_notify barrier timed out address=%s timeout=%.1fs", self._address, timeout
            )
            return False
        finally:
            os.close(rfd)

    def send(self, *, fds: Sequence[int] = (), pid: int | None = None, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in the order given, e.g. ``send(X_GENERATION=3)``."""
        return self.send_raw(_encode(fields.items()), fds=fds, pid=pid)

    def send_raw(
        self, payload: bytes | str, *, fds: Sequence[int] = (), pid: int | None = None
    ) -> bool:
        """Send one datagram as is; ``fds`` ride as SCM_RIGHTS.

        ``pid`` sends explicit SCM_CREDENTIALS naming another process (sd_pid_notify); the
        kernel allows that to root only.
        """
        if self._target is None:
            return False
        data = payload.encode() if isinstance(payload, str) else payload
        ancillary: list[tuple[int, int, bytes]] = []
        if fds:
            rights = array.array("i", fds).tobytes()
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, rights))
        if pid is not None:
            creds = struct.pack("iII", pid, os.getuid(), os.getgid())
            ancillary.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds))
        try:
            self._socket().sendmsg([data], ancillary, socket.MSG_NOSIGNAL, self._target)
        except OSError as e:
            self._report_failure(e)
            return False
        if self._failing:
            self._failing = False
            log.info("sd_notify recovered address=%s", self._address)
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------

    def _send_fields(self, fields: list[tuple[str, str | int]], status: str | None) -> bool:
        if status is not None:
            fields.append(("STATUS", _one_line(status)))
        return self.send_raw(_encode(fields))

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                # Unconnected: every sendmsg resolves the address again, so a manager that
                # re-created its socket (daemon-reexec) is found without reconnecting.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(self._timeout)
                self._sock = sock
            return self._sock

    def _report_failure(self, error: OSError) -> None:
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "sd_notify send failed address=%s error=%s", self._address, error)


# --- socket activation ---------------------------------------------------------------------------


def _parse_int(name: str, value: str, minimum: int, error: type[SystemdError]) -> int:
    # int() would also accept " 3", "+3" and "3_0"; systemd's parsers do not.
    if not value.isascii() or not value.isdigit() or int(value) < minimum:
        raise error(f"{name}={value!r} is not an integer >= {minimum}")
    return int(value)


def listen_fds(environ: Mapping[str, str] = os.environ) -> list[tuple[str, int]]:
    """The ``(name, fd)`` pairs handed to this process by socket activation or the fd store.

    Empty unless ``LISTEN_PID`` is this process (the variables may have been inherited by
    accident). The fds get FD_CLOEXEC, like sd_listen_fds(). The variables are left in the
    environment; strip them with :func:`clear_listen_env` before starting children.
    """
    pid_text = environ.get("LISTEN_PID")
    count_text = environ.get("LISTEN_FDS")
    if pid_text is None or count_text is None:
        return []
    if _parse_int("LISTEN_PID", pid_text, 1, ListenFdsError) != os.getpid():
        return []
    count = _parse_int("LISTEN_FDS", count_text, 0, ListenFdsError)
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = ["unknown"] * count
    else:
        names = [name or "unknown" for name in names_text.split(":")] if count else []
        if len(names) != count:
            raise ListenFdsError(
                f"LISTEN_FDNAMES={names_text!r} has {len(names)} names for LISTEN_FDS={count}"
            )
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    flags = []
    for fd in fds:
        try:
            flags.append(fcntl.fcntl(fd, fcntl.F_GETFD))
        except OSError as e:
            if e.errno != errno_mod.EBADF:
                raise
            raise ListenFdsError(f"LISTEN_FDS={count} but fd {fd} is not open") from e
    for fd, fd_flags in zip(fds, flags, strict=True):
        fcntl.fcntl(fd, fcntl.F_SETFD, fd_flags | fcntl.FD_CLOEXEC)
    return list(zip(names, fds, strict=True))


def fds_by_name(pairs: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """Group :func:`listen_fds` output by name (a socket unit with two ``Listen*=`` lines gives
    both fds its one name)."""
    grouped: dict[str, list[int]] = {}
    for name, fd in pairs:
        grouped.setdefault(name, []).append(fd)
    return grouped


def clear_listen_env(environ: MutableMapping[str, str]) -> None:
    """Remove ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` (e.g. from a child's env)."""
    for key in LISTEN_ENV:
        environ.pop(key, None)


def listen_env(pid: int, names: Sequence[str]) -> dict[str, str]:
    """The variables that hand fds 3.. (one per name) to process ``pid``.

    ``pid`` must be the process that will use them, so it is only known after fork.
    """
    for name in names:
        _check_fdname(name)
    return {
        "LISTEN_PID": str(pid),
        "LISTEN_FDS": str(len(names)),
        "LISTEN_FDNAMES": ":".join(names),
    }


# --- watchdog ------------------------------------------------------------------------------------


def watchdog_usec(environ: Mapping[str, str] = os.environ) -> int | None:
    """The watchdog timeout in µs if this process must ping, else None.

    ``WATCHDOG_PID`` (when set) must be this process: a child that inherited the variables
    must not ping on its parent's behalf.
    """
    usec_text = environ.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    usec = _parse_int("WATCHDOG_USEC", usec_text, 1, WatchdogEnvError)
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None and _parse_int("WATCHDOG_PID", pid_text, 1, WatchdogEnvError) != (
        os.getpid()
    ):
        return None
    return usec
