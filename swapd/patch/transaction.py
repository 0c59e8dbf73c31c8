"""Prepared plans and their commit.

One commit path serves one plan (`Plan.commit`) or plans for several modules committed as
one patch (`commit_all`): every store of every plan in one indivisible step, then each
migration in order; a failure anywhere undoes all of it.  Committed patches and their
rollback are in `swapd.patch.rollback`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Sequence
from typing import Any

from swapd.patch import listeners
from swapd.patch.commit import (
    DELETE,
    Locks,
    MigrationContext,
    Op,
    UndoFailed,
    apply_or_undo,
    changed_since,
    forward_ops,
    is_current,
    records,
    run_soon,
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
)
from swapd.patch.plan import linecache_entry, set_linecache
from swapd.patch.planning import PlanData
from swapd.patch.rollback import Applied

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
        self._handle = Applied(self, self._data, self._ctx)

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
            "changed": records(d.changed),
            "added": records(d.added),
            "absent": records(d.absent),
            "removed": records(d.removed),
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
    with Locks(p._data.state for p in plans):
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
        if listeners.listeners:
            for p, h in zip(plans, handles, strict=True):
                event = listeners.PatchEvent(h.module_name, "commit", h.serial, p._names)
                p._ctx.notes += listeners.notify(event)
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
