"""Release identity: the label each generation carries, and where its code is.

A label is given (`--release LABEL` on `run`, `upgrade` or `reload`, or $SWAPD_RELEASE in
the environment of the command that asks), else derived from the code the generation is
about to run, in this order:

1. the release-directory layout: workers started in `.../releases/<label>` (typically
   through a `current` symlink, see docs/operations.md) are release `<label>`;
2. the git commit checked out in the workers' directory or a parent: `git:<12 hex>`
   (read from `.git` directly: HEAD, loose refs, packed-refs, worktrees; no `git` process);
3. otherwise a hash of the command and of its main module's content (the first `*.py`
   argument, or `-m module` under the directory), or, for a program that is not a Python
   script, of the executable's size and mtime: `sha:<12 hex>`.

The workers' directory is resolved once per generation (`root`): a `current` symlink
that a deploy flips later does not move a running generation, nor a worker of it that
is restarted after a crash, onto other code.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence

from swapd.config import Config

LABEL = re.compile(r"[A-Za-z0-9._:+@/=-]{1,128}")
RELEASES_DIR = "releases"
_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_MAX_READ = 64 * 1024  # of a git metadata file
_MAX_HASHED = 16 * 1024 * 1024  # of a main module


class ReleaseError(ValueError):
    """A label that cannot be used; one line for the operator."""


def check_label(label: str) -> str:
    if not LABEL.fullmatch(label):
        raise ReleaseError(f"bad release label {label[:140]!r}: use 1-128 letters, digits "
                           "and . _ : + @ / = -")
    return label


def resolve_root(cwd: str | None) -> str | None:
    """The workers' directory with its symlinks resolved (None: the supervisor's own)."""
    if cwd is None:
        return None
    return os.path.realpath(cwd) if os.path.isdir(cwd) else cwd


def derive(config: Config, root: str | None) -> str:
    directory = root or os.getcwd()
    parent, name = os.path.split(os.path.realpath(directory))
    if os.path.basename(parent) == RELEASES_DIR and LABEL.fullmatch(name):
        return name
    commit = git_commit(directory)
    if commit is not None:
        return f"git:{commit[:12]}"
    return "sha:" + code_hash(config.command, directory)[:12]


def git_commit(start: str) -> str | None:
    """The commit checked out in `start` or the nearest parent holding `.git`."""
    directory = os.path.abspath(start)
    while True:
        dotgit = os.path.join(directory, ".git")
        if os.path.isdir(dotgit):
            return _head(dotgit)
        if os.path.isfile(dotgit):  # a worktree or submodule: "gitdir: <path>"
            text = _read(dotgit)
            if text is None or not text.startswith("gitdir:"):
                return None
            return _head(os.path.join(directory, text[len("gitdir:"):].strip()))
        up = os.path.dirname(directory)
        if up == directory:
            return None
        directory = up


def _head(gitdir: str) -> str | None:
    head = _read(os.path.join(gitdir, "HEAD"))
    if head is None:
        return None
    head = head.strip()
    if _HEX.fullmatch(head):
        return head  # detached
    if not head.startswith("ref: "):
        return None
    ref = head[len("ref: "):].strip()
    if ".." in ref.split("/"):
        return None
    common = gitdir
    pointer = _read(os.path.join(gitdir, "commondir"))
    if pointer is not None:
        common = os.path.join(gitdir, pointer.strip())
    for base in dict.fromkeys((gitdir, common)):
        loose = _read(os.path.join(base, ref))
        if loose is not None and _HEX.fullmatch(loose.strip()):
            return loose.strip()
    packed = _read(os.path.join(common, "packed-refs"), limit=_MAX_HASHED)
    for line in (packed or "").splitlines():
        sha, _, name = line.partition(" ")
        if name == ref and _HEX.fullmatch(sha):
            return sha
    return None


def code_hash(command: Sequence[str], directory: str) -> str:
    digest = hashlib.sha256("\0".join(command).encode())
    main = main_module(command, directory)
    if main is not None:
        try:
            with open(main, "rb") as f:
                digest.update(f.read(_MAX_HASHED))
            return digest.hexdigest()
        except OSError:
            pass
    program = command[0] if command else ""
    found = program if os.sep in program else shutil.which(program)
    if found:
        try:
            st = os.stat(os.path.join(directory, found))
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            pass
    return digest.hexdigest()


def main_module(command: Sequence[str], directory: str) -> str | None:
    """The file of the worker's main Python module, if the command names one."""
    args = list(command[1:])
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            base = os.path.join(directory, *args[i + 1].split("."))
            for candidate in (base + ".py", os.path.join(base, "__main__.py")):
                if os.path.isfile(candidate):
                    return candidate
            return None
        if arg.endswith(".py"):
            return os.path.join(directory, arg)
    return None


def _read(path: str, limit: int = _MAX_READ) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None
