"""Third-party servers as workers: a broken release is refused, a good one swaps under load.

For each recipe of docs/servers.md, under a bounded close-mode load: a release that fails to
import, then one whose startup fails (ASGI lifespan, aiohttp on_startup, the WSGI app
factory, Django's AppConfig.ready()), are refused with exit 1 and the failure's text while the
old generation serves on; then a good release swaps in. Not one request fails.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from swapd.loadgen import BackgroundLoad, http_get
from tests.integration.supervised import PY, ROOT, Supervised, supervised, write_behavior
from tests.integration.supervised import http_get as get_once

APPS = ROOT / "tests" / "apps"
GUNICORN = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
LOAD = {"clients": 4, "mode": "close", "duration": 90.0, "max_requests": 200_000}


def gunicorn(*extra: str, app: str = "servers_app:make_wsgi()") -> list[str]:
    return [GUNICORN or "gunicorn", "-c", "python:swapd.servers.gunicorn", "--workers", "2",
            "--graceful-timeout", "10", "--no-control-socket", *extra, app]


# name: (command, modules it needs)
SERVERS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "gunicorn-sync": (gunicorn(), ("gunicorn",)),
    "gunicorn-sync-preload": (gunicorn("--preload"), ("gunicorn",)),
    "gunicorn-gthread": (gunicorn("-k", "gthread", "--threads", "4"), ("gunicorn",)),
    "gunicorn-uvicorn": (gunicorn("-k", "uvicorn.workers.UvicornWorker", app="servers_app:asgi"),
                         ("gunicorn", "uvicorn")),
    "uvicorn": ([PY, "-m", "swapd.servers.uvicorn", "servers_app:asgi"], ("uvicorn",)),
    "hypercorn": ([PY, "-m", "swapd.servers.hypercorn", "servers_app:asgi"], ("hypercorn",)),
    "aiohttp": ([PY, "-m", "swapd.servers.aiohttp", "servers_app:make_aiohttp"], ("aiohttp",)),
    "flask": (gunicorn(app="flask_app:create_app()"), ("gunicorn", "flask")),
    "django": (gunicorn(app="django_app:application"), ("gunicorn", "django")),
}

BROKEN = [
    ({"import_error": True}, "ImportError: simulated import failure in the new release"),
    ({"startup_error": True}, "simulated failure in"),
]


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def run_servers(tmp_path: Path, command: list[str], args: tuple[str, ...] = (),
                behavior: Path | None = None) -> Supervised:
    behavior = behavior or tmp_path / "behavior.json"
    if not behavior.exists():
        write_behavior(behavior, version="v1")
    return Supervised(tmp_path, command, args=["--cwd", str(APPS), *args],
                      env={"BEHAVIOR": str(behavior), "HOME": str(tmp_path),
                           "PYTHONWARNINGS": "ignore::DeprecationWarning"})


@pytest.mark.slow
@pytest.mark.parametrize("server", list(SERVERS))
def test_broken_releases_refused_good_release_swaps(tmp_path: Path, server: str) -> None:
    command, needs = SERVERS[server]
    if missing(needs):
        pytest.skip(f"{', '.join(missing(needs))} not installed (the test extra has them)")
    behavior = tmp_path / "behavior.json"
    write_behavior(behavior, version="v1")
    s = run_servers(tmp_path, command, behavior=behavior)
    try:
        s.start()
        old = s.active_pids()
        with BackgroundLoad(s.address(), http_get("/"), **LOAD) as load:  # type: ignore[arg-type]
            load.wait_for_successes(30, timeout=30)
            for behave, text in BROKEN:
                write_behavior(behavior, **behave)
                with load.window(f"refused {next(iter(behave))}"):
                    proc = s.cli("upgrade")
                assert proc.returncode == 1, (proc.stdout, proc.stderr)
                assert "FAILED" in proc.stderr and "before it was ready" in proc.stderr, \
                    proc.stderr
                assert text in proc.stderr, proc.stderr
                assert s.active_pids() == old
                load.wait_for_successes(30, timeout=30)
            write_behavior(behavior, version="v2")
            with load.window("good release"):
                res = s.result("upgrade")
            assert res["ok"], res
            load.wait_for_successes(30, timeout=30)
        report = load.report
        assert report is not None
        assert report.failed == 0, report.format()
        assert all(w.ok > 0 for w in report.windows), report.format()
        status, body = get_once(s.address())
        assert status == 200 and body.startswith("v2 "), body
        assert s.active_pids() != old
    finally:
        s.stop()
