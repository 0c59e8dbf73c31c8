"""Less common shapes: nested classes, lambdas, patches on top of patches, revived names."""

from __future__ import annotations

import functools

import pytest

from swapd import patch
from tests.unit.patch_support import Mods, edit

NESTED_CLASS = """
class Outer:
    class Inner:
        LEVEL = 1

        def who(self):
            return "inner-v1"
"""


def test_nested_class_members_patch_and_grow(mods: Mods) -> None:
    m = mods.load(NESTED_CLASS)
    inner = m.Outer.Inner()
    new = edit(NESTED_CLASS, ('"inner-v1"', '"inner-v2"'), ("LEVEL = 1", "LEVEL = 2"))
    new += "\n        def extra(self):\n        return (self.LEVEL, __class__.__qualname__)\n"
    new = new.replace(
        "        def extra(self):\n        return",
        "        def extra(self):\n            return",
    )
    h = patch.apply(m, new)
    assert inner.who() == "inner-v2" and m.Outer.Inner.LEVEL == 2
    assert inner.extra() == (2, "Outer.Inner")
    assert m.Outer.Inner.extra.__qualname__ == "Outer.Inner.extra"
    h.rollback()
    assert inner.who() == "inner-v1" and not hasattr(inner, "extra")


def test_module_level_lambda_and_lambda_added_beside_it(mods: Mods) -> None:
    src = "key = lambda x: x + 1\n"
    m = mods.load(src)
    held = m.key
    h = patch.apply(m, "key = lambda x: x + 2\n")
    assert held is m.key and held(1) == 3
    h.rollback()
    # a second lambda on another line: the live one is matched by its signature
    h = patch.apply(m, "key = lambda x: x + 3\nother = lambda a, b: a * b\n")
    assert held(1) == 4 and m.other(2, 3) == 6


def test_objects_added_by_a_patch_are_patched_by_the_next(mods: Mods) -> None:
    src = "def f():\n    return 0\n"
    m = mods.load(src)
    s1 = src + (
        "\nclass Added:\n    def m(self):\n        return 'a1'\n\ndef helper():\n    return 'h1'\n"
    )
    patch.apply(m, s1)
    obj, helper = m.Added(), m.helper
    s2 = s1.replace("'a1'", "'a2'").replace("'h1'", "'h2'")
    plan = patch.prepare(m, s2)  # the base (s1) must describe what the first patch created
    assert {c.name for c in plan.changed} == {"Added.m", "helper"}
    plan.commit()
    assert obj.m() == "a2" and helper() == "h2" and m.helper is helper


def test_a_removed_function_revived_later_keeps_its_identity(mods: Mods) -> None:
    src = "def helper():\n    return 'v1'\n\ndef use():\n    return helper()\n"
    m = mods.load(src)
    held = m.helper
    patch.apply(m, "def use():\n    return 'no helper'\n")
    assert m.helper is held  # removed from the source, kept in the module
    patch.apply(m, "def helper():\n    return 'v3'\n\ndef use():\n    return helper()\n")
    assert m.helper is held and held() == "v3" and m.use() == "v3"


def test_cached_property_values_are_reported(mods: Mods) -> None:
    src = """
    import functools

    class C:
        @functools.cached_property
        def value(self):
            return 1
    """
    m = mods.load(src)
    c = m.C()
    assert c.value == 1
    plan = patch.prepare(m, edit(src, ("return 1", "return 2")))
    assert any("cached_property" in n for n in plan.notes)
    plan.commit()
    assert c.value == 1 and m.C().value == 2


def test_singledispatch_implementations_are_patched(mods: Mods) -> None:
    src = """
    import functools

    @functools.singledispatch
    def show(x):
        return "obj"

    @show.register
    def _(x: int):
        return "int-v1"
    """
    m = mods.load(src)
    held = m.show
    h = patch.apply(m, edit(src, ('"int-v1"', '"int-v2"')))
    assert held(1) == "int-v2" and held("s") == "obj"
    h.rollback()
    assert held(1) == "int-v1"


def test_partial_and_bound_method_held_elsewhere(mods: Mods) -> None:
    src = """
    class Svc:
        def handle(self, x):
            return ("v1", x)
    svc = Svc()
    """
    m = mods.load(src)
    held_bound = m.svc.handle
    held_partial = functools.partial(m.Svc.handle, m.svc)
    h = patch.apply(m, edit(src, ('("v1", x)', '("v2", x)')))
    assert held_bound(1) == ("v2", 1) and held_partial(2) == ("v2", 2)
    h.rollback()
    assert held_bound(3) == ("v1", 3)


def test_stale_after_module_replaced(mods: Mods) -> None:
    src = "def f():\n    return 1\n"
    m = mods.load(src)
    plan = patch.prepare(m, src.replace("1", "2"))
    import sys

    sys.modules[m.__name__] = type(m)(m.__name__)
    try:
        with pytest.raises(patch.PlanStale, match="reloaded or replaced"):
            plan.commit()
    finally:
        sys.modules[m.__name__] = m
    assert m.f() == 1


def test_apply_sequence_then_unwind_whole_stack(mods: Mods) -> None:
    src = "def f():\n    return 0\n"
    m = mods.load(src)
    for i in range(1, 6):
        patch.apply(m, f"def f():\n    return {i}\n")
    assert m.f() == 5
    while patch.applied(m):
        patch.applied(m)[-1].rollback()
    assert m.f() == 0 and patch.source_of(m)[0] == src


def test_rollback_keeps_data_changed_since_and_refuses_foreign_code(mods: Mods) -> None:
    src = "LIMIT = 1\n\ndef f():\n    return LIMIT\n"
    m = mods.load(src)
    h = patch.apply(m, src.replace("LIMIT = 1", "LIMIT = 2"))
    m.__dict__["LIMIT"] = 5  # the application changed the value after the commit
    notes = h.rollback()
    assert m.f() == 5 and any("global LIMIT changed since; kept" in n for n in notes)
    h = patch.apply(m, src.replace("return LIMIT", "return -LIMIT"))
    foreign = compile("def f():\n    return 'foreign'\n", "<x>", "exec").co_consts[0]
    m.f.__code__ = foreign  # someone else patched the function
    with pytest.raises(patch.RollbackError, match="changed outside swapd"):
        h.rollback()
    assert m.f() == "foreign" and patch.applied(m) == [h]


def test_descriptor_rebuild_keeps_functions_when_ordinals_shift(mods: Mods) -> None:
    src = """
    class K:
        def helper(self):
            return "h"

        def value(self):
            return 1
    """
    m = mods.load(src)
    k = m.K()
    plain = m.K.__dict__["value"]
    # `value` becomes a property with a setter: the group grows from one def to two, and the
    # getter (ordinal 0 before and after) must be the same function object, patched.
    new = edit(
        src,
        (
            "    def value(self):\n        return 1\n",
            "    @property\n    def value(self):\n        return getattr(self, '_v', 2)\n\n"
            "    @value.setter\n    def value(self, v):\n        self._v = v\n",
        ),
    )
    h = patch.apply(m, new)
    assert m.K.__dict__["value"].fget is plain and k.value == 2
    k.value = 5
    assert k.value == 5
    h.rollback()
    assert m.K.__dict__["value"] is plain and k.value() == 1


def test_added_code_compiles_exactly_like_the_whole_module(mods: Mods) -> None:
    # CPython compiles `module.attr(...)` differently when `module` is imported at module
    # level; code the patch adds is compiled on its own and must still match, or the next
    # patch would find the live code unlike its base.
    src = "import functools\nimport os\n\nclass K:\n    pass\n"
    m = mods.load(src)
    s1 = src + (
        "    def join(self, *parts):\n        return os.path.join(*parts)\n"
        "\ndef total(xs):\n    return functools.reduce(lambda a, b: a + b, xs)\n"
    )
    patch.apply(m, s1)
    assert m.total([1, 2, 3]) == 6 and m.K().join("a", "b") == "a/b"
    s2 = s1.replace("a + b", "a * b").replace("os.path.join(*parts)", "'+'.join(parts)")
    plan = patch.prepare(m, s2)
    assert {c.name for c in plan.changed} == {"total", "K.join"}
    plan.commit()
    assert m.total([2, 3, 4]) == 24 and m.K().join("a", "b") == "a+b"
