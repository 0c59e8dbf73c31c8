"""The deploy history: what was done to the service, by whom, and how it went.

Every start, swap (upgrade, reload), re-exec, patch, watch window, rollback and stop
appends one JSON object, one line, to `history.jsonl` in the state directory:

    {"v": 1, "time": "2024-05-29T12:00:00.123Z", "kind": "upgrade",
     "who": {"via": "control", "uid": 1000, "pid": 4242},
     "outcome": "ok", "reason": null,
     "gen_before": 3, "gen_after": 4, "release_before": "v41", "release_after": "v42",
     "duration_ms": 812.4, "timings_ms": {"spawned": 1.2, "ready": 640.3, ...}, "watch": 30}

    kind      start | upgrade | reload | reexec | patch | patch.rollback | watch |
              rollback | stop | history (reset: a file found here was set aside;
              gap: entries that could not be written)
    outcome   ok | failed | refused | rolled-back (watch) | passed (watch) | reset, gap
    who.via   control (uid, pid from the socket's peer credentials) | signal (signal) |
              watch (trigger: what made swapd roll back) | start | stop

Where (first that applies): `state_dir` (flag or file); systemd's $STATE_DIRECTORY
(`StateDirectory=`); $XDG_STATE_HOME/swapd/<instance> (instance: a digest of the control
socket's path, so that two supervisors never share a file); else next to the control
socket, as `<socket name>.history.jsonl`. Restarts and re-execs append to the same file.

Bounded: past MAX_BYTES the file is rotated (`.1` … `.KEEP`, the oldest dropped). A line
that is not an entry (a torn write of an older swapd, a hand edit) is skipped and counted
by every reader; the file is kept: it is the deploy record. A write is all or nothing: a
full disk cuts a write short, and what it wrote is cut back off the file (else the next
entry would be glued to half a line); the entries that could not be written are counted,
and the first write that works again starts with a `history gap: N entries lost` entry.

Other users: a directory of another user, or one others may write to without the sticky
bit, is refused (the control socket's rule). In a sticky shared directory (/tmp) another
user may have made the file first: a file that is not a regular file of ours (another
user's, a symlink, a FIFO, a directory) is set aside as `history.jsonl.foreign-<time>`
(`.corrupt-<time>` if not a regular file) and ours created with O_EXCL, and readers skip
files that are not ours or root's. Writing never raises into the supervisor (a failure is
logged once and shown by `swapd status`). One write per event, from the event loop, no
fsync: an entry survives a crash of swapd, not necessarily one of the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Mapping
from typing import Any

from swapd.control import check_owned

log = logging.getLogger("swapd")

FORMAT = 1
FILE = "history.jsonl"
MAX_BYTES = 1024 * 1024
KEEP = 3  # rotated files kept: history.jsonl.1 .. .3
MAX_ENTRY = 64 * 1024  # a line longer than this is cut to its essentials
_MAX_READ = (KEEP + 1) * (MAX_BYTES + MAX_ENTRY)


def history_path(state_dir: str | None, control: str,
                 environ: Mapping[str, str] = os.environ) -> str:
    """The history file of the supervisor whose control socket is `control`."""
    if state_dir:
        return os.path.join(state_dir, FILE)
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return os.path.join(systemd, FILE)
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        instance = hashlib.sha256(os.path.abspath(control).encode()).hexdigest()[:12]
        return os.path.join(xdg, "swapd", instance, FILE)
    name = os.path.basename(control).removesuffix(".sock") or "swapd"
    return os.path.join(os.path.dirname(os.path.abspath(control)), f"{name}.history.jsonl")


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class CorruptHistory(ValueError):
    """A history file that is not what swapd writes; the message says where and why."""


def check_entry(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise CorruptHistory(f"a {type(entry).__name__}, not an object")
    if entry.get("v") != FORMAT:
        raise CorruptHistory(f"format {entry.get('v')!r}, not {FORMAT}")
    for key in ("time", "kind", "outcome"):
        if not isinstance(entry.get(key), str):
            raise CorruptHistory(f"no {key!r}")
    return entry


def parse(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Entries of one file and the number of lines that are not entries (skipped)."""
    entries: list[dict[str, Any]] = []
    bad = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            entries.append(check_entry(json.loads(line)))
        except (ValueError, RecursionError):
            bad += 1
    return entries, bad


def check_directory(directory: str, st: os.stat_result) -> None:
    """The control socket's rule (swapd.control) for the history's directory: `st` (of
    the directory as opened) must belong to us or root and be writable by nobody else
    unless sticky, and a symlink to it must be ours or root's. OSError says why."""
    link = os.lstat(directory)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
        raise OSError(errno.EPERM, f"history directory {directory} is a symlink of uid "
                      f"{link.st_uid}")
    check_owned(st, f"history directory {directory}")


def untrusted(path: str) -> str | None:
    """Why the history file at `path` is not to be believed by a reader (its directory or
    itself is another user's: the entries could be made up), or None."""
    directory = os.path.dirname(path) or "."
    try:
        check_directory(directory, os.stat(directory))
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISREG(st.st_mode):
        return f"history file {path} is not a regular file"
    if st.st_uid not in (os.geteuid(), 0):
        return f"history file {path} belongs to uid {st.st_uid}, not to us or root"
    return None


def _line(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"


def _read_file(path: str, limit: int) -> bytes | None:
    """A regular file's bytes (None: there is none). Never follows a symlink, never blocks
    on a FIFO; CorruptHistory for anything that is not a regular file of ours or root's
    (another user's file in a shared directory would be entries they made up)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptHistory("a symbolic link, not a file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptHistory("not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise CorruptHistory(f"owned by uid {st.st_uid}, not by us or root")
        chunks = []
        remaining = min(st.st_size, limit)
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read(path: str, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The newest `limit` entries (oldest first) across the rotated files, and how many
    lines could not be read; used by `swapd history`, with or without a supervisor."""
    entries: list[dict[str, Any]] = []
    bad = 0
    for i in range(KEEP, -1, -1):
        name = path if i == 0 else f"{path}.{i}"
        try:
            data = _read_file(name, MAX_BYTES * 4)
        except (CorruptHistory, OSError):
            bad += 1
            continue
        if data is None:
            continue
        got, skipped = parse(data)
        entries += got
        bad += skipped
    if limit is not None:
        entries = entries[-limit:] if limit > 0 else []
    return entries, bad


class History:
    """The supervisor's writer of the history file."""

    def __init__(self, path: str, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.error: str | None = None  # the last write problem, for `swapd status`
        self.warning: str | None = None  # a file found at start that was set aside
        self._fd = -1
        self._size = 0
        self._torn = False  # the file does not end with a newline: the next write starts one
        self._pending: dict[str, Any] | None = None  # the entry saying a file was set aside
        self._lost = 0  # entries not written since the last one that was
        self._lost_why = ""

    def open(self) -> None:
        """Open for appending, checking what is there first; never raises."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            self._open()
            self._count_bad_lines()
        except OSError as e:
            self._failed("open", e)
            return
        if self._pending is not None:
            self._write(b"")

    def _open(self) -> None:
        """Open the file in a directory that passes `check_directory`; a file that is not a
        regular file of ours is set aside first and ours created (O_EXCL), so that nothing
        another user made (a sticky /tmp) is appended to or read back as ours."""
        directory, name = os.path.split(self.path)
        dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            check_directory(directory or ".", os.fstat(dfd))
            flags = (os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()):
                self._set_aside(name, dfd, st)
                flags |= os.O_EXCL
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():  # raced in between
            os.close(fd)
            raise OSError(errno.EPERM, f"not a regular file of ours (uid {st.st_uid})")
        self._fd = fd
        self._size = st.st_size
        # A write cut short by a crash of the machine leaves no newline: start a new line.
        self._torn = st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n"

    def _set_aside(self, name: str, dfd: int, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                    "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            suffix = "corrupt"
        else:
            what = f"owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
            suffix = "foreign"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{name}.{suffix}-{stamp}"
        try:
            os.rename(name, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            raise OSError(e.errno, f"{what}, and it cannot be set aside: {e.strerror}") from e
        aside = os.path.join(os.path.dirname(self.path), aside)
        self.warning = f"history file {self.path} was {what}; kept as {aside}, a new one started"
        log.warning("event=history.set_aside path=%s reason=%r kept_as=%s", self.path, what,
                    aside)
        self._pending = {"v": FORMAT, "time": now_iso(), "kind": "history", "who": {"via": "swapd"},
                         "outcome": "reset", "reason": what, "kept_as": aside}

    def _count_bad_lines(self) -> None:
        """Lines that are not entries (a torn write of an older swapd, an edit) are skipped
        by every reader and counted; the file is kept: it is the deploy record."""
        limit = self.max_bytes + MAX_ENTRY
        data = os.pread(self._fd, min(self._size, limit), max(0, self._size - limit))
        _, bad = parse(data)
        if bad:
            log.warning("event=history.bad_lines path=%s count=%d action=skipped", self.path, bad)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def append(self, kind: str, outcome: str, who: Mapping[str, Any], **fields: Any
               ) -> dict[str, Any]:
        """Write one entry; returns it. Problems are logged, never raised."""
        entry: dict[str, Any] = {"v": FORMAT, "time": now_iso(), "kind": kind, "who": dict(who),
                                 "outcome": outcome}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = _line(entry)
        if len(line) > MAX_ENTRY:  # e.g. a very long reason: keep what identifies it
            entry = {k: entry[k] for k in ("v", "time", "kind", "who", "outcome")}
            entry["reason"] = str(fields.get("reason", ""))[:1000] + " [cut]"
            line = _line(entry)
        self._write(line)
        return entry

    def _write(self, line: bytes) -> None:
        """Write `line` after what is owed (the set-aside note, the gap), all or nothing."""
        try:
            if self._fd < 0:  # it failed before (e.g. the directory was not writable yet)
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                self._open()
            data = self._owed() + line
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
                data = self._owed() + line
            self._write_all(data)
        except OSError as e:
            if line:
                self._lost += 1
                self._lost_why = e.strerror or str(e)
            self._failed("write", e)
            return
        if self._lost:
            log.warning("event=history.gap path=%s lost=%d reason=%r", self.path, self._lost,
                        self._lost_why)
        self._pending = None
        self._lost = 0
        self.error = None

    def _owed(self) -> bytes:
        owed = b"\n" if self._torn else b""
        if self._pending is not None:
            owed += _line(self._pending)
        if self._lost:
            owed += _line({"v": FORMAT, "time": now_iso(), "kind": "history",
                           "who": {"via": "swapd"}, "outcome": "gap",
                           "reason": f"history gap: {self._lost} "
                                     f"entr{'y' if self._lost == 1 else 'ies'} lost "
                                     f"({self._lost_why})",
                           "lost": self._lost})
        return owed

    def _write_all(self, data: bytes) -> None:
        """Write all of `data`, or none of it: what a failed write left (a full disk cuts
        a write short) is cut back off, so the next entry is not glued to half a line."""
        start = os.fstat(self._fd).st_size
        done = 0
        try:
            while done < len(data):  # a short write: the next one says why (ENOSPC)
                written = os.write(self._fd, data[done:])
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += written
        except OSError:
            self._cut(start)
            raise
        self._size = start + done
        self._torn = False

    def _cut(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            self._size = size
        except OSError:  # then the next entry starts on a line of its own
            with contextlib.suppress(OSError):
                self._size = os.fstat(self._fd).st_size
            self._torn = True

    def _rotate(self) -> None:
        self.close()
        for i in range(KEEP - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()
        log.info("event=history.rotated path=%s kept=%d", self.path, KEEP)

    def _failed(self, what: str, e: OSError) -> None:
        message = f"history {what} failed: {self.path}: {e.strerror or e}"
        if message != self.error:
            log.error("event=history.failed op=%s path=%s error=%r", what, self.path,
                      e.strerror or str(e))
        self.error = message

    def warnings(self) -> list[str]:
        return [w for w in (self.warning, self.error) if w]
