"""The history file: where it lives, what an entry holds, rotation, and a corrupt file set
aside (reported, kept, a new one started) instead of a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from swapd.supervisor import history as h
from swapd.supervisor.history import History, history_path

WHO = {"via": "control", "uid": 1000, "pid": 42}


def test_where_it_lives() -> None:
    control = "/run/app/swapd.sock"
    assert history_path("/srv/state", control, {}) == "/srv/state/history.jsonl"
    env = {"STATE_DIRECTORY": "/var/lib/swapd/app:/var/lib/other", "XDG_STATE_HOME": "/x"}
    assert history_path(None, control, env) == "/var/lib/swapd/app/history.jsonl"
    xdg = history_path(None, control, {"XDG_STATE_HOME": "/home/u/.local/state"})
    other = history_path(None, "/run/other.sock", {"XDG_STATE_HOME": "/home/u/.local/state"})
    assert xdg.startswith("/home/u/.local/state/swapd/") and xdg.endswith("/history.jsonl")
    assert xdg != other  # two supervisors never share a file
    assert history_path(None, control, {}) == "/run/app/swapd.history.jsonl"
    assert history_path(None, control, {"XDG_STATE_HOME": "relative"}) == (
        "/run/app/swapd.history.jsonl")  # the spec ignores a relative XDG_STATE_HOME


def test_entries_append_and_read_back(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "history.jsonl")  # the directory is created
    hist = History(path)
    hist.open()
    hist.append("upgrade", "ok", WHO, gen_before=1, gen_after=2, release_before="v1",
                release_after="v2", timings_ms={"ready": 12.5}, reason=None)
    hist.append("rollback", "refused", {"via": "watch", "trigger": "unhealthy"},
                refused="version 2 refused")
    hist.close()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["v"] == 1 and first["kind"] == "upgrade" and first["outcome"] == "ok"
    assert first["who"] == WHO and first["release_after"] == "v2"
    assert first["timings_ms"] == {"ready": 12.5}
    assert "reason" not in first  # None fields are left out
    assert first["time"].endswith("Z") and first["time"][4] == "-"
    entries, bad = h.read(path)
    assert [e["kind"] for e in entries] == ["upgrade", "rollback"] and bad == 0
    assert h.read(path, 1)[0] == entries[-1:]
    # a later supervisor (restart, re-exec) appends to the same file
    again = History(path)
    again.open()
    again.append("start", "ok", {"via": "start"})
    again.close()
    assert [e["kind"] for e in h.read(path)[0]] == ["upgrade", "rollback", "start"]
    assert again.warnings() == []


def test_bounded_by_rotation(tmp_path: Path) -> None:
    path = str(tmp_path / "history.jsonl")
    hist = History(path, max_bytes=2000)
    hist.open()
    for i in range(400):
        hist.append("patch", "ok", WHO, patch=i, module="app.rules")
    hist.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["history.jsonl", *(f"history.jsonl.{i}" for i in range(1, h.KEEP + 1))]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 2000
    entries, bad = h.read(path)
    patches = [e["patch"] for e in entries]
    assert bad == 0 and patches == list(range(patches[0], 400))  # newest kept, in order
    assert len(patches) < 400


def test_an_overlong_entry_is_cut_not_lost(tmp_path: Path) -> None:
    path = str(tmp_path / "history.jsonl")
    hist = History(path)
    hist.open()
    entry = hist.append("upgrade", "failed", WHO, reason="x" * (h.MAX_ENTRY * 2))
    hist.close()
    assert entry["reason"].endswith(" [cut]") and len(entry["reason"]) < 2000
    assert h.read(path)[0][0]["outcome"] == "failed"


@pytest.mark.parametrize(("content", "why"), [
    (b'{"v": 1, "time": "t", "kind": "start", "outcome": "ok"}\n{"v": 1, "ti', "truncated"),
    (b'{"v": 1, "time": "t", "kind": "start", "outcome": "ok"}\nnot json\n', "line 2"),
    (b'[1, 2]\n', "line 1: a list, not an object"),
    (b'{"v": 9, "time": "t", "kind": "start", "outcome": "ok"}\n', "format 9"),
    (b'\x00\x00\x00\x00', "truncated"),
])
def test_a_corrupt_file_is_set_aside_and_a_new_one_started(tmp_path: Path, content: bytes,
                                                          why: str) -> None:
    path = tmp_path / "history.jsonl"
    path.write_bytes(content)
    hist = History(str(path))
    hist.open()  # no exception
    hist.append("start", "ok", {"via": "start"})
    hist.close()
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept, untouched
    [warning] = hist.warnings()
    assert why in warning and str(aside[0]) in warning
    entries, bad = h.read(str(path))
    assert bad == 0
    assert [(e["kind"], e["outcome"]) for e in entries] == [("history", "reset"),
                                                            ("start", "ok")]
    assert why in entries[0]["reason"]


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_what_is_not_a_regular_file_is_set_aside(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "history.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for writing must not block the supervisor
    else:
        target = tmp_path / "elsewhere"
        target.write_text("")
        path.symlink_to(target)
    hist = History(str(path))
    hist.open()
    hist.append("start", "ok", {"via": "start"})
    hist.close()
    assert path.is_file() and not path.is_symlink()
    assert len(h.read(str(path))[0]) == 2
    assert hist.warnings() and "kept as" in hist.warnings()[0]


def test_write_failures_are_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    hist = History(str(blocker / "history.jsonl"))
    hist.open()
    entry = hist.append("stop", "ok", WHO)  # no exception
    assert entry["kind"] == "stop"
    [warning] = hist.warnings()
    assert "history write failed" in warning and "not-a-dir/history.jsonl: File exists" in warning
    # once the problem is gone, writing resumes (retried per entry)
    blocker.unlink()
    blocker.mkdir()
    hist.append("start", "ok", WHO)
    hist.close()
    assert hist.warnings() == []
    assert [e["kind"] for e in h.read(str(blocker / "history.jsonl"))[0]] == ["start"]


def test_reading_skips_bad_lines_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    good = json.dumps({"v": 1, "time": "t", "kind": "stop", "outcome": "ok"})
    path.write_text(f"{good}\n{{broken\n{good}\n")
    entries, bad = h.read(str(path))
    assert len(entries) == 2 and bad == 1
