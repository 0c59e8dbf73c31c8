"""Release labels: given, or derived from the release-directory layout, the git commit, or
a hash of the code; and the workers' directory resolved once per generation."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from swapd.config import build
from swapd.supervisor import release as r

GIT = shutil.which("git")


def config(cwd: Path, *command: str) -> object:
    return build({"command": list(command) or ["python3", "app.py"], "cwd": str(cwd)}, {},
                 environ={"SWAPD_CONTROL": "/nonexistent/c.sock"})


@pytest.mark.parametrize("label", ["v42", "2024-05-29.1", "git:1a2b3c", "app@1.2+build.7"])
def test_good_labels(label: str) -> None:
    assert r.check_label(label) == label


@pytest.mark.parametrize("label", ["", "has space", "new\nline", "x" * 129, "é"])
def test_bad_labels(label: str) -> None:
    with pytest.raises(r.ReleaseError, match="bad release label"):
        r.check_label(label)


def test_release_directories_name_the_release_and_current_is_resolved_once(
        tmp_path: Path) -> None:
    for name in ("v41", "v42"):
        (tmp_path / "releases" / name).mkdir(parents=True)
        (tmp_path / "releases" / name / "app.py").write_text(f"# {name}\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v41")
    cfg = config(current)
    root = r.resolve_root(str(current))
    assert root == str(tmp_path / "releases" / "v41")
    assert r.derive(cfg, root) == "v41"  # type: ignore[arg-type]
    # a deploy flips the symlink: a generation started now gets the new release; one
    # started before keeps the root it resolved
    current.unlink()
    current.symlink_to(tmp_path / "releases" / "v42")
    assert r.resolve_root(str(current)) == str(tmp_path / "releases" / "v42")
    assert r.derive(cfg, r.resolve_root(str(current))) == "v42"  # type: ignore[arg-type]
    assert root == str(tmp_path / "releases" / "v41")


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_git_commit_of_the_working_directory(tmp_path: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    def git(*args: str) -> str:
        return subprocess.run([str(GIT), "-C", str(tmp_path), *args], check=True, env=env,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "app.py").write_text("print(1)\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    sub = str(tmp_path / "sub")
    cfg = config(tmp_path / "sub")
    label = r.derive(cfg, sub)  # type: ignore[arg-type]
    code = r.code_hash(["python3", "app.py"], sub)
    assert label == f"git:{head[:12]}+{code[:8]}"
    assert r.derive(cfg, sub) == label  # type: ignore[arg-type]  # the same code, the same label
    # one commit, what runs of it differs: another command, an uncommitted edit of the main
    # module (both were `git:<commit>` alone, e.g. game_v1.py then game_v2.py)
    (tmp_path / "sub" / "app2.py").write_text("print(3)\n")
    git("add", ".")
    git("commit", "-q", "-m", "two commands")
    head = git("rev-parse", "HEAD")
    one = r.derive(config(tmp_path / "sub", "python3", "app.py"), sub)  # type: ignore[arg-type]
    two = r.derive(config(tmp_path / "sub", "python3", "app2.py"), sub)  # type: ignore[arg-type]
    assert one.startswith(f"git:{head[:12]}+") and two.startswith(f"git:{head[:12]}+")
    assert one != two
    (tmp_path / "sub" / "app.py").write_text("print(1.5)\n")  # not committed
    edited = r.derive(config(tmp_path / "sub", "python3", "app.py"), sub)  # type: ignore[arg-type]
    assert edited.startswith(f"git:{head[:12]}+") and edited != one
    assert r.check_label(edited) == edited and len(edited) == len("git:") + 12 + 1 + 8
    git("checkout", "-q", "--", "sub/app.py")
    assert r.derive(config(tmp_path / "sub", "python3", "app.py"), sub) == one  # type: ignore[arg-type]
    first = git("rev-parse", "HEAD~1")
    # a packed ref, as after `git gc`
    git("pack-refs", "--all")
    assert not (tmp_path / ".git" / "refs" / "heads" / "main").exists()
    assert r.git_commit(str(tmp_path / "sub")) == head
    # a linked worktree (".git" is a file pointing elsewhere)
    (tmp_path / "app.py").write_text("print(2)\n")
    git("add", ".")
    git("commit", "-q", "-m", "two")
    second = git("rev-parse", "HEAD")
    git("worktree", "add", "-q", "--detach", str(tmp_path / "wt"), first)
    assert (tmp_path / "wt" / ".git").is_file()
    assert r.git_commit(str(tmp_path / "wt")) == first
    assert r.git_commit(str(tmp_path)) == second


def test_without_git_a_hash_of_command_and_main_module(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("print(1)\n")
    cfg = config(tmp_path, "python3", "app.py")
    first = r.derive(cfg, str(tmp_path))  # type: ignore[arg-type]
    assert first.startswith("sha:") and len(first) == 16
    assert r.derive(cfg, str(tmp_path)) == first  # type: ignore[arg-type]
    (tmp_path / "app.py").write_text("print(2)\n")  # new code, new label
    second = r.derive(cfg, str(tmp_path))  # type: ignore[arg-type]
    assert second != first
    other = config(tmp_path, "python3", "app.py", "--port", "1")
    assert r.derive(other, str(tmp_path)) != second  # type: ignore[arg-type]


def test_main_module(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__main__.py").write_text("")
    (tmp_path / "mod.py").write_text("")
    d = str(tmp_path)
    assert r.main_module(["python", "-m", "pkg"], d) == str(tmp_path / "pkg" / "__main__.py")
    assert r.main_module(["python", "-m", "mod"], d) == str(tmp_path / "mod.py")
    assert r.main_module(["python", "-u", "srv/app.py"], d) == str(tmp_path / "srv" / "app.py")
    assert r.main_module(["gunicorn", "app:wsgi"], d) is None
