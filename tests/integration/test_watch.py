"""Watch windows and rollbacks with real processes, every path under load.

Stateless: a crash of a watched worker rolls back, and the only failed requests are those
the crashed worker had in flight; failed health probes roll back losing nothing. Stateful:
an unhealthy report hands every acknowledged write back to the held generation; a held
code that refuses the newer state version refuses the rollback and the watched generation
keeps serving, state intact; a crashed worker's slot comes back with its commit-time state.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from swapd.loadgen import BackgroundLoad, Outcome, fetch_sync, http_get, http_get_int, http_post
from tests.integration.supervised import (
    MISBEHAVE,
    Supervised,
    supervised,
    wait_pid_gone,
    write_behavior,
)
from tests.integration.supervised import (
    http_get as get_once,
)

pytestmark = pytest.mark.slow

CLIENTS = 16
LOAD: dict[str, Any] = {"clients": CLIENTS, "duration": 90.0, "max_requests": 500_000}


def gen_pids(s: Supervised, gen_id: int) -> list[int]:
    gen = next(g for g in s.status()["generations"] if g["id"] == gen_id)
    return [w["pid"] for w in gen["workers"]]


def post(address: tuple[str, int], path: str) -> int:
    import http.client

    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("POST", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def history(s: Supervised) -> list[dict[str, Any]]:
    res = s.result("history", n=50)
    assert res["ok"], res
    entries: list[dict[str, Any]] = res["data"]["entries"]
    return entries


def test_stateless_crash_rolls_back_losing_only_what_was_in_the_crashed_worker(
        tmp_path: Path) -> None:
    behavior = tmp_path / "behavior.json"
    write_behavior(behavior, version="v1")
    args = ["--workers", "2", "--watch", "120", "--release", "r1"]
    with supervised(tmp_path, MISBEHAVE, args=args, env={"BEHAVIOR": str(behavior)}) as s:
        old = gen_pids(s, 1)
        write_behavior(behavior, version="v2")
        with BackgroundLoad(s.address(), http_get("/"), mode="keepalive", **LOAD) as load:
            load.wait_for_successes(300, timeout=60)
            mark = s.log_mark()
            waiter = s.cli_background("upgrade", "--release", "r2", "--wait-watch")
            s.wait_log(r"event=watch\.start gen=2 release=r2 held=1 held_release=r1", start=mark)
            new = gen_pids(s, 2)
            s.worker_pids.update(new)
            load.wait_for_successes(300, timeout=60)  # gen 2 serves, gen 1 is held
            t_kill = time.monotonic()
            os.kill(new[0], signal.SIGKILL)
            assert wait_pid_gone(new[0], 10)
            t_dead = time.monotonic()
            s.wait_log(r"event=rollback\.done trigger=worker-exited gen=1 release=r1", start=mark)
            load.wait_for_successes(500, timeout=60)  # gen 1 serves again
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 1, (out, err)
        assert "rolled back to gen=1 (r1)" in err and f"pid={new[0]} killed by SIGKILL" in err
        report = load.report
        assert report is not None
        failed = [a for a in load.generator.attempts if a.outcome != Outcome.OK]
        # only what the crashed worker had in flight: one request per client at most,
        # each sent before the worker was gone
        assert len(failed) <= CLIENTS, report.format()
        assert all(a.t_start <= t_dead for a in failed), report.format()
        assert {a.outcome for a in failed} <= {Outcome.RESET, Outcome.EOF}, report.format()
        assert not [a for a in load.generator.attempts if a.t_start > t_dead and
                    a.outcome != Outcome.OK]
        assert t_kill <= t_dead
        st = s.status()
        assert st["active"] == 1 and st["watch"] is None
        assert gen_pids(s, 1) == old  # the same processes: revived, not restarted
        last = st["last_rollback"]
        assert last["outcome"] == "rolled-back" and last["trigger"] == "worker-exited"
        body = get_once(s.address())[1]
        assert body.startswith("v1 ") and int(body.split()[1]) in old
        kinds = [(e["kind"], e["outcome"]) for e in history(s)]
        assert kinds[-2:] == [("upgrade", "ok"), ("rollback", "ok")]
        entry = history(s)[-1]
        assert entry["who"] == {"via": "watch", "trigger": "worker-exited"}
        assert entry["release_before"] == "r2" and entry["release_after"] == "r1"


def test_stateless_failed_health_probes_roll_back_losing_nothing(tmp_path: Path) -> None:
    behavior = tmp_path / "behavior.json"
    write_behavior(behavior, version="v1")
    args = ["--workers", "2", "--watch", "120", "--health-url", "/healthz",
            "--health-interval", "0.2", "--health-failures", "2"]
    with supervised(tmp_path, MISBEHAVE, args=args, env={"BEHAVIOR": str(behavior)}) as s:
        write_behavior(behavior, version="v2", unhealthy_http=True)
        with BackgroundLoad(s.address(), http_get("/"), mode="close", **LOAD) as load:
            load.wait_for_successes(200, timeout=60)
            mark = s.log_mark()
            with load.window("upgrade and rollback"):
                res = s.result("upgrade")
                assert res["ok"] and res["data"]["watch"]["held"] == 1, res
                s.worker_pids.update(gen_pids(s, 2))
                s.wait_log(r'event=health\.failed gen=2 failures=2 of=2 reason="GET /healthz: '
                           r'status 503"', start=mark)
                s.wait_log(r"event=rollback\.done trigger=health-probe gen=1", start=mark)
            load.wait_for_successes(300, timeout=60)
        report = load.report
        assert report is not None
        assert report.failed == 0, report.format()
        assert all(w.ok > 0 for w in report.windows)
        st = s.status()
        assert st["active"] == 1
        assert "health probe failed 2 times in a row" in st["last_rollback"]["reason"]


def test_stateful_unhealthy_report_hands_every_write_back(tmp_path: Path) -> None:
    behavior = tmp_path / "behavior.json"
    # the held code restores its successor's newer state version: rollback possible
    write_behavior(behavior, state_version=1, accept_versions=[1, 2])
    args = ["--mode", "stateful", "--watch", "120"]
    with supervised(tmp_path, MISBEHAVE, args=args, env={"BEHAVIOR": str(behavior)}) as s:
        write_behavior(behavior, state_version=2)
        with BackgroundLoad(s.address(), http_post("/incr"), mode="keepalive", **LOAD) as load:
            load.wait_for_successes(300, timeout=60)
            mark = s.log_mark()
            with load.window("upgrade"):
                res = s.result("upgrade")
            assert res["ok"], res
            s.worker_pids.update(gen_pids(s, 2))
            load.wait_for_successes(300, timeout=60)  # written to gen 2 since the commit
            with load.window("rollback"):
                assert post(s.address(), "/sick") == 200  # only gen 2 accepts: it answers
                s.wait_log(r"event=rollback\.done trigger=unhealthy gen=1", start=mark)
            load.wait_for_successes(300, timeout=60)
        report = load.report
        assert report is not None
        print(report.format())
        assert report.failed == 0, report.format()
        final = fetch_sync(s.address(), http_get_int("/count"))
        assert report.acknowledged == final == report.max_acknowledged
        assert report.duplicate_values == 0 and report.value_regressions == 0
        st = s.status()
        assert st["active"] == 1
        last = st["last_rollback"]
        assert last["outcome"] == "rolled-back" and last["trigger"] == "unhealthy"
        assert "told to be sick" in last["reason"] and "pause" in last["timings_ms"]


def test_stateful_refused_rollback_and_a_crashed_worker(tmp_path: Path) -> None:
    behavior = tmp_path / "behavior.json"
    write_behavior(behavior, state_version=1)  # accepts its own version and older: not 2
    args = ["--mode", "stateful", "--watch", "120"]
    with supervised(tmp_path, MISBEHAVE, args=args, env={"BEHAVIOR": str(behavior)}) as s:
        address = s.address()
        for _ in range(6):
            assert post(address, "/incr") == 200
        write_behavior(behavior, state_version=2)
        assert s.result("upgrade")["ok"]
        s.worker_pids.update(gen_pids(s, 2))
        for _ in range(4):
            assert post(address, "/incr") == 200
        # refused: the held code does not take state version 2; gen 2 keeps serving
        done = s.cli("rollback")
        assert done.returncode == 1, done
        assert "swapd rollback: FAILED: rollback refused: gen=1 worker=0" in done.stderr
        assert "version 2" in done.stderr and "gen=2 keeps serving" in done.stderr, done.stderr
        st = s.status()
        assert st["active"] == 2 and st["watch"] is None
        assert [g["state"] for g in st["generations"] if g["id"] == 1] in ([], ["draining"])
        assert get_once(address, "/count")[1] == "10"  # its state untouched, serving
        # a crashed watched worker: the held one comes back with the state of the commit
        write_behavior(behavior, state_version=2, accept_versions=[1, 2])
        assert s.result("upgrade")["ok"]
        gen3 = gen_pids(s, 3)
        s.worker_pids.update(gen3)
        for _ in range(5):
            assert post(address, "/incr") == 200
        assert get_once(address, "/count")[1] == "15"
        mark = s.log_mark()
        os.kill(gen3[0], signal.SIGKILL)
        s.wait_log(r"event=rollback\.done trigger=worker-exited gen=2 .* lost_slots=0( |$)",
                   start=mark)
        st = s.status()
        assert st["active"] == 2 and st["last_rollback"]["lost_slots"] == [0]
        assert get_once(address, "/count")[1] == "10"  # lost: what only the dead worker had
        assert [e["outcome"] for e in history(s) if e["kind"] == "rollback"] == ["refused",
                                                                                "ok"]
