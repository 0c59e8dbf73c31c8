"""Release identity: the label each generation carries, and where its code is.

A label is given (`--release LABEL` on `run`, `upgrade` or `reload`, or $SWAPD_RELEASE in
the environment of the command that asks), else derived from the code the generation is
about to run, in this order:

1. the release-directory layout: workers started in `.../releases/<label>` (typically
   through a `current` symlink, see docs/operations.md) are release `<label>`;
2. the git commit checked out in the workers' directory or a parent, and what runs of
   it: `git:<12 hex>+<8 hex>` (the commit read from `.git` directly: HEAD, loose refs,
   packed-refs, worktrees; no `git` process; then the code hash below). A commit alone
   hid two commands run from one checkout (game_v1.py, then game_v2.py) and an
   uncommitted edit of the main module: both change the part after `+` (an edit of another
   module is not seen: hashing every import is not cheap; pass `--release`);
3. otherwise `sha:<12 hex>`, the code hash: of the command and of its main module's
   content (the first `*.py` argument, or `-m module` under the directory), or, for a
   program that is not a Python script, of the executable's size and mtime.

The workers' directory is resolved once per generation (`root`): a `current` symlink
that a deploy flips later does not move a running generation, nor a worker of it that
is restarted after a crash, onto other code.

This runs in the supervisor's event loop, often as root, over directories other local
users may write to. So the git step trusts only what git itself would (its
`safe.directory` rule: owners root or our euid; the walk up stops at a directory of
another user and at a mount point), opens every file O_NONBLOCK|O_NOFOLLOW and reads it
only if it is a regular file of root or our euid, up to a bound, and follows HEAD only to
a ref under `refs/`. Whatever is refused is logged once (`event=release.git_refused`)
and the label is the `sha:` hash. The main module is opened the same way, but its owner
is not checked: it is only hashed. The guarantee and its limits: docs/reliability.md,
"Security and hostile input".
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
from collections.abc import Sequence

from swapd.config import Config

log = logging.getLogger("swapd")

LABEL = re.compile(r"[A-Za-z0-9._:+@/=-]{1,128}")
RELEASES_DIR = "releases"
_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_MAX_READ = 64 * 1024  # of a git metadata file
_MAX_HASHED = 16 * 1024 * 1024  # of a main module
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_BAD_REF_CHAR = re.compile(r"[\x00-\x20\x7f\\]")


class ReleaseError(ValueError):
    """A label that cannot be used; one line for the operator."""


class _Refused(Exception):
    """A git file or directory that is not trusted: the git step gives up."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


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
    code = code_hash(config.command, directory)
    if commit is not None:
        return f"git:{commit[:12]}+{code[:8]}"
    return "sha:" + code[:12]


def git_commit(start: str) -> str | None:
    """The commit checked out in `start` or the nearest parent holding `.git`; None if
    there is none or it is not trusted (logged once, with the reason)."""
    try:
        return _discover(os.path.realpath(start))
    except _Refused as e:
        log.warning("event=release.git_refused pid=%d path=%r reason=%r fallback=sha",
                    os.getpid(), e.path[:200], e.reason)
        return None


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _stat(path: str, *, follow: bool = True) -> os.stat_result | None:
    """stat (lstat unless `follow`); None if nothing is there."""
    try:
        return os.stat(path, follow_symlinks=follow)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _Refused(path, f"cannot stat: {e.strerror}") from e
    except ValueError as e:  # a NUL byte in a path read from a file
        raise _Refused(path[:200], "NUL byte in path") from e


def _discover(start: str) -> str | None:
    directory, device = start, None
    while True:
        st = _stat(directory)
        if st is None:
            return None
        if device is None:
            device = st.st_dev
        elif st.st_dev != device:  # a mount point: git does not look further either
            _stopped(directory, "filesystem boundary")
            return None
        dotgit = os.path.join(directory, ".git")
        if not _trusted(st.st_uid):  # not considered, and not passed
            reason = f"directory owned by uid {st.st_uid}"
            if _stat(dotgit, follow=False) is not None:
                raise _Refused(directory, reason)
            _stopped(directory, reason)
            return None
        link = _stat(dotgit, follow=False)
        if link is not None:
            if not _trusted(link.st_uid):
                raise _Refused(dotgit, f"owned by uid {link.st_uid}")
            target = _followed(dotgit, link)
            if stat.S_ISDIR(target.st_mode):
                return _head(dotgit)
            if stat.S_ISREG(target.st_mode):  # a worktree or submodule: "gitdir: <path>"
                text = _read(dotgit)
                if text is None or not text.startswith("gitdir:"):
                    raise _Refused(dotgit, "not a gitdir: file")
                return _head(_git_directory(directory, text[len("gitdir:"):].strip()))
            raise _Refused(dotgit, "neither a directory nor a regular file")
        up = os.path.dirname(directory)
        if up == directory:
            return None
        directory = up


def _followed(dotgit: str, link: os.stat_result) -> os.stat_result:
    """What a `.git` of ours is: itself, or what it links to (a separate git directory,
    say) if that is ours too."""
    if not stat.S_ISLNK(link.st_mode):
        return link
    target = _stat(dotgit)
    if target is None:
        raise _Refused(dotgit, "dangling symlink")
    if not _trusted(target.st_uid):
        raise _Refused(dotgit, f"points to a path owned by uid {target.st_uid}")
    return target


def _stopped(directory: str, reason: str) -> None:
    log.debug("event=release.git_walk_stopped pid=%d path=%r reason=%r", os.getpid(),
              directory, reason)


def _git_directory(base: str, pointer: str) -> str:
    """The directory a `gitdir:` or `commondir` file names, if it is trusted."""
    path = os.path.join(base, pointer)
    st = _stat(path)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise _Refused(path, "not a directory")
    if not _trusted(st.st_uid):
        raise _Refused(path, f"owned by uid {st.st_uid}")
    return path


def _head(gitdir: str) -> str | None:
    head = _read(os.path.join(gitdir, "HEAD"))
    if head is None:
        return None
    head = head.strip()
    if _HEX.fullmatch(head):
        return head  # detached
    if not head.startswith("ref: "):
        raise _Refused(os.path.join(gitdir, "HEAD"), "neither a commit nor a ref")
    ref = head[len("ref: "):].strip()
    parts = ref.split("/")
    if (parts[0] != "refs" or len(parts) < 2 or _BAD_REF_CHAR.search(ref)
            or any(part in ("", ".", "..") for part in parts)):
        raise _Refused(os.path.join(gitdir, "HEAD"), f"bad ref {ref[:100]!r}")
    common = gitdir
    pointer = _read(os.path.join(gitdir, "commondir"))
    if pointer is not None:
        common = _git_directory(gitdir, pointer.strip())
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
        # Symlinks resolved first: a main module may well be one (the worker follows it);
        # O_NOFOLLOW then only stops one swapped in meanwhile.
        path = os.path.realpath(main)
        try:
            digest.update(_read_bytes(path, _MAX_HASHED, owner=False))
            return digest.hexdigest()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except (_Refused, OSError) as e:
            log.warning("event=release.main_not_hashed pid=%d path=%r reason=%r", os.getpid(),
                        path, e.reason if isinstance(e, _Refused) else e.strerror)
    program = command[0] if command else ""
    found = program if os.sep in program else shutil.which(program)
    if found:
        try:
            st = os.stat(os.path.join(directory, found))
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except (OSError, ValueError):
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
    """A git file's text, None if it does not exist; _Refused if it is not trusted."""
    try:
        return _read_bytes(path, limit, owner=True).decode("utf-8", "replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _Refused(path, f"cannot read: {e.strerror}") from e


def _read_bytes(path: str, limit: int, *, owner: bool) -> bytes:
    """At most `limit` bytes of a regular file (of root or our euid if `owner`), without
    ever blocking on the open (a FIFO, a device) or following a symlink."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except ValueError as e:
        raise _Refused(path[:200], "NUL byte in path") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(path, "not a regular file")
        if owner and not _trusted(st.st_uid):
            raise _Refused(path, f"owned by uid {st.st_uid}")
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
