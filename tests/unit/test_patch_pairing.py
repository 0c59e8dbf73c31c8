"""Which live function gets which new code when definitions share a name (lambdas of one
scope, property accessors, overload stubs), and names that change kind.

Pairing by compile order silently ran the wrong code; pairing is by binding site now, or
the plan is refused.
"""

from __future__ import annotations

import ast
import sysconfig
import typing
from pathlib import Path

import pytest

from swapd import patch
from swapd.patch.code import CodeIndex
from swapd.patch.sites import Sites
from tests.unit.patch_support import Mods, edit


def test_module_lambdas_swapped_keep_their_own_code(mods: Mods) -> None:
    src = "INC = lambda x: x + 1\nDEC = lambda x: x - 1\n"
    m = mods.load(src)
    inc, dec = m.INC, m.DEC
    held = [inc, dec]
    handle = patch.apply(m, "DEC = lambda x: x - 2\nINC = lambda x: x + 2\n")
    assert m.INC is inc and m.DEC is dec
    assert (held[0](5), held[1](5)) == (7, 3)  # INC stays an increment, now by 2
    handle.rollback()
    assert (inc(5), dec(5)) == (6, 4)


def test_closures_in_container_slots_pair_by_key(mods: Mods) -> None:
    src = """
    def make():
        return {"inc": lambda x: x + 1, "dec": lambda x: x - 1}

    OPS = make()
    """
    m = mods.load(src)
    ops = m.OPS
    patch.apply(m, edit(src, ('{"inc": lambda x: x + 1, "dec": lambda x: x - 1}',
                              '{"dec": lambda x: x - 10, "inc": lambda x: x + 10}')))
    assert (ops["inc"](5), ops["dec"](5)) == (15, -5)
    assert (m.make()["inc"](5), m.make()["dec"](5)) == (15, -5)


def test_definitions_that_cannot_be_told_apart_are_refused(mods: Mods) -> None:
    src = """
    def make():
        def h():
            return 1
        return h

    H = make()
    """
    m = mods.load(src)
    new = edit(src, ("    return h\n", "    def h():\n        return 2\n    return h\n"))
    plan = patch.prepare(m, new)
    assert not plan.committable
    assert any("cannot be paired" in r.reason and r.what == "make.<locals>.h"
               for r in plan.refused), plan.refused
    assert m.H() == 1


@pytest.mark.parametrize("became", [
    "class handler:\n    def __init__(self, x):\n        self.x = x\n",
    "handler = print\n",
    "from os.path import basename as handler\n",
])
def test_a_function_that_changes_kind_is_refused(mods: Mods, became: str) -> None:
    src = "def handler(x):\n    return x\n\nCALLBACKS = [handler]\n"
    m = mods.load(src)
    code = m.handler.__code__
    plan = patch.prepare(m, became + "\nCALLBACKS = [handler]\n")
    assert not plan.committable
    [refusal] = [r for r in plan.refused if r.what == "handler"]
    assert refusal.reason.startswith("was a function and becomes")
    assert "references taken before the patch" in refusal.reason
    assert m.CALLBACKS[0](3) == 3 and m.handler.__code__ is code


def test_a_class_that_becomes_a_function_is_refused(mods: Mods) -> None:
    src = "class Handler:\n    def run(self):\n        return 1\n"
    m = mods.load(src)
    plan = patch.prepare(m, "def Handler():\n    return 2\n")
    assert any(r.what == "Handler" and r.reason.startswith("was a class and becomes a function")
               for r in plan.refused), plan.refused


def test_a_method_that_becomes_a_nested_class_is_refused(mods: Mods) -> None:
    src = "class K:\n    def part(self):\n        return 1\n"
    m = mods.load(src)
    plan = patch.prepare(m, "class K:\n    class part:\n        pass\n")
    assert any(r.what == "K.part" and "was a function and becomes a class" in r.reason
               for r in plan.refused), plan.refused


def test_second_lambda_with_the_same_parameters_is_added(mods: Mods) -> None:
    src = "INC = lambda x: x + 1\n"
    m = mods.load(src)
    inc = m.INC
    plan = patch.prepare(m, "INC = lambda x: x + 2\nDEC = lambda x: x - 1\n")
    assert plan.committable, plan.refused
    handle = plan.commit()
    assert m.INC is inc and inc(5) == 7 and m.DEC(5) == 4
    handle.rollback()
    assert inc(5) == 6 and not hasattr(m, "DEC")


PROPERTY = """
class K:
    def __init__(self):
        self._v = 1

    @property
    def v(self):
        return self._v

    @v.setter
    def v(self, value):
        self._v = value
"""


def test_adding_a_property_deleter(mods: Mods) -> None:
    m = mods.load(PROPERTY)
    k = m.K()
    getter, setter = m.K.v.fget, m.K.v.fset
    new = PROPERTY.replace("        self._v = value\n", "        self._v = value * 2\n") + (
        "\n    @v.deleter\n    def v(self):\n        self._v = 0\n")
    plan = patch.prepare(m, new)
    assert plan.committable, plan.refused
    handle = plan.commit()
    prop = m.K.__dict__["v"]
    assert prop.fget is getter and prop.fset is setter  # kept and patched in place
    k.v = 3
    assert k.v == 6
    del k.v
    assert k.v == 0
    handle.rollback()
    assert m.K.__dict__["v"].fdel is None
    k.v = 3
    assert k.v == 3


def test_adding_overload_stubs(mods: Mods) -> None:
    src = "from typing import overload\n\ndef scale(x):\n    return x\n"
    m = mods.load(src)
    fn = m.scale
    new = (
        "from typing import overload\n\n"
        "@overload\ndef scale(x: int) -> int: ...\n"
        "@overload\ndef scale(x: str) -> str: ...\n"
        "def scale(x):\n    return x * 2\n"
    )
    plan = patch.prepare(m, new)
    assert plan.committable, plan.refused
    assert any("typing.overload stubs of scale" in n for n in plan.notes)
    plan.commit()
    assert m.scale is fn and fn(2) == 4 and fn("a") == "aa"
    # One more patch on top: the stubs (now in the base) pair with themselves.
    plan = patch.prepare(m, new.replace("x * 2", "x * 3"))
    assert plan.committable, plan.refused
    plan.commit()
    assert fn(2) == 6
    assert typing.get_overloads(fn) == []  # not executed; the note says so


def _stdlib_sources(limit: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.count("lambda") + text.count(" for ") > 40:
            found.append(path)
        if len(found) == limit:
            break
    return found


@pytest.mark.slow
def test_every_repeated_definition_of_real_modules_has_a_site() -> None:
    """Every code object whose qualified name repeats is found in the tree and gets a
    site (else the engine would refuse to pair it)."""
    checked = 0
    for path in _stdlib_sources(30):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        index = CodeIndex([compile(tree, str(path), "exec", dont_inherit=True)])
        sites = Sites(tree, index)
        duplicated = {q for q, n in index.counts.items() if n > 1}
        for qual in duplicated:
            for i in range(index.counts[qual]):
                assert sites.site((qual, i), duplicated) is not None, (path, qual, i)
                checked += 1
    assert checked > 100, checked
