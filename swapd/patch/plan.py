"""The planner: from (live module, base source, new source) to a list of stores.

Planning reads live objects and never writes to them.  It executes only what the patch adds
(new imports, definitions and assignments, in scratch locals over the live globals), the
default values and annotations of changed signatures (a copy of the ``def`` without
decorators or body) and the ``__swapd_cells__`` hook; the plan's notes say so.

The phases, each in its own module, and what passes between them:

    compiling    base and new source  -> trees and code indexes            (`Inputs`)
    code         the live module      -> its live functions and classes    (`Inputs.found`)
    matching     live code, indexes   -> live functions by key, key pairs  (`Matching`)
    diff         the two trees        -> statement-level work              (`ModuleDiff`)
    statements   ModuleDiff           -> module/class stores, scratch, hooks, signatures
    functions    Matching, signatures -> code/defaults stores, absent cells  (`Updates`)
    followups    Updates              -> what refers to changed functions: property and
                                         wrapper docs, singledispatch registries, caches

Every phase appends what it decides to one `PlanData` (the plan being built: stores and the
report); everything else a phase needs from an earlier one is passed as an argument.
"""

from __future__ import annotations

import linecache
from types import ModuleType
from typing import Any

from swapd.patch import followups, functions, matching, statements
from swapd.patch.code import discover
from swapd.patch.commit import ModuleState
from swapd.patch.compiling import compile_source, import_guard, module_imports
from swapd.patch.diff import Differ
from swapd.patch.planning import Inputs, PlanData
from swapd.patch.source import BaseSource


def make_plan(
    module: ModuleType,
    state: ModuleState,
    base: BaseSource,
    new_text: str,
    new_sha: str,
    *,
    version: int,
    filename: str,
    display: str,
    prune: bool,
    scan_heap: bool,
    peers: dict[str, dict[str, Any]] | None = None,
) -> PlanData:
    """Plan replacing ``module``'s code (which runs ``base``) with ``new_text``.  ``peers``:
    what the plans of other modules of the same patch set bind, by module name."""
    old_tree, old_idx = compile_source(base.text, filename, display, True)
    new_tree, new_idx = compile_source(new_text, filename, display, False)
    out = PlanData(module, module.__name__, filename, display, base, new_text, new_sha, state,
                   version)
    if base.origin == "disk":
        out.notes.append(
            f"{display}: base source read from disk at prepare (the module was "
            "imported before record_sources()); verified against the live code"
        )
    found = discover(module, filename, scan_heap)
    inp = Inputs(module, filename, display, state, prune, old_tree, old_idx, new_tree, new_idx,
                 found, peers or {})
    match = matching.match(inp, out)
    has_migrate = any("__swapd_migrate__" in statements.bound_names(s) for s in new_tree.body)
    diff = Differ(old_tree, new_tree, display, inp.live_class, has_migrate).run()
    out.refused += diff.refusals
    out.notes += diff.notes
    for r in diff.removed:
        out.add_removed(r)
    # Code compiled for one statement must equal the whole compile of the new source.
    run = statements.Runner(inp, diff.future_flags,
                            import_guard(sorted(set(module_imports(new_tree.body)))))
    executed = statements.exec_module(inp, out, diff, run)
    consts = statements.constants(inp, out, diff)
    for work in diff.classes:
        statements.class_members(inp, out, work, run, executed.scratch, consts, match)
    signatures = statements.signatures(inp, diff, run, executed.scratch, consts)
    updates = functions.plan_functions(inp, out, match, signatures, executed, run, consts)
    followups.follow(inp, out, updates)
    return out


def linecache_entry(filename: str, text: str, lines: list[str]) -> tuple[int, None, list[str], str]:
    # mtime None: linecache.checkcache() leaves the entry alone, so tracebacks keep showing
    # the source the code was compiled from, not whatever is on disk.
    return (len(text), None, lines, filename)


def set_linecache(filename: str, entry: Any) -> Any:
    previous = linecache.cache.get(filename)
    if entry is None:
        linecache.cache.pop(filename, None)
    else:
        linecache.cache[filename] = entry
    return previous
