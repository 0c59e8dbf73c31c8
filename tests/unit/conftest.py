"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.notify_fake import FakeNotifySocket


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
