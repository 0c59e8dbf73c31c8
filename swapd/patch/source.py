"""The source a live module was loaded from: the base every patch is diffed against.

The file on disk is not a reliable base: a deploy may already have replaced it while the
worker still runs the old code.  `record_sources()` puts a finder at the front of
``sys.meta_path`` that hands plain source modules to a loader which remembers the exact text
it executes (and its sha256).  Modules imported before the recorder was installed fall back
to reading the file at prepare time; the engine then verifies that source against the live
code objects and says so in the plan's notes.

sha256 is always taken over the decoded text encoded as UTF-8, whether the source arrived as
bytes (a file) or as text (a patch), so one file gives one hash on every path.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from types import FunctionType, ModuleType
from typing import NamedTuple

from swapd.patch.model import SourceUnavailable


class SourceRecord(NamedTuple):
    text: str
    sha256: str
    filename: str
    serial: int  # increments each time the module is (re)loaded through the recorder


class BaseSource(NamedTuple):
    text: str
    sha256: str
    origin: str  # "explicit" | "patched" | "recorded" | "disk"


_records: dict[str, SourceRecord] = {}
_lock = threading.Lock()
_serial = 0
_finder: _RecordingFinder | None = None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def decode(source: str | bytes) -> str:
    """Text of a source given as text or as the bytes of a file (PEP 263 aware)."""
    if isinstance(source, str):
        return source
    return importlib.util.decode_source(source)


def record(name: str, text: str, filename: str) -> SourceRecord:
    """Remember ``text`` as the source module ``name`` was loaded from."""
    global _serial
    with _lock:
        _serial += 1
        rec = SourceRecord(text, sha256_text(text), filename, _serial)
        _records[name] = rec
    return rec


def recorded(name: str) -> SourceRecord | None:
    return _records.get(name)


def forget(name: str) -> None:
    with _lock:
        _records.pop(name, None)


class _RecordingLoader(importlib.machinery.SourceFileLoader):
    """A SourceFileLoader that remembers the source text of what it loads.

    The source is read just before the code is obtained (from the .pyc when it is valid, so
    imports stay as fast as usual); the .pyc is validated against the same file, so the two
    agree unless the file is replaced in the microseconds between.  The engine verifies the
    base against the live code anyway.
    """

    def get_code(self, fullname: str) -> object:  # type: ignore[override]
        try:
            data = self.get_data(self.path)
        except OSError:
            data = None
        code = super().get_code(fullname)
        if data is not None:
            record(fullname, decode(data), self.path)
        return code


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get("stdlib"), paths.get("platstdlib")}
    return tuple(os.path.join(d, "") for d in dirs if d)


class _RecordingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, prefixes: tuple[str, ...] | None, include_stdlib: bool) -> None:
        self.prefixes = prefixes
        self.exclude = () if include_stdlib else _stdlib_dirs()

    def wanted(self, fullname: str) -> bool:
        if self.prefixes is None:
            return True
        return any(fullname == p or fullname.startswith(p + ".") for p in self.prefixes)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not self.wanted(fullname):
            return None
        # Ask the finders behind us, in order, exactly as the import system would have.
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None:
            return None
        loader = spec.loader
        if type(loader) is importlib.machinery.SourceFileLoader:
            if self.exclude and loader.path.startswith(self.exclude):
                return spec
            spec.loader = _RecordingLoader(loader.name, loader.path)
        return spec


def record_sources(prefixes: Iterable[str] | None = None, *, include_stdlib: bool = False) -> None:
    """Start remembering the source of every module imported from now on.

    ``prefixes`` limits recording to those packages (``["app"]`` records ``app`` and
    ``app.*``); by default every source module outside the standard library is recorded.
    Calling it again replaces the filter.  Modules imported before the call are not
    recorded; the engine reads their file at prepare time instead (and notes it).
    """
    global _finder
    finder = _RecordingFinder(tuple(prefixes) if prefixes is not None else None, include_stdlib)
    with _lock:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        sys.meta_path.insert(0, finder)
        _finder = finder


def stop_recording() -> None:
    """Remove the import hook; sources recorded so far are kept."""
    global _finder
    with _lock:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = None


def module_filename(module: ModuleType) -> str:
    """The file name the module's code objects carry (``co_filename``).

    Usually ``__file__``; but the code is the truth (a script run as ``__main__`` may carry
    another spelling of its path), so the name most of the module's own functions carry
    wins.  Functions made by ``exec`` (``<string>``) do not count."""
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) if spec is not None else None
    filename = getattr(module, "__file__", None) or origin
    names: Counter[str] = Counter()
    moddict = module.__dict__
    for value in list(moddict.values()):
        if type(value) is FunctionType and value.__globals__ is moddict:
            name = value.__code__.co_filename
            if name.endswith(".py"):
                names[name] += 1
    if names:
        filename = names.most_common(1)[0][0]
    if not isinstance(filename, str) or not filename.endswith(".py"):
        raise SourceUnavailable(f"{module.__name__}: not a Python source module ({filename!r})")
    return filename


def read_disk_source(module: ModuleType, filename: str) -> str:
    loader = getattr(module, "__loader__", None)
    get_source = getattr(loader, "get_source", None)
    text: str | None = None
    if get_source is not None:
        try:
            text = get_source(module.__name__)
        except (ImportError, OSError):
            text = None
    if text is None:
        try:
            with open(filename, "rb") as f:
                text = decode(f.read())
        except OSError as e:
            raise SourceUnavailable(
                f"{module.__name__}: cannot read {filename}: {e.strerror or e}"
            ) from e
    return text


def base_source(
    module: ModuleType, filename: str, patched: str | None, explicit: str | bytes | None
) -> BaseSource:
    """The text the live module runs, in order of trust: given by the caller, the source of
    the last committed patch, the recorded import, the file on disk."""
    if explicit is not None:
        text = decode(explicit)
        return BaseSource(text, sha256_text(text), "explicit")
    if patched is not None:
        return BaseSource(patched, sha256_text(patched), "patched")
    rec = recorded(module.__name__)
    if rec is not None and rec.filename == filename:
        return BaseSource(rec.text, rec.sha256, "recorded")
    text = read_disk_source(module, filename)
    return BaseSource(text, sha256_text(text), "disk")
