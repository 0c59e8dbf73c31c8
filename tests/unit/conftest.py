"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.notify_fake import FakeNotifySocket
from tests.unit.patch_support import Mods


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNotifySocket]:
    fake = FakeNotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def mods(tmp_path: Path) -> Iterator[Mods]:
    """Throw-away modules for the patch engine's tests, removed (and forgotten) afterwards."""
    with Mods(tmp_path) as m:
        yield m
