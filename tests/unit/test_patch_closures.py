"""Live closures whose free variables a patch changes: they run the new code themselves,
with their real signature and no frame added per call (issue 12, items 12 and 13)."""

from __future__ import annotations

import asyncio
import inspect
import sys
import typing
from types import FunctionType
from typing import Any

from swapd import patch
from tests.unit.patch_support import Mods, edit

RECURSIVE = """
import sys

def depth():
    frame, n = sys._getframe(), 0
    while frame is not None:
        frame, n = frame.f_back, n + 1
    return n

def make():
    step = 1
    def walk(n):
        return depth() if n == 0 else walk(n - step)
    return walk

walk = make()
"""


def frames_per_call(walk: Any) -> int:
    return int(walk(50) - walk(0)) // 50


def test_a_closure_that_gains_a_variable_adds_no_frame_per_call(mods: Mods) -> None:
    m = mods.load(RECURSIVE)
    held = m.walk
    assert frames_per_call(held) == 1
    new = edit(RECURSIVE, ("    step = 1\n", "    step = 1\n    floor = 0\n"),
               ("n == 0", "n <= floor"))
    plan = patch.prepare(m, new)
    assert [(a.name, a.source) for a in plan.absent] == [("floor", "constexpr")]
    plan.commit()
    assert m.walk is held and frames_per_call(held) == 1
    # what pytest reads to inject fixtures: the parameters without a default
    from _pytest.compat import getfuncargnames

    assert getfuncargnames(held) == ("n",)
    # what the issue reported: depth 600 worked before and must still work after
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        assert held(600) > 600
    finally:
        sys.setrecursionlimit(limit)


def test_introspection_sees_the_real_parameters(mods: Mods) -> None:
    src = """
    def make():
        rate = 2
        def price(qty: int, /, unit: float = 1.0, *extra: int, currency: str = "EUR",
                  **opts: str) -> float:
            return qty * unit * rate
        return price

    price = make()
    """
    m = mods.load(src)
    from swapd.patch.code import logical_code

    held = m.price
    new = edit(src, ("    rate = 2\n", "    rate = 2\n    tax = 3\n"),
               ("qty * unit * rate", "qty * unit * rate + tax"))
    patch.apply(m, new)
    fresh = m.make()  # made by the new code: what a framework would see after a restart
    assert held is m.price and held(2) == 7.0
    assert logical_code(held.__code__) is not held.__code__  # compiled for its closure
    assert inspect.signature(held) == inspect.signature(fresh)
    assert str(inspect.signature(held)) == (
        "(qty: int, /, unit: float = 1.0, *extra: int, currency: str = 'EUR', **opts: str)"
        " -> float")
    assert inspect.getfullargspec(held) == inspect.getfullargspec(fresh)
    code, want = held.__code__, fresh.__code__
    for attr in ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags",
                 "co_name", "co_qualname", "co_filename", "co_firstlineno"):
        assert getattr(code, attr) == getattr(want, attr), attr
    assert code.co_varnames[:6] == want.co_varnames[:6]
    assert typing.get_type_hints(held) == typing.get_type_hints(fresh)
    assert not hasattr(held, "__wrapped__")


KINDS = """
import asyncio

def make():
    base = 10
    def gen(n):
        for i in range(n):
            yield base + i
    async def coro(x):
        await asyncio.sleep(0)
        return base + x
    async def agen(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield base + i
    short = lambda x: base + x
    return gen, coro, agen, short

gen, coro, agen, short = make()
"""


def test_every_kind_of_function_runs_its_new_code_on_its_closure(mods: Mods) -> None:
    m = mods.load(KINDS)
    held = (m.gen, m.coro, m.agen, m.short)
    new = edit(KINDS, ("    base = 10\n", "    base = 10\n    bonus = 100\n"),
               ("yield base + i\n    async def coro", "yield base + i + bonus\n    async def coro"),
               ("return base + x\n", "return base + x + bonus\n"),
               ("            yield base + i\n    short", "            yield base + i + bonus\n"
                "    short"),
               ("lambda x: base + x", "lambda x: base + x + bonus"))
    plan = patch.prepare(m, new)
    assert plan.committable, plan.refused
    handle = plan.commit()

    async def run_async() -> tuple[int, list[int]]:
        return await m.coro(1), [v async for v in m.agen(2)]

    assert (m.gen, m.coro, m.agen, m.short) == held
    assert list(m.gen(2)) == [110, 111]
    assert asyncio.run(run_async()) == (111, [110, 111])
    assert m.short(1) == 111
    assert inspect.isgeneratorfunction(m.gen) and inspect.iscoroutinefunction(m.coro)
    assert inspect.isasyncgenfunction(m.agen) and m.short.__name__ == "<lambda>"
    handle.rollback()
    assert list(m.gen(2)) == [10, 11] and m.short(1) == 11


def test_siblings_share_the_new_cell_and_write_it(mods: Mods) -> None:
    src = """
    def make():
        total = 0
        def add(n):
            nonlocal total
            total += n
            return total
        def get():
            return total
        return add, get

    add, get = make()
    """
    m = mods.load(src)
    m.add(5)
    new = edit(
        src,
        ("    total = 0\n", "    total = 0\n    calls = 0\n"),
        ("        nonlocal total\n        total += n\n",
         "        nonlocal total, calls\n        total += n\n        calls += 1\n"),
        ("        return total\n    return add",
         "        return (total, calls)\n    return add"),
    )
    patch.apply(m, new)
    assert m.add(1) == 6 and m.add(1) == 7
    assert m.get() == (7, 2)  # the state kept, and one new `calls` cell for both closures


def test_a_method_that_starts_using_super(mods: Mods) -> None:
    src = """
    class Base:
        def greet(self):
            return "base"

    class K(Base):
        def greet(self):
            return "k"

    k = K()
    """
    m = mods.load(src)
    bound = m.k.greet
    patch.apply(m, edit(src, ('return "k"', 'return "k+" + super().greet()')))
    assert bound() == "k+base" and m.K().greet() == "k+base"
    assert inspect.signature(m.K.greet) == inspect.signature(lambda self: None)


def test_later_patches_see_the_new_source_not_the_compiled_copy(mods: Mods) -> None:
    from swapd.patch.code import logical_code

    m = mods.load(RECURSIVE)
    held = m.walk
    original = held.__code__
    s1 = edit(RECURSIVE, ("    step = 1\n", "    step = 1\n    floor = 0\n"),
              ("n == 0", "n <= floor"))
    patch.apply(m, s1)
    s2 = edit(s1, ("return depth() if", "return -depth() if"))
    plan = patch.prepare(m, s2)  # no BaseSourceMismatch: the live code maps to s1's
    assert any(c.name == "make.<locals>.walk" for c in plan.changed)
    plan.commit()
    assert held(0) < 0
    patch.apply(m, RECURSIVE)  # back to the original free variables: plain code again
    assert held(0) > 0 and logical_code(held.__code__) is held.__code__
    assert held.__code__ == original


def test_a_moved_variable_rebound_in_a_nested_scope_is_refused(mods: Mods) -> None:
    src = """
    def make():
        a = 1
        def f():
            return a
        return f

    f = make()
    """
    m = mods.load(src)
    new = edit(src, ("    a = 1\n", "    a = 1\n    b = 2\n"),
               ("        return a\n",
                "        g = lambda b: b\n        return a + b + g(0)\n"))
    plan = patch.prepare(m, new)
    assert any("free variables change" in r.reason and "'b' is bound by a parameter" in r.reason
               for r in plan.refused), plan.refused
    assert m.f() == 1


def test_closures_made_after_the_commit_are_switched_back_by_rollback(mods: Mods) -> None:
    src = """
    def make():
        a = 1
        def outer():
            def inner():
                return a
            return inner
        return outer

    outer = make()
    """
    m = mods.load(src)
    new = edit(src, ("    a = 1\n", "    a = 1\n    b = 2\n"),
               ("            return a\n", "            return a * b * 5\n"))
    handle = patch.apply(m, new)
    made = m.outer()  # made by outer's code compiled for its closure (b in a constant)
    assert type(made) is FunctionType and made() == 10
    notes = handle.rollback()
    assert made() == 1, notes
