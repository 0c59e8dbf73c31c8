"""Release labels over hostile files: the git step trusts only what git would (owners root
or our euid, no FIFO, no symlink, refs under refs/), never blocks the supervisor, and
falls back to the `sha:` label with one warning. Real files, FIFOs and chown to uid 65534."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from swapd.config import build
from swapd.supervisor import release as r
from tests.unit.test_control_protocol import NOBODY, as_root

SHA = "0123456789abcdef" * 2 + "01234567"  # 40 hex
OTHER = "fedcba9876543210" * 2 + "76543210"
DEADLINE = 5.0  # a call that should take milliseconds; a regression blocks forever


def config(cwd: Path, *command: str) -> object:
    return build({"command": list(command) or ["python3", "app.py"], "cwd": str(cwd)}, {},
                 environ={"SWAPD_CONTROL": "/nonexistent/c.sock"})


def git_dir(top: Path, sha: str = SHA) -> None:
    """`top/.git` as git lays it out, on branch main at `sha`."""
    (top / ".git" / "refs" / "heads").mkdir(parents=True)
    (top / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (top / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")


def repo(top: Path, sha: str = SHA) -> Path:
    """A checkout at `top` with `app/app.py`; returns `app`."""
    git_dir(top, sha)
    (top / "app").mkdir()
    (top / "app" / "app.py").write_text("print(1)\n")
    return top / "app"


def derive(app: Path, fifos: Iterable[Path] = ()) -> str:
    """`release.derive` for workers in `app`, in a thread with a deadline: a regression
    that blocks on a FIFO fails the test (its FIFOs are then opened for writing, which
    lets the blocked open return) instead of hanging it."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["label"] = r.derive(config(app), str(app))  # type: ignore[arg-type]
        except BaseException as e:  # reported in the test's thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):  # the call may have passed it meanwhile
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(DEADLINE)
        pytest.fail(f"release.derive blocked for more than {DEADLINE}s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    label = out["label"]
    assert isinstance(label, str)
    return label


def refused(caplog: pytest.LogCaptureFixture, event: str = "release.git_refused") -> str:
    lines = [rec.getMessage() for rec in caplog.records if f"event={event} " in rec.getMessage()]
    assert len(lines) == 1, [rec.getMessage() for rec in caplog.records]
    assert lines[0].startswith(f"event={event} pid={os.getpid()} path=")
    assert all(rec.levelno == logging.WARNING for rec in caplog.records
               if f"event={event} " in rec.getMessage())
    return lines[0]


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="swapd")


def test_the_fixture_repository_is_labelled_by_its_commit(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    app = repo(tmp_path)
    assert derive(app).startswith(f"git:{SHA[:12]}+")
    # detached, packed, a `.git` symlink to the directory (a separate git dir)
    (tmp_path / ".git" / "HEAD").write_text(OTHER + "\n")
    assert r.git_commit(str(app)) == OTHER
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").unlink()
    (tmp_path / ".git" / "packed-refs").write_text(f"# pack-refs\n{OTHER} refs/heads/main\n")
    assert r.git_commit(str(app)) == OTHER
    (tmp_path / ".git").rename(tmp_path / "gitdir")
    (tmp_path / ".git").symlink_to(tmp_path / "gitdir")
    assert r.git_commit(str(app)) == OTHER
    assert "release.git_refused" not in caplog.text


def test_a_symlinked_main_module_is_still_hashed(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.py").write_text("print(1)\n")
    (tmp_path / "app.py").symlink_to(tmp_path / "src" / "app.py")
    first = derive(tmp_path)
    (tmp_path / "src" / "app.py").write_text("print(2)\n")
    assert derive(tmp_path) != first


@pytest.mark.parametrize("fifo", ["HEAD", "refs/heads/main", "packed-refs", "commondir"])
def test_a_fifo_in_git_metadata_does_not_block(tmp_path: Path, fifo: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    app = repo(tmp_path)
    path = tmp_path / ".git" / fifo
    if fifo == "packed-refs":  # read when the ref is not loose
        (tmp_path / ".git" / "refs" / "heads" / "main").unlink()
    else:
        path.unlink(missing_ok=True)
    os.mkfifo(path)
    label = derive(app, fifos=[path])
    assert label.startswith("sha:")
    assert "reason='not a regular file'" in refused(caplog)


def test_a_fifo_as_the_main_module_does_not_block(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    os.mkfifo(tmp_path / "app.py")
    label = derive(tmp_path, fifos=[tmp_path / "app.py"])
    assert "reason='not a regular file'" in refused(caplog, "release.main_not_hashed")
    # not hashed: the label is the one without a main module (the interpreter's stat)
    (tmp_path / "app.py").unlink()
    assert derive(tmp_path) == label


@pytest.mark.parametrize("head", ["ref: {secret}", "ref: secret", "ref: refs/../secret",
                                  "ref: refs/heads/../../secret", "ref: refs/heads/a\0b",
                                  "ref: refs/"])
def test_a_ref_outside_refs_is_refused(tmp_path: Path, head: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """An absolute `ref:` made root read any file and show 12 hex characters of it."""
    app = repo(tmp_path)
    secret = tmp_path / ".git" / "secret"
    secret.write_text(OTHER + "\n")
    (tmp_path / ".git" / "HEAD").write_text(head.format(secret=secret) + "\n")
    assert derive(app).startswith("sha:")
    assert "reason=\"bad ref" in refused(caplog)


def test_a_symlinked_head_is_not_followed(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    app = repo(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text(OTHER + "\n")
    (tmp_path / ".git" / "HEAD").unlink()
    (tmp_path / ".git" / "HEAD").symlink_to(secret)
    assert derive(app).startswith("sha:")
    assert "cannot read" in refused(caplog)


@as_root
def test_the_reported_attack_a_fifo_in_a_dot_git_of_another_user(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/tmp/shared is 1777, the app no checkout; nobody made shared/.git/HEAD a FIFO."""
    shared = tmp_path / "shared"
    (shared / "app").mkdir(parents=True)
    shared.chmod(0o1777)
    (shared / "app" / "app.py").write_text("print(1)\n")
    (shared / ".git").mkdir()
    os.mkfifo(shared / ".git" / "HEAD")
    os.chown(shared / ".git", NOBODY, NOBODY)
    os.chown(shared / ".git" / "HEAD", NOBODY, NOBODY)
    assert derive(shared / "app", fifos=[shared / ".git" / "HEAD"]).startswith("sha:")
    assert f"reason='owned by uid {NOBODY}'" in refused(caplog)


@as_root
@pytest.mark.parametrize("foreign", [".git", ".git/HEAD", ".git/refs/heads/main"])
def test_git_metadata_of_another_uid_is_not_used(tmp_path: Path, foreign: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    app = repo(tmp_path)
    os.chown(tmp_path / foreign, NOBODY, NOBODY)
    assert derive(app).startswith("sha:")
    assert f"owned by uid {NOBODY}" in refused(caplog)


@as_root
@pytest.mark.parametrize("foreign", ["shared/app", "shared"])
def test_the_walk_up_does_not_pass_a_directory_of_another_uid(
        tmp_path: Path, foreign: str, caplog: pytest.LogCaptureFixture) -> None:
    """The checkout is tmp_path, the workers run in shared/app: a directory of another
    uid on the way (the start or a parent) ends the walk before tmp_path/.git."""
    git_dir(tmp_path)
    app = tmp_path / "shared" / "app"
    app.mkdir(parents=True)
    (app / "app.py").write_text("print(1)\n")
    assert derive(app).startswith(f"git:{SHA[:12]}+")
    os.chown(tmp_path / foreign, NOBODY, NOBODY)
    assert derive(app).startswith("sha:")
    assert "release.git_refused" not in caplog.text  # no .git there: a debug line only
    assert f"event=release.git_walk_stopped pid={os.getpid()} path='{tmp_path / foreign}' " \
        f"reason='directory owned by uid {NOBODY}'" in caplog.text
    # a .git in that directory is not used either, and that is said
    (tmp_path / ".git").rename(tmp_path / foreign / ".git")
    assert derive(app).startswith("sha:")
    assert f"reason='directory owned by uid {NOBODY}'" in refused(caplog)


@as_root
@pytest.mark.parametrize("pointer", ["gitdir", "commondir"])
def test_a_pointer_to_a_directory_of_another_uid_is_not_followed(
        tmp_path: Path, pointer: str, caplog: pytest.LogCaptureFixture) -> None:
    """A linked worktree: `.git` is a `gitdir:` file; its git dir names the common one."""
    app = repo(tmp_path / "main")
    common = tmp_path / "main" / ".git"
    worktree = common / "worktrees" / "wt"
    worktree.mkdir(parents=True)
    (worktree / "HEAD").write_text("ref: refs/heads/main\n")
    (worktree / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "app.py").write_text("print(1)\n")
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {worktree}\n")
    assert derive(tmp_path / "wt").startswith(f"git:{SHA[:12]}+")
    assert derive(app).startswith(f"git:{SHA[:12]}+")
    os.chown(worktree if pointer == "gitdir" else common, NOBODY, NOBODY)
    assert derive(tmp_path / "wt").startswith("sha:")
    assert f"reason='owned by uid {NOBODY}'" in refused(caplog)


MOUNTED = """
import sys
from swapd.supervisor import release as r
top, mount = sys.argv[1:]
print(r.git_commit(top), r.git_commit(mount + "/app"))
"""


def _unshare(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=30)


@as_root
def test_the_walk_up_stops_at_a_filesystem_boundary(tmp_path: Path) -> None:
    """Like git without GIT_DISCOVERY_ACROSS_FILESYSTEM: a tmpfs mounted below a checkout
    (in a mount namespace of the test's own) is not part of it."""
    repo(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = f"mount -t tmpfs swapd-test {mnt}"
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = _unshare(f"{mount} && umount {mnt}")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace: {probe.stderr.strip()[:200]}")
    run = _unshare(f"{mount} && mkdir {mnt / 'app'} && "
                   f"exec {sys.executable} -c '{MOUNTED}' {tmp_path} {mnt}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [SHA, "None"]


def test_the_walk_up_is_unchanged_for_a_plain_directory(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """No `.git` anywhere up to a boundary: the sha: label, and nothing refused."""
    (tmp_path / "app.py").write_text("print(1)\n")
    assert derive(tmp_path).startswith("sha:")
    assert "release.git_refused" not in caplog.text

