"""The history file: where it lives, what an entry holds, rotation, bad lines skipped and
the file kept, what is not a regular file set aside (reported, kept, a new one started),
and a full disk (a real tmpfs): no torn line, the lost entries said once writing works."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
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


GOOD = b'{"v": 1, "time": "t", "kind": "start", "outcome": "ok"}'


@pytest.mark.parametrize(("content", "good", "bad_lines"), [
    (GOOD + b"\n" + GOOD[:20], 1, 1),  # the last line torn (a crash of the machine)
    (GOOD + b"\n" + GOOD[:30] + GOOD + b"\n" + GOOD + b"\n", 2, 1),  # a torn write, glued
    (GOOD + b"\nnot json\n[1, 2]\n" + GOOD.replace(b"1", b"9", 1) + b"\n", 1, 3),
    (b"\x00\x00\x00\x00", 0, 1),
])
def test_bad_lines_are_skipped_and_counted_and_the_file_kept(tmp_path: Path, content: bytes,
                                                              good: int, bad_lines: int) -> None:
    """The file is the deploy record (`release_before` for a rollback after the window): a
    bad line costs that line, not the file (it was renamed away at the next start)."""
    path = tmp_path / "history.jsonl"
    path.write_bytes(content)
    hist = History(str(path))
    hist.open()  # no exception
    hist.append("start", "ok", {"via": "start"})
    hist.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.jsonl"]  # nothing set aside
    assert hist.warnings() == []
    data = path.read_bytes()
    assert data.startswith(content) and data.endswith(b"\n")
    entries, bad = h.read(str(path))
    assert bad == bad_lines  # the new entry is on a line of its own, not glued to a torn one
    assert [e["kind"] for e in entries] == ["start"] * good + ["start"]
    assert entries[-1]["who"] == {"via": "start"}


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
    # once the problem is gone, writing resumes (retried per entry), after a note of the gap
    blocker.unlink()
    blocker.mkdir()
    hist.append("start", "ok", WHO)
    hist.close()
    assert hist.warnings() == []
    entries = h.read(str(blocker / "history.jsonl"))[0]
    assert [(e["kind"], e["outcome"]) for e in entries] == [("history", "gap"), ("start", "ok")]
    assert entries[0]["lost"] == 1
    assert entries[0]["reason"] == "history gap: 1 entry lost (File exists)"


def test_reading_skips_bad_lines_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    good = json.dumps({"v": 1, "time": "t", "kind": "stop", "outcome": "ok"})
    path.write_text(f"{good}\n{{broken\n{good}\n")
    entries, bad = h.read(str(path))
    assert len(entries) == 2 and bad == 1


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (root, and mount allowed: skipped otherwise)."""
    where = tmp_path / "fs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a tmpfs that fills up")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        # lazy: a writer a failed assertion left open must not fail the teardown
        subprocess.run(["umount", "-l", str(where)], check=True, timeout=30)


def _fill(directory: Path) -> Path:
    """Take every free block of the filesystem."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for _ in range(1000):  # 64 KiB: far fewer are needed
            try:
                f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
        else:
            raise AssertionError("the tmpfs never filled up")
    return filler


def test_a_full_disk_tears_no_line_and_the_gap_is_recorded(tiny_tmpfs: Path) -> None:
    """ENOSPC cuts writes short: what they wrote is cut back off (else the next entry is
    glued to half a line, and the file was thrown away at the next start); the entries
    lost are counted, and said once writing works again."""
    path = tiny_tmpfs / "history.jsonl"
    hist = History(str(path))
    hist.open()
    hist.append("start", "ok", {"via": "start"}, release_after="v41")
    hist.append("upgrade", "ok", WHO, release_before="v41", release_after="v42")
    size = path.stat().st_size
    assert size % 4096  # room left in the file's last block: the next write is cut short
    filler = _fill(tiny_tmpfs)
    for i in range(5):  # each longer than a block: at best a part of it fits
        hist.append("upgrade", "failed", WHO, reason=f"{i}:" + "x" * 5000)
        assert path.read_bytes().endswith(b"\n") and path.stat().st_size == size
        [warning] = hist.warnings()
        assert "history write failed" in warning and "No space left on device" in warning
    entries, bad = h.read(str(path))
    assert bad == 0 and len(entries) == 2
    filler.unlink()
    hist.append("stop", "ok", WHO)
    hist.close()
    assert hist.warnings() == []
    entries, bad = h.read(str(path))
    assert bad == 0
    assert [(e["kind"], e["outcome"]) for e in entries] == [
        ("start", "ok"), ("upgrade", "ok"), ("history", "gap"), ("stop", "ok")]
    assert entries[2]["reason"] == "history gap: 5 entries lost (No space left on device)"
    # the next start keeps the file, and the release to go back to with it
    again = History(str(path))
    again.open()
    again.close()
    assert again.warnings() == [] and sorted(p.name for p in tiny_tmpfs.iterdir()) == [
        "history.jsonl"]
    assert h.read(str(path))[0][1]["release_before"] == "v41"
