"""Default values, docstrings, annotations, singledispatch registrations and caches follow
the new source, and what cannot follow is reported (issue 12, items 6-11)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from swapd import patch
from tests.unit.patch_support import Mods, edit

MUTABLE = """
def remember(x, seen=[], factor=1, *, sep=",", bag={}):
    seen.append(x)
    bag[x] = True
    return sep.join(map(str, seen)) + "*" + str(factor)
"""


def test_only_the_defaults_that_changed_change(mods: Mods) -> None:
    m = mods.load(MUTABLE)
    m.remember(1)
    m.remember(2)
    seen, bag = m.remember.__defaults__[0], m.remember.__kwdefaults__["bag"]
    plan = patch.prepare(m, edit(MUTABLE, ("factor=1", "factor=3"), ('sep=","', 'sep="-"')))
    assert any(c.detail.startswith("defaults (factor, sep)") for c in plan.changed), plan.changed
    handle = plan.commit()
    assert m.remember(3) == "1-2-3*3"  # the accumulated list kept its contents
    assert m.remember.__defaults__[0] is seen and m.remember.__kwdefaults__["bag"] is bag
    handle.rollback()
    assert m.remember(4) == "1,2,3,4*1" and m.remember.__defaults__[0] is seen


def test_a_default_reading_a_changed_constant_follows_it(mods: Mods) -> None:
    src = """
    LIMIT = 10

    def cap(n=LIMIT, *, floor=LIMIT // 10):
        return n, floor

    class K:
        STEP = 1

        def step(self, by=STEP, limit=LIMIT):
            return by, limit
    """
    m = mods.load(src)
    plan = patch.prepare(m, edit(src, ("LIMIT = 10", "LIMIT = 20"), ("STEP = 1", "STEP = 2")))
    details = {c.name: c.detail for c in plan.changed}
    assert details["cap"].startswith("defaults (n, floor)"), details
    assert details["K.step"].startswith("defaults (by, limit)"), details
    handle = plan.commit()
    assert m.cap() == (20, 2) and m.K().step() == (2, 20)  # what a fresh import gives
    handle.rollback()
    assert m.cap() == (10, 1) and m.K().step() == (1, 10)


def test_a_constant_kept_at_its_runtime_value_leaves_defaults_alone(mods: Mods) -> None:
    src = "LIMIT = 10\n\ndef cap(n=LIMIT):\n    return n\n"
    m = mods.load(src)
    m.LIMIT = 15  # the application changed it: the patch keeps it, and cap's default too
    plan = patch.prepare(m, edit(src, ("LIMIT = 10", "LIMIT = 20")))
    assert any("keeps its live value 15" in n for n in plan.notes)
    plan.commit()
    assert m.cap() == 10 and m.LIMIT == 15


def test_closures_made_before_the_patch_report_their_old_defaults(mods: Mods) -> None:
    src = """
    def make():
        def g(n=1, *, tag="a"):
            return n, tag
        return g

    G = make()
    """
    m = mods.load(src)
    plan = patch.prepare(m, edit(src, ("n=1", "n=2")))
    assert any("1 live closure(s) make.<locals>.g keep the default values they were made "
               "with (n)" in note for note in plan.notes), plan.notes
    plan.commit()
    assert m.G() == (1, "a") and m.make()() == (2, "a")


def test_property_docstring_follows_the_getter(mods: Mods) -> None:
    src = '''
    class K:
        @property
        def size(self):
            """Old size."""
            return 1
    '''
    m = mods.load(src)
    handle = patch.apply(m, edit(src, ('"""Old size."""', '"""New size, in bytes."""')))
    assert m.K.size.__doc__ == "New size, in bytes." and inspect.getdoc(m.K.size) == (
        "New size, in bytes.")
    handle.rollback()
    assert m.K.size.__doc__ == "Old size."


def test_wraps_wrappers_take_the_new_docstring_and_annotations(mods: Mods) -> None:
    src = '''
    import functools

    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @logged
    def area(w: int, h: int) -> int:
        """Area of a rectangle."""
        return w * h

    @functools.lru_cache
    def double(x: int) -> int:
        """Twice x."""
        return x * 2
    '''
    m = mods.load(src)
    wrapper, cached = m.area, m.double
    new = edit(src, ('"""Area of a rectangle."""', '"""Area, in square units."""'),
               ("def area(w: int, h: int) -> int:", "def area(w: float, h: float) -> float:"),
               ('"""Twice x."""', '"""Two times x."""'))
    handle = patch.apply(m, new)
    assert m.area is wrapper and wrapper.__doc__ == "Area, in square units."
    assert wrapper.__annotations__ == {"w": float, "h": float, "return": float}
    assert inspect.signature(wrapper) == inspect.signature(wrapper.__wrapped__)
    assert cached.__doc__ == "Two times x."
    handle.rollback()
    assert wrapper.__doc__ == "Area of a rectangle." and cached.__doc__ == "Twice x."
    assert wrapper.__annotations__ == {"w": int, "h": int, "return": int}


DISPATCH = """
import functools

@functools.singledispatch
def describe(x):
    return "object"

@describe.register
def _(x: int):
    return "int"

@describe.register
def _(x: str):
    return "str"

@describe.register(bytes)
def _(x):
    return "bytes"
"""


def test_singledispatch_follows_a_changed_annotation(mods: Mods) -> None:
    m = mods.load(DISPATCH)
    assert m.describe(1) == "int"  # fills the dispatch cache for int
    plan = patch.prepare(m, edit(DISPATCH, ("x: int):\n    return \"int\"",
                                            "x: float | int):\n    return \"number\"")))
    assert any(c.kind == "dispatch" and "registered for float | int instead of int" in c.detail
               for c in plan.changed), plan.changed
    handle = plan.commit()
    assert (m.describe(1), m.describe(1.5), m.describe("s"), m.describe(b"b")) == (
        "number", "number", "str", "bytes")
    handle.rollback()
    assert (m.describe(1), m.describe(1.5)) == ("int", "object")


def test_caches_of_changed_code_and_of_code_reading_changed_names_are_cleared(
    mods: Mods,
) -> None:
    src = """
    import functools

    RATE = 2

    def rate():
        return RATE

    @functools.cache
    def price(qty):
        return qty * rate()

    @functools.lru_cache(maxsize=None)
    def unrelated(x):
        return x
    """
    m = mods.load(src)
    assert m.price(5) == 10 and m.unrelated(1) == 1
    plan = patch.prepare(m, edit(src, ("RATE = 2", "RATE = 3")))
    caches = {c.name: c.detail for c in plan.changed if c.kind == "cache"}
    assert list(caches) == ["price"] and "reads RATE" in caches["price"], caches
    handle = plan.commit()
    assert m.price(5) == 15  # not the 10 computed by the old value
    assert m.unrelated.cache_info().currsize == 1  # reads nothing the patch changed
    handle.rollback()
    assert m.price(5) == 10
    # a change of the function the cached one calls clears it too
    patch.apply(m, edit(src, ("return RATE\n", "return RATE * 10\n")))
    assert m.price(5) == 100


def test_on_change_lets_applications_drop_their_own_caches(mods: Mods) -> None:
    src = "def score(x):\n    return x\n"
    m = mods.load(src)
    memo: dict[Any, Any] = {1: m.score(1)}
    events: list[patch.PatchEvent] = []

    def drop(event: patch.PatchEvent) -> None:
        events.append(event)
        memo.clear()

    def broken(event: patch.PatchEvent) -> None:
        raise RuntimeError("boom")

    remove = patch.on_change(drop)
    remove_broken = patch.on_change(broken)
    try:
        handle = patch.apply(m, "def score(x):\n    return x * 2\n")
        assert memo == {} and events[-1][:2] == (m.__name__, "commit")
        assert events[-1].changed == ("score",)
        assert any("on_change callback" in n and "boom" in n for n in handle.notes)
        memo[1] = m.score(1)
        notes = handle.rollback()
        assert memo == {} and events[-1].action == "rollback"
        assert any("boom" in n for n in notes)
    finally:
        remove()
        remove_broken()
    patch.apply(m, "def score(x):\n    return x * 3\n")
    assert len(events) == 2  # removed


def test_lru_cache_on_a_method_is_cleared(mods: Mods) -> None:
    src = """
    import functools

    class Shop:
        @functools.cache
        def price(self, qty):
            return qty
    """
    m = mods.load(src)
    shop = m.Shop()
    assert shop.price(3) == 3
    patch.apply(m, edit(src, ("return qty\n", "return qty * 100\n")))
    assert shop.price(3) == 300
    assert isinstance(m.Shop.__dict__["price"], functools._lru_cache_wrapper)
