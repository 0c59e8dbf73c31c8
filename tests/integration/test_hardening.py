"""Promises that broke under a careless release or operator: a listener shut down by a
worker, a restart after a supervisor crash, SIGHUP bursts, stateful mode with a worker that
cannot hand over state."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from tests.integration.supervised import (
    MISBEHAVE,
    ROOT,
    SWAPD,
    Supervised,
    http_get,
    supervised,
    wait_pid_gone,
    write_behavior,
)


def _refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=10):
            return False
    except ConnectionRefusedError:
        return True


def test_listener_shut_down_by_a_release_is_reported_and_rebound(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior, shutdown_on_drain=True)  # release 1 shuts fd 3 down on its way out
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)}) as s:
        address = s.address()
        # Release 2 accepts on nothing: the dead socket makes it spin in no accept loop.
        write_behavior(behavior, serve=False)
        mark = s.log_mark()
        assert s.upgrade()["ok"]
        s.wait_log(r"\| shutting down listener fd=3", start=mark)
        s.wait_log(r"event=listener.dead name=http address=127\.0\.0\.1:\d+ gen=2 ", start=mark)
        assert _refused(address)  # the kernel refuses: the one shared socket is dead
        st = s.status()
        assert any("listener http" in w and "does not listen" in w for w in st["warnings"])
        assert st["listeners"][0]["listening"] is False
        text = s.cli("status").stdout  # the listener line says it too, not only the warning
        assert re.search(r"^  http +127\.0\.0\.1:\d+ +\(bound\)  listening: no$", text, re.M), text
        # The next release gets a new socket at the same address and serves.
        write_behavior(behavior, version="v3")
        mark = s.log_mark()
        assert s.upgrade()["ok"]
        s.wait_log(r"event=listener.rebound name=http ", start=mark)
        assert s.address() == address
        status, body = http_get(address)
        assert (status, body.split()[0]) == (200, "v3")
        st = s.status()
        assert st["listeners"][0]["listening"] is True
        assert not any("listener http" in w for w in st["warnings"])


NOTIFY_ONLY = [sys.executable, str(ROOT / "tests" / "apps" / "notify_only.py")]


def test_stateful_mode_refuses_a_worker_without_swapd_worker(tmp_path: Path) -> None:
    """gunicorn & co. cannot hand over state: refused at once (exit 2, one line), not
    SIGKILLed 30 s after start with a late READY and a `swapd stop` hanging meanwhile."""
    control = tmp_path / "ctl.sock"
    proc = subprocess.run(
        [*SWAPD, "run", "--control", str(control), "--bind", "http=127.0.0.1:0",
         "--mode", "stateful", "--ready-timeout", "600", "--restore-timeout", "600", "--",
         *NOTIFY_ONLY], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--mode stateful needs workers that use swapd.worker" in last
    assert "reported ready via notify and never spoke the channel" in last
    assert "run it with --mode stateless" in last
    pid = int(re.search(r"gen=1 worker=0 pid=(\d+)", last).group(1))  # type: ignore[union-attr]
    assert wait_pid_gone(pid, 10)
    assert not control.exists()


def test_stop_during_start_does_not_wait_for_readiness(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior, never_ready=True)
    s = Supervised(tmp_path, MISBEHAVE, args=["--ready-timeout", "600"],
                   env={"BEHAVIOR": str(behavior)})
    try:
        s.launch()
        m = s.wait_log(r"gen=1 worker=0 pid=(\d+)\| never getting ready, as told")
        worker = int(m.group(1))
        s.worker_pids.add(worker)
        stop = s.cli("stop", timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert s.wait_exit(30) == 0
        s.wait_log(r'event=start.cancelled reason="stop requested"')
        assert wait_pid_gone(worker, 10)
        assert s.notify.seen == [] or all("READY" not in m for m in s.notify.seen)
    finally:
        s.stop()


def test_restart_after_a_supervisor_crash_waits_for_the_orphans(tmp_path: Path) -> None:
    """SIGKILL the supervisor: its worker (told by PR_SET_PDEATHSIG) drains, holding the
    port while a keep-alive connection is open. A new supervisor on the same port says
    why it waits, and serves once the orphan is gone: no "address already in use"."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    crashed = Supervised(tmp_path / "one", MISBEHAVE, args=["--idle-grace", "600"])
    restarted: Supervised | None = None
    try:
        crashed.start()
        host, port = crashed.address()
        (orphan,) = crashed.active_pids()
        client = socket.create_connection((host, port), timeout=10)
        with contextlib.closing(client):
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200")  # idle keep-alive from here
            os.kill(crashed.pid, signal.SIGKILL)
            assert crashed.wait_exit(30) == -signal.SIGKILL
            restarted = Supervised(tmp_path / "two", MISBEHAVE, binds=(f"http={host}:{port}",))
            restarted.launch()
            restarted.wait_log(rf"event=listener.busy address={host}:{port} holders={orphan} "
                               r'reason="workers of an earlier swapd')
        # The connection closed: the orphan's drain ends, and it exits.
        assert wait_pid_gone(orphan, 30)
        restarted.start()
        restarted.wait_log(rf"event=listener.holder_exited address={host}:{port} pid={orphan}")
        status, body = http_get((host, port))
        assert status == 200 and int(body.split()[1]) in restarted.active_pids()
    finally:
        crashed.stop()
        if restarted is not None:
            restarted.stop()


def test_a_port_held_by_something_else_fails_at_once_naming_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([*SWAPD, "run", "--control", str(tmp_path / "ctl.sock"), "--bind",
                               f"http=127.0.0.1:{port}", "--", *MISBEHAVE], capture_output=True,
                              text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"swapd: cannot bind 127.0.0.1:{port}: address already in use (held by pid "
        f"{os.getpid()} ({psutil.Process().name()}))"]


def test_a_second_swapd_on_a_live_supervisors_port_fails_at_once_naming_it(
        tmp_path: Path) -> None:
    """The operator forgot the first `swapd run`. Its workers carry SWAPD_GENERATION, but
    their supervisor is alive: nothing will drain, so the second start fails at once
    (it waited out the workers' drain deadline, here 600 s, blaming "a crashed
    supervisor"), naming the supervisor, its control socket and every process holding
    the socket (psutil names only one)."""
    (tmp_path / "one").mkdir()
    with supervised(tmp_path / "one", MISBEHAVE,
                    args=["--workers", "2", "--drain-timeout", "600"]) as live:
        host, port = live.address()
        workers = sorted(live.active_pids())
        proc = subprocess.run([*SWAPD, "run", "--control", str(tmp_path / "two.sock"),
                               "--bind", f"http={host}:{port}", "--", *MISBEHAVE],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert proc.returncode == 2, proc.stderr
        assert "event=listener.busy" not in proc.stderr
        name = psutil.Process(workers[0]).name()
        held = ", ".join([f"pid {live.pid} ({psutil.Process(live.pid).name()}, a running swapd "
                          "supervisor)",
                          *(f"pid {w} ({name}, gen=1 worker of the running swapd pid "
                            f"{live.pid})" for w in workers)])
        assert proc.stderr.strip().splitlines()[-1] == (
            f"swapd: cannot bind {host}:{port}: address already in use (held by the running "
            f"swapd pid {live.pid} (control {live.control}): {held})")
        assert live.status()["generations"][0]["state"] == "active"  # untouched
