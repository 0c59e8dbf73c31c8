"""Signals, and at most one swap in flight: joins, refusals, SIGHUP bursts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.supervised import (
    HELLO,
    MISBEHAVE,
    SWAPD,
    Supervised,
    http_get,
    open_gate,
    supervised,
    wait_pid_gone,
    write_behavior,
)


def test_sighup_reloads(tmp_path: Path) -> None:
    with supervised(tmp_path, HELLO) as s:
        mark = s.log_mark()
        os.kill(s.pid, signal.SIGHUP)
        s.wait_log(r"event=swap.commit kind=reload gen=2", start=mark)
        assert s.status()["active"] == 2
        s.notify.wait_for("RELOADING", "1")
        ready = s.notify.wait_for("READY", "1")
        assert "gen 2 active" in ready["STATUS"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_finishes_requests(tmp_path: Path, sig: signal.Signals) -> None:
    """TERM/INT drain: a request in flight completes, then exit 0."""
    behavior = tmp_path / "b.json"
    write_behavior(behavior, version="v1")
    s = Supervised(tmp_path, [*MISBEHAVE], env={"BEHAVIOR": str(behavior)})
    try:
        s.start()
        pids = s.active_pids()
        addr = s.address()
        results: list[tuple[int, str]] = []
        t = threading.Thread(target=lambda: results.append(http_get(addr, "/slow")))
        t.start()
        s.wait_log(r"\| slow request in flight")
        os.kill(s.pid, sig)
        s.notify.wait_for("STOPPING", "1")
        assert s.wait_exit(60) == 0
        t.join(30)
        assert results == [(200, "slow done")]
        for pid in pids:
            assert wait_pid_gone(pid, 10)
        assert not os.path.exists(s.control)
    finally:
        s.stop()


def test_sigquit_fast_stop(tmp_path: Path) -> None:
    s = Supervised(tmp_path, HELLO)
    try:
        s.start()
        pids = s.active_pids()
        os.kill(s.pid, signal.SIGQUIT)
        assert s.wait_exit(30) == 0
        for pid in pids:
            assert wait_pid_gone(pid, 10)
        s.wait_log(r"event=supervisor.stopping fast=True")
    finally:
        s.stop()


@pytest.fixture
def gated(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A service whose next generation waits at a FIFO gate before ready()."""
    behavior = tmp_path / "b.json"
    gate = tmp_path / "gate"
    for slot in range(2):
        os.mkfifo(f"{gate}-{slot}")
    write_behavior(behavior, version="v1")
    with supervised(tmp_path, MISBEHAVE, args=["--workers", "2"],
                    env={"BEHAVIOR": str(behavior)}) as s:
        write_behavior(behavior, version="v2", gate=str(gate))
        yield s, gate


def _open_gate(gate: Path, workers: int) -> None:
    """Let each gated worker through; open() blocks until that worker waits at its FIFO."""
    for slot in range(workers):
        with open(f"{gate}-{slot}", "w") as f:
            f.write("go\n")


def _start_cli(s: Supervised, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*SWAPD, *argv, "--control", s.control], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_second_upgrade_joins_and_reload_is_refused(gated) -> None:  # type: ignore[no-untyped-def]
    s, gate = gated
    first = _start_cli(s, "upgrade")
    assert first.stdout is not None
    assert "started 2 worker(s)" in first.stdout.readline()  # the swap is in flight
    old_pids = s.active_pids()
    assert s.status()["swap"]["kind"] == "upgrade"
    # the readiness gate holds: old generation serves while the new one is not ready
    assert http_get(s.address())[1].startswith("v1 ")

    second = _start_cli(s, "upgrade")
    assert second.stdout is not None
    assert "joined the upgrade in flight (gen=2)" in second.stdout.readline()

    refused = s.cli("reload")
    assert refused.returncode == 1
    assert "an upgrade is in flight (gen=2" in refused.stderr

    # A SIGHUP is not refused: it asks for one reload after the upgrade (RELOADING=1 at
    # once for systemd >= 253, whose READY=1 comes at the end of that reload).
    mark = s.log_mark()
    os.kill(s.pid, signal.SIGHUP)
    s.wait_log(r'event=signal.deferred name=SIGHUP until="the upgrade in flight \(gen=2\)"',
               start=mark)
    assert "SIGHUP reload refused" not in s.notify.wait_for("RELOADING", "1")["STATUS"]
    _open_gate(gate, 2)
    out1, _ = first.communicate(timeout=60)
    out2, _ = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0
    assert "gen=2 active" in out1 and "gen=2 active" in out2
    assert set(s.active_pids()).isdisjoint(old_pids)
    _open_gate(gate, 2)  # the reload that followed: gen 3, gated like gen 2
    s.wait_log(r"event=swap.commit kind=reload gen=3", start=mark)
    ready = s.notify.wait_for("READY", "1")  # the upgrade's end sent none: a reload followed
    assert "gen 3 active" in ready["STATUS"]
    st = s.status()
    assert st["active"] == 3 and st["swap"] is None and st["swaps"]["ok"] == 2


def test_sighup_burst_during_a_reload_makes_exactly_one_more(gated) -> None:  # type: ignore[no-untyped-def]
    """The reload in flight has read its configuration: SIGHUPs after that (any number)
    may be about a newer one, so they make one more reload after it, never more."""
    s, gate = gated
    mark = s.log_mark()
    os.kill(s.pid, signal.SIGHUP)
    s.wait_log(r"event=swap.start kind=reload origin=SIGHUP", start=mark)
    s.status()  # a round trip: the reload in flight has read its configuration
    for _ in range(1000):
        os.kill(s.pid, signal.SIGHUP)
    s.status()  # every signal sent before this has been handled
    s.wait_log(r'event=signal.deferred name=SIGHUP until="the reload in flight \(gen=2\)"',
               start=mark)
    _open_gate(gate, 2)  # gen 2
    s.wait_log(r"event=swap.commit kind=reload gen=2", start=mark)  # its gates are closed
    _open_gate(gate, 2)  # gen 3, the one more, gated the same way
    s.wait_log(r"event=swap.commit kind=reload gen=3", start=mark)
    st = s.status()
    assert st["active"] == 3 and st["swap"] is None
    assert st["swaps"] == {"ok": 2, "failed": 0}
    assert s.log_text().count("event=swap.start") == 2
    assert s.log_text().count("event=signal.deferred") == 1


def test_a_reload_says_what_it_could_not_apply(tmp_path: Path) -> None:
    """Operator review L4: keys that need a restart are warnings of the reload's result,
    printed by `swapd reload`, kept in status' last swap; the swap itself goes on."""
    cfg = tmp_path / "swapd.toml"
    command = f"command = {list(HELLO)!r}\n".replace("'", '"')
    cfg.write_text(command)
    with supervised(tmp_path, [], args=["--config", str(cfg)]) as s:
        history = s.status()["history"]
        cfg.write_text(command + f'state_dir = "{tmp_path / "elsewhere"}"\n'
                       'metrics = "127.0.0.1:0"\nfdstore = false\n')
        proc = s.cli("reload")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        for key in ("state_dir", "metrics", "fdstore"):
            assert re.search(rf"^swapd: WARNING: {key} changed in the configuration .*: not "
                             r"applied, it needs a restart; still ", out, re.M), out
        assert "still none" in out  # metrics: none was bound at start
        st = s.status()
        assert st["active"] == 2 and st["history"] == history and st["metrics"] is None
        warnings = st["last_swap"]["warnings"]
        assert [w.split(" ", 1)[0] for w in warnings] == ["metrics", "state_dir", "fdstore"]
        # a reload that changes nothing of the kind says nothing of the kind
        cfg.write_text(command)
        proc = s.cli("reload")
        assert proc.returncode == 0 and "WARNING" not in proc.stdout, proc.stdout
        assert s.status()["last_swap"]["warnings"] == []


def test_an_upgrade_joins_only_the_swap_that_gives_it_what_it_asks(gated) -> None:  # type: ignore[no-untyped-def]
    """Operator review M2: a second upgrade asking another release or watch window is
    refused (exit 1, one line naming what is in flight); with none, or the same, it joins."""
    s, gate = gated
    first = _start_cli(s, "upgrade", "--release", "v2")
    assert first.stdout is not None
    assert "started 2 worker(s)" in first.stdout.readline()  # the swap is in flight
    other = s.cli("upgrade", "--release", "v3", "--watch", "60")
    assert other.returncode == 1, other
    assert other.stderr.strip().splitlines() == [
        "swapd upgrade: FAILED: an upgrade with release v2, watch 0s is in flight (gen=2); "
        "not joined: this request asks for release v3, watch 60s; retry when it finishes"]
    assert s.cli("upgrade", "--watch", "30").returncode == 1
    joiners = [_start_cli(s, "upgrade"), _start_cli(s, "upgrade", "--release", "v2",
                                                    "--watch", "0")]
    for joiner in joiners:
        assert joiner.stdout is not None
        assert "joined the upgrade in flight (gen=2)" in joiner.stdout.readline()
    _open_gate(gate, 2)
    for proc in (first, *joiners):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "gen=2 active" in out, out + err
    st = s.status()
    gen2 = next(g for g in st["generations"] if g["id"] == 2)
    assert st["active"] == 2 and gen2["release"] == "v2" and st["watch"] is None
    refused = [e for e in s.result("history", n=10)["data"]["entries"]
               if e["outcome"] == "refused"]
    assert len(refused) == 2 and "not joined" in refused[0]["reason"]


DEAF = """\
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("deaf to SIGTERM", flush=True)
while True:
    time.sleep(3600)
"""


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return proc.stdout.readline()


@pytest.mark.parametrize("how", ["stop --fast", "SIGQUIT", "SIGTERM"])
def test_a_graceful_stop_can_be_escalated(tmp_path: Path, how: str) -> None:
    """Operator review M1: while a graceful stop waits for a worker deaf to SIGTERM (drain
    deadline 300 s), `stop --fast`, SIGQUIT or a second SIGTERM kill it and end the stop
    now; another graceful `stop` is told a stop is in progress and waits for it."""
    app = tmp_path / "deaf.py"
    app.write_text(DEAF)
    s = Supervised(tmp_path, [sys.executable, str(app)],
                   args=["--readiness", "exec", "--drain-timeout", "300"])
    waiting: list[subprocess.Popen[str]] = []
    try:
        s.start()
        (worker,) = s.active_pids()
        s.wait_log(r"\| deaf to SIGTERM")
        if how == "stop --fast":
            waiting.append(_start_cli(s, "stop"))
        else:
            os.kill(s.pid, signal.SIGTERM)
        s.wait_log(r"event=supervisor.stopping fast=False")
        s.notify.wait_for("STOPPING", "1")
        again = _start_cli(s, "stop")
        waiting.append(again)
        assert re.fullmatch(r"swapd: a graceful stop is already in progress \(asked \d+s ago, "
                            r"over within \d+s at most\): waiting for it; `swapd stop --fast` "
                            r"kills the draining workers now\n", _first_line(again, 30))
        os.kill(worker, 0)  # still there: draining, deaf
        if how == "stop --fast":
            fast = s.cli("stop", "--fast", timeout=60)
            assert fast.returncode == 0, fast.stderr
            assert fast.stdout.splitlines() == [
                "swapd: the graceful stop in progress is now a fast one: the draining "
                "workers are killed", "swapd stop: stopped"]
        else:
            os.kill(s.pid, getattr(signal, how))
        assert s.wait_exit(60) == 0
        assert wait_pid_gone(worker, 10)
        origin = "origin=control client_pid=\\d+ client_uid=\\d+" if how == "stop --fast" \
            else f"origin={how}"
        s.wait_log(rf"event=stop.escalated {origin} killed=1 after=[\d.]+s")
        for proc in waiting:  # everyone who asked for the stop hears it ended
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0 and out.endswith("swapd stop: stopped\n"), out + err
    finally:
        for proc in waiting:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        s.stop()


def test_a_sighup_during_the_first_start_reloads_once_it_is_ready(tmp_path: Path) -> None:
    """Operator review L8: not refused (the edit written meanwhile would be missed) but
    deferred: one reload once the first generation is ready, announced after READY=1."""
    behavior = tmp_path / "b.json"
    gate = tmp_path / "gate"
    os.mkfifo(f"{gate}-0")
    write_behavior(behavior, version="v1", gate=str(gate), say="gen 1 read its behaviour")
    s = Supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)})
    try:
        s.launch()
        s.wait_log(r"event=supervisor.start ")  # its signal handlers are in place
        mark = s.log_mark()
        for _ in range(3):
            os.kill(s.pid, signal.SIGHUP)
        s.wait_log(r'event=signal.deferred name=SIGHUP until="the first start"', start=mark)
        s.wait_log(r"\| gen 1 read its behaviour")
        write_behavior(behavior, version="v2")  # the edit the reload must not miss
        assert open_gate(f"{gate}-0", 30)
        first = s.notify.wait_for("READY", "1")
        assert "gen 1 active" in first["STATUS"]
        s.wait_log(r"event=swap.commit kind=reload gen=2", start=mark)
        assert s.notify.wait_for("RELOADING", "1")
        assert "gen 2 active" in s.notify.wait_for("READY", "1")["STATUS"]
        s.status()
        assert http_get(s.address())[1].startswith("v2 ")
        log = "\n".join(s.log_lines[mark:])
        assert log.count("event=swap.start") == 1 and "signal.refused" not in log
    finally:
        s.stop()
