"""The state half of `swapd.worker`: what a handoff sends and how it is taken back.

A handoff is a flat list of snapshots (each a sealed memfd plus its own fds),
sent as one channel message:

    [state]  [tracked dict part]  [tracked dict part] ...

`state` is {"app": snapshot(), "conns": [(listener, socket, meta, buffered)],
"tracked": [names of the parts that follow]}. With `w.state_codec` other than pickle5
(marshal: plain data only; dumps 1.3-3.4x faster, loads about as fast) the application's
state is the first part that follows, named "" (connections always travel with pickle5,
as sockets). Every memfd carries its envelope in its header, so the receiver splits the
flat fd list by reading them, and a list kept in systemd's fd store (where fds come
back without envelopes) restores the same way. A tracked dict contributes only the keys
changed since its pre-copy when the quiesce request says `"precopied": true` (a pre-copy
of this round has just been loaded by the successor); otherwise its whole content, as a
round of its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from swapd import handoff
from swapd.handoff import Restored, Snapshot, TrackedDict

Migrate = Callable[[Any, int], Any]
CHUNK_ENTRIES = 50_000  # pre-copy chunk: the worker serves requests between chunks
APP = ""  # the part name of the application state when it has a codec of its own


@dataclass
class TrackedEntry:
    td: TrackedDict[Any, Any]
    migrate: Migrate | None
    codec: str = "pickle5"


@dataclass
class StateParts:
    """What a worker keeps across a handoff, on either side."""

    version: int = 1
    codec: str = "pickle5"  # of the application's own state; connections always pickle5
    tracked: dict[str, TrackedEntry] = field(default_factory=dict)
    restored: list[Restored] = field(default_factory=list)  # committed on swap commit

    # -- the old worker --------------------------------------------------------------

    def precopy(self) -> Iterator[tuple[str, Snapshot]]:
        """Bulk parts of every tracked dict, chunk by chunk (the caller yields between)."""
        for name, entry in self.tracked.items():
            for part in entry.td.precopy_chunks(app_version=self.version, codec=entry.codec,
                                                chunk_entries=CHUNK_ENTRIES):
                yield name, part

    @property
    def dirty(self) -> int:
        """Entries changed since the last part shipped, over every tracked dict in a round."""
        return sum(e.td.dirty_count for e in self.tracked.values() if e.td.tracking)

    def precopy_delta(self) -> list[tuple[str, Snapshot]]:
        """Another pre-copy round: what changed since the previous part, per tracked dict."""
        parts: list[tuple[str, Snapshot]] = []
        try:
            for name, entry in self.tracked.items():
                if entry.td.tracking and entry.td.dirty_count:
                    parts.append((name, entry.td.delta()))
        except BaseException:
            for _, part in parts:
                part.close()
            raise
        return parts

    def dump(self, app: Any, conns: list[tuple[Any, ...]], *,
             precopied: bool = False) -> list[Snapshot]:
        """The handoff, main part first. `precopied`: a pre-copy of the round open now has
        just been loaded by the successor, so tracked dicts send only what changed since;
        otherwise (no pre-copy, or one that failed) any open round ends and they send all."""
        names = list(self.tracked)
        separate = self.codec != "pickle5"  # then the app state is a part of its own: APP
        main = {"app": None if separate else app, "conns": conns,
                "tracked": [APP, *names] if separate else names}
        snaps = [handoff.dump(main, app_version=self.version)]
        try:
            if separate:
                snaps.append(handoff.dump(app, app_version=self.version, codec=self.codec))
            for name in names:
                td = self.tracked[name].td
                if precopied and td.tracking:
                    snaps.append(td.delta())
                    continue
                td.end_precopy()
                snaps.append(td.begin_precopy(app_version=self.version,
                                              codec=self.tracked[name].codec))
                td.end_precopy()  # a whole copy is a round of its own: nothing to track after
        except BaseException:
            for snap in snaps:
                snap.close()
            raise
        return snaps

    def end_rounds(self) -> None:
        """After an abort (old side) or a commit (new side): the next swap starts over."""
        for entry in self.tracked.values():
            entry.td.end_precopy()

    # -- the new worker --------------------------------------------------------------

    def load_precopy(self, names: list[str], fds: list[int], accept: Container[int]) -> None:
        """Load pre-copy parts; a refused state version fails before any migrate() ran."""
        parts = split(fds)
        try:
            if len(parts) != len(names):
                raise handoff.PrecopyError(f"{len(names)} pre-copy names for {len(parts)} parts")
            entries = [self._entry(name) for name in names]
        except BaseException:
            _close_parts(parts)
            raise
        for i, (entry, (memfd, extra)) in enumerate(zip(entries, parts, strict=True)):
            try:
                self._apply(entry, handoff.load(None, memfd, extra, accept_versions=accept))
            except BaseException:
                _close_parts(parts[i + 1 :])
                raise

    def load(self, fds: list[int], accept: Container[int],
             envelope: Mapping[str, object] | None = None) -> Restored:
        """Restore a handoff; returns the main part (its state has app, conns, tracked).

        `envelope` is the main part's, if it travelled beside the fds (not from the fd
        store): it must then match the one in the memfd's header.
        """
        parts = split(fds)
        if not parts:
            raise handoff.Truncated("the restore request carried no snapshot")
        try:
            main = handoff.load(envelope, *parts[0], accept_versions=accept)
            names = main.state.get("tracked", []) if isinstance(main.state, dict) else None
            if not isinstance(names, list):
                raise handoff.CorruptSnapshot("the main part is not a swapd.worker handoff")
            if len(names) != len(parts) - 1:
                raise handoff.FdMismatch(f"state names {len(names)} tracked dicts, "
                                         f"{len(parts) - 1} parts arrived")
            entries = [None if name == APP else self._entry(name) for name in names]
        except BaseException:
            _close_parts(parts[1:])
            raise
        if main.shared:
            self.restored.append(main)
        for i, (entry, (memfd, extra)) in enumerate(zip(entries, parts[1:], strict=True)):
            try:
                part = handoff.load(None, memfd, extra, accept_versions=accept)
                if entry is None:
                    main.state["app"] = part.state
                    if part.shared:
                        self.restored.append(part)
                else:
                    self._apply(entry, part)
            except BaseException:
                _close_parts(parts[i + 2 :])
                raise
        return main

    def commit(self) -> None:
        for restored in self.restored:
            restored.commit()
        self.restored.clear()
        self.end_rounds()

    def _entry(self, name: str) -> TrackedEntry:
        entry = self.tracked.get(name)
        if entry is None:
            raise handoff.PrecopyError(
                f"the predecessor hands over tracked dict {name!r}, which this code does not "
                "register (w.tracked_dict)"
            )
        return entry

    def _apply(self, entry: TrackedEntry, part: Restored) -> None:
        if entry.td.receiving:
            entry.td.apply_delta(part)
        else:
            entry.td.load_bulk(part, migrate=entry.migrate)
        # Keep a part only if it holds SharedBuffers to commit; otherwise drop it now, so
        # its memory is released here (pre-copy: outside the pause), not at commit.
        if part.shared:
            self.restored.append(part)


def split(fds: list[int]) -> list[tuple[int, list[int]]]:
    """Cut a flat fd list into (memfd, its fds) by reading each memfd's envelope."""
    parts: list[tuple[int, list[int]]] = []
    i = 0
    try:
        while i < len(fds):
            count = handoff.read_envelope(fds[i]).fds
            if i + 1 + count > len(fds):
                raise handoff.FdMismatch(f"snapshot needs {count} fds, {len(fds) - i - 1} left")
            parts.append((fds[i], fds[i + 1 : i + 1 + count]))
            i += 1 + count
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return parts


def _close_parts(parts: list[tuple[int, list[int]]]) -> None:
    for memfd, extra in parts:
        for fd in (memfd, *extra):
            with contextlib.suppress(OSError):
                os.close(fd)
