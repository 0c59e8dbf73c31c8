"""Prepared plans, their commit, committed patches and their rollback.

One commit path serves one plan (`Plan.commit`) or plans for several modules committed as
one patch (`commit_all`): every store of every plan in one indivisible step, then each
migration in order; a failure anywhere undoes all of it.  A patch set is rolled back as a
whole, the same way.  `make_permanent` folds committed patches: they stay in force, and
the engine drops what it kept to undo them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import sys
from collections.abc import Callable, Iterable, Sequence
from types import FunctionType
from typing import Any, NamedTuple, NoReturn, TypeVar

from swapd.patch.code import logical_code
from swapd.patch.commit import (
    DELETE,
    MISSING,
    MigrationContext,
    ModuleState,
    Op,
    Store,
    UndoFailed,
    apply_or_undo,
    changed_since,
    existing_state,
    forward_ops,
    is_current,
    undo_ops,
)
from swapd.patch.model import (
    NEEDS_SWAP,
    AbsentCell,
    AbsentCells,
    Added,
    Change,
    CommitFailed,
    MigrationFailed,
    PatchError,
    PatchInconsistent,
    PatchRefused,
    PlanStale,
    Refusal,
    Removed,
    RollbackError,
)
from swapd.patch.plan import PlanData, linecache_entry, set_linecache

T = TypeVar("T")


def run_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``fn`` on ``loop``'s thread between two callbacks; a future for the result."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)
            if not isinstance(e, Exception):
                raise

    loop.call_soon_threadsafe(run)
    return future


def _records(items: list[Any]) -> list[dict[str, Any]]:
    return [dict(item._asdict()) for item in items]


class _Locks:
    """The locks of several modules' states, taken in name order (no deadlock between two
    transactions over the same modules)."""

    def __init__(self, states: Iterable[ModuleState]) -> None:
        unique = {id(s): s for s in states}
        self.states = sorted(unique.values(), key=lambda s: s.name)

    def __enter__(self) -> None:
        for s in self.states:
            s.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for s in reversed(self.states):
            s.lock.release()


# ---------------------------------------------------------------- prepared plans


class Plan:
    """A prepared patch.  Reading it is free; `commit` applies it atomically."""

    def __init__(self, data: PlanData, accept_absent: bool) -> None:
        self._data = data
        self._accept_absent = accept_absent
        self._status = "prepared"
        self._forward = forward_ops(data.stores)
        self._undo = undo_ops(data.stores)
        self._reads = [s.read_op() for s in data.stores]
        self._expected = [s.old for s in data.stores]
        self._lines: object = linecache_entry(
            data.filename, data.new_text, data.new_text.splitlines(keepends=True)
        )
        self._superseded = data.state.entries(data.superseded)
        self._names = tuple(dict.fromkeys(c.name for c in data.changed))
        # Built now so the commit, on the event-loop thread, allocates next to nothing.
        self._ctx = MigrationContext(data.module, "migrate", self.to_dict() if data.migrate else {})
        self._handle = Applied(self, self._ctx)

    module_name = property(lambda self: self._data.name)
    sha256 = property(lambda self: self._data.new_sha)
    base_sha256 = property(lambda self: self._data.base.sha256)
    base_origin = property(lambda self: self._data.base.origin)
    status = property(lambda self: self._status)

    @property
    def changed(self) -> list[Change]:
        return list(self._data.changed)

    @property
    def added(self) -> list[Added]:
        return list(self._data.added)

    @property
    def absent(self) -> list[AbsentCell]:
        return list(self._data.absent)

    @property
    def removed(self) -> list[Removed]:
        return list(self._data.removed)

    @property
    def refused(self) -> list[Refusal]:
        return list(self._data.refused)

    @property
    def notes(self) -> list[str]:
        return list(self._data.notes)

    @property
    def needs_accept_absent(self) -> bool:
        return self._data.needs_ack

    @property
    def committable(self) -> bool:
        return not self._data.refused and (not self._data.needs_ack or self._accept_absent)

    def to_dict(self) -> dict[str, Any]:
        d = self._data
        refused = [dict(r._asdict(), remedy=NEEDS_SWAP) for r in d.refused]
        return {
            "module": d.name,
            "file": d.display,
            "sha256": d.new_sha,
            "state": self._status,
            "base": {"sha256": d.base.sha256, "origin": d.base.origin},
            "changed": _records(d.changed),
            "added": _records(d.added),
            "absent": _records(d.absent),
            "removed": _records(d.removed),
            "refused": refused,
            "notes": list(d.notes),
            "stores": len(d.stores),
            "committable": self.committable,
            "accept_absent_required": d.needs_ack,
            "migrate": d.migrate is not None,
            "rollback_hook": d.rollback_hook is not None,
        }

    def bindings(self) -> dict[str, Any]:
        """The module globals the commit binds: name -> new value."""
        d = self._data
        moddict = d.module.__dict__
        return {s.name: s.new for s in d.stores
                if s.kind == "item" and s.target is moddict and s.new is not DELETE}

    def discard(self) -> None:
        """Drop the plan.  New modules it imported stay imported."""
        if self._status == "prepared":
            self._status = "discarded"
            self._forward = self._undo = self._reads = self._expected = []

    def commit_soon(self, loop: asyncio.AbstractEventLoop) -> concurrent.futures.Future[Applied]:
        """Commit on ``loop``'s thread, between two of its callbacks (thread-safe)."""
        return run_soon(loop, self.commit)

    def commit(self, *, accept_absent: bool = False) -> Applied:
        """Apply the plan in one indivisible step (see `swapd.patch.api`) and return the
        handle that rolls it back.  Raises without changing anything if the plan is refused,
        needs ``accept_absent``, or is stale.  After `CommitFailed` or `MigrationFailed`
        everything was undone and the plan may be committed again; after `PatchInconsistent`
        (the undo failed too) it is "failed"."""
        return _commit([self], accept_absent)[0]

    def _check(self, accept_absent: bool) -> None:
        d = self._data
        if self._status != "prepared":
            raise PatchError(f"{d.display}: this plan was already {self._status}")
        if d.refused:
            raise PatchRefused(d.name, d.refused)
        if d.needs_ack and not (accept_absent or self._accept_absent):
            empty = [a for a in d.absent if a.source == "EMPTY"]
            raise AbsentCells(d.name, empty)

    def _check_fresh(self) -> None:
        d = self._data
        state = d.state
        if not is_current(state) or sys.modules.get(d.name, d.module) is not d.module:
            raise PlanStale(f"{d.display}: the module was reloaded or replaced since prepare")
        if state.version != d.version:
            raise PlanStale(
                f"{d.display}: the module was patched or rolled back since prepare; prepare again"
            )
        stale = changed_since(self._reads, self._expected)
        if stale:
            what = ", ".join(d.stores[i].describe() for i in stale[:3])
            raise PlanStale(f"{d.display}: {what} changed since prepare; prepare again")

    def _activate(self) -> Applied:
        d = self._data
        state = d.state
        handle = self._handle
        handle._activate(state.current, len(state.stack) + 1)
        # The replaced entry is freed by the next prepare, off the loop (~10 us here).
        state.trash.append(set_linecache(d.filename, self._lines))
        self._lines = None  # linecache holds it while it is current
        state.version += 1
        state.current = d.new_text
        state.superseded.update(self._superseded)
        state.stack.append(handle)
        self._status = "committed"
        self._reads = self._expected = []  # only the commit needed them
        return handle


def commit_all(plans: Sequence[Plan], *, accept_absent: bool = False) -> list[Applied]:
    """Commit plans of several modules as one patch: every store of every plan in one
    indivisible step, then each migration in order.  If a store or a migration fails,
    everything is undone (`CommitFailed`, `MigrationFailed`) and nothing changed.  Returns
    one handle per module; rolling back any of them rolls back the whole set."""
    return _commit(list(plans), accept_absent)


def _commit(plans: list[Plan], accept_absent: bool) -> list[Applied]:
    if not plans:
        return []
    names = [p._data.name for p in plans]
    if len(set(names)) != len(names):
        raise PatchError(f"one plan per module in a patch set: {', '.join(names)}")
    where = plans[0]._data.display if len(plans) == 1 else f"modules {', '.join(names)}"
    for p in plans:
        p._check(accept_absent)
    if len(plans) == 1:  # the usual case, on the event loop: no list built
        forward, undo = plans[0]._forward, plans[0]._undo
    else:
        forward = [op for p in plans for op in p._forward]
        undo = [op for p in plans for op in p._undo]
    with _Locks(p._data.state for p in plans):
        for p in plans:
            p._check_fresh()
        try:
            apply_or_undo(forward, undo)
        except UndoFailed as e:
            for p in plans:
                p._status = "failed"
            raise PatchInconsistent(
                f"{where}: a store failed during the commit ({e}): the module runs part "
                "of the new code"
            ) from e
        except Exception as e:
            raise CommitFailed(
                f"{where}: a store failed ({type(e).__name__}: {e}); nothing was changed"
            ) from e
        for i, p in enumerate(plans):
            migrate = p._data.migrate
            if migrate is None:
                continue
            try:
                migrate(p._ctx)
            except BaseException as e:
                _abort(plans[: i + 1], forward, undo, p, e)
                if not isinstance(e, Exception):
                    raise
                raise MigrationFailed(
                    f"{p._data.display}: __swapd_migrate__ raised {type(e).__name__}: {e}; "
                    + ("the patch was rolled back" if len(plans) == 1
                       else f"the patch to {', '.join(names)} was rolled back")
                ) from e
        for p in plans:
            for action in p._data.after_commit:
                action()
        handles = [p._activate() for p in plans]
        if len(handles) > 1:
            group = tuple(handles)
            for h in handles:
                h._group = group
        if _listeners:
            for p, h in zip(plans, handles, strict=True):
                p._ctx.notes += _notify(PatchEvent(h.module_name, "commit", h.serial, p._names))
        return handles


def _abort(migrated: list[Plan], forward: list[Op], undo: list[Op], culprit: Plan,
           error: BaseException) -> None:
    """Undo a commit whose migration (of ``culprit``) raised ``error``: the migrations'
    changes, newest first, then the stores.  The plans stay prepared, with no note left from
    the failed attempt, unless something could not be undone (`PatchInconsistent`; the
    plans are then "failed")."""
    failed: list[str] = []
    for p in reversed(migrated):
        try:
            left = p._ctx.undo()
        except Exception as e:
            failed.append(f"undoing its changes failed ({type(e).__name__}: {e})")
        else:
            if left:
                failed.append("; ".join(left))
    try:
        apply_or_undo(list(reversed(undo)), list(reversed(forward)))
    except UndoFailed as e:
        failed.append(f"restoring the old code failed ({e}): part of the new code is live")
    except Exception as e:
        failed.append(
            f"restoring the old code failed ({type(e).__name__}: {e}): the new code is live"
        )
    for p in migrated:
        p._ctx.notes.clear()
    if failed:
        for p in migrated:
            p._status = "failed"
        raise PatchInconsistent(
            f"{culprit._data.display}: __swapd_migrate__ raised {type(error).__name__}: "
            f"{error}; " + "; ".join(failed)
        ) from error


# ---------------------------------------------------------------- committed patches


class Applied:
    """A committed patch (of one module): the handle that rolls it back."""

    def __init__(self, plan: Plan, ctx: MigrationContext) -> None:
        d = plan._data
        self._plan: Plan | None = plan
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
            "changed": _records(self._changed),
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
    from swapd.patch.commit import all_states

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
        with _Locks(p.state for p in parts):
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
                if _listeners:
                    names = tuple(dict.fromkeys(c.name for c in p.data.changed))
                    notes += _notify(PatchEvent(p.data.name, "rollback", p.applied.serial, names))
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


# ---------------------------------------------------------------- change listeners


class PatchEvent(NamedTuple):
    """Passed to `on_change` callbacks."""

    module: str
    action: str  # "commit" or "rollback"
    serial: int  # the patch's place in the module's stack (1 = the first)
    changed: tuple[str, ...]  # what changed: functions, constants, members, caches


_listeners: list[Callable[[PatchEvent], object]] = []


def on_change(callback: Callable[[PatchEvent], object]) -> Callable[[], None]:
    """Call ``callback(event)`` after every patch committed or rolled back in this process,
    on the thread that commits it (a worker's event-loop thread), once the new code, the
    migration and the engine's own cache clears are in place.  The place to drop an
    application's own memo caches (a dict of computed results, a cache in another module
    that calls the patched code).  Keep it short: it runs inside the commit's pause.  An
    exception it raises does not undo the patch; it is added to the patch's notes.
    Returns a function that removes the callback."""
    _listeners.append(callback)

    def remove() -> None:
        if callback in _listeners:
            _listeners.remove(callback)

    return remove


def _notify(event: PatchEvent) -> list[str]:
    notes = []
    for callback in list(_listeners):
        try:
            callback(event)
        except Exception as e:
            name = getattr(callback, "__qualname__", repr(callback))
            notes.append(f"{event.module}: on_change callback {name} raised "
                         f"{type(e).__name__}: {e}")
    return notes
