"""Operations with a real supervisor: the history across restarts and re-execs (and a
torn line), the metrics endpoint scraped by a real client, JSON logs, and worker
output passed through untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.supervised import (
    HELLO,
    MISBEHAVE,
    PY,
    ROOT,
    SWAPD,
    Supervised,
    supervised,
    write_behavior,
)

pytestmark = pytest.mark.slow

SHOP = [PY, str(ROOT / "examples" / "patching" / "shop.py")]
FIX = str(ROOT / "examples" / "patching" / "fix_rules.py")


def history(s: Supervised) -> list[dict[str, Any]]:
    res = s.result("history", n=100)
    assert res["ok"], res
    entries: list[dict[str, Any]] = res["data"]["entries"]
    return entries


def last_swap_gauges(address: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {x.name: x.value for f in text_string_to_metric_families(text) for x in f.samples
            if x.name.startswith("swapd_last_swap")}


def test_history_across_restart_reexec_and_a_torn_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    control = str(tmp_path / "swapd.sock")
    args = ["--state-dir", str(state), "--release", "r1"]
    (tmp_path / "a").mkdir()
    with supervised(tmp_path / "a", HELLO, args=[*args, "--metrics", "127.0.0.1:0"],
                    control=control) as s:
        assert s.result("upgrade", release="r2")["ok"]
        last_swap = last_swap_gauges(s.status()["metrics"])
        assert last_swap["swapd_last_swap_success"] == 1
        reexec = s.cli("upgrade", "--self")
        assert reexec.returncode == 0, reexec
        # The new image's counters start from 0, but it knows how the last swap went.
        assert last_swap_gauges(s.status()["metrics"]) == last_swap
        entries = history(s)  # the new image appends to the file the old one wrote
        assert [(e["kind"], e["outcome"]) for e in entries] == [
            ("start", "ok"), ("upgrade", "ok"), ("reexec", "ok")]
        me = {"via": "control", "uid": os.getuid()}
        assert {k: entries[1]["who"][k] for k in me} == me
        assert entries[1]["release_before"] == "r1" and entries[1]["release_after"] == "r2"
        assert entries[2]["who"]["via"] == "control" and entries[2]["version_after"]
        status = s.status()
        assert status["history"] == str(state / "history.jsonl")
        assert [g["release"] for g in status["generations"] if g["state"] == "active"] == ["r2"]
    # no supervisor: the CLI reads the file itself
    offline = subprocess.run([*SWAPD, "history", "--control", control, "--state-dir",
                              str(state), "--json"], capture_output=True, text=True,
                             timeout=60, cwd=str(ROOT))
    assert offline.returncode == 0, offline
    kinds = [e["kind"] for e in json.loads(offline.stdout)["data"]["entries"]]
    assert kinds == ["start", "upgrade", "reexec", "stop"]
    assert json.loads(offline.stdout)["data"]["entries"][-1]["who"] == {
        "via": "signal", "signal": "SIGTERM"}
    # a restart appends to the same history; patches, windows and rollbacks go in it too
    (tmp_path / "b").mkdir()
    with supervised(tmp_path / "b", SHOP, args=args, control=control) as s:
        assert [e["kind"] for e in history(s)] == ["start", "upgrade", "reexec", "stop",
                                                   "start"]
        text = s.cli("history", "-n", "2")
        assert text.returncode == 0 and text.stdout.count("\n") == 2, text
        assert "stop" in text.stdout and "by SIGTERM" in text.stdout
        assert s.cli("patch", FIX, "--module", "rules").returncode == 0
        assert s.cli("patch", "--rollback").returncode == 0
        opened = s.cli("upgrade", "--watch", "60", "--release", "r3")
        assert opened.returncode == 0, opened
        assert "gen=1 held for a 60s watch window" in opened.stdout
        busy = s.cli("upgrade")  # nothing else changes the service during a window
        assert busy.returncode == 1 and "a watch window is open on gen=2" in busy.stderr
        back = s.cli("rollback")
        assert back.returncode == 0, back
        assert "swapd rollback: ok: gen=1 (r1) active again, gen=2 (r3) draining" in back.stdout
        passed = s.cli("upgrade", "--watch", "0.5", "--wait-watch", "--release", "r4")
        assert passed.returncode == 0 and "watch window passed" in passed.stdout, passed
        late = s.cli("rollback")
        assert late.returncode == 1 and "no watch window is open" in late.stderr, late
        assert "(gen=1, release r1, was let go when the window of gen=3 ended: passed)" in (
            late.stderr)
        entries = history(s)[5:]
        assert [(e["kind"], e["outcome"]) for e in entries] == [
            ("patch", "ok"), ("patch.rollback", "ok"), ("upgrade", "ok"),
            ("upgrade", "refused"), ("rollback", "ok"), ("upgrade", "ok"),
            ("watch", "passed")]
        assert entries[0]["module"] == "rules" and entries[4]["who"]["via"] == "control"
        assert entries[4]["trigger"] == "manual" and entries[6]["release_before"] == "r4"
    # a file cut in the middle of a line (a crash of the machine, or an older swapd's torn
    # write at ENOSPC): the line is skipped and counted, the file and its record kept
    path = state / "history.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    before = len(data.splitlines()) - 1
    (tmp_path / "c").mkdir()
    with supervised(tmp_path / "c", HELLO, args=args, control=control) as s:
        st = s.status()
        assert [w for w in st["warnings"] if "history" in w] == []
        res = s.result("history", n=100)["data"]
        assert res["unreadable_lines"] == 1
        assert [(e["kind"], e["outcome"]) for e in res["entries"][before - 2:]] == [
            ("upgrade", "ok"), ("watch", "passed"), ("start", "ok")]
        assert [p.name for p in state.iterdir()] == ["history.jsonl"]
        s.wait_log(r"event=history.bad_lines path=\S+ count=1 action=skipped")
    assert path.read_bytes().startswith(data[:-10] + b"\n{")


def test_rollback_after_the_window_names_the_previous_release_directory(tmp_path: Path) -> None:
    """With the release-directory layout, `swapd rollback` outside a window names the
    directory to point `current` at: the release before the active one, from the history
    (so also after a plain upgrade, and after a restart)."""
    top = tmp_path / "srv"
    for release in ("v41", "v42"):
        (top / "releases" / release).mkdir(parents=True)
        for name in ("hello.py", "httpkit.py"):
            shutil.copy(ROOT / "examples" / name, top / "releases" / release / name)
    current = top / "current"
    current.symlink_to("releases/v41")
    args = ["--cwd", str(current), "--state-dir", str(tmp_path / "state")]
    control = str(tmp_path / "swapd.sock")
    want = (f"point the `current` symlink at {top / 'releases' / 'v41'} and run "
            "`swapd upgrade`")
    (tmp_path / "a").mkdir()
    with supervised(tmp_path / "a", [PY, "hello.py"], args=args, control=control) as s:
        tmp = top / "current.new"
        tmp.symlink_to("releases/v42")
        tmp.rename(current)
        assert s.result("upgrade")["ok"]  # no window
        late = s.cli("rollback")
        assert late.returncode == 1 and "no watch window is open" in late.stderr, late
        assert want in late.stderr, late.stderr
    (tmp_path / "b").mkdir()
    with supervised(tmp_path / "b", [PY, "hello.py"], args=args, control=control) as s:
        assert [g["release"] for g in s.status()["generations"]] == ["v42"]
        late = s.cli("rollback")
        assert late.returncode == 1 and want in late.stderr, late.stderr


def test_metrics_scraped_and_json_logs(tmp_path: Path) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    args = ["--workers", "2", "--metrics", "127.0.0.1:0", "--log-format", "json",
            "--release", "m1"]
    with supervised(tmp_path, HELLO, args=args) as s:
        address = s.status()["metrics"]

        def scrape() -> tuple[str, list[Any]]:
            request = urllib.request.Request(
                f"http://{address}/metrics", headers={"Accept": "application/openmetrics-text"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                text = resp.read().decode()
            return text, [x for f in text_string_to_metric_families(text) for x in f.samples]

        # No swap yet: no "last swap" to fail an alert on.
        text, samples = scrape()
        assert not [x for x in samples if x.name.startswith("swapd_last_swap")], text
        assert s.result("upgrade", release="m2", watch=120)["ok"]  # gen 1 held
        text, samples = scrape()

        def value(name: str, **labels: str) -> float:
            for x in samples:
                if x.name == name and all(x.labels.get(k) == v for k, v in labels.items()):
                    return float(x.value)
            raise AssertionError(f"no {name}{labels} in:\n{text}")

        assert value("swapd_swaps_total", kind="upgrade", outcome="ok") == 1
        assert value("swapd_swap_duration_seconds_count", kind="upgrade") == 1
        assert value("swapd_release_info", release="m2", generation="2", state="active") == 1
        assert value("swapd_release_info", release="m1", generation="1", state="held") == 1
        assert value("swapd_watch_remaining_seconds") > 60
        assert value("swapd_workers", state="ready", generation_state="active") == 2
        assert value("swapd_listener_queue_max", listener="http") == 1024
        assert value("swapd_listener_queue_length", listener="http") >= 0
        assert value("process_open_fds") > 5
        assert value("process_resident_memory_bytes") > 1e6
        assert value("swapd_last_swap_success") == 1
        assert value("swapd_last_swap_timestamp_seconds") > 0
        s.wait_log(r'"event": "metrics.listening"')
        gen1 = [w["pid"] for g in s.status()["generations"] if g["id"] == 1
                for w in g["workers"]]
    # stopped with the window open: the held generation drained like the active one
    assert s.proc is not None and s.proc.returncode == 0
    lines = [line for line in s.log_lines if line != "<EOF>"]
    objects = [json.loads(line) for line in lines]  # every line is one JSON object
    commit = next(o for o in objects if o.get("event") == "swap.commit")
    assert commit["kind"] == "upgrade" and commit["gen"] == 2
    assert isinstance(commit["timings_ms"], dict) and commit["timings_ms"]["ready"] > 0
    assert {"event": "gen.state", "gen": 1, "from": "held", "to": "draining"}.items() <= next(
        o for o in objects if o.get("event") == "gen.state" and o.get("from") == "held").items()
    exits = {o["pid"]: o["status"] for o in objects if o.get("event") == "worker.exit"}
    assert all(exits.get(pid) == "exited with status 0" for pid in gen1), exits
    spawn = next(o for o in objects if o.get("event") == "worker.spawn")
    assert {"gen", "worker", "pid", "role", "time", "level", "swapd_pid"} <= set(spawn)


class Captured(Supervised):
    """A supervisor whose stdout is kept too (worker output passthrough)."""

    def start(self, timeout: float = 30.0) -> Supervised:
        self.stdout_lines: list[str] = []
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=str(ROOT))
        self._log_thread = threading.Thread(target=self._read_log, daemon=True)
        self._log_thread.start()
        self._out_thread = threading.Thread(target=self._read_out, daemon=True)
        self._out_thread.start()
        try:
            self.notify.wait_for("READY", "1", timeout)
        except TimeoutError:
            raise AssertionError(f"supervisor not ready; log:\n{self.log_text()}") from None
        self.status()
        return self

    def _read_out(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._log_cond:
                self.stdout_lines.append(line)
                self._log_cond.notify_all()

    def wait_stdout(self, line: str, timeout: float = 30.0) -> None:
        with self._log_cond:
            if not self._log_cond.wait_for(lambda: line in self.stdout_lines, timeout):
                raise AssertionError(f"{line!r} not on stdout: {self.stdout_lines}")


def test_worker_output_passthrough(tmp_path: Path) -> None:
    behavior = tmp_path / "behavior.json"
    said = '{"app": "json", "msg": "started \\"quoted\\"", "n": 1}'
    write_behavior(behavior, say=said)
    s = Captured(tmp_path, MISBEHAVE, args=["--worker-output", "passthrough"],
                 env={"BEHAVIOR": str(behavior)})
    try:
        s.start()
        s.wait_stdout(said + "\n")  # the worker's own bytes on our stdout, unchanged
        assert json.loads(s.stdout_lines[0]) == json.loads(said)
        assert not [line for line in s.log_lines if "| " in line and "gen=1" in line]
        write_behavior(behavior, exit_before_ready=3)
        failed = s.result("upgrade")
        assert not failed["ok"]
        assert "output not captured: --worker-output passthrough" in failed["data"]["tail"]
        s.wait_stdout("exiting before ready, as told\n")
    finally:
        s.stop()
        if s.proc is not None and s.proc.stdout is not None:
            s._out_thread.join(10)
            s.proc.stdout.close()
