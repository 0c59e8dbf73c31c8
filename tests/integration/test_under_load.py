"""Swaps under concurrent load: zero failed requests, in both connection modes, nothing lost.

The loads are bounded in time and count; between swaps each test waits for a number of
successes (an event) rather than for time to pass, so every swap happens under load.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from swapd.loadgen import BackgroundLoad, fetch_sync, http_get, http_get_int, http_post
from tests.integration.supervised import HELLO, PY, ROOT, Supervised, supervised

pytestmark = pytest.mark.slow

COUNTER = [PY, str(ROOT / "examples" / "counter.py")]
LOAD = {"clients": 16, "duration": 120.0, "max_requests": 1_000_000}
MODES = ["close", "keepalive"]


def swaps_under(load: BackgroundLoad, s: Supervised, count: int, between: int = 200) -> None:
    for i in range(count):
        load.wait_for_successes(between, timeout=60)
        with load.window(f"swap {i + 1}"):
            res = s.result("upgrade")
        assert res["ok"], res
    load.wait_for_successes(between, timeout=60)


@pytest.mark.parametrize("mode", MODES)
def test_stateless_upgrades_under_load(tmp_path: Path, mode: str) -> None:
    with supervised(tmp_path, HELLO, args=["--workers", "2"]) as s:
        with BackgroundLoad(s.address(), http_get("/"), mode=mode, **LOAD) as load:
            swaps_under(load, s, 8)
        report = load.report
        assert report is not None
        print(report.format())
        assert report.failed == 0, report.format()
        assert report.ok >= 9 * 200
        assert all(w.ok > 0 for w in report.windows)
        assert s.status()["active"] == 9
        if mode == "keepalive":
            assert report.connections_opened < report.ok, "connections were really reused"


@pytest.mark.parametrize("mode", MODES)
def test_stateful_counter_loses_nothing(tmp_path: Path, mode: str) -> None:
    """Every acknowledged POST /incr is in the final count, across 20 stateful swaps."""
    with supervised(tmp_path, COUNTER, args=["--mode", "stateful"]) as s:
        with BackgroundLoad(s.address(), http_post("/incr"), mode=mode, **LOAD) as load:
            swaps_under(load, s, 20, between=100)
        report = load.report
        assert report is not None
        print(report.format())
        assert report.failed == 0, report.format()
        final = fetch_sync(s.address(), http_get_int("/count"))
        assert report.acknowledged == final == report.max_acknowledged
        assert report.duplicate_values == 0 and report.value_regressions == 0
        assert s.status()["active"] == 21


GUNICORN = shutil.which("gunicorn", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(GUNICORN is None, reason="gunicorn is in the test extra; not installed")
def test_gunicorn_worker_under_load(tmp_path: Path) -> None:
    assert GUNICORN is not None
    command = [GUNICORN, "--workers", "2", "--no-control-socket", "--chdir",
               str(ROOT / "tests" / "apps"), "wsgi_app:app"]
    with supervised(tmp_path, command, env={"HOME": str(tmp_path)}) as s:
        with BackgroundLoad(s.address(), http_get("/"), mode="close", **LOAD) as load:
            swaps_under(load, s, 4)
        assert load.report is not None
        assert load.report.failed == 0, load.report.format()


class Scoreboard:
    """Counts acknowledged scores of all players; tests wait on it (events, not time)."""

    def __init__(self) -> None:
        self.total = 0
        self.errors: list[str] = []
        self.cond = threading.Condition()

    def add(self) -> None:
        with self.cond:
            self.total += 1
            self.cond.notify_all()

    def wait_more(self, count: int, timeout: float = 30) -> None:
        with self.cond:
            target = self.total + count
            assert self.cond.wait_for(lambda: self.total >= target or self.errors, timeout)
            assert not self.errors, self.errors


class Player:
    """A game client on one long-lived TCP connection."""

    def __init__(self, address: tuple[str, int], name: str) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.file = self.sock.makefile("rwb")
        self.name = name
        self.local = self.sock.getsockname()
        self.acknowledged = 0
        assert self.cmd(f"NAME {name}").startswith(f"WELCOME {name}")

    def cmd(self, text: str) -> str:
        self.file.write(text.encode() + b"\n")
        self.file.flush()
        reply = self.file.readline().decode().strip()
        assert reply, f"{self.name}: connection closed"
        return reply

    def play(self, stop: threading.Event, board: Scoreboard) -> None:
        try:
            for _ in range(100_000):  # bounded; the test stops it much earlier
                if stop.is_set():
                    return
                reply = self.cmd("SCORE 3")
                assert reply.startswith("SCORE score="), reply
                self.acknowledged += 3
                board.add()
        except Exception as e:  # reported through the scoreboard
            with board.cond:
                board.errors.append(f"{self.name}: {e!r}")
                board.cond.notify_all()


def test_game_players_keep_scores_across_v1_to_v2(tmp_path: Path) -> None:
    """Players connected during the upgrade keep their connection and every point."""
    cfg = tmp_path / "game.toml"
    game = ROOT / "examples" / "game"

    def write(version: str) -> None:
        cfg.write_text(f"command = {json.dumps([PY, str(game / version)])}\n"
                       'mode = "stateful"\n[bind]\ngame = "127.0.0.1:0"\n')

    write("game_v1.py")
    with supervised(tmp_path, [], args=["--config", str(cfg)], binds=[]) as s:
        address = s.address("game")
        players = [Player(address, f"p{i}") for i in range(10)]
        board, stop = Scoreboard(), threading.Event()
        threads = [threading.Thread(target=p.play, args=(stop, board)) for p in players]
        for t in threads:
            t.start()
        try:
            board.wait_more(300)
            write("game_v2.py")
            res = s.result("reload")
            assert res["ok"], res
            board.wait_more(300)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert board.errors == []
        for p in players:
            assert p.sock.getsockname() == p.local, "still the same connection"
            reply = p.cmd("ME")
            assert reply == (f"ME {p.name} score={p.acknowledged} level="
                             f"{1 + p.acknowledged // 100} exp={p.acknowledged}"), reply
            p.sock.close()
