"""In-process patching: new code for a running module, state and identity kept.

Usable on its own::

    from swapd import patch
    patch.record_sources(["app"])             # before the application is imported
    ...
    plan = patch.prepare("app.rules", new_source)   # any thread; touches no live object
    print(plan.to_dict())                            # changed/added/absent/removed/refused
    handle = plan.commit()                           # the event-loop thread, between callbacks
    handle.rollback()                                # exact undo (LIFO per module)

Semantics (see ``docs/patching.md`` for the operator's view)
------------------------------------------------------------
* **Identity is kept.**  Existing function and class objects are changed in place, so
  ``from m import f`` elsewhere, timers, callbacks, registries, bound methods, existing
  instances and pickling by reference all run the new code.  Names are never rebound to
  new objects, except names the patch adds.
* **Cells are joined by name**, recursively: every live function whose code changed keeps
  the closure cells whose names the new code still uses, so state in closures survives;
  functions stored in cells are patched in place, so the cell needs no change.  Never by
  position: CPython only checks the *number* of free variables and ``co_freevars`` is
  sorted, so a renamed variable would silently read its neighbour's cell.
* **Nothing unchanged runs again**: no decorator, no module statement.  Module data keeps
  its live value.  A changed ``NAME = <literal>`` takes the new literal only if the live
  value still equals the old literal; otherwise it is kept and the plan notes a conflict.
* **Classes are updated in place**: methods, properties, classmethods, staticmethods and
  class constants change on the class object, so existing instances see them.
* ``functools.lru_cache`` caches of patched functions are cleared after the commit.
* Generators and coroutines already running finish on the old code; new calls get the new.
* **Refused** ("needs a swap"): changed class bases, metaclass, class decorators,
  ``__slots__``, dataclass/attrs/NamedTuple/TypedDict fields, enum members, changed decorator
  expressions, a function turning into (or from) a generator or coroutine, a changed
  non-literal module statement without ``__swapd_migrate__``, ``from __future__`` changes.

What the engine diffs against (the *base*)
------------------------------------------
The source the live module was loaded from, not the file on disk (a deploy may have
replaced it).  In order: ``base_source=`` if given; the source of the last patch committed
to the module; the text recorded at import by `record_sources()`; else the file, read at
prepare (noted in the plan).  Whatever the origin, the base is compiled and every function
reachable from the module namespace must match a code object of it exactly (bytecode,
constants, names and line numbers), else `BaseSourceMismatch`.  After a commit the patch
source becomes the module's source; a rollback restores the previous one.  Hence applying
the same sequence of sources to a freshly imported module gives the same result: a
restarted worker replays the journal.

Closure cells that exist only in the new code (``absent``)
----------------------------------------------------------
Their value comes from ``__swapd_cells__`` in the patch (a dict ``{qualname: {name: value}}``
or a callable ``(qualname, name, old_function) -> value`` raising ``LookupError`` for "no
value"), else from a literal initializer of that variable in the enclosing function
(``b = 10``), else the cell is EMPTY and reading it raises ``NameError``: such a plan commits
only with ``accept_absent=True``.  Closures made by one call of the enclosing function get
one shared new cell (grouped by the cells they already share).  ``__class__`` cells (a
method that starts using ``super()``) are bound to the owning class.

Commit mechanics and the atomicity guarantee
--------------------------------------------
A plan is a list of stores (function ``__code__``/``__defaults__``/``__kwdefaults__``/
``__doc__``, class dictionary entries, module globals), each with the value it had at
prepare.  ``commit()`` checks every one still holds that value (else `PlanStale`, nothing
changed), then performs all of them inside **one C-level call** that executes no bytecode,
with the cyclic GC paused and every replaced object kept alive by the undo log.  We chose
this over a table of trampolines flipped by one pointer store (the design in the reference):
it is just as atomic, costs 25-140 ns per store (a 100-function commit blocks the loop for
~50 us in all), and leaves no per-call cost behind (a trampoline adds ~60 ns to every call
until compaction).
Trampolines remain only where they are unavoidable: a function whose free variables change
keeps its identity and gets a code object that calls a new function built on the joined
cells (see ``bench/bench_patch_commit.py`` for figures).

Guarantee, on GIL builds of CPython 3.11+: the commit is one indivisible step for every
other thread.  Every bytecode another thread executes sees either none or all of the
patch's stores.  Hence:

1. a call that enters a patched function after the step runs the new code, one that entered
   before runs the old code to its end (a frame never changes code);
2. a thread calling patched functions sees the versions change at most once per commit,
   never new code and then old (until a rollback, which is the same kind of step);
3. a call that started before the step and calls other patched functions after it runs old
   code itself and new code in its callees (Erlang's external-call rule).  Committing on the
   event-loop thread between callbacks removes this for code running on the loop.

``__swapd_migrate__(ctx)`` and cache clears run right after the step on the committing
thread; code on other threads can run new code before the migration finishes.  Exceptions:
a Python audit hook (``sys.addaudithook``) runs bytecode inside the step, and free-threaded
builds have no GIL; in both cases every store is still atomic but the step is not.

Migrations
----------
``def __swapd_migrate__(ctx)`` in the patch runs inside the transaction; changes made through
``ctx.set``/``ctx.setitem``/``ctx.delete``/``ctx.delitem`` are undo-logged, and if the hook
raises, everything is rolled back and `MigrationFailed` is raised.  ``__swapd_rollback__(ctx)``
runs first when the patch is rolled back; then the code is restored in one step, and the
migration's changes are undone right after it.  The ``__swapd_*`` hooks are never bound into
the module.

Errors
------
`PatchError` is the base.  `PatchSyntaxError`, `PatchExecError`/`PatchImportError`,
`SourceUnavailable` and `BaseSourceMismatch` come from prepare; `PatchRefused`,
`AbsentCells`, `PlanStale`, `CommitFailed` and `MigrationFailed` from commit;
`RollbackError` from rollback.  Each message is one line.  Any of these leaves the module
exactly as it was.  The exception is `PatchInconsistent` (commit or rollback): a step failed
and undoing what it had already changed failed too, so the module may run a mix of old and
new code, or half-migrated data; its message says which.

Plan wire format (``Plan.to_dict()``, JSON-able)
------------------------------------------------
::

    {"module": "app.rules", "file": "app/rules.py", "sha256": "…", "state": "prepared",
     "base": {"sha256": "…", "origin": "recorded"},
     "changed": [{"kind": "function", "name": "make.<locals>.g", "detail": "code; 3 object(s)"}],
     "added":   [{"kind": "function", "name": "helper", "detail": "…"}],
     "absent":  [{"function": "make.<locals>.g", "name": "b", "source": "constexpr",
                  "value": "10"}],
     "removed": [{"kind": "freevar", "where": "make.<locals>.g", "name": "c"}],
     "refused": [{"where": "app/rules.py:12", "what": "class P", "reason": "…",
                  "remedy": "needs a swap"}],
     "notes": ["…"], "stores": 7, "committable": true, "accept_absent_required": false,
     "migrate": false, "rollback_hook": false}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any, NamedTuple, NoReturn, TypeVar

from swapd.patch.code import CodeIndex, CodeKey, logical_code
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
    drop_state,
    existing_state,
    forward_ops,
    is_current,
    state_for,
    undo_ops,
)
from swapd.patch.model import (
    NEEDS_SWAP,
    AbsentCell,
    AbsentCells,
    Added,
    BaseSourceMismatch,
    Change,
    CommitFailed,
    MigrationFailed,
    PatchError,
    PatchExecError,
    PatchImportError,
    PatchInconsistent,
    PatchRefused,
    PatchSyntaxError,
    PlanStale,
    Refusal,
    Removed,
    RollbackError,
    SourceUnavailable,
)
from swapd.patch.plan import PlanData, linecache_entry, make_plan, set_linecache
from swapd.patch.source import (
    base_source as _base_source,
)
from swapd.patch.source import (
    decode,
    module_filename,
    record_sources,
    sha256_text,
    stop_recording,
)
from swapd.patch.source import (
    forget as _forget_record,
)

__all__ = [
    "AbsentCell",
    "AbsentCells",
    "Added",
    "Applied",
    "BaseSourceMismatch",
    "Change",
    "CommitFailed",
    "MigrationContext",
    "MigrationFailed",
    "PatchError",
    "PatchEvent",
    "PatchExecError",
    "PatchImportError",
    "PatchInconsistent",
    "PatchRefused",
    "PatchSyntaxError",
    "Plan",
    "PlanStale",
    "Refusal",
    "Removed",
    "RollbackError",
    "RollbackPlan",
    "SourceUnavailable",
    "applied",
    "apply",
    "forget",
    "on_change",
    "prepare",
    "record_sources",
    "source_of",
    "stop_recording",
]

T = TypeVar("T")


def _module(module: ModuleType | str) -> ModuleType:
    if isinstance(module, ModuleType):
        return module
    found = sys.modules.get(module)
    if not issubclass(type(found), ModuleType):
        raise SourceUnavailable(f"{module}: no such module is imported")
    assert isinstance(found, ModuleType)
    return found


def _display(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


def _run_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
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


# ---------------------------------------------------------------- prepare


def prepare(
    module: ModuleType | str,
    new_source: str | bytes,
    *,
    base_source: str | bytes | None = None,
    base_sha256: str | None = None,
    accept_absent: bool = False,
    prune: bool = False,
    source_name: str | None = None,
    scan_heap: bool = True,
) -> Plan:
    """Plan replacing ``module``'s code with ``new_source``, without changing anything.

    Safe to call from any thread.  ``base_sha256``, if given, must be the sha256 of the
    source the module runs (the base the patch was written against).  ``prune`` deletes
    names and members the new source no longer defines (default: keep them).
    ``scan_heap`` (default) walks the garbage collector's objects to find closures made by
    calls and functions held only outside the module; it holds the GIL for roughly
    ~15-25 ms per million objects.  ``source_name`` is used in diagnostics.
    """
    mod = _module(module)
    filename = module_filename(mod)
    display = source_name or _display(filename)
    state = state_for(mod)
    # Both under the lock (a commit or rollback changes them together): a commit landing
    # after this read makes the plan stale, never wrong.
    with state.lock:
        version, current = state.version, state.current
    base = _base_source(mod, filename, current, base_source)
    if base_sha256 is not None and base_sha256 != base.sha256:
        raise BaseSourceMismatch(
            f"{display}: the patch was written against base {base_sha256[:12]}, but the "
            f"module runs {base.sha256[:12]} ({base.origin} source)"
        )
    try:
        new_text = decode(new_source)
    except (SyntaxError, UnicodeDecodeError) as e:
        raise PatchSyntaxError(f"{display}: SyntaxError: cannot decode source: {e}") from e
    data = make_plan(
        mod,
        state,
        base,
        new_text,
        sha256_text(new_text),
        version=version,
        filename=filename,
        display=display,
        prune=prune,
        scan_heap=scan_heap,
    )
    return Plan(data, accept_absent)


def apply(module: ModuleType | str, new_source: str | bytes, **options: Any) -> Applied:
    """`prepare` and `Plan.commit` in one call, on the calling thread."""
    return prepare(module, new_source, **options).commit()


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
        self._lines = linecache_entry(data.filename, data.new_text, data.lines)
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

    def discard(self) -> None:
        """Drop the plan.  New modules it imported stay imported."""
        if self._status == "prepared":
            self._status = "discarded"
            self._forward = self._undo = self._reads = self._expected = []

    def commit_soon(self, loop: asyncio.AbstractEventLoop) -> concurrent.futures.Future[Applied]:
        """Commit on ``loop``'s thread, between two of its callbacks (thread-safe)."""
        return _run_soon(loop, self.commit)

    def commit(self, *, accept_absent: bool = False) -> Applied:
        """Apply the plan in one indivisible step (see the module docstring) and return the
        handle that rolls it back.  Raises without changing anything if the plan is refused,
        needs ``accept_absent``, or is stale.  After `CommitFailed` or `MigrationFailed`
        everything was undone and the plan may be committed again; after `PatchInconsistent`
        (the undo failed too) it is "failed"."""
        d = self._data
        if self._status != "prepared":
            raise PatchError(f"{d.display}: this plan was already {self._status}")
        if d.refused:
            raise PatchRefused(d.name, d.refused)
        if d.needs_ack and not (accept_absent or self._accept_absent):
            empty = [a for a in d.absent if a.source == "EMPTY"]
            raise AbsentCells(d.name, empty)
        state = d.state
        with state.lock:
            self._check_fresh(state)
            stale = changed_since(self._reads, self._expected)
            if stale:
                what = ", ".join(d.stores[i].describe() for i in stale[:3])
                raise PlanStale(f"{d.display}: {what} changed since prepare; prepare again")
            try:
                apply_or_undo(self._forward, self._undo)
            except UndoFailed as e:
                self._status = "failed"
                raise PatchInconsistent(
                    f"{d.display}: a store failed during the commit ({e}): the module runs "
                    "part of the new code"
                ) from e
            except Exception as e:
                raise CommitFailed(
                    f"{d.display}: a store failed ({type(e).__name__}: {e}); nothing was changed"
                ) from e
            ctx = self._ctx
            if d.migrate is not None:
                try:
                    d.migrate(ctx)
                except BaseException as e:
                    self._abort(ctx, e)
                    if not isinstance(e, Exception):
                        raise
                    raise MigrationFailed(
                        f"{d.display}: __swapd_migrate__ raised {type(e).__name__}: {e}; "
                        "the patch was rolled back"
                    ) from e
            for action in d.after_commit:
                action()
            handle = self._handle
            handle._activate(state.current, len(state.stack) + 1)
            # Keep the replaced entry: freeing its lines here would cost the loop ~10 us.
            handle._previous_lines = set_linecache(d.filename, self._lines)
            state.version += 1
            state.current = d.new_text
            state.superseded.update(self._superseded)
            state.stack.append(handle)
            self._status = "committed"
            if _listeners:
                ctx.notes += _notify(PatchEvent(d.name, "commit", handle.serial, self._names))
            return handle

    def _check_fresh(self, state: ModuleState) -> None:
        d = self._data
        if not is_current(state) or sys.modules.get(d.name, d.module) is not d.module:
            raise PlanStale(f"{d.display}: the module was reloaded or replaced since prepare")
        if state.version != d.version:
            raise PlanStale(
                f"{d.display}: the module was patched or rolled back since prepare; prepare again"
            )

    def _abort(self, ctx: MigrationContext, error: BaseException) -> None:
        """Undo a commit whose migration raised ``error``: the migration's changes, then the
        stores.  The plan stays prepared, with no note left from the failed attempt, unless
        something could not be undone (`PatchInconsistent`; the plan is then "failed")."""
        d = self._data
        failed: list[str] = []
        try:
            left = ctx.undo()
        except Exception as e:
            failed.append(f"undoing its changes failed ({type(e).__name__}: {e})")
        else:
            if left:
                failed.append("; ".join(left))
        try:
            apply_or_undo(list(reversed(self._undo)), list(reversed(self._forward)))
        except UndoFailed as e:
            failed.append(f"restoring the old code failed ({e}): part of the new code is live")
        except Exception as e:
            failed.append(
                f"restoring the old code failed ({type(e).__name__}: {e}): the new code is live"
            )
        ctx.notes.clear()
        if failed:
            self._status = "failed"
            raise PatchInconsistent(
                f"{d.display}: __swapd_migrate__ raised {type(error).__name__}: {error}; "
                + "; ".join(failed)
            ) from error


# ---------------------------------------------------------------- committed patches


class Applied:
    """A committed patch: the handle that rolls it back."""

    def __init__(self, plan: Plan, ctx: MigrationContext) -> None:
        self._plan = plan
        self._data = plan._data
        self._ctx = ctx
        self._previous_current: str | None = None
        self._previous_lines: object = None
        self.serial = 0
        self.active = False
        self._notes = plan._data.notes

    def _activate(self, previous_current: str | None, serial: int) -> None:
        self._previous_current = previous_current
        self.serial = serial
        self.active = True

    @property
    def notes(self) -> list[str]:
        """The plan's notes and those the migration added."""
        return self._notes + self._ctx.notes

    module_name = property(lambda self: self._data.name)
    sha256 = property(lambda self: self._data.new_sha)
    base_sha256 = property(lambda self: self._data.base.sha256)
    changed = property(lambda self: list(self._data.changed))

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self._data.name,
            "serial": self.serial,
            "sha256": self._data.new_sha,
            "base_sha256": self._data.base.sha256,
            "active": self.active,
            "changed": _records(self._data.changed),
            "notes": list(self.notes),
        }

    def prepare_rollback(self, *, scan_heap: bool = True) -> RollbackPlan:
        """Plan the rollback (any thread).  With ``scan_heap``, closures that the patched
        code created since the commit are switched back to the old code too (when their
        free variables allow it; the others are listed in the notes)."""
        return RollbackPlan(self, scan_heap)

    def rollback(self, *, scan_heap: bool = True) -> list[str]:
        """Roll back on the calling thread; returns notes (see `RollbackPlan.commit`)."""
        return self.prepare_rollback(scan_heap=scan_heap).commit()

    def rollback_soon(
        self, loop: asyncio.AbstractEventLoop
    ) -> concurrent.futures.Future[list[str]]:
        """Plan now, commit the rollback on ``loop``'s thread between callbacks."""
        plan = self.prepare_rollback()
        return _run_soon(loop, plan.commit)


class RollbackPlan:
    """A prepared rollback of the most recent patch of a module."""

    def __init__(self, applied: Applied, scan_heap: bool) -> None:
        d = applied._data
        self._applied = applied
        self._state = d.state
        self._check(applied)
        self._version = d.state.version
        self.notes: list[str] = []
        self._stores = list(d.stores)
        self._strays: list[Store] = []
        if scan_heap and d.base_index is not None:
            self._find_strays(d.base_index)
        self._lines = linecache_entry(
            d.filename, d.base.text, d.base.text.splitlines(keepends=True)
        )
        # Everything the commit needs, built now (the commit runs on the event loop).
        stores, strays = self._stores, self._strays
        self._reads = [s.read_op() for s in stores + strays]
        self._expected = [MISSING if s.new is DELETE else s.new for s in stores]
        self._expected += [s.old for s in strays]
        self._ops, self._inverse = _rollback_ops(stores, strays)
        self._installed = d.state.entries(d.installed)
        plan = applied.to_dict() if d.rollback_hook is not None else {}
        self._ctx = MigrationContext(d.module, "rollback", plan)

    def _check(self, applied: Applied) -> None:
        d = applied._data
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

    def _find_strays(self, base_index: CodeIndex) -> None:
        import gc

        d = self._applied._data
        installed: dict[int, CodeKey] = {id(code): key for code, key in d.installed}
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
                old = base_index.by_key.get(key)
                if old is not None and old.co_freevars == obj.__code__.co_freevars:
                    self._strays.append(Store("attr", obj, "__code__", old, obj.__code__))
                else:
                    kept += 1
        finally:
            del objects
        if self._strays:
            self.notes.append(
                f"{d.display}: {len(self._strays)} function(s) created by the patched code "
                "since the commit switch back to the old code"
            )
        if kept:
            self.notes.append(
                f"{d.display}: {kept} function(s) created by the patched code keep it (the old "
                "code has no counterpart with the same free variables)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = self._applied._data
        return {
            "module": d.name,
            "serial": self._applied.serial,
            "stores": len(self._stores) + len(self._strays),
            "migrate_undo": self._applied._ctx.recorded,
            "rollback_hook": d.rollback_hook is not None,
            "notes": list(self.notes),
        }

    def commit_soon(self, loop: asyncio.AbstractEventLoop) -> concurrent.futures.Future[list[str]]:
        return _run_soon(loop, self.commit)

    def commit(self) -> list[str]:
        """Run ``__swapd_rollback__``, restore the previous code and values in one indivisible
        step, then undo the migration; returns notes.  `RollbackError`: nothing was rolled
        back.  `PatchInconsistent`: an undo failed too; the message says what is left."""
        applied = self._applied
        d = applied._data
        state = self._state
        with state.lock:
            self._check(applied)
            if state.version != self._version:
                raise RollbackError(
                    f"{d.display}: the module changed since the rollback was planned"
                )
            # What we set must still be there.  Data values (constants) changed since are
            # kept; anything else changed means someone else patched the module.
            ops, inverse, notes = self._ops, self._inverse, list(self.notes)
            stale = changed_since(self._reads, self._expected)
            if stale:
                ops, inverse = self._without(stale, notes)
            ctx = self._ctx
            if d.rollback_hook is not None:
                try:
                    d.rollback_hook(ctx)
                except Exception as e:
                    self._unwind(ctx, f"__swapd_rollback__ raised {type(e).__name__}: {e}", e)
            # The code first: that step is all or nothing, undoing the migration is not.
            try:
                apply_or_undo(ops, inverse)
            except UndoFailed as e:
                raise PatchInconsistent(
                    f"{d.display}: a store failed during the rollback ({e}): the module runs "
                    "part of the old code and part of the new"
                ) from e
            except Exception as e:
                self._unwind(ctx, f"a store failed ({type(e).__name__}: {e})", e)
            for action in d.after_commit:
                action()
            applied._previous_lines = set_linecache(d.filename, self._lines)
            state.stack.pop()
            state.version += 1
            state.current = applied._previous_current
            state.superseded.update(self._installed)
            applied.active = False
            try:
                notes += applied._ctx.undo()
            except Exception as e:
                raise PatchInconsistent(
                    f"{d.display}: the code was rolled back, but undoing the migration failed "
                    f"({type(e).__name__}: {e}); the data it changed is partly still migrated"
                ) from e
            if _listeners:
                names = tuple(dict.fromkeys(c.name for c in d.changed))
                notes += _notify(PatchEvent(d.name, "rollback", applied.serial, names))
            return notes + ctx.notes

    def _unwind(self, ctx: MigrationContext, what: str, error: Exception) -> NoReturn:
        """Nothing was rolled back: undo the rollback hook's changes and say so."""
        d = self._applied._data
        try:
            ctx.undo()
        except Exception as e:
            raise PatchInconsistent(
                f"{d.display}: {what}; undoing __swapd_rollback__'s changes failed "
                f"({type(e).__name__}: {e}); the patch is still in force"
            ) from error
        raise RollbackError(f"{d.display}: {what}; nothing was rolled back") from error

    def _without(self, stale: list[int], notes: list[str]) -> tuple[list[Op], list[Op]]:
        """Ops for a rollback where some values changed since the commit."""
        d = self._applied._data
        count = len(self._stores)
        for i in stale:
            if i < count and not self._stores[i].data:
                raise RollbackError(
                    f"{d.display}: {self._stores[i].describe()} was changed outside swapd "
                    "since the commit"
                )
            if i < count:
                notes.append(f"{d.display}: {self._stores[i].describe()} changed since; kept")
        skip = set(stale)
        keep = [s for i, s in enumerate(self._stores) if i not in skip]
        strays = [s for i, s in enumerate(self._strays) if i + count not in skip]
        return _rollback_ops(keep, strays)


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


# ---------------------------------------------------------------- module helpers


def applied(module: ModuleType | str) -> list[Applied]:
    """The patches committed to ``module``, oldest first (roll back from the end)."""
    name = module if isinstance(module, str) else module.__name__
    state = existing_state(name)
    return list(state.stack) if state is not None and is_current(state) else []


def source_of(module: ModuleType | str) -> tuple[str, str, str]:
    """``(text, sha256, origin)`` of the source the engine would diff a patch against."""
    mod = _module(module)
    filename = module_filename(mod)
    state = existing_state(mod.__name__)
    current = state.current if state is not None and is_current(state) else None
    base = _base_source(mod, filename, current, None)
    return base.text, base.sha256, base.origin


def forget(module: ModuleType | str) -> None:
    """Drop what the engine knows about ``module`` (its patch stack and recorded source),
    e.g. after the module object was discarded.  The module itself is not touched."""
    name = module if isinstance(module, str) else module.__name__
    drop_state(name)
    _forget_record(name)
