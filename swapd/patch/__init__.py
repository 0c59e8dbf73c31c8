"""swapd.patch: the in-process patch engine (usable on its own; see `swapd.patch.api`).

    from swapd import patch
    plan = patch.prepare("app.rules", new_source)
    handle = plan.commit()

The names below load the engine on first use (PEP 562): a worker imports
`swapd.patch.source` at start-up to record module sources, and that must not pull the
whole engine into every process's start-up (nor into the supervisor, which only hashes
sources).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swapd.patch.api import (
        AbsentCell,
        AbsentCells,
        Added,
        Applied,
        BaseSourceMismatch,
        Change,
        CommitFailed,
        MigrationContext,
        MigrationFailed,
        PatchError,
        PatchEvent,
        PatchExecError,
        PatchImportError,
        PatchInconsistent,
        PatchRefused,
        PatchSyntaxError,
        Plan,
        PlanStale,
        Refusal,
        Removed,
        RollbackError,
        RollbackPlan,
        SourceUnavailable,
        applied,
        apply,
        commit_all,
        forget,
        make_permanent,
        on_change,
        prepare,
        record_sources,
        source_of,
        stop_recording,
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
    "commit_all",
    "forget",
    "make_permanent",
    "on_change",
    "prepare",
    "record_sources",
    "source_of",
    "stop_recording",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("swapd.patch.api"), name)
    raise AttributeError(f"module 'swapd.patch' has no attribute {name!r}")
