"""StateParts: how a handoff is split into parts and taken back, and that errors leak no fd."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from swapd import handoff
from swapd.handoff import Snapshot, TrackedDict
from swapd.worker.state import StateParts, TrackedEntry


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() <= before, "fds leaked"


def receiver(*names: str) -> StateParts:
    parts = StateParts()
    for name in names:
        parts.tracked[name] = TrackedEntry(TrackedDict(), None)
    return parts


def sent(snaps: list[Snapshot]) -> list[int]:
    """What a receiver gets: its own copies of every snapshot's fds."""
    fds = [os.dup(fd) for snap in snaps for fd in snap.send_fds]
    for snap in snaps:
        snap.close()
    return fds


def test_precopy_of_an_unregistered_dict_closes_every_part(no_fd_leak: None) -> None:
    old = receiver("players", "rooms")
    old.tracked["players"].td.update(a=1)
    parts = [part for _, part in old.precopy()]
    with pytest.raises(handoff.PrecopyError, match="'players'"):
        receiver("rooms").load_precopy(["players", "rooms"], sent(parts), range(0, 10))


def test_a_main_part_that_is_not_a_dict_closes_the_other_parts(no_fd_leak: None) -> None:
    bulk = TrackedDict({"a": 1}).begin_precopy(app_version=1)
    fds = sent([handoff.dump(["not", "a", "dict"], app_version=1), bulk])
    with pytest.raises(handoff.CorruptSnapshot, match=r"not a swapd\.worker handoff"):
        receiver("players").load(fds, range(0, 10))


def test_a_handoff_naming_an_unregistered_dict_loads_nothing(no_fd_leak: None) -> None:
    old = receiver("players")
    old.tracked["players"].td.update(a=1)
    with pytest.raises(handoff.PrecopyError, match="'players'"):
        receiver().load(sent(old.dump({"app": 1}, [])), range(0, 10))


def test_a_refused_version_loads_no_precopy_part(no_fd_leak: None) -> None:
    migrated: list[object] = []
    new = StateParts()
    new.tracked["players"] = TrackedEntry(TrackedDict(), lambda v, _: migrated.append(v))
    bulk = TrackedDict({"a": 1}).begin_precopy(app_version=5)
    with pytest.raises(handoff.VersionRefused):
        new.load_precopy(["players"], sent([bulk]), range(0, 2))
    assert migrated == [] and not new.tracked["players"].td.receiving
