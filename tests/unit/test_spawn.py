"""A start that fails half way (EMFILE at the fd limit) leaks no descriptor and no file.

The supervisor retries a failed spawn when descriptors return: each failed attempt that
left a socketpair or a notify socket open would bring the limit closer.
"""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from swapd.config import build
from swapd.supervisor import notify, spawn
from swapd.supervisor.process import OsProcesses
from swapd.supervisor.spawn import WorkerSpec, spawn_worker


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _emfile(*_: Any, **__: Any) -> Any:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


@pytest.mark.parametrize("step", ["notify", "pipe", "spawn", "probe-spawn"])
def test_a_failed_spawn_closes_what_it_opened(step: str, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    cfg = build({"command": ["true"], "bind": {"http": "127.0.0.1:0"}}, {},
                environ={"SWAPD_CONTROL": "/nonexistent/ctl.sock"})
    if step == "probe-spawn":
        cfg = replace(cfg, readiness="probe", probe="tcp")
    processes = OsProcesses()
    if step == "notify":
        monkeypatch.setattr(notify, "notify_socket", _emfile)
    elif step == "pipe":
        monkeypatch.setattr(spawn.os, "pipe2", _emfile)
    else:
        monkeypatch.setattr(processes, "spawn", _emfile)
    spec = WorkerSpec(1, 0, cfg, [], [], "fresh", {})
    loop = asyncio.new_event_loop()
    try:
        before = _open_fds()
        with pytest.raises(OSError) as failed:
            spawn_worker(spec, processes, loop)
        assert failed.value.errno == errno.EMFILE
        assert _open_fds() == before
    finally:
        loop.close()


def test_a_start_that_fails_after_binding_the_control_socket_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Storing the listeners in systemd's fd store fails (OSError): the start fails with one
    # line, and neither a listener nor the control socket (file and descriptor) is left.
    from swapd.supervisor.core import Supervisor
    from swapd.supervisor.listeners import Listeners
    from swapd.supervisor.startup import StartupError

    control = tmp_path / "ctl" / "swapd.sock"
    control.parent.mkdir(mode=0o700)
    cfg = build({"command": ["true"], "bind": {"http": "127.0.0.1:0"}}, {},
                environ={"SWAPD_CONTROL": str(control)})
    monkeypatch.setattr(Listeners, "store_all", _emfile)
    before = _open_fds()
    sup = Supervisor(cfg, {})
    with pytest.raises(StartupError, match="Too many open files"):
        sup.prepare()
    assert not control.exists()
    assert _open_fds() == before
