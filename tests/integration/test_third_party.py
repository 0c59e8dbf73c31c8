"""Any socket-activation-aware server is a worker: gunicorn reads LISTEN_FDS and sends READY=1."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.supervised import ROOT, http_get, supervised, wait_pid_gone

pytestmark = pytest.mark.slow

GUNICORN = shutil.which("gunicorn", path=str(Path(sys.executable).parent))


def gunicorn_command(tmp_path: Path) -> list[str]:
    assert GUNICORN is not None
    return [GUNICORN, "--workers", "2", "--graceful-timeout", "10", "--no-control-socket",
            "--chdir", str(ROOT / "tests" / "apps"), "wsgi_app:app"]


@pytest.mark.skipif(GUNICORN is None, reason="gunicorn is in the test extra; not installed")
def test_gunicorn_as_worker(tmp_path: Path) -> None:
    with supervised(tmp_path, gunicorn_command(tmp_path), env={"HOME": str(tmp_path)}) as s:
        (master,) = s.active_pids()
        status, body = http_get(s.address())
        assert status == 200 and body.startswith("wsgi ")
        worker_pid = int(body.split()[1])
        assert worker_pid != master, "served by a gunicorn worker, forked by its arbiter"
        res = s.upgrade()
        assert res["ok"], res
        assert wait_pid_gone(master, 30)
        (new_master,) = s.active_pids()
        assert new_master != master
        status, body = http_get(s.address())
        assert status == 200 and int(body.split()[1]) != worker_pid
        st = s.status()
        assert st["generations"][0]["workers"][0]["children"] == 2
        assert st["generations"][0]["workers"][0]["speaks_channel"] is False
