"""The history file next to a control socket in a shared sticky directory (/tmp): another
user may make the file, or the directory, before swapd does. Neither the supervisor nor
`swapd history` (reading the file when no supervisor answers) may take their entries for
ours, and the supervisor never appends root's entries to their file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from swapd import cli
from swapd.supervisor import history as h
from swapd.supervisor.history import History
from tests.unit.test_control_protocol import NOBODY, as_root

FORGED = json.dumps({"v": 1, "time": "2026-12-03T10:00:00.000Z", "kind": "upgrade",
                     "who": {"via": "control", "uid": 0, "pid": 1}, "outcome": "ok",
                     "release_after": "evil-v666"}) + "\n"


def _sticky(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"  # stands in for /tmp
    shared.mkdir()
    os.chmod(shared, 0o1777)
    return shared


def _theirs(path: Path, text: str = FORGED) -> None:
    path.write_text(text)
    os.chmod(path, 0o666)
    os.chown(path, NOBODY, NOBODY)


@as_root
def test_a_file_another_user_made_first_is_set_aside_not_appended_to(tmp_path: Path) -> None:
    shared = _sticky(tmp_path)
    path = shared / "s.history.jsonl"
    _theirs(path)
    hist = History(str(path))
    hist.open()
    hist.append("start", "ok", {"via": "start"})
    hist.close()
    st = path.stat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o600  # ours, made anew
    assert "evil" not in path.read_text()
    [aside] = [p for p in shared.iterdir() if ".foreign-" in p.name]
    assert aside.read_text() == FORGED and aside.stat().st_uid == NOBODY  # theirs, untouched
    entries, bad = h.read(str(path))
    assert bad == 0
    assert [(e["kind"], e["outcome"]) for e in entries] == [("history", "reset"), ("start", "ok")]
    assert entries[0]["kept_as"] == str(aside)
    [warning] = hist.warnings()
    assert f"owned by uid {NOBODY}, not by us (uid 0)" in warning and str(aside) in warning


@as_root
def test_a_rotated_file_of_another_user_is_not_read(tmp_path: Path) -> None:
    shared = _sticky(tmp_path)
    path = shared / "s.history.jsonl"
    hist = History(str(path))
    hist.open()
    hist.append("start", "ok", {"via": "start"})
    hist.close()
    _theirs(shared / "s.history.jsonl.1")
    entries, bad = h.read(str(path))
    assert [e["kind"] for e in entries] == ["start"] and bad == 1


@pytest.mark.parametrize("how", [pytest.param("theirs", marks=as_root), "writable"])
def test_a_directory_another_user_controls_is_refused(tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if how == "theirs":  # e.g. a /tmp/swapd-0 someone else made first
        os.chown(state, NOBODY, NOBODY)
        why = f"history directory {state} belongs to uid {NOBODY}, not to us"
    else:
        os.chmod(state, 0o777)
        why = f"history directory {state} is writable by others and not sticky"
    hist = History(str(state / "history.jsonl"))
    hist.open()
    hist.append("start", "ok", {"via": "start"})
    hist.close()
    assert not (state / "history.jsonl").exists()
    [warning] = hist.warnings()
    assert why in warning


@as_root
def test_swapd_history_without_a_supervisor_refuses_another_users_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = _sticky(tmp_path)
    control = shared / "s.sock"  # nobody answers there
    path = shared / "s.history.jsonl"
    _theirs(path)
    assert cli.main(["history", "--control", str(control)]) == cli.EXIT_UNREACHABLE
    out, err = capsys.readouterr()
    assert "evil" not in out and out == ""
    assert (f"refusing to read {path}: history file {path} belongs to uid {NOBODY}, not to us "
            "or root") in err
    # the same file of ours is read
    os.chown(path, 0, 0)
    assert cli.main(["history", "--control", str(control)]) == cli.EXIT_OK
    assert "2026-12-03 10:00:00Z  upgrade" in capsys.readouterr().out


@as_root
def test_swapd_history_without_a_supervisor_refuses_another_users_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    theirs = tmp_path / "swapd-0"  # an impostor's /tmp/swapd-UID: root's file inside
    theirs.mkdir()
    (theirs / "swapd.history.jsonl").write_text(FORGED)
    os.chown(theirs, NOBODY, NOBODY)
    assert cli.main(["history", "--control", str(theirs / "swapd.sock")]) == cli.EXIT_UNREACHABLE
    out, err = capsys.readouterr()
    assert out == "" and f"history directory {theirs} belongs to uid {NOBODY}" in err
