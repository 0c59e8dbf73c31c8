"""Committed patches and their rollback (of one module, or of every module of a patch set),
and `make_permanent`, which folds committed patches so the engine drops their undo state."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import sys
from types import FunctionType
from typing import Any, NoReturn

from swapd.patch import listeners
from swapd.patch.code import logical_code
from swapd.patch.commit import (
    DELETE,
    MISSING,
    Locks,
    MigrationContext,
    Op,
    Store,
    UndoFailed,
    all_states,
    apply_or_undo,
    changed_since,
    existing_state,
    forward_ops,
    is_current,
    records,
    run_soon,
    undo_ops,
)
from swapd.patch.model import Change, PatchInconsistent, RollbackError
from swapd.patch.plan import linecache_entry, set_linecache
from swapd.patch.planning import PlanData


class Applied:
    """A committed patch (of one module): the handle that rolls it back."""

    def __init__(self, plan: object, data: PlanData, ctx: MigrationContext) -> None:
        d = data
        # The committed Plan (transaction.py), kept alive with what it holds until folded;
        # typed `object` here so that this module does not depend on the one that uses it.
        self._plan: object | None = plan
        self._data: PlanData | None = d
        self._ctx = ctx
        self._previous_current: str | None = None
        self._group: tuple[Applied, ...] = ()  # the patch set it belongs to, if any
        self.module_name = d.name
        self.sha256 = d.new_sha
        self.base_sha256 = d.base.sha256
        self._changed = d.changed
        self._notes = d.notes
        self.serial = 0
        self.active = False
        self.permanent = False

    def _activate(self, previous_current: str | None, serial: int) -> None:
        self._previous_current = previous_current
        self.serial = serial
        self.active = True

    @property
    def changed(self) -> list[Change]:
        return list(self._changed)

    @property
    def notes(self) -> list[str]:
        """The plan's notes and those the migration (and `on_change` callbacks) added."""
        return self._notes + self._ctx.notes

    @property
    def group(self) -> list[Applied]:
        """The handles of the patch set this patch belongs to (itself alone if none)."""
        return list(self._group) or [self]

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module_name,
            "serial": self.serial,
            "sha256": self.sha256,
            "base_sha256": self.base_sha256,
            "active": self.active,
            "permanent": self.permanent,
            "changed": records(self._changed),
            "notes": list(self.notes),
        }

    def prepare_rollback(self, *, scan_heap: bool = True) -> RollbackPlan:
        """Plan the rollback of this patch (and of the rest of its patch set), on any thread.
        With ``scan_heap``, closures that the patched code created since the commit are
        switched back to the old code too (when their free variables allow it; the others
        are listed in the notes)."""
        return RollbackPlan(self.group, scan_heap)

    def rollback(self, *, scan_heap: bool = True) -> list[str]:
        """Roll back on the calling thread; returns notes (see `RollbackPlan.commit`)."""
        return self.prepare_rollback(scan_heap=scan_heap).commit()

    def rollback_soon(
        self, loop: asyncio.AbstractEventLoop
    ) -> concurrent.futures.Future[list[str]]:
        """Plan now, commit the rollback on ``loop``'s thread between callbacks."""
        plan = self.prepare_rollback()
        return run_soon(loop, plan.commit)

    def _fold(self) -> None:
        """Made permanent: drop everything kept to undo this patch."""
        self.active = False
        self.permanent = True
        self._plan = self._data = None
        self._previous_current = None
        self._ctx = MigrationContext(self._ctx.module, "migrate", {})
        self._group = ()


def make_permanent(module: Any = None) -> int:
    """Make the committed patches of ``module`` (a module or its name; None: of every
    module) permanent: they stay in force but can no longer be rolled back, and the engine
    drops their undo logs, the code objects and values they replaced, and the sources kept
    for rollback.  Patch sets spanning several modules are folded in all of them.  Returns
    the number of patches folded."""
    states = all_states()
    todo = {s.name for s in states} if module is None else {
        module if isinstance(module, str) else module.__name__}
    folded = 0
    done: set[str] = set()
    while todo - done:
        name = sorted(todo - done)[0]
        done.add(name)
        state = existing_state(name)
        if state is None:
            continue
        with state.lock:
            for handle in state.stack:
                todo.update(h.module_name for h in handle._group)
                handle._fold()
                folded += 1
            state.stack.clear()
    return folded


class _Part:
    """One module's share of a rollback."""

    def __init__(self, applied: Applied, scan_heap: bool) -> None:
        self.applied = applied
        self.check()
        d = applied._data
        assert d is not None
        self.data = d
        self.state = d.state
        self.version = d.state.version
        self.notes: list[str] = []
        self.stores = list(d.stores)
        self.strays: list[Store] = []
        if scan_heap:
            self._find_strays()
        self.lines = linecache_entry(d.filename, d.base.text, d.base.text.splitlines(keepends=True))
        # Everything the commit needs, built now (the commit runs on the event loop).
        stores, strays = self.stores, self.strays
        self.reads = [s.read_op() for s in stores + strays]
        self.expected = [MISSING if s.new is DELETE else s.new for s in stores]
        self.expected += [s.old for s in strays]
        self.ops, self.inverse = _rollback_ops(stores, strays)
        self.installed = d.state.entries(d.installed)
        plan = applied.to_dict() if d.rollback_hook is not None else {}
        self.ctx = MigrationContext(d.module, "rollback", plan)

    def check(self) -> None:
        applied = self.applied
        d = applied._data
        if applied.permanent or d is None:
            raise RollbackError(f"{applied.module_name}: patch #{applied.serial} was made "
                                "permanent (squashed): it can no longer be rolled back")
        state = d.state
        if not applied.active:
            raise RollbackError(f"{d.display}: patch #{applied.serial} is not active")
        if not is_current(state) or sys.modules.get(d.name, d.module) is not d.module:
            raise RollbackError(f"{d.display}: the module was reloaded or replaced")
        if not state.stack or state.stack[-1] is not applied:
            top = state.stack[-1].serial if state.stack else "?"
            raise RollbackError(
                f"{d.display}: patch #{applied.serial} is not the latest; roll back #{top} first"
            )

    def _find_strays(self) -> None:
        d = self.data
        installed = {id(code): key for code, key in d.installed}
        added = {id(code) for code in d.installed_new}
        moddict = d.module.__dict__
        kept = 0
        objects = gc.get_objects()
        try:
            for obj in objects:
                if type(obj) is not FunctionType or obj.__globals__ is not moddict:
                    continue
                if id(obj) in d.touched:
                    continue
                key = installed.get(id(obj.__code__))
                if key is None:
                    kept += id(logical_code(obj.__code__)) in added
                    continue
                old = d.old_codes.get(key)
                if old is not None and old.co_freevars == obj.__code__.co_freevars:
                    self.strays.append(Store("attr", obj, "__code__", old, obj.__code__))
                else:
                    kept += 1
        finally:
            del objects
        if self.strays:
            self.notes.append(
                f"{d.display}: {len(self.strays)} function(s) created by the patched code "
                "since the commit switch back to the old code"
            )
        if kept:
            self.notes.append(
                f"{d.display}: {kept} function(s) created by the patched code keep it (the old "
                "code has no counterpart with the same free variables)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.data.name,
            "serial": self.applied.serial,
            "stores": len(self.stores) + len(self.strays),
            "migrate_undo": self.applied._ctx.recorded,
            "rollback_hook": self.data.rollback_hook is not None,
            "notes": list(self.notes),
        }

    def ops_now(self, notes: list[str]) -> tuple[list[Op], list[Op]]:
        """The batch for now: what we set must still be there.  Data values (constants)
        changed since are kept; anything else changed means someone else patched the
        module."""
        stale = changed_since(self.reads, self.expected)
        if not stale:
            return self.ops, self.inverse
        d = self.data
        count = len(self.stores)
        for i in stale:
            if i < count and not self.stores[i].data:
                raise RollbackError(
                    f"{d.display}: {self.stores[i].describe()} was changed outside swapd "
                    "since the commit"
                )
            if i < count:
                notes.append(f"{d.display}: {self.stores[i].describe()} changed since; kept")
        skip = set(stale)
        keep = [s for i, s in enumerate(self.stores) if i not in skip]
        strays = [s for i, s in enumerate(self.strays) if i + count not in skip]
        return _rollback_ops(keep, strays)


class RollbackPlan:
    """A prepared rollback of the most recent patch of a module (of each module of a patch
    set)."""

    def __init__(self, handles: list[Applied], scan_heap: bool) -> None:
        self._parts = [_Part(h, scan_heap) for h in handles]

    @property
    def notes(self) -> list[str]:
        return [n for p in self._parts for n in p.notes]

    def to_dict(self) -> dict[str, Any]:
        if len(self._parts) == 1:
            return self._parts[0].to_dict()
        return {
            "modules": [p.data.name for p in self._parts],
            "stores": sum(len(p.stores) + len(p.strays) for p in self._parts),
            "notes": self.notes,
            "parts": [p.to_dict() for p in self._parts],
        }

    def commit_soon(self, loop: asyncio.AbstractEventLoop) -> concurrent.futures.Future[list[str]]:
        return run_soon(loop, self.commit)

    def commit(self) -> list[str]:
        """Run ``__swapd_rollback__``, restore the previous code and values in one indivisible
        step, then undo the migration; returns notes.  `RollbackError`: nothing was rolled
        back.  `PatchInconsistent`: an undo failed too; the message says what is left."""
        parts = self._parts
        where = parts[0].data.display if len(parts) == 1 else "modules " + ", ".join(
            p.data.name for p in parts)
        with Locks(p.state for p in parts):
            notes = self.notes
            for p in parts:
                p.check()
                if p.state.version != p.version:
                    raise RollbackError(
                        f"{p.data.display}: the module changed since the rollback was planned"
                    )
            batches = [p.ops_now(notes) for p in parts]
            hooked: list[_Part] = []
            for p in reversed(parts):
                if p.data.rollback_hook is not None:
                    hooked.append(p)
                    try:
                        p.data.rollback_hook(p.ctx)
                    except Exception as e:
                        _unwind(hooked, f"{p.data.display}: __swapd_rollback__ raised "
                                        f"{type(e).__name__}: {e}", e)
            # The code first: that step is all or nothing, undoing the migration is not.
            ops = batches[0][0] if len(parts) == 1 else [op for b in batches for op in b[0]]
            inverse = batches[0][1] if len(parts) == 1 else [op for b in batches for op in b[1]]
            try:
                apply_or_undo(ops, inverse)
            except UndoFailed as e:
                raise PatchInconsistent(
                    f"{where}: a store failed during the rollback ({e}): the module runs "
                    "part of the old code and part of the new"
                ) from e
            except Exception as e:
                _unwind(hooked, f"{where}: a store failed ({type(e).__name__}: {e})", e)
            for p in parts:
                for action in p.data.after_commit:
                    action()
                applied = p.applied
                p.state.trash.append(set_linecache(p.data.filename, p.lines))
                p.state.stack.pop()
                p.state.version += 1
                p.state.current = applied._previous_current
                p.state.superseded.update(p.installed)
                applied.active = False
            for p in reversed(parts):
                try:
                    notes += p.applied._ctx.undo()
                except Exception as e:
                    raise PatchInconsistent(
                        f"{p.data.display}: the code was rolled back, but undoing the migration "
                        f"failed ({type(e).__name__}: {e}); the data it changed is partly still "
                        "migrated"
                    ) from e
            for p in parts:
                if listeners.listeners:
                    names = tuple(dict.fromkeys(c.name for c in p.data.changed))
                    event = listeners.PatchEvent(p.data.name, "rollback", p.applied.serial, names)
                    notes += listeners.notify(event)
                notes += p.ctx.notes
            return notes


def _unwind(hooked: list[_Part], what: str, error: Exception) -> NoReturn:
    """Nothing was rolled back: undo the rollback hooks' changes and say so."""
    for p in reversed(hooked):
        try:
            p.ctx.undo()
        except Exception as e:
            raise PatchInconsistent(
                f"{what}; undoing __swapd_rollback__'s changes failed "
                f"({type(e).__name__}: {e}); the patch is still in force"
            ) from error
    raise RollbackError(f"{what}; nothing was rolled back") from error


def _rollback_ops(stores: list[Store], strays: list[Store]) -> tuple[list[Op], list[Op]]:
    """A rollback's batch (the patch's stores undone, newest first, and the stray closures
    switched back) and its inverse, for `apply_or_undo`."""
    ops = list(reversed(undo_ops(stores))) + forward_ops(strays)
    inverse = list(reversed(forward_ops(stores))) + undo_ops(strays)
    return ops, inverse
