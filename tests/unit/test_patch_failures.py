"""Failure paths of commit and rollback, and the migration context's undo log."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swapd import patch
from swapd.patch.commit import ModuleState, state_for
from tests.unit.patch_support import Mods


def test_migration_set_undo_removes_an_instance_attribute_it_added() -> None:
    class Job:
        retries = 0  # a class-level default, not the instance's own value

        @property
        def size(self) -> int:
            return self.__dict__.get("_size", 1)

        @size.setter
        def size(self, value: int) -> None:
            self.__dict__["_size"] = value

    job = Job()
    ctx = patch.MigrationContext(types.ModuleType("m"), "migrate", {})
    ctx.set(job, "retries", 3)
    ctx.set(job, "size", 5)  # through a data descriptor: its value is what is restored
    ctx.set(Job, "retries", 9)
    assert (job.retries, job.size, Job.retries) == (3, 5, 9)
    ctx.undo()
    assert job.__dict__ == {"_size": 1} and Job.retries == 0 and job.size == 1


# A Python audit hook is the one way to make a store of the indivisible batch fail in the
# middle (the reviewer's reproduction).  Hooks cannot be removed, and one would make the
# batch divisible for the rest of the session (test_patch_threads would see torn reads), so
# each scenario that needs one runs in a fresh interpreter: the test runs
# ``_scenario_<name>(mods)`` there and reports its traceback.
_refuse: list[Callable[[object, object], bool] | None] = [None]


def _audit(event: str, args: tuple[object, ...]) -> None:
    refuse = _refuse[0]
    if refuse is not None and event == "object.__setattr__" and args[1] == "__code__":  # noqa: SIM102
        if refuse(args[0], args[2]):
            raise RuntimeError("code store refused by a test")


@contextlib.contextmanager
def refusing_code_stores(refuse: Callable[[object, object], bool]) -> Iterator[None]:
    assert os.environ.get("SWAPD_TEST_AUDIT") == "1", "only in a fresh interpreter"
    _refuse[0] = refuse
    try:
        yield
    finally:
        _refuse[0] = None


def in_fresh_interpreter(scenario: Callable[[Mods], None], tmp_path: Path) -> None:
    code = (
        "import sys, pathlib\n"
        f"from {__name__} import _audit, {scenario.__name__} as scenario\n"
        "from tests.unit.patch_support import Mods\n"
        "sys.addaudithook(_audit)\n"
        f"with Mods(pathlib.Path({str(tmp_path)!r})) as mods:\n"
        "    scenario(mods)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, SWAPD_TEST_AUDIT="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def after(allowed: int) -> Callable[[object, object], bool]:
    """Refuse every code store after the first ``allowed`` ones."""
    count = itertools.count()
    return lambda fn, code: next(count) >= allowed


TWO = "def f():\n    return 'f1'\n\ndef g():\n    return 'g1'\n"
TWO_V2 = TWO.replace("1'", "2'")


def _scenario_store_fails(mods: Mods) -> None:
    m = mods.load(TWO)
    plan = patch.prepare(m, TWO_V2)
    with refusing_code_stores(lambda fn, code: fn is m.g), pytest.raises(
        patch.CommitFailed, match="nothing was changed"
    ):
        plan.commit()
    assert (m.f(), m.g()) == ("f1", "g1") and plan.status == "prepared"
    plan.commit()
    assert (m.f(), m.g()) == ("f2", "g2")


def test_failed_store_is_undone_and_the_plan_can_be_committed_again(tmp_path: Path) -> None:
    in_fresh_interpreter(_scenario_store_fails, tmp_path)


def _scenario_commit_undo_fails(mods: Mods) -> None:
    m = mods.load(TWO)
    plan = patch.prepare(m, TWO_V2)
    # f's store passes; g's fails, and so does putting f's old code back
    with refusing_code_stores(after(1)), pytest.raises(
        patch.PatchInconsistent, match="runs part of the new code"
    ) as info:
        plan.commit()
    assert not isinstance(info.value, patch.CommitFailed)
    assert "RuntimeError: code store refused" in str(info.value)
    assert (m.f(), m.g()) == ("f2", "g1") and plan.status == "failed"
    with pytest.raises(patch.PatchError, match="already failed"):
        plan.commit()
    assert patch.applied(m) == []


def test_commit_whose_undo_fails_says_the_module_is_inconsistent(tmp_path: Path) -> None:
    in_fresh_interpreter(_scenario_commit_undo_fails, tmp_path)


def test_failed_migration_leaves_a_clean_plan_to_retry(mods: Mods) -> None:
    src = "TRIES = []\n\ndef f():\n    return 1\n"
    migrate = (
        "\ndef __swapd_migrate__(ctx):\n"
        "    ctx.note('migrated')\n"
        "    TRIES.append(1)\n"
        "    if len(TRIES) == 1:\n"
        "        raise RuntimeError('first try fails')\n"
    )
    m = mods.load(src)
    plan = patch.prepare(m, src.replace("return 1", "return 2") + migrate)
    with pytest.raises(patch.MigrationFailed, match="first try fails"):
        plan.commit()
    assert m.f() == 1 and plan.status == "prepared"
    h = plan.commit()
    assert m.f() == 2 and h.notes.count("migrated") == 1


def test_migration_whose_undo_fails_says_the_module_is_inconsistent(mods: Mods) -> None:
    src = "def f():\n    return 1\n"
    migrate = (
        "\ndef __swapd_migrate__(ctx):\n"
        "    ctx.on_rollback(lambda: 1 / 0)\n"
        "    raise RuntimeError('migration fails')\n"
    )
    m = mods.load(src)
    plan = patch.prepare(m, src.replace("return 1", "return 2") + migrate)
    with pytest.raises(patch.PatchInconsistent) as info:
        plan.commit()
    message = str(info.value)
    assert "RuntimeError: migration fails" in message
    assert "undoing its changes failed (ZeroDivisionError" in message
    assert m.f() == 1 and plan.status == "failed"  # the old code is back all the same


MIGRATED = "def f():\n    return 'v1'\n"
MIGRATED_V2 = MIGRATED.replace("v1", "v2") + (
    "\ndef __swapd_migrate__(ctx):\n    ctx.set(ctx.module, 'MIGRATED', True)\n"
    "\ndef __swapd_rollback__(ctx):\n    ctx.set(ctx.module, 'HOOK_RAN', True)\n"
)


def _scenario_rollback_store_fails(mods: Mods) -> None:
    m = mods.load(MIGRATED)
    h = patch.apply(m, MIGRATED_V2)
    assert m.f() == "v2" and m.MIGRATED is True
    with refusing_code_stores(lambda fn, code: True), pytest.raises(
        patch.RollbackError, match=r"a store failed .*; nothing was rolled back"
    ):
        h.rollback()
    # all or nothing: new code, migration in place, rollback hook undone, still in force
    assert m.f() == "v2" and m.MIGRATED is True and not hasattr(m, "HOOK_RAN")
    assert h.active and patch.applied(m) == [h]
    h.rollback()
    assert m.f() == "v1" and not hasattr(m, "MIGRATED") and patch.applied(m) == []


def test_rollback_whose_store_fails_changes_nothing(tmp_path: Path) -> None:
    in_fresh_interpreter(_scenario_rollback_store_fails, tmp_path)


def test_rollback_whose_migration_undo_fails_still_restores_the_code(mods: Mods) -> None:
    m = mods.load(MIGRATED)
    migrate = "\ndef __swapd_migrate__(ctx):\n    ctx.on_rollback(lambda: 1 / 0)\n"
    h = patch.apply(m, MIGRATED.replace("v1", "v2") + migrate)
    with pytest.raises(patch.PatchInconsistent, match="the code was rolled back, but undoing"):
        h.rollback()
    assert m.f() == "v1" and not h.active and patch.applied(m) == []
    assert patch.source_of(m)[0] == MIGRATED  # the next patch diffs against the old code


def test_rollback_report_says_whether_a_migration_is_undone(mods: Mods) -> None:
    m = mods.load(MIGRATED)
    plain = patch.apply(m, MIGRATED.replace("v1", "v2"))
    assert plain.prepare_rollback().to_dict()["migrate_undo"] is False
    plain.rollback()
    migrated = patch.apply(m, MIGRATED_V2)
    assert migrated.prepare_rollback().to_dict()["migrate_undo"] is True


def test_prepare_never_reads_half_of_a_commits_bookkeeping(mods: Mods) -> None:
    """A prepare on another thread while a commit sets the new version but not yet the new
    source would diff against the old source: it waits for the commit instead."""
    m = mods.load(TWO)
    plan = patch.prepare(m, TWO_V2)
    state = state_for(m)
    seen: dict[str, Any] = {}

    def prepare_next() -> None:
        try:
            seen["plan"] = patch.prepare(m, TWO_V2.replace("2'", "3'"))
        except Exception as e:
            seen["error"] = e

    class Watched(ModuleState):
        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)
            if name == "version" and "thread" not in seen:  # the commit is in between
                seen["thread"] = threading.Thread(target=prepare_next)
                seen["thread"].start()
                seen["thread"].join(0.3)

    state.__class__ = Watched
    try:
        plan.commit()
    finally:
        state.__class__ = ModuleState
    seen["thread"].join(30)
    assert "error" not in seen, seen.get("error")
    assert seen["plan"].base_sha256 == plan.sha256
    seen["plan"].commit()
    assert m.f() == "f3"


SESSION_DATA = """
class Config:
    mode = "v1"

SESSIONS = {"a": "old-a", "b": "old-b", "gone": "old-gone"}
CONFIG = Config()
"""
SESSION_MIGRATION = """
def __swapd_migrate__(ctx):
    for key in ("a", "b"):
        ctx.setitem(SESSIONS, key, "new-" + key)
    ctx.delitem(SESSIONS, "gone")
    ctx.set(CONFIG, "mode", "v2")
    ctx.set(CONFIG, "extra", 1)
    ctx.delete(Config, "mode")
"""


def test_rollback_of_a_migration_keeps_what_the_application_wrote_since(mods: Mods) -> None:
    m = mods.load(SESSION_DATA)
    handle = patch.apply(m, SESSION_DATA + SESSION_MIGRATION)
    assert m.SESSIONS == {"a": "new-a", "b": "new-b"} and m.CONFIG.mode == "v2"
    # The application keeps running on the migrated data, and writes some of it.
    m.SESSIONS["a"] = "written-after"
    m.SESSIONS["gone"] = "recreated"
    m.CONFIG.extra = 2
    notes = handle.rollback()
    assert m.SESSIONS == {"a": "written-after", "b": "old-b", "gone": "recreated"}
    assert m.CONFIG.extra == 2 and m.CONFIG.mode == "v1" and m.Config.mode == "v1"
    mod = m.__name__
    assert f"{mod}: SESSIONS['a'] was changed since __swapd_migrate__ set it; kept" in notes
    assert f"{mod}: SESSIONS['gone'] was set again since __swapd_migrate__ set it; kept" in notes
    assert f"{mod}: CONFIG.extra was changed since __swapd_migrate__ set it; kept" in notes
    assert not any("'b'" in n or "mode" in n for n in notes), notes  # restored, not reported
