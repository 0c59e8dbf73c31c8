"""What the planner's phases share: the inputs every phase reads (`Inputs`) and the plan
being built (`PlanData`). In a module of their own so that the phases (matching,
statements, functions, followups) depend on these types, not on the planner that runs them.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType, ModuleType
from typing import Any

from swapd.patch.code import CodeIndex, CodeKey, Discovery
from swapd.patch.commit import ModuleState, Store, read_value
from swapd.patch.model import AbsentCell, Added, Change, Refusal, Removed
from swapd.patch.nodes import FunctionNodes
from swapd.patch.source import BaseSource


@dataclass
class PlanData:
    """The plan being built, then the prepared plan: its stores and its report."""

    module: ModuleType
    name: str
    filename: str
    display: str
    base: BaseSource
    new_text: str
    new_sha: str
    state: ModuleState
    version: int
    stores: list[Store] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    added: list[Added] = field(default_factory=list)
    absent: list[AbsentCell] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    migrate: Callable[[Any], object] | None = None
    rollback_hook: Callable[[Any], object] | None = None
    after_commit: list[Callable[[], object]] = field(default_factory=list)  # and rollback
    superseded: list[tuple[CodeType, CodeKey]] = field(default_factory=list)
    installed: list[tuple[CodeType, CodeKey]] = field(default_factory=list)
    installed_new: list[CodeType] = field(default_factory=list)  # no base counterpart
    touched: set[int] = field(default_factory=set)
    old_codes: dict[CodeKey, CodeType] = field(default_factory=dict)  # of `installed`
    needs_ack: bool = False
    _removed_seen: set[Removed] = field(default_factory=set, repr=False)
    _absent_seen: set[AbsentCell] = field(default_factory=set, repr=False)

    def refuse(self, refusal: Refusal) -> None:
        if refusal not in self.refused:  # once, not once per live closure
            self.refused.append(refusal)

    def add_removed(self, r: Removed) -> None:
        if r not in self._removed_seen:
            self._removed_seen.add(r)
            self.removed.append(r)

    def add_absent(self, a: AbsentCell) -> None:
        if a not in self._absent_seen:
            self._absent_seen.add(a)
            self.absent.append(a)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def store(self, kind_: str, target: Any, name: Any, new: Any, data: bool = False) -> None:
        old = read_value(kind_, target, name)
        self.stores.append(Store(kind_, target, name, new, old, data))


@dataclass(frozen=True)
class Inputs:
    """What every phase reads and none changes: the live module, both compiled sources and
    what discovery found in the module."""

    module: ModuleType
    filename: str
    display: str
    state: ModuleState
    prune: bool
    old_tree: ast.Module
    old_idx: CodeIndex
    new_tree: ast.Module
    new_idx: CodeIndex
    found: Discovery
    peers: dict[str, dict[str, Any]]  # module name -> names its plan binds (a patch set)
    _nodes: dict[bool, FunctionNodes] = field(default_factory=dict, repr=False)

    @property
    def moddict(self) -> dict[str, Any]:
        return self.module.__dict__

    def live_class(self, qualname: str) -> type | None:
        """The live class of that qualified name, if the module still binds its outermost
        class (a class the module no longer binds is not updated in place)."""
        cls = self.found.classes.get(qualname)
        if cls is None:
            return None
        top = self.moddict.get(qualname.split(".")[0])
        return cls if isinstance(top, type) else None

    def nodes(self, new: bool) -> FunctionNodes:
        """The function nodes of the new (or old) tree, indexed on first use (a cache)."""
        found = self._nodes.get(new)
        if found is None:
            found = self._nodes[new] = FunctionNodes(self.new_tree if new else self.old_tree)
        return found
