"""Fixtures for tests that boot a real systemd as PID 1 in private namespaces (see harness.py).

Tests that need one take ``booted_systemd``; tests that build their own ``BootedSystemd`` take
``systemd_bootable`` so that they skip, like the others, where booting is impossible.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.systemd.harness import BootedSystemd, cannot_boot_reason


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here boots a real systemd: the slow tier."""
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def _why_not_bootable() -> str | None:
    return cannot_boot_reason()


@pytest.fixture
def systemd_bootable(_why_not_bootable: str | None) -> None:
    """Skip, with the reason, unless this machine can boot systemd in namespaces."""
    if _why_not_bootable is not None:
        pytest.skip(f"cannot boot a real systemd here: {_why_not_bootable}")


@pytest.fixture(scope="module")
def booted_systemd(_why_not_bootable: str | None) -> Iterator[BootedSystemd]:
    """One systemd per test module: boots in about half a second, powers off in a quarter.

    Tests share it, so each gives its units (and ports) names of its own.
    """
    if _why_not_bootable is not None:
        pytest.skip(f"cannot boot a real systemd here: {_why_not_bootable}")
    with BootedSystemd() as instance:
        yield instance
