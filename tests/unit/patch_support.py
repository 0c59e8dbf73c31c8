"""Helpers shared by the test_patch_* modules.

`Mods` writes throw-away modules under a test's tmp_path, imports them under unique names
and, on exit, removes them from ``sys.modules`` and from the patch engine's state.
"""

from __future__ import annotations

import importlib.util
import linecache
import sys
import textwrap
import uuid
from pathlib import Path
from types import ModuleType, TracebackType

from swapd import patch


class Mods:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.names: list[str] = []
        self.paths: list[str] = []

    def __enter__(self) -> Mods:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for name in self.names:
            sys.modules.pop(name, None)
            patch.forget(name)
        for path in self.paths:
            linecache.cache.pop(path, None)

    def name(self) -> str:
        return f"swapd_pt_{uuid.uuid4().hex[:12]}"

    def write(self, source: str, name: str | None = None) -> tuple[str, Path]:
        name = name or self.name()
        path = self.tmp / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return name, path

    def load(self, source: str, name: str | None = None) -> ModuleType:
        """Import ``source`` as a fresh module (its base source is recorded, as if
        `patch.record_sources()` had been installed before the import)."""
        name, path = self.write(source, name)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        self.names.append(name)
        self.paths.append(str(path))
        spec.loader.exec_module(module)
        from swapd.patch.source import record

        record(name, path.read_text(), str(path))
        return module

    def load_unrecorded(self, source: str) -> ModuleType:
        """Import without recording the source: the engine falls back to the file."""
        name, path = self.write(source)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        self.names.append(name)
        self.paths.append(str(path))
        spec.loader.exec_module(module)
        return module

    def source(self, module: ModuleType) -> str:
        return patch.source_of(module)[0]


def edit(source: str, *pairs: tuple[str, str]) -> str:
    """``source`` (dedented) with each ``old`` replaced by ``new`` verbatim; each ``old``
    must occur exactly once."""
    text = textwrap.dedent(source)
    for old, new in pairs:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text
