"""swapd.servers runs inside third-party servers: light, never the supervisor's code, and the
gunicorn config module composes with a user's own hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from swapd.servers import _gunicorn_hooks as hooks

MODULES = ["swapd.servers.gunicorn", "swapd.servers.uvicorn", "swapd.servers.hypercorn",
           "swapd.servers.aiohttp"]


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_server_module_loads_no_supervisor_and_no_server(module: str) -> None:
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('swapd', 'uvicorn', 'hypercorn', 'aiohttp', 'gunicorn', 'asyncio'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    loaded = json.loads(out)
    assert not [m for m in loaded if m.startswith("swapd.supervisor")], loaded
    # The server itself is imported when the launcher runs, not when the module is read.
    assert not [m for m in loaded if m.split(".")[0] in ("uvicorn", "hypercorn", "aiohttp")], \
        loaded


def test_install_keeps_the_users_hooks_and_gunicorn_accepts_them() -> None:
    from gunicorn.config import Config

    calls: list[str] = []

    def on_starting(server: Any) -> None:
        calls.append("user on_starting")

    def post_worker_init(worker: Any) -> None:
        calls.append("user post_worker_init")

    namespace: dict[str, Any] = {"on_starting": on_starting,
                                 "post_worker_init": post_worker_init, "workers": 3}
    hooks.install(namespace)
    hooks.install(namespace)  # twice: still one layer
    assert namespace["child_exit"] is hooks.child_exit
    assert namespace["workers"] == 3
    cfg = Config()
    for name in ("on_starting", "post_worker_init", "child_exit"):
        cfg.set(name, namespace[name])  # gunicorn checks each hook's arity here
    assert getattr(namespace["post_worker_init"], "_swapd_composed", False)

    class Worker:
        pid = 1234

    saved = hooks._gate
    hooks._gate = None  # not under swapd (no NOTIFY_SOCKET): the user's hooks still run
    try:
        cfg.post_worker_init(Worker())
    finally:
        hooks._gate = saved
    assert calls == ["user post_worker_init"]


def test_install_into_an_empty_config_is_the_config_module() -> None:
    namespace: dict[str, Any] = {}
    hooks.install(namespace)
    assert namespace == hooks.HOOKS


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["swapd.servers.uvicorn", "app:app", "--port", "9000"],
         "swapd.servers.uvicorn: error: --port is not for a swapd worker: swapd binds the "
         "listeners: use `swapd run --bind`"),
        (["swapd.servers.uvicorn", "app:app"],
         "swapd.servers.uvicorn: error: no inherited listening socket (LISTEN_FDS): run it as a "
         "worker of `swapd run --bind NAME=ADDR -- ...` (or a systemd socket unit)"),
        (["swapd.servers.hypercorn", "app:app"], "swapd.servers.hypercorn: error: no inherited"),
        (["swapd.servers.aiohttp", "app:make_app"], "swapd.servers.aiohttp: error: no inherited"),
    ],
)
def test_launchers_refuse_in_one_line(argv: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")}
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
