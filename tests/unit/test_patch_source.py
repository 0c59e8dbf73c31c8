"""The base source: the recorder, the disk fallback and its verification, the plan report."""

from __future__ import annotations
import __future__

import ast
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapd import patch
from swapd.patch.source import sha256_text
from tests.unit.patch_support import Mods


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[str]:
    """A package name under tmp_path whose modules are recorded at import."""
    package = f"swapd_rec_{tmp_path.name.replace('-', '_')}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    patch.record_sources([package])
    try:
        yield package
    finally:
        patch.stop_recording()
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
            patch.forget(name)


def test_recorder_keeps_the_imported_source_when_the_file_changes(
    tmp_path: Path, recorder: str
) -> None:
    path = tmp_path / recorder / "rules.py"
    path.write_text("def rule():\n    return 'v1'\n")
    m = importlib.import_module(f"{recorder}.rules")
    path.write_text("def rule():\n    return 'on disk, not loaded'\n\ndef other():\n    pass\n")
    text, sha, origin = patch.source_of(m)
    assert origin == "recorded" and text == "def rule():\n    return 'v1'\n"
    assert sha == sha256_text(text)
    plan = patch.prepare(m, "def rule():\n    return 'v2'\n")
    assert plan.base_origin == "recorded" and plan.notes == []
    plan.commit()
    assert m.rule() == "v2"


def test_reload_through_the_recorder_resets_the_patch_stack(tmp_path: Path, recorder: str) -> None:
    path = tmp_path / recorder / "svc.py"
    path.write_text("def f():\n    return 1\n")
    m = importlib.import_module(f"{recorder}.svc")
    patch.apply(m, "def f():\n    return 2\n")
    assert len(patch.applied(m)) == 1
    path.write_text("def f():\n    return 3\n\n\n")
    importlib.reload(m)
    assert patch.applied(m) == [] and patch.source_of(m)[0] == "def f():\n    return 3\n\n\n"


def test_disk_fallback_is_verified_against_the_live_code(mods: Mods) -> None:
    src = "def f():\n    return 1\n"
    m = mods.load_unrecorded(src)
    plan = patch.prepare(m, src.replace("1", "2"))
    assert plan.base_origin == "disk"
    assert any("read from disk" in n for n in plan.notes)
    path = Path(str(m.__file__))
    path.write_text("def f():\n    return 'edited after import'\n")
    with pytest.raises(patch.BaseSourceMismatch, match="live code of f does not match") as err:
        patch.prepare(m, src.replace("1", "2"))
    assert "record_sources()" in str(err.value)
    h = patch.apply(m, src.replace("1", "2"), base_source=src)  # the caller knows the base
    assert m.f() == 2
    h.rollback()
    assert m.f() == 1


def test_source_of_follows_commits_and_rollbacks(mods: Mods) -> None:
    s0 = "def f():\n    return 0\n"
    s1 = "def f():\n    return 1\n"
    m = mods.load(s0)
    h = patch.apply(m, s1)
    assert patch.source_of(m) == (s1, sha256_text(s1), "patched")
    h.rollback()
    assert patch.source_of(m)[0] == s0


def test_plan_serialises_to_json(mods: Mods) -> None:
    src = """
    def make():
        a = 1
        def g():
            return a
        return g
    held = make()
    """
    m = mods.load(src)
    new = (
        "def make():\n    a = 1\n    b = 2\n    def g():\n        return a + b\n    return g\n"
        "held = make()\n\ndef extra():\n    return 0\n"
    )
    plan = patch.prepare(m, new)
    d = json.loads(json.dumps(plan.to_dict()))
    assert set(d) >= {"module", "changed", "added", "absent", "removed", "refused", "notes"}
    assert d["absent"] == [
        {"function": "make.<locals>.g", "name": "b", "source": "constexpr", "value": "2"}
    ]
    assert d["committable"] and d["state"] == "prepared"
    h = plan.commit()
    assert json.loads(json.dumps(h.to_dict()))["serial"] == 1
    assert json.loads(json.dumps(h.prepare_rollback().to_dict()))["serial"] == 1


def test_bytes_source_honours_the_encoding_cookie(mods: Mods) -> None:
    m = mods.load("def f():\n    return 'a'\n")
    new = "# -*- coding: latin-1 -*-\ndef f():\n    return 'é'\n".encode("latin-1")
    patch.apply(m, new)
    assert m.f() == "é"


PIECES = '''"""Module doc."""
from __future__ import annotations

import functools

X = (1,
     2)


@functools.lru_cache
def f(a: int) -> int:
    return a


class K:
    def m(self):
        return lambda: 1


async def g():
    return 1
'''


def test_piecewise_compile_equals_a_whole_compile() -> None:
    from swapd.patch.code import nested_codes
    from swapd.patch.compiling import _compile_in_pieces

    pieces = _compile_in_pieces(PIECES, "f.py")
    assert pieces is not None
    tree, codes = pieces
    whole = ast.parse(PIECES, "f.py")
    assert ast.dump(tree, include_attributes=True) == ast.dump(whole, include_attributes=True)
    mine = [c for code in codes for c in nested_codes(code)]
    theirs = list(nested_codes(compile(whole, "f.py", "exec", dont_inherit=True)))
    assert len(mine) == len(theirs) == 5
    assert all(a == b and a.co_qualname == b.co_qualname for a, b in zip(mine, theirs, strict=True))
    assert all(c.co_flags & __future__.annotations.compiler_flag for c in mine)
    # A false cut (inside a string, inside brackets) fails to parse and is merged away.
    for text in ('S = """\ndef inside():\n"""\n', "a = b = 1\nx = (a\n@ b)\n"):
        merged = _compile_in_pieces(text, "f.py")
        assert merged is not None and len(merged[1]) == 1
        assert ast.dump(merged[0]) == ast.dump(ast.parse(text))


@pytest.mark.slow
def test_piecewise_compile_matches_on_real_modules() -> None:
    """The 40 largest stdlib modules compile piecewise to the same trees and code objects."""
    import sysconfig
    import warnings

    from swapd.patch.code import nested_codes
    from swapd.patch.compiling import _compile_in_pieces

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: p.stat().st_size, reverse=True)[:40]
    assert len(files) == 40
    for path in files:
        text = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            whole = compile(text, str(path), "exec", dont_inherit=True)
            pieces = _compile_in_pieces(text, str(path))
        assert pieces is not None, path
        mine = [c for code in pieces[1] for c in nested_codes(code)]
        theirs = list(nested_codes(whole))
        assert len(mine) == len(theirs), path
        for a, b in zip(mine, theirs, strict=True):
            assert a == b and a.co_qualname == b.co_qualname, (path, b.co_qualname)
