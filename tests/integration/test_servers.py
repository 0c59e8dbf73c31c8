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
import time
from pathlib import Path

import pytest

from swapd.loadgen import BackgroundLoad, http_get
from tests.integration.supervised import PY, ROOT, Supervised, write_behavior
from tests.integration.supervised import http_get as get_once

APPS = ROOT / "tests" / "apps"
GUNICORN = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
LOAD = {"clients": 4, "mode": "close", "duration": 90.0, "max_requests": 200_000}


def answers_from_new_release(address: tuple[str, int], timeout: float = 10.0) -> bool:
    """After a stateless commit the old generation may still take a connection or two while
    its drain begins (both generations accept for an instant, by design): ask until the new
    release answers, every answer a 200, within a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = get_once(address)
        assert status == 200, (status, body)
        if body.startswith("v2 "):
            return True
        assert body.startswith("v1 "), body
    return False


def gunicorn(*extra: str, app: str = "servers_app:make_wsgi()",
             config: str = "python:swapd.servers.gunicorn") -> list[str]:
    return [GUNICORN or "gunicorn", "-c", config, "--workers", "2",
            "--graceful-timeout", "10", "--no-control-socket", *extra, app]


# name: (command, modules it needs)
SERVERS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "gunicorn-sync": (gunicorn(), ("gunicorn",)),
    "gunicorn-sync-preload": (gunicorn("--preload"), ("gunicorn",)),
    # gthread through a user's own config file that calls swapd.servers.gunicorn.install()
    "gunicorn-gthread": (gunicorn(config="gunicorn_conf.py"), ("gunicorn",)),
    "gunicorn-uvicorn": (gunicorn("-k", "swapd.servers.gunicorn_uvicorn.UvicornWorker",
                                  app="servers_app:asgi"), ("gunicorn", "uvicorn")),
    "uvicorn": ([PY, "-m", "swapd.servers.uvicorn", "servers_app:asgi"], ("uvicorn",)),
    "hypercorn": ([PY, "-m", "swapd.servers.hypercorn", "servers_app:asgi"], ("hypercorn",)),
    "aiohttp": ([PY, "-m", "swapd.servers.aiohttp", "servers_app:make_aiohttp"], ("aiohttp",)),
    # one gunicorn worker each: two are covered above, and a framework import is not cheap
    "flask": (gunicorn("--workers", "1", app="flask_app:create_app()"), ("gunicorn", "flask")),
    "django": (gunicorn("--workers", "1", app="django_app:application"),
               ("gunicorn", "django")),
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
    # --idle-grace: how long a draining launcher gives just-accepted connections (ms would do)
    return Supervised(tmp_path, command, args=["--cwd", str(APPS), "--idle-grace", "0.25", *args],
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
        assert answers_from_new_release(s.address())
        assert s.active_pids() != old
        if command[0] == GUNICORN:  # READY=1 came from the hooks, not gunicorn's arbiter
            st = s.status()
            (worker,) = next(g for g in st["generations"] if g["id"] == st["active"])["workers"]
            booted = 1 if "--workers" in command[command.index("--workers") + 2:] else 2
            assert worker["status"] == f"gunicorn: {booted} worker(s) booted", worker
        if server == "gunicorn-gthread":
            s.wait_log(r"\| user post_worker_init pid=\d+", timeout=5)
            s.wait_log(r"Using worker: gthread", timeout=5)
    finally:
        s.stop()


@pytest.mark.skipif(missing(("gunicorn", "uvicorn")) != [], reason="gunicorn and uvicorn are "
                    "in the test extra; not installed")
def test_plain_uvicorn_worker_is_ready_only_after_its_startup(tmp_path: Path) -> None:
    """uvicorn's own worker class runs the lifespan after gunicorn's post_worker_init: the
    hooks wait for it, so a failing startup is refused (no load: readiness only)."""
    command = gunicorn("-k", "uvicorn.workers.UvicornWorker", app="servers_app:asgi")
    s = run_servers(tmp_path, command)
    try:
        s.start()
        old = s.active_pids()
        write_behavior(tmp_path / "behavior.json", startup_error=True)
        proc = s.cli("upgrade")
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "simulated failure in lifespan startup" in proc.stderr, proc.stderr
        assert s.active_pids() == old
        write_behavior(tmp_path / "behavior.json", version="v2")
        assert s.result("upgrade")["ok"]
        assert answers_from_new_release(s.address())
    finally:
        s.stop()


HYPERCORN = shutil.which("hypercorn", path=str(Path(sys.executable).parent))
UVICORN = shutil.which("uvicorn", path=str(Path(sys.executable).parent))


def hypercorn_cli(probe_bind_file: Path) -> list[str]:
    """Plain `hypercorn` (it never sends READY=1), serving fd 3 and whatever the file adds:
    `--bind fd://$SWAPD_PROBE_FD` makes it serve its private probe socket too."""
    assert HYPERCORN is not None
    return ["sh", "-c", f'eval exec {HYPERCORN} --workers 0 --bind fd://3 '
            f'"$(cat "{probe_bind_file}")" servers_app:asgi']


@pytest.mark.slow
@pytest.mark.skipif(HYPERCORN is None, reason="hypercorn is in the test extra; not installed")
def test_http_probe_reaches_the_new_generation(tmp_path: Path) -> None:
    """The public listener would answer 200 from the old generation; the probe asks the new
    worker itself, so a release that starts but answers 500 is refused.

    hypercorn through swapd's launcher, which serves every inherited socket (the probe's
    too) and whose drain lets a connection accepted an instant earlier deliver its request:
    the load below may then see no failure at all. (Plain hypercorn's own drain may cut
    such a connection, an EOF in close mode: docs/servers.md. In probe mode the launcher's
    READY=1 does not count; only the probe does.)"""
    s = run_servers(tmp_path, SERVERS["hypercorn"][0],
                    ("--readiness", "probe", "--probe", "http:/", "--ready-timeout", "3",
                     "--probe-timeout", "1"))
    behavior = tmp_path / "behavior.json"
    try:
        s.start()
        old = s.active_pids()
        # No load here: until it is refused, the 500 release accepts on the shared listener
        # like any new generation, so clients it reaches see its 500s (docs/servers.md).
        write_behavior(behavior, status=500)
        proc = s.cli("upgrade")
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "not ready within 3s (ready_timeout): waiting for GET / to answer 2xx or 3xx" \
            " on its private probe socket 127.0.0.1:" in proc.stderr, proc.stderr
        assert "last: GET / answered 500" in proc.stderr, proc.stderr
        assert s.active_pids() == old
        with BackgroundLoad(s.address(), http_get("/"), **LOAD) as load:  # type: ignore[arg-type]
            load.wait_for_successes(30, timeout=30)
            write_behavior(behavior, import_error=True)
            proc = s.cli("upgrade")
            assert proc.returncode == 1 and "simulated import failure" in proc.stderr, proc.stderr
            write_behavior(behavior, version="v2")
            res = s.result("upgrade")
            assert res["ok"], res
            load.wait_for_successes(30, timeout=30)
        report = load.report
        assert report is not None and report.failed == 0, report and report.format()
        assert answers_from_new_release(s.address())
    finally:
        s.stop()


@pytest.mark.slow
@pytest.mark.skipif(HYPERCORN is None, reason="hypercorn is in the test extra; not installed")
def test_tcp_probe_waits_for_the_worker_to_accept(tmp_path: Path) -> None:
    """tcp: ready once the new worker accepts on its probe socket; one that does not serve it
    (the connection stays queued in the backlog) is never taken for ready."""
    binds = tmp_path / "probe-bind"
    binds.write_text("--bind fd://$SWAPD_PROBE_FD")
    s = run_servers(tmp_path, hypercorn_cli(binds),
                    ("--readiness", "probe", "--probe", "tcp", "--ready-timeout", "2"))
    try:
        s.start()
        old = s.active_pids()
        binds.write_text("")  # the next release serves fd 3 only: its probe is never accepted
        proc = s.cli("upgrade")
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "waiting for the worker to accept a connection on its private probe socket" \
            in proc.stderr, proc.stderr
        assert s.active_pids() == old
        binds.write_text("--bind fd://$SWAPD_PROBE_FD")
        assert s.result("upgrade")["ok"]
        assert get_once(s.address())[0] == 200
    finally:
        s.stop()


@pytest.mark.skipif(UVICORN is None, reason="uvicorn is in the test extra; not installed")
def test_ready_timeout_says_what_it_waited_for(tmp_path: Path) -> None:
    """Plain `uvicorn --fd 3` never sends READY=1: the failure says what swapd waited for,
    that nothing came, where to look, and what the worker printed last."""
    import subprocess

    from tests.integration.supervised import SWAPD

    assert UVICORN is not None
    write_behavior(tmp_path / "behavior.json", version="v1")
    proc = subprocess.run(
        [*SWAPD, "run", "--control", str(tmp_path / "swapd.sock"), "--bind", "http=127.0.0.1:0",
         "--cwd", str(APPS), "--ready-timeout", "2", "--", UVICORN, "--fd", "3",
         "servers_app:asgi"],
        env={**run_servers(tmp_path, []).env, "NOTIFY_SOCKET": ""}, capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("swapd: gen=1"))
    assert "not ready within 2s (ready_timeout): waiting for READY=1 on its NOTIFY_SOCKET" in line
    assert "it sent nothing" in line and "docs/servers.md" in line
    assert "last output: " in line and "Uvicorn running on socket" in line, line
