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
* **Definitions sharing a name pair by where they are bound** (the assigned name, the
  decorators, the dict key or list slot, the enclosing statement: `swapd.patch.sites`),
  never by compile order; what cannot be paired is refused.
* **Nothing unchanged runs again**: no decorator, no module statement.  Module data keeps
  its live value.  A changed ``NAME = <literal>`` takes the new literal only if the live
  value still equals the old literal; otherwise it is kept and the plan notes a conflict.
* **Only what changed changes**: a default value whose expression changed (or reads a
  constant the patch changes) gets the new value; every other default keeps its live
  object.  Docstrings and annotations follow into ``property`` objects and
  ``functools.wraps``/``lru_cache`` wrappers; ``singledispatch`` registrations follow a
  changed annotation.
* **Classes are updated in place**: methods, properties, classmethods, staticmethods and
  class constants change on the class object, so existing instances see them.
* ``functools.lru_cache``/``cache`` caches are cleared after the commit when the cached
  function, or a name it reads (through other functions of the module too), changed;
  `on_change` callbacks let applications drop their own caches.
* Generators and coroutines already running finish on the old code; new calls get the new.
* **Refused** ("needs a swap"): changed class bases, metaclass, class decorators,
  ``__slots__``, dataclass/attrs/NamedTuple/TypedDict fields, enum members, changed decorator
  expressions, a function turning into (or from) a generator or coroutine, a name that
  turns from a function or class into anything else, definitions that cannot be paired, a
  changed non-literal module statement without ``__swapd_migrate__``, ``from __future__``
  changes, the signature of a function an object analysed when it was registered (a FastAPI
  route or dependency: `swapd.patch.introspected`).  ``docs/patching.md`` lists each with
  its reason.  Any other change to a function's parameters commits with a warning note.

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
until compaction).  A function whose free variables change keeps its identity and runs code
compiled from its new ``def`` for the closure it has (`swapd.patch.closures`): no forwarding
frame, its real signature (see ``bench/bench_patch_commit.py`` for figures).

Several modules can be patched as one (`commit_all`): their stores form one batch, their
migrations run in order, and a failure undoes all of it; the set rolls back as a whole.
`make_permanent` folds committed patches: they stay, and the engine drops what it kept to
undo them (the replaced code and values, the old sources).

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
migration's changes are undone right after it: each value is restored only if it is still
the one the migration left (a value the application wrote since is kept, and the rollback's
notes say so).  The ``__swapd_*`` hooks are never bound into the module.

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

import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from swapd.patch.commit import (
    MigrationContext,
    drop_state,
    existing_state,
    is_current,
    state_for,
)
from swapd.patch.listeners import PatchEvent, on_change
from swapd.patch.model import (
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
from swapd.patch.plan import make_plan
from swapd.patch.rollback import Applied, RollbackPlan, make_permanent
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
from swapd.patch.transaction import Plan, commit_all

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
    "commit_all",
    "forget",
    "make_permanent",
    "on_change",
    "prepare",
    "record_sources",
    "source_of",
    "stop_recording",
]


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
    peers: Sequence[Plan] = (),
) -> Plan:
    """Plan replacing ``module``'s code with ``new_source``, without changing anything.

    Safe to call from any thread.  ``base_sha256``, if given, must be the sha256 of the
    source the module runs (the base the patch was written against).  ``prune`` deletes
    names and members the new source no longer defines (default: keep them).
    ``scan_heap`` (default) walks the garbage collector's objects to find closures made by
    calls and functions held only outside the module; it holds the GIL for roughly
    ~15-25 ms per million objects.  ``source_name`` is used in diagnostics.  ``peers`` are
    plans of other modules to be committed with this one (`commit_all`): a new
    ``from other import name`` in this patch takes ``name`` from the peer plan of
    ``other`` when that plan adds or rebinds it.
    """
    mod = _module(module)
    filename = module_filename(mod)
    display = source_name or _display(filename)
    state = state_for(mod)
    # Both under the lock (a commit or rollback changes them together): a commit landing
    # after this read makes the plan stale, never wrong.
    with state.lock:
        version, current = state.version, state.current
        trash, state.trash = state.trash, []
    del trash  # freed here, not on the loop that committed
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
        peers={p.module_name: p.bindings() for p in peers},
    )
    return Plan(data, accept_absent)


def apply(module: ModuleType | str, new_source: str | bytes, **options: Any) -> Applied:
    """`prepare` and `Plan.commit` in one call, on the calling thread."""
    return prepare(module, new_source, **options).commit()


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
