"""What the engine refuses ("needs a swap") and how every failure leaves the module as it was."""

from __future__ import annotations

import operator
from types import ModuleType
from typing import Any

import pytest

from swapd import patch
from swapd.patch.commit import apply_or_undo
from tests.unit.patch_support import Mods, edit


def fingerprint(m: ModuleType) -> dict[str, Any]:
    """Everything a patch could change: module names, class dicts, function code/defaults."""
    out: dict[str, Any] = {}
    for name, value in vars(m).items():
        out[name] = value
        if isinstance(value, type):
            out[name + ".__dict__"] = dict(vars(value))
            for attr, member in vars(value).items():
                if hasattr(member, "__code__"):
                    out[f"{name}.{attr}.code"] = member.__code__
        if hasattr(value, "__code__"):
            out[name + ".code"] = value.__code__
            out[name + ".defaults"] = value.__defaults__
    return out


def assert_refused(m: ModuleType, new: str, reason: str) -> None:
    before = fingerprint(m)
    plan = patch.prepare(m, new)
    assert not plan.committable
    assert any(reason in r.reason for r in plan.refused), plan.refused
    info = plan.to_dict()["refused"]
    assert all(r["remedy"] == "needs a swap" for r in info)
    with pytest.raises(patch.PatchRefused) as err:
        plan.commit()
    assert "\n" not in str(err.value) and "needs a swap" in str(err.value)
    assert fingerprint(m) == before


DATACLASS = """
from dataclasses import dataclass

@dataclass
class Point:
    x: int
    y: int = 0

    def norm(self):
        return self.x + self.y
"""


def test_dataclass_field_changes_are_refused(mods: Mods) -> None:
    m = mods.load(DATACLASS)
    assert_refused(
        m,
        edit(DATACLASS, ("    y: int = 0\n", "    y: int = 0\n    z: int = 0\n")),
        "dataclass fields changed",
    )
    assert_refused(m, edit(DATACLASS, ("y: int = 0", "y: int = 1")), "dataclass fields changed")


ENUM = """
import enum

class Color(enum.Enum):
    RED = 1
    GREEN = 2

    def label(self):
        return self.name.lower()
"""


def test_enum_member_changes_are_refused_but_methods_patch(mods: Mods) -> None:
    m = mods.load(ENUM)
    red = m.Color.RED
    assert_refused(
        m, edit(ENUM, ("    GREEN = 2\n", "    GREEN = 2\n    BLUE = 3\n")), "enum members changed"
    )
    assert_refused(m, edit(ENUM, ("GREEN = 2", "GREEN = 20")), "enum members changed")
    h = patch.apply(m, edit(ENUM, ("self.name.lower()", "self.name.title()")))
    assert m.Color.RED is red and red.label() == "Red"
    h.rollback()
    assert red.label() == "red"


CLASS = """
import abc

class Base:
    pass

class Other:
    pass

class K(Base):
    __slots__ = ("a",)

    def m(self):
        return 1
"""


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (("class K(Base):", "class K(Other):"), "bases or metaclass changed"),
        (("class K(Base):", "class K(Base, metaclass=abc.ABCMeta):"), "bases or metaclass changed"),
        (("class K(Base):", "@staticmethod\nclass K(Base):"), "class decorators changed"),
        (('__slots__ = ("a",)', '__slots__ = ("a", "b")'), "__slots__ changed"),
        (("        return 1\n", "        yield 1\n"), "function kind changed"),
        (("    def m(self):", "    async def m(self):"), "function kind changed"),
        (
            ("import abc\n", "from __future__ import annotations\nimport abc\n"),
            "compiler flags of the module changed",
        ),
    ],
)
def test_layout_and_kind_changes_are_refused(
    mods: Mods, change: tuple[str, str], reason: str
) -> None:
    m = mods.load(CLASS)
    assert_refused(m, edit(CLASS, change), reason)


def test_namedtuple_fields_are_refused(mods: Mods) -> None:
    src = "from typing import NamedTuple\n\nclass P(NamedTuple):\n    x: int\n"
    m = mods.load(src)
    assert_refused(m, src + "    y: int = 0\n", "NamedTuple fields changed")


def test_new_statement_is_refused_without_a_migration(mods: Mods) -> None:
    src = "HANDLERS = []\n\ndef h():\n    return 1\n"
    m = mods.load(src)
    assert_refused(m, src + "HANDLERS.append(h)\n", "cannot be re-run in place")
    migrate = "\ndef __swapd_migrate__(ctx):\n    ctx.setitem(ctx.module.__dict__, 'X', 1)\n"
    plan = patch.prepare(m, src + "HANDLERS.append(h)\n" + migrate)
    assert plan.committable and any("HANDLERS.append(h)" in n for n in plan.notes)
    plan.commit()
    assert m.HANDLERS == [] and m.X == 1  # the statement was not run; the migration was


def test_removed_statement_and_main_block_are_only_noted(mods: Mods) -> None:
    src = "LOG = []\nLOG.append('loaded')\n\nif __name__ == '__main__':\n    print('a')\n"
    m = mods.load(src)
    new = "LOG = []\n\nif __name__ == '__main__':\n    print('b')\n"
    plan = patch.prepare(m, new)
    assert plan.committable
    assert ("statement", plan.to_dict()["file"], "LOG.append('loaded')") in plan.removed
    assert any("__main__" in n for n in plan.notes)


def test_syntax_error_is_one_line_with_location_and_touches_nothing(mods: Mods) -> None:
    m = mods.load("def f():\n    return 1\n")
    before = fingerprint(m)
    with pytest.raises(patch.PatchSyntaxError) as err:
        patch.prepare(m, "def f():\n    return (1\n\ndef g(:\n", source_name="app/rules.py")
    text = str(err.value)
    assert text.startswith("app/rules.py:") and "SyntaxError" in text and "\n" not in text
    assert isinstance(err.value.__cause__, SyntaxError)
    assert fingerprint(m) == before and patch.applied(m) == []


def test_failing_new_import_or_statement_touches_nothing(mods: Mods) -> None:
    src = "def f():\n    return 1\n"
    m = mods.load(src)
    before = fingerprint(m)
    with pytest.raises(patch.PatchImportError, match=r":1: ModuleNotFoundError: "):
        patch.prepare(m, "import swapd_no_such_module_xyz\n" + src.replace("1", "2"))
    with pytest.raises(patch.PatchExecError, match=r":3: ZeroDivisionError"):
        patch.prepare(m, src.replace("1", "2") + "X = 1 / 0\n")
    with pytest.raises(patch.PatchExecError, match="NameError"):
        patch.prepare(m, "def f(x=undefined_name):\n    return 2\n")
    assert fingerprint(m) == before and m.f() == 1


def test_stale_plans_are_rejected_without_changes(mods: Mods) -> None:
    src = "LIMIT = 1\n\ndef f():\n    return LIMIT\n"
    m = mods.load(src)
    a = patch.prepare(m, src.replace("LIMIT = 1", "LIMIT = 2"))
    b = patch.prepare(m, src.replace("return LIMIT", "return -LIMIT"))
    a.commit()
    with pytest.raises(patch.PlanStale, match="patched or rolled back since prepare"):
        b.commit()
    c = patch.prepare(m, patch.source_of(m)[0].replace("LIMIT = 2", "LIMIT = 3"))
    m.__dict__["LIMIT"] = 7  # the application changes the value the plan replaces
    with pytest.raises(patch.PlanStale, match="global LIMIT changed since prepare"):
        c.commit()
    assert m.f() == 7
    with pytest.raises(patch.PatchError, match="already committed"):
        a.commit()


def test_base_sha256_is_checked(mods: Mods) -> None:
    src = "def f():\n    return 1\n"
    m = mods.load(src)
    _, sha, origin = patch.source_of(m)
    assert origin == "recorded"
    with pytest.raises(patch.BaseSourceMismatch, match="written against base 000000000000"):
        patch.prepare(m, src, base_sha256="0" * 64)
    assert patch.prepare(m, src.replace("1", "2"), base_sha256=sha).commit().base_sha256 == sha


def test_unknown_module_is_reported(mods: Mods) -> None:
    with pytest.raises(patch.SourceUnavailable, match="no such module"):
        patch.prepare("swapd_no_such_module_abc", "x = 1\n")


def test_failed_store_undoes_the_applied_prefix() -> None:
    class Target:
        a = 0
        b = 0

    t = Target()
    t.a, t.b = 1, 2
    forward = [(setattr, t, "a", 10), (operator.truediv, 1, 0), (setattr, t, "b", 20)]
    undo = [(setattr, t, "a", 1), (setattr, t, "a", 1), (setattr, t, "b", 2)]
    with pytest.raises(ZeroDivisionError):
        apply_or_undo(forward, undo)
    assert (t.a, t.b) == (1, 2)


def test_error_hierarchy() -> None:
    for cls in (
        patch.PatchSyntaxError,
        patch.PatchExecError,
        patch.PatchImportError,
        patch.PatchRefused,
        patch.AbsentCells,
        patch.PlanStale,
        patch.MigrationFailed,
        patch.CommitFailed,
        patch.RollbackError,
        patch.PatchInconsistent,
        patch.SourceUnavailable,
        patch.BaseSourceMismatch,
    ):
        assert issubclass(cls, patch.PatchError)
    assert issubclass(patch.PatchImportError, patch.PatchExecError)
