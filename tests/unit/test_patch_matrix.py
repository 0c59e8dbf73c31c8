"""The patch engine's test matrix (each kind of change a patch can make) and its acceptance cases.

Each case checks four things: state is kept, identity is kept, references taken before the
patch ("held") run the new code, and rollback restores the old behaviour exactly.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from swapd import patch
from swapd.patch.code import logical_code
from tests.unit.patch_support import Mods, edit

COUNTER = """
def make_counter():
    count = 100
    def counter():
        nonlocal count
        count += 1
        return count
    return counter

counter = make_counter()
"""


def test_closure_counter_keeps_state_and_identity(mods: Mods) -> None:
    m = mods.load(COUNTER)
    held = m.counter
    assert held() == 101
    handle = patch.apply(m, edit(COUNTER, ("count += 1", "count += 10")))
    assert m.counter is held  # identity
    assert held() == 111  # new code, old state
    assert m.make_counter()() == 110  # new closures get the new code
    assert [c.name for c in handle.changed if c.kind == "function"] == [
        "make_counter",
        "make_counter.<locals>.counter",
    ]
    handle.rollback()
    assert held() == 112  # old code, the shared cell keeps counting
    assert m.make_counter()() == 101
    # exactly the old code object again, the one the old make_counter creates closures with
    assert any(c is held.__code__ for c in m.make_counter.__code__.co_consts)


NESTED = """
def wrap(fn):
    def wrapper(*a):
        return fn(*a)
    return wrapper

def base():
    return "b1"

wrapped = wrap(base)

def outer():
    prefix = "p"
    def middle():
        n = 0
        def inner():
            nonlocal n
            n += 1
            return f"{prefix}:{n}:v1"
        return inner
    return middle

mid = outer()
inner = mid()
"""


def test_nested_closures_and_functions_stored_in_cells(mods: Mods) -> None:
    m = mods.load(NESTED)
    held_inner, held_wrapped = m.inner, m.wrapped
    assert held_inner() == "p:1:v1" and held_wrapped() == "b1"
    h = patch.apply(m, edit(NESTED, (':v1"', ':v2"'), ('"b1"', '"b2"')))
    assert held_inner() == "p:2:v2"  # closure in a closure: joined by name, state kept
    assert m.mid()() == "p:1:v2"  # the live middle function makes new inners
    assert held_wrapped() == "b2"  # `base` lives in a cell of wrapper: patched in place
    assert m.wrapped is held_wrapped and m.inner is held_inner
    h.rollback()
    assert held_inner() == "p:3:v1" and held_wrapped() == "b1"


CLASSES = """
class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        return f"hello {self.name}"

    @property
    def shout(self):
        return self.name.upper()

    @staticmethod
    def kind():
        return "s1"

    @classmethod
    def make(cls, name):
        return ("c1", cls(name))
"""


def test_class_updated_in_place_for_existing_instances(mods: Mods) -> None:
    m = mods.load(CLASSES)
    cls = m.Greeter
    g = cls("ann")
    bound, held_static, held_cm = g.greet, cls.kind, cls.make
    new = edit(
        CLASSES,
        ('f"hello {self.name}"', 'f"hi {self.name}"'),
        ("return self.name.upper()", 'return self.name.upper() + "!"'),
        ('"s1"', '"s2"'),
        ('("c1", cls(name))', '("c2", cls(name))'),
    )
    new += "\n    def bye(self):\n        return f'bye {self.name}'\n"
    h = patch.apply(m, new)
    assert m.Greeter is cls and g.name == "ann"  # same class, instance state kept
    assert g.greet() == "hi ann" and bound() == "hi ann"
    assert g.shout == "ANN!"
    assert held_static() == "s2" and cls.kind() == "s2"
    assert held_cm("bob")[0] == "c2" and held_cm("bob")[1].greet() == "hi bob"
    assert g.bye() == "bye ann"  # a new method reaches existing instances
    h.rollback()
    assert g.greet() == "hello ann" and bound() == "hello ann" and g.shout == "ANN"
    assert held_static() == "s1" and held_cm("x")[0] == "c1"
    assert not hasattr(g, "bye")


DESCRIPTORS = """
class Box:
    def __init__(self):
        self._v = 1

    @property
    def v(self):
        return self._v

    @staticmethod
    def tag():
        return "static"
"""


def test_descriptor_kind_changes_rebuild_the_descriptor(mods: Mods) -> None:
    m = mods.load(DESCRIPTORS)
    b = m.Box()
    getter = m.Box.__dict__["v"].fget
    new = edit(
        DESCRIPTORS,
        (
            "        return self._v\n",
            "        return self._v * 10\n\n    @v.setter\n    def v(self, x):\n"
            "        self._v = x\n",
        ),
        ("@staticmethod\n    def tag():\n", "@classmethod\n    def tag(cls):\n"),
        ('return "static"', 'return "class " + cls.__name__'),
    )
    plan = patch.prepare(m, new)
    assert plan.refused == []
    h = plan.commit()
    b.v = 7  # the property gained a setter
    assert b.v == 70
    assert m.Box.__dict__["v"].fget is getter  # the getter function kept its identity
    assert m.Box.tag() == "class Box"
    h.rollback()
    assert b.v == 7
    with pytest.raises(AttributeError):
        b.v = 8
    assert m.Box.tag() == "static"


DECORATED = """
import functools

APPLIED = []
CALLS = []

def logged(fn):
    APPLIED.append(fn.__name__)
    @functools.wraps(fn)
    def wrapper(*a, **k):
        CALLS.append(fn.__name__)
        return fn(*a, **k)
    return wrapper

@logged
def greet(name):
    return f"hello {name}"
"""


def test_decorated_function_patched_without_rerunning_the_decorator(mods: Mods) -> None:
    m = mods.load(DECORATED)
    held = m.greet
    h = patch.apply(m, edit(DECORATED, ('f"hello {name}"', 'f"hi {name}"')))
    assert m.APPLIED == ["greet"]  # the decorator did not run again
    assert m.greet is held and held("x") == "hi x" and m.CALLS == ["greet"]
    h.rollback()
    assert held("y") == "hello y"


def test_changed_decorator_expression_is_refused(mods: Mods) -> None:
    m = mods.load(DECORATED)
    plan = patch.prepare(m, edit(DECORATED, ("@logged\n", "@functools.lru_cache\n")))
    assert [r.reason for r in plan.refused] == ["decorator expressions changed"]
    with pytest.raises(patch.PatchRefused, match="decorator expressions changed"):
        plan.commit()
    assert m.greet("z") == "hello z"


LRU = """
import functools

@functools.lru_cache(maxsize=None)
def price(n):
    return n
"""


def test_lru_cache_cleared_on_commit_and_rollback(mods: Mods) -> None:
    m = mods.load(LRU)
    held = m.price
    assert held(5) == 5
    plan = patch.prepare(m, edit(LRU, ("return n", "return n * 2")))
    assert any(c.kind == "cache" for c in plan.changed)
    h = plan.commit()
    assert m.price is held and held(5) == 10  # not the stale cached 5
    h.rollback()
    assert held(5) == 5


ASYNC = """
async def handler(event, out):
    out.append("v1-start")
    await event.wait()
    out.append("v1-end")
    return "v1"
"""


def test_coroutine_in_flight_finishes_on_old_code(mods: Mods) -> None:
    m = mods.load(ASYNC)
    held = m.handler

    async def scenario() -> tuple[list[str], str, str, list[str]]:
        event = asyncio.Event()
        out: list[str] = []
        task = asyncio.create_task(held(event, out))
        while not out:  # let the coroutine reach its await
            await asyncio.sleep(0)
        plan = patch.prepare(m, ASYNC.replace("v1", "v2"))
        notes = plan.notes
        plan.commit()  # on the loop thread, between callbacks
        event.set()
        old = await task
        new = await held(event, out)
        return out, old, new, notes

    out, old, new, notes = asyncio.run(scenario())
    assert old == "v1" and new == "v2"
    assert out == ["v1-start", "v1-end", "v2-start", "v2-end"]
    assert any("running generator(s)/coroutine(s) of handler" in n for n in notes)


GEN = """
def gen():
    yield "v1-a"
    yield "v1-b"
"""


def test_generator_in_flight_finishes_on_old_code(mods: Mods) -> None:
    m = mods.load(GEN)
    running = m.gen()
    assert next(running) == "v1-a"
    h = patch.apply(m, GEN.replace("v1", "v2"))
    assert next(running) == "v1-b"
    assert list(m.gen()) == ["v2-a", "v2-b"]
    h.rollback()
    assert list(m.gen()) == ["v1-a", "v1-b"]


def test_function_imported_by_another_module_and_held_by_callbacks(mods: Mods) -> None:
    src = """
    HANDLERS = []

    def handler(x):
        return ("v1", x)

    HANDLERS.append(handler)
    """
    a = mods.load(src)
    b = mods.load(f"from {a.__name__} import handler\n\ndef call():\n    return handler(1)\n")
    fired: list[object] = []
    timer = threading.Timer(3600, a.handler)  # held by a timer object, never started
    h = patch.apply(a, edit(src, ('("v1", x)', '("v2", x)')))
    assert b.call() == ("v2", 1) and b.handler is a.handler
    assert len(a.HANDLERS) == 1 and a.HANDLERS[0](2) == ("v2", 2)  # not re-registered
    fired.append(timer.function(3))
    assert fired == [("v2", 3)]
    h.rollback()
    assert b.call() == ("v1", 1)


NEW_FREEVAR = """
def make():
    a = 5
    def g():
        return a
    return g
"""


def test_new_free_variable_from_constant_initializer(mods: Mods) -> None:
    m = mods.load(NEW_FREEVAR)
    held = m.make()
    new = edit(
        NEW_FREEVAR, ("    a = 5\n", "    a = 5\n    b = 10\n"), ("return a", "return a + b")
    )
    plan = patch.prepare(m, new)
    assert [(c.function, c.name, c.source) for c in plan.absent] == [
        ("make.<locals>.g", "b", "constexpr")
    ]
    code = held.__code__
    h = plan.commit()
    assert held() == 15  # old a = 5, b = 10 from the initializer, the held object itself
    assert held.__code__.co_freevars == ("a",)  # its own closure: b lives in a constant
    assert m.make()() == 15 and m.make().__code__.co_freevars == ("a", "b")
    h.rollback()
    assert held() == 5 and held.__code__ is code


def test_removed_free_variable(mods: Mods) -> None:
    src = """
    def make():
        a = 5
        b = 200
        def g():
            return a * b
        return g
    """
    m = mods.load(src)
    held = m.make()
    plan = patch.prepare(m, edit(src, ("return a * b", "return a * 200")))
    assert plan.removed == [("freevar", "make.<locals>.g", "b")]
    h = plan.commit()
    assert held() == 1000
    h.rollback()
    assert held() == 1000 and held.__code__.co_freevars == ("a", "b")


def test_renamed_free_variable_with_same_count_binds_by_name(mods: Mods) -> None:
    src = """
    def make():
        x_label = "X"
        def g():
            return x_label + ":v1"
        return g
    """
    m = mods.load(src)
    held = m.make()
    new = edit(
        src,
        ('x_label = "X"', 'z_label = "Z"'),
        ('return x_label + ":v1"', 'return z_label + ":v2"'),
    )
    plan = patch.prepare(m, new)
    assert plan.removed == [("freevar", "make.<locals>.g", "x_label")]
    h = plan.commit()
    assert held() == "Z:v2"  # never the old X cell read by position
    h.rollback()
    assert held() == "X:v1"


DEFAULTS = """
def f(x=1, *, y="a"):
    return (x, y)

class Job:
    RETRIES = 3

    def run(self, n=RETRIES * 2):
        return n
"""


def test_changed_defaults_evaluated_in_live_globals_and_class_namespace(mods: Mods) -> None:
    m = mods.load(DEFAULTS)
    job = m.Job()
    new = edit(
        DEFAULTS,
        ('def f(x=1, *, y="a")', 'def f(x=2, *, y="b")'),
        ("RETRIES = 3", "RETRIES = 5"),
        ("n=RETRIES * 2", "n=RETRIES * 3"),
    )
    h = patch.apply(m, new)
    assert m.f() == (2, "b")
    # evaluated against the class namespace, with the patch's new class constant
    assert job.run() == 15 and m.Job.RETRIES == 5
    h.rollback()
    assert m.f() == (1, "a") and job.run() == 6 and m.Job.RETRIES == 3


CONSTANTS = """
LIMIT = 10
HITS = 0
CACHE = {}

def limit():
    return LIMIT

def hit():
    global HITS
    HITS += 1
    return HITS
"""


def test_module_constants_follow_the_constant_rule(mods: Mods) -> None:
    m = mods.load(CONSTANTS)
    m.hit()
    m.hit()
    m.CACHE["k"] = "v"
    new = edit(CONSTANTS, ("LIMIT = 10", "LIMIT = 20"), ("HITS = 0", "HITS = 100"))
    plan = patch.prepare(m, new)
    assert [c.name for c in plan.changed] == ["LIMIT"]
    assert any("HITS keeps its live value 2" in n for n in plan.notes)
    h = plan.commit()
    assert m.limit() == 20 and m.HITS == 2 and m.CACHE == {"k": "v"}
    assert m.hit() == 3  # state kept
    h.rollback()
    assert m.limit() == 10 and m.HITS == 3


def test_changed_non_constant_statement_needs_a_migration(mods: Mods) -> None:
    m = mods.load(CONSTANTS)
    cache = m.CACHE
    new = edit(CONSTANTS, ("CACHE = {}", "CACHE = dict(size=1)"))
    plan = patch.prepare(m, new)
    assert plan.refused and "add __swapd_migrate__" in plan.refused[0].reason
    migrate = "\ndef __swapd_migrate__(ctx):\n    ctx.setitem(CACHE, 'size', 1)\n"
    plan = patch.prepare(m, new + migrate)
    assert plan.refused == [] and any("left to __swapd_migrate__" in n for n in plan.notes)
    h = plan.commit()
    assert m.CACHE is cache and cache == {"size": 1}  # kept, migrated in place
    assert not hasattr(m, "__swapd_migrate__")  # hooks are never bound into the module
    h.rollback()
    assert cache == {}


def test_migration_that_raises_rolls_everything_back(mods: Mods) -> None:
    m = mods.load(CONSTANTS)
    new = edit(CONSTANTS, ("LIMIT = 10", "LIMIT = 20"), ("return LIMIT", "return LIMIT + 1"))
    new += (
        "\ndef __swapd_migrate__(ctx):\n"
        "    ctx.setitem(CACHE, 'x', 1)\n"
        "    raise KeyError('boom')\n"
    )
    before = m.limit.__code__
    with pytest.raises(patch.MigrationFailed, match="KeyError") as info:
        patch.apply(m, new)
    assert isinstance(info.value.__cause__, KeyError)
    assert m.limit() == 10 and m.limit.__code__ is before and m.CACHE == {}
    assert patch.applied(m) == []
    assert patch.apply(m, edit(CONSTANTS, ("LIMIT = 10", "LIMIT = 30"))).serial == 1


def test_rollback_hook_runs_first(mods: Mods) -> None:
    m = mods.load(CONSTANTS)
    hooks = (
        "\ndef __swapd_migrate__(ctx):\n    CACHE['migrated'] = True\n"
        "\ndef __swapd_rollback__(ctx):\n    CACHE.pop('migrated')\n    ctx.note('unmigrated')\n"
    )
    h = patch.apply(m, CONSTANTS + hooks)
    assert m.CACHE == {"migrated": True}
    assert "unmigrated" in h.rollback()
    assert m.CACHE == {}


SUPER = """
RETRIES = 2

class Base:
    def hello(self):
        return "base"

class Child(Base):
    def hello(self):
        return "child"
"""


def test_method_starting_to_use_super_and_new_method_with_super(mods: Mods) -> None:
    m = mods.load(SUPER)
    c = m.Child()
    new = edit(SUPER, ('return "child"', 'return "child+" + super().hello()'))
    new += "\n    def again(self, n=RETRIES * 2):\n        return (n, super().hello())\n"
    plan = patch.prepare(m, new)
    assert ("Child.hello", "__class__", "__class__") in [a[:3] for a in plan.absent]
    h = plan.commit()
    assert c.hello() == "child+base"
    assert c.again() == (4, "base")
    h.rollback()
    assert c.hello() == "child" and not hasattr(c, "again")


def test_rollback_of_an_earlier_patch_must_wait_for_later_ones(mods: Mods) -> None:
    m = mods.load(GEN)
    first = patch.apply(m, GEN.replace("v1", "v2"))
    second = patch.apply(m, GEN.replace("v1", "v3"))
    assert [p.serial for p in patch.applied(m)] == [1, 2]
    with pytest.raises(patch.RollbackError, match="not the latest; roll back #2 first"):
        first.rollback()
    second.rollback()
    assert list(m.gen()) == ["v2-a", "v2-b"]
    first.rollback()
    assert list(m.gen()) == ["v1-a", "v1-b"]
    with pytest.raises(patch.RollbackError, match="not active"):
        first.rollback()


def test_closures_created_by_patched_code_are_rolled_back_too(mods: Mods) -> None:
    m = mods.load(COUNTER)
    h = patch.apply(m, edit(COUNTER, ("count += 1", "count += 10")))
    made_after = m.make_counter()  # created by the patched make_counter
    assert made_after() == 110
    notes = h.rollback()
    assert any("switch back to the old code" in n for n in notes)
    assert made_after() == 111  # old code (+1) on the state it accumulated


FACTORY = """
def make(n):
    def inner():
        return ("v1", n)
    return inner
"""


def test_closures_of_a_factory_with_no_live_closure_at_prepare_are_rolled_back(
    mods: Mods,
) -> None:
    m = mods.load(FACTORY)
    h = patch.apply(m, edit(FACTORY, ('"v1"', '"v2"')))
    made = m.make(1)  # its code is nested in the new make(); no closure of it existed
    assert made() == ("v2", 1)
    notes = h.rollback()
    assert any("1 function(s) created by the patched code" in n for n in notes), notes
    assert made() == ("v1", 1) and m.make(2)() == ("v1", 2)


def test_closures_of_a_function_the_patch_added_are_reported_at_rollback(mods: Mods) -> None:
    m = mods.load(FACTORY)
    extra = "    def extra():\n        return n\n    return extra"
    new = edit(FACTORY, ("    return inner", extra))
    h = patch.apply(m, new)
    made = m.make(3)
    notes = h.rollback()
    assert any("1 function(s) created by the patched code keep it" in n for n in notes), notes
    assert made() == 3 and m.make(4)() == ("v1", 4)


def test_closures_made_by_old_code_after_prepare_are_caught_by_the_next_patch(
    mods: Mods,
) -> None:
    m = mods.load(COUNTER)
    plan = patch.prepare(m, edit(COUNTER, ("count += 1", "count += 10")))
    late = m.make_counter()  # old code, made between prepare and commit
    plan.commit()
    assert late() == 101  # missed by this plan
    sweep = patch.prepare(m, patch.source_of(m)[0])  # same source again: a sweep
    assert any(c.name == "make_counter.<locals>.counter" for c in sweep.changed)
    sweep.commit()
    assert late() == 111


def test_same_free_variables_use_direct_code_assignment(mods: Mods) -> None:
    m = mods.load(COUNTER)
    held = m.counter
    patch.apply(m, edit(COUNTER, ("count += 1", "count += 10")))
    assert held.__code__.co_name == "counter" and "count" in held.__code__.co_freevars
    assert logical_code(held.__code__) is held.__code__  # the new code itself, not adapted


def test_dataclass_generated_functions_are_not_reported(mods: Mods) -> None:
    src = """
    from dataclasses import dataclass

    @dataclass
    class Point:
        x: int
        y: int = 0

        def norm(self):
            return abs(self.x) + abs(self.y)
    """
    m = mods.load(src)
    p = m.Point(3, -4)
    plan = patch.prepare(
        m, edit(src, ("abs(self.x) + abs(self.y)", "max(abs(self.x), abs(self.y))"))
    )
    assert plan.removed == [] and plan.refused == []
    assert [c.name for c in plan.changed] == ["Point.norm"]
    plan.commit()
    assert p.norm() == 4 and m.Point(1, 2) == m.Point(1, 2)


def test_new_names_added_and_removed_names_kept_unless_pruned(mods: Mods) -> None:
    src = """
    import os

    def old_helper():
        return "old"

    def use():
        return old_helper()
    """
    m = mods.load(src)
    new = edit(
        src,
        (
            'def old_helper():\n    return "old"\n',
            'SEP = "-"\n\ndef new_helper():\n    return os.sep + SEP\n',
        ),
        ("return old_helper()", "return new_helper()"),
    )
    plan = patch.prepare(m, new)
    assert {a.name for a in plan.added} == {"SEP", "new_helper"}
    assert ("function", plan.to_dict()["file"], "old_helper") in plan.removed
    h = plan.commit()
    assert m.use() == "/-" and m.old_helper() == "old"
    h.rollback()
    assert not hasattr(m, "new_helper") and m.use() == "old"
    h2 = patch.apply(m, new, prune=True)
    assert not hasattr(m, "old_helper")
    h2.rollback()
    assert m.old_helper() == "old"


def test_line_shift_keeps_matching_and_updates_line_numbers(mods: Mods) -> None:
    src = "def a():\n    return 1\n\ndef b():\n    raise ValueError('b')\n"
    m = mods.load(src)
    held = m.b
    plan = patch.prepare(m, "# a comment\n# another\n" + src)
    assert {c.name: c.detail for c in plan.changed} == {
        "a": "line numbers; 1 object(s)",
        "b": "line numbers; 1 object(s)",
    }
    plan.commit()
    assert held.__code__.co_firstlineno == 6
    with pytest.raises(ValueError) as info:
        held()
    assert info.traceback[-1].lineno + 1 == 7  # pytest's lineno is 0-based


def test_commit_from_a_control_thread_runs_on_the_loop_thread(mods: Mods) -> None:
    m = mods.load(CONSTANTS)
    new = (
        CONSTANTS
        + "\ndef __swapd_migrate__(ctx):\n"
        + "    ctx.setitem(CACHE, 'thread', __import__('threading').get_ident())\n"
    )

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()

        def control() -> Any:
            plan = patch.prepare(m, new)  # planned off the loop
            return plan.commit_soon(loop).result(timeout=30)

        handle = await loop.run_in_executor(None, control)
        assert handle.serial == 1
        return threading.get_ident(), m.CACHE["thread"]

    loop_thread, commit_thread = asyncio.run(main())
    assert commit_thread == loop_thread


def test_async_generator_with_changed_free_variables_is_patched(mods: Mods) -> None:
    src = """
    def make():
        a = 1
        async def agen():
            yield a
        return agen
    held = make()
    """
    m = mods.load(src)
    plan = patch.prepare(
        m, edit(src, ("    a = 1\n", "    a = 1\n    b = 2\n"), ("yield a", "yield a + b"))
    )
    assert plan.committable, plan.refused
    plan.commit()

    async def first() -> Any:
        async for value in m.held():
            return value

    assert asyncio.run(first()) == 3


def test_hook_supplies_absent_cells_and_siblings_share_them(mods: Mods) -> None:
    src = """
    def make(start):
        total = start
        def add(n):
            nonlocal total
            total += n
            return total
        def get():
            return total
        return add, get
    pair1 = make(0)
    pair2 = make(100)
    """
    m = mods.load(src)
    new = edit(
        src,
        ("        total += n\n", "        total += n\n        log.append(n)\n"),
        ("        return total\n    return", "        return (total, len(log))\n    return"),
        ("    total = start\n", "    total = start\n    log = []\n"),
    )
    plan = patch.prepare(m, new)
    # `log = []` is a literal initializer: one fresh list per call of make, shared by its
    # two closures (they share the cell `total`), not shared across calls.
    assert {(a.function, a.name, a.source) for a in plan.absent} == {
        ("make.<locals>.add", "log", "constexpr"),
        ("make.<locals>.get", "log", "constexpr"),
    }
    plan.commit()
    add1, get1 = m.pair1
    add2, get2 = m.pair2
    add1(5)
    add1(6)
    add2(1)
    assert get1() == (11, 2) and get2() == (101, 1)


def test_empty_absent_cell_requires_accept_absent(mods: Mods) -> None:
    src = """
    def make(x):
        def g():
            return x
        return g
    held = make(1)
    """
    m = mods.load(src)
    new = edit(src, ("def make(x):\n", "def make(x, y=None):\n"), ("return x\n", "return (x, y)\n"))
    plan = patch.prepare(m, new)
    assert plan.needs_accept_absent and not plan.committable
    assert [a.source for a in plan.absent] == ["EMPTY"]
    with pytest.raises(patch.AbsentCells, match="accept_absent=True"):
        plan.commit()
    assert m.held() == 1  # nothing changed
    with_hook = new + "\n__swapd_cells__ = {'make.<locals>.g': {'y': 'hooked'}}\n"
    h = patch.apply(m, with_hook)
    assert m.held() == (1, "hooked")
    h.rollback()
    h = patch.prepare(m, new, accept_absent=True).commit()
    # The held closure reads y through the cell in its code's constants: an empty cell
    # raises ValueError there; a closure made by the new code raises NameError.
    with pytest.raises(ValueError, match="Cell is empty"):
        m.held()
    h.rollback()
    assert m.held() == 1


def test_same_source_sequence_replays_identically_on_a_fresh_module(mods: Mods) -> None:
    s1 = edit(COUNTER, ("count += 1", "count += 10"))
    s2 = s1 + "\nLIMIT = 5\n\ndef limit():\n    return LIMIT\n"
    s3 = edit(s2, ("count += 10", "count += 100"), ("LIMIT = 5", "LIMIT = 6"))
    results = []
    for _ in range(2):
        m = mods.load(COUNTER)
        assert m.counter() == 101
        for source in (s1, s2, s3):
            patch.apply(m, source)
        results.append((m.counter(), m.limit(), patch.source_of(m)[:2], len(patch.applied(m))))
    assert results[0] == results[1] == (201, 6, (s3, results[0][2][1]), 3)


def test_traceback_lines_come_from_the_patched_source(mods: Mods) -> None:
    import traceback

    src = "def boom():\n    raise RuntimeError('v1')\n"
    m = mods.load(src)
    patch.apply(m, "def boom():\n    x = 1\n    raise RuntimeError('v2 line 3')\n")
    with pytest.raises(RuntimeError) as info:
        m.boom()
    text = "".join(traceback.format_exception(info.value))
    assert "raise RuntimeError('v2 line 3')" in text
