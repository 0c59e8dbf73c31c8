"""Many swaps leave no fds, no zombies and no stray children behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from swapd.supervisor.fleet import HISTORY
from tests.integration.supervised import (
    HELLO,
    children_of,
    supervised,
    wait_pid_gone,
    zombies_of,
)

pytestmark = pytest.mark.slow

SWAPS = 20


def test_no_fd_or_process_leaks_after_many_swaps(tmp_path: Path) -> None:
    with supervised(tmp_path, HELLO, args=["--workers", "2"]) as s:
        # One swap first, so lazily created objects (psutil caches, loggers) exist already.
        assert s.upgrade()["ok"]
        for pid in s.worker_pids - set(s.active_pids()):
            assert wait_pid_gone(pid, 30)
        # Counted by the supervisor itself while answering: exactly one control connection open.
        baseline = s.status()["open_fds"]
        for _ in range(SWAPS):
            previous = s.active_pids()
            res = s.upgrade()
            assert res["ok"], res
            for pid in previous:
                assert wait_pid_gone(pid, 30)
        st = s.status()
        assert st["active"] == SWAPS + 2
        assert [g["id"] for g in st["generations"]] == [SWAPS + 2]
        assert st["open_fds"] == baseline
        # Memory stays bounded: ended generations are summaries, and only the last few.
        assert st["generations_held"] == 1
        assert [g["id"] for g in st["ended"]] == list(range(SWAPS + 2 - HISTORY, SWAPS + 2))
        assert zombies_of(s.pid) == []
        assert sorted(children_of(s.pid)) == sorted(s.active_pids())
