"""Integration tests start a real supervisor and real workers: the slow tier.

Each one costs the start of a supervisor and at least one interpreter (~0.5 s before it
asserts anything), so together they take minutes even when each is quick. The fast tier,
`pytest -m "not slow"`, keeps one end-to-end smoke test (test_basics.py) and the unit
tests; `pytest` runs everything.
"""

from __future__ import annotations

import pytest

SMOKE = "test_basics.py"  # start, status, upgrade, stop: kept in the fast tier


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        path = str(item.path)
        if path.startswith(here) and not path.endswith(SMOKE):
            item.add_marker(pytest.mark.slow)
