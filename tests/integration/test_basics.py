"""The core operations against a real supervisor: start, status, upgrade, stop."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.integration.supervised import HELLO, fd_count, http_get, supervised, wait_pid_gone


def test_start_status_upgrade_stop(tmp_path: Path) -> None:
    with supervised(tmp_path, HELLO, args=["--workers", "2"]) as s:
        st = s.status()
        assert st["active"] == 1
        (gen,) = st["generations"]
        assert gen["state"] == "active" and len(gen["workers"]) == 2
        assert all(w["rss"] > 0 and w["state"] == "ready" for w in gen["workers"])
        addr = s.address()
        assert addr[1] != 0  # port 0 was resolved and is shown
        status, body = http_get(addr)
        assert status == 200 and "hello from pid" in body

        old_pids = s.active_pids()
        res = s.upgrade()
        assert res["ok"], res
        assert res["data"]["gen"] == 2
        for pid in old_pids:
            assert wait_pid_gone(pid, 30), f"old worker {pid} did not exit after drain"
        new_pids = s.active_pids()
        assert set(new_pids).isdisjoint(old_pids)
        status, body = http_get(addr)
        assert status == 200 and int(body.split()[3]) in new_pids

        assert stat.S_IMODE(os.stat(s.control).st_mode) == 0o600
        before = fd_count(s.pid)
        res = s.result("stop")
        assert res["ok"] and res["data"]["stopped"]
        assert s.wait_exit(30) == 0
        assert not os.path.exists(s.control)
        assert before > 0
        # Every exit was processed: an exception in a callback (a worker whose output
        # closed before its pidfd fired) leaves its exit unseen until the drain deadline.
        assert "Traceback" not in s.log_text(), s.log_text()
