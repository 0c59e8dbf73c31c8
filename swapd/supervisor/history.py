"""The deploy history: what was done to the service, by whom, and how it went.

Every start, swap (upgrade, reload), re-exec, patch, watch window, rollback and stop
appends one JSON object, one line, to `history.jsonl` in the state directory:

    {"v": 1, "time": "2024-05-29T12:00:00.123Z", "kind": "upgrade",
     "who": {"via": "control", "uid": 1000, "pid": 4242},
     "outcome": "ok", "reason": null,
     "gen_before": 3, "gen_after": 4, "release_before": "v41", "release_after": "v42",
     "duration_ms": 812.4, "timings_ms": {"spawned": 1.2, "ready": 640.3, ...}, "watch": 30}

    kind      start | upgrade | reload | reexec | patch | patch.rollback | watch |
              rollback | stop | history (this file was found corrupt and restarted)
    outcome   ok | failed | refused | rolled-back (watch) | passed (watch)
    who.via   control (uid, pid from the socket's peer credentials) | signal (signal) |
              watch (trigger: what made swapd roll back) | start | stop

Where (first that applies): `state_dir` (flag or file); systemd's $STATE_DIRECTORY
(`StateDirectory=`); $XDG_STATE_HOME/swapd/<instance> (instance: a digest of the control
socket's path, so that two supervisors never share a file); else next to the control
socket, as `<socket name>.history.jsonl`. Restarts and re-execs append to the same file.

Bounded: past MAX_BYTES the file is rotated (`.1` … `.KEEP`, the oldest dropped). A file
that is not what swapd writes (a line that is not an entry, a last line without its
newline, not a regular file) is reported, kept aside as `history.jsonl.corrupt-<time>`,
and a new one started; writing never raises into the supervisor (a failure is logged once
and shown by `swapd status`). One write per event, from the event loop, no fsync: an
entry survives a crash of swapd, not necessarily one of the kernel.
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


def parse(data: bytes, *, strict: bool) -> tuple[list[dict[str, Any]], int]:
    """Entries of one file and the number of bad lines (strict: CorruptHistory at the first)."""
    entries: list[dict[str, Any]] = []
    bad = 0
    if strict and data and not data.endswith(b"\n"):
        last = data.count(b"\n") + 1
        raise CorruptHistory(f"line {last}: truncated (no newline at the end)")
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(check_entry(json.loads(line)))
        except (ValueError, RecursionError) as e:
            if strict:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                raise CorruptHistory(f"line {number}: {reason}") from None
            bad += 1
    return entries, bad


def _read_file(path: str, limit: int) -> bytes | None:
    """A regular file's bytes (None: there is none). Never follows a symlink, never blocks
    on a FIFO; CorruptHistory for anything that is not a regular file."""
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
        got, skipped = parse(data, strict=False)
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
        self.warning: str | None = None  # a corrupt file found at start
        self._fd = -1
        self._size = 0
        self._pending: dict[str, Any] | None = None  # the entry saying a file was set aside

    def open(self) -> None:
        """Open for appending, checking what is there first; never raises."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            try:
                data = _read_file(self.path, self.max_bytes + MAX_ENTRY)
                if data is not None and len(data) <= self.max_bytes:
                    parse(data, strict=True)
            except CorruptHistory as e:
                self._set_aside(str(e))
            self._open()
        except OSError as e:
            self._failed("open", e)

    def _set_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{self.path}.corrupt-{stamp}"
        os.rename(self.path, aside)
        self.warning = (f"history file {self.path} was corrupt ({reason}); kept as {aside}, "
                        "a new one started")
        log.warning("event=history.corrupt path=%s reason=%r kept_as=%s", self.path, reason,
                    aside)
        self._pending = {"kind": "history", "outcome": "reset", "reason": reason,
                         "kept_as": aside}

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                           | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):  # raced in between: not ours to write to
            os.close(self._fd)
            self._fd = -1
            raise OSError(errno.EINVAL, "not a regular file")
        self._size = st.st_size
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.append(pending.pop("kind"), pending.pop("outcome"), {"via": "swapd"},
                        **pending)

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
        line = json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"
        if len(line) > MAX_ENTRY:  # e.g. a very long reason: keep what identifies it
            entry = {k: entry[k] for k in ("v", "time", "kind", "who", "outcome")}
            entry["reason"] = str(fields.get("reason", ""))[:1000] + " [cut]"
            line = json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"
        try:
            if self._fd < 0:  # it failed before (e.g. the directory was not writable yet)
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                self._open()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            written = os.write(self._fd, line)
            self._size += written
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write")
            self.error = None
        except OSError as e:
            self._failed("write", e)
        return entry

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
