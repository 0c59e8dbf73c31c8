"""The planner: from (live module, base source, new source) to a list of stores.

Planning reads live objects and never writes to them.  It executes only what the patch adds
(new imports, definitions and assignments, in scratch locals over the live globals), the
default values and annotations of changed signatures (a copy of the ``def`` without
decorators or body) and the ``__swapd_cells__`` hook; the plan's notes say so.

Joining (the Python form of Lua's ``upvaluejoin``): a live function keeps every closure
cell whose *name* still appears in the new code's free variables; a name that is new gets
``__class__`` (the owning class) or a fresh cell shared by all live closures made by the same
call of the enclosing function (found through the cells they already share), valued from
``__swapd_cells__``, else from a literal initializer in the enclosing function, else EMPTY.
When the new free variables are the function's own, ``__code__`` is assigned; otherwise the
function gets a trampoline (identity kept) calling a new function built on the joined cells.
"""

from __future__ import annotations

import ast
import copy
import functools
import linecache
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import CellType, CodeType, FunctionType, ModuleType
from typing import Any, TypeVar

from swapd.patch.code import (
    CodeIndex,
    CodeKey,
    LiveFunction,
    discover,
    docstring,
    is_target,
    kind,
    make_trampoline,
    nested_codes,
    runner_code,
    same_but_positions,
    same_code,
    threads_running,
)
from swapd.patch.commit import DELETE, MISSING, ModuleState, Store, read_value
from swapd.patch.diff import (
    HOOKS,
    ClassWork,
    Differ,
    FunctionNodes,
    ModuleDiff,
    future_flags,
    import_names,
    literal_initializer,
)
from swapd.patch.model import (
    AbsentCell,
    Added,
    BaseSourceMismatch,
    Change,
    PatchExecError,
    PatchImportError,
    PatchSyntaxError,
    Refusal,
    Removed,
)
from swapd.patch.source import BaseSource


def short(value: object, limit: int = 40) -> str:
    try:
        text = repr(value)
    except Exception as e:  # a broken __repr__ must not break planning
        text = f"<{type(value).__name__}: repr failed: {type(e).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class PlanData:
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
    lru_clear: list[Any] = field(default_factory=list)
    superseded: list[tuple[CodeType, CodeKey]] = field(default_factory=list)
    installed: list[tuple[CodeType, CodeKey]] = field(default_factory=list)
    installed_new: list[CodeType] = field(default_factory=list)  # no base counterpart
    touched: set[int] = field(default_factory=set)
    base_index: CodeIndex | None = None
    lines: list[str] = field(default_factory=list)
    needs_ack: bool = False


@dataclass(eq=False)
class _Instance:
    lf: LiveFunction
    key: CodeKey
    code: CodeType
    cells: list[CellType | None]
    pending: list[str]
    sig: dict[str, Any]


class _Shell:
    """A stand-in metaclass: runs a class body in a namespace prefilled with a live class's
    dictionary, and returns that namespace instead of creating a class."""

    def __init__(self, prefill: dict[str, Any]) -> None:
        self.prefill = prefill
        self.ns: dict[str, Any] = {}

    def __prepare__(self, name: str, bases: tuple[type, ...], **kw: Any) -> dict[str, Any]:
        return dict(self.prefill)

    def __call__(self, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kw: Any) -> Any:
        self.ns = ns
        return self


_Node = TypeVar("_Node", ast.alias, ast.stmt)
# Where a top-level definition starts: a line beginning (column 0) with one of these.
_TOP_LEVEL = re.compile(r"^(?:def |class |async def |@)", re.MULTILINE)


def compile_source(
    text: str, filename: str, display: str, is_base: bool
) -> tuple[ast.Module, CodeIndex]:
    """Parse and compile ``text``, piecewise when possible.  Nothing is cached: a module's
    tree is a large number of objects, and kept alive it would slow down every full
    garbage collection of the worker for good."""
    pieces = _compile_in_pieces(text, filename)
    if pieces is None:
        tree, code = _compile(text, filename, display, is_base)
        pieces = (tree, [code])
    return pieces[0], CodeIndex(pieces[1])


def _compile_in_pieces(text: str, filename: str) -> tuple[ast.Module, list[CodeType]] | None:
    """Parse and compile one top-level definition at a time.

    ``ast.parse`` and ``compile`` are single C calls that hold the GIL: ~15 ms per 1,000
    lines, during which a worker's event loop cannot run.  Cut at lines that start a
    definition in column 0 and each call is short; every piece is padded with the newlines
    before it, so positions are exactly those of a whole compile.  A piece always starts at
    a real statement boundary; if it ends at a false one (a decorator line, or a cut inside
    a string, a bracket or a continuation) it fails to parse and is merged with the next.

    Code generation also reads one module-wide fact: whether a name is bound by an import
    at module level (3.11+ then compiles ``name.attr(...)`` with LOAD_ATTR rather than
    LOAD_METHOD).  Each piece is therefore compiled behind a prelude importing those names,
    which reproduces the module's symbol table; the prelude creates no code objects, so the
    nested code objects equal those of a whole compile (tested against the stdlib).
    Returns None when the caller should compile the whole text instead.
    """
    if "\r" in text:
        return None  # the parser counts "\r" as a line break; keep line numbers exact
    cuts = [m.start() for m in _TOP_LEVEL.finditer(text) if m.start() > 0] + [len(text)]
    trees: list[ast.Module] = []
    begin = merges = 0
    for end in cuts:
        try:
            trees.append(ast.parse("\n" * text.count("\n", 0, begin) + text[begin:end], filename))
        except (SyntaxError, ValueError):
            merges += 1
            if merges > 8 or end == len(text):
                return None
            continue
        begin, merges = end, 0
    flags = future_flags(trees[0])
    imported = sorted({name for tree in trees for name in module_imports(tree.body)})
    prelude = import_guard(imported)
    body: list[ast.stmt] = []
    codes: list[CodeType] = []
    try:
        for tree in trees:
            head = _leading_futures(tree.body)  # __future__ imports must stay first
            module = ast.Module(tree.body[:head] + prelude + tree.body[head:], type_ignores=[])
            codes.append(compile(module, filename, "exec", flags=flags, dont_inherit=True))
            body.extend(tree.body)
    except (SyntaxError, ValueError):
        return None
    return ast.Module(body=body, type_ignores=[]), codes


def import_guard(names: list[str]) -> list[ast.stmt]:
    """``if False: import a, b`` at line 1: no import runs, but the compiler's symbol table
    marks the names as module imports, as in a whole compile of the module."""
    if not names:
        return []
    node = ast.If(
        test=ast.Constant(False),
        body=[ast.Import(names=[_at_line_1(ast.alias(n)) for n in names])],
        orelse=[],
    )
    return [ast.fix_missing_locations(_at_line_1(node))]


def _at_line_1(node: _Node) -> _Node:
    node.lineno = node.end_lineno = 1
    node.col_offset = node.end_col_offset = 0
    return node


def module_imports(stmts: list[ast.stmt]) -> Iterator[str]:
    """Names bound by import statements in module scope (compound statements included)."""
    for node in stmts:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield from import_names(node)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, ()):
                    if isinstance(child, ast.stmt):
                        yield from module_imports([child])
                    else:  # except handlers, match cases
                        yield from module_imports(getattr(child, "body", []))


def _leading_futures(stmts: list[ast.stmt]) -> int:
    count = 0
    for i, node in enumerate(stmts):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            count = i + 1
        elif not (i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            break
    return count


def _compile(text: str, filename: str, display: str, is_base: bool) -> tuple[ast.Module, CodeType]:
    try:
        tree = ast.parse(text, filename)
        code = compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as e:
        msg = f"{display}:{e.lineno or 0}: {type(e).__name__}: {e.msg}"
        if is_base:
            raise BaseSourceMismatch(f"base source: {msg}") from e
        raise PatchSyntaxError(msg) from e
    except ValueError as e:  # e.g. null bytes
        if is_base:
            raise BaseSourceMismatch(f"{display}: base source: {e}") from e
        raise PatchSyntaxError(f"{display}: SyntaxError: {e}") from e
    return tree, code


class Planner:
    def __init__(
        self,
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
    ) -> None:
        self.module = module
        self.moddict: dict[str, Any] = module.__dict__
        self.state = state
        self.filename = filename
        self.display = display
        self.prune = prune
        self.scan_heap = scan_heap
        self.out = PlanData(
            module,
            module.__name__,
            filename,
            display,
            base,
            new_text,
            new_sha,
            state,
            version,
        )
        self.scratch: dict[str, Any] = {}
        self.future_flags = 0
        self.guard: list[ast.stmt] = []
        self.unresolved: set[CodeKey] = set()
        self.class_values: dict[str, dict[str, Any]] = {}
        self.signature: dict[CodeKey, dict[str, Any]] = {}
        self.live_by_key: dict[CodeKey, list[LiveFunction]] = {}
        self.revived: list[tuple[LiveFunction, CodeKey]] = []
        self.instances: list[_Instance] = []
        self.class_cells: dict[int, CellType] = {}
        self.changed: dict[CodeKey, list[str]] = {}
        self._nodes: dict[bool, FunctionNodes] = {}
        self.superseded_ids: set[int] = set()
        self.installed_ids: set[int] = set()
        self.absent_seen: set[AbsentCell] = set()
        self.to_new: dict[CodeKey, CodeKey] = {}
        self.to_old: dict[CodeKey, CodeKey] = {}
        self.removed_seen: set[Removed] = set()

    # ------------------------------------------------------------------ driver
    def run(self) -> PlanData:
        base = self.out.base
        self.old_tree, self.old_idx = compile_source(base.text, self.filename, self.display, True)
        self.new_tree, self.new_idx = compile_source(
            self.out.new_text, self.filename, self.display, False
        )
        self.out.base_index = self.old_idx
        if base.origin == "disk":
            self.out.notes.append(
                f"{self.display}: base source read from disk at prepare (the module was "
                "imported before record_sources()); verified against the live code"
            )
        self.found = discover(self.module, self.filename, self.scan_heap)
        self.map_live()
        self.unresolved = self.match_keys()
        has_migrate = any("__swapd_migrate__" in _bound_names(s) for s in self.new_tree.body)
        diff = Differ(
            self.old_tree, self.new_tree, self.display, self.live_class, has_migrate
        ).run()
        self.out.refused += diff.refusals
        self.out.notes += diff.notes
        for r in diff.removed:
            self.add_removed(r)
        self.exec_module(diff)
        self.constants(diff)
        for work in diff.classes:
            self.class_members(work)
        self.defaults(diff)
        self.functions()
        self.caches()
        self.runners()
        self.out.lines = self.out.new_text.splitlines(keepends=True)
        return self.out

    def nodes(self, new: bool) -> FunctionNodes:
        """The function nodes of the new (or old) tree, indexed on first use."""
        found = self._nodes.get(new)
        if found is None:
            found = self._nodes[new] = FunctionNodes(self.new_tree if new else self.old_tree)
        return found

    def live_class(self, qualname: str) -> type | None:
        cls = self.found.classes.get(qualname)
        if cls is None:
            return None
        top = self.moddict.get(qualname.split(".")[0])
        return cls if isinstance(top, type) else None

    def refuse(self, refusal: Refusal) -> None:
        if refusal not in self.out.refused:  # once, not once per live closure
            self.out.refused.append(refusal)

    def add_removed(self, r: Removed) -> None:
        if r not in self.removed_seen:
            self.removed_seen.add(r)
            self.out.removed.append(r)

    def store(self, kind_: str, target: Any, name: str, new: Any, data: bool = False) -> None:
        old = read_value(kind_, target, name)
        self.out.stores.append(Store(kind_, target, name, new, old, data))

    # ------------------------------------------------------------------ live functions
    def map_live(self) -> None:
        mismatched: list[str] = []
        strays = 0
        for lf in self.found.functions.values():
            code = lf.current().__code__
            if code.co_filename != self.filename:
                continue  # generated code (dataclass __init__ and friends)
            if code.co_qualname.split(".")[0] in HOOKS:
                continue
            key = self.old_idx.find(code) or self.state.superseded_key(code)
            if key is None:
                if lf.reachable and self.old_idx.counts[code.co_qualname]:
                    mismatched.append(code.co_qualname)
                elif not lf.reachable:
                    strays += 1
                continue
            self.live_by_key.setdefault(key, []).append(lf)
        if mismatched:
            origin = self.out.base.origin
            hint = {
                "disk": "the file changed since it was imported; pass base_source= or call "
                "swapd.patch.record_sources() before importing the application",
                "recorded": "the module was changed by something other than swapd",
                "patched": "the module was changed by something other than swapd",
                "explicit": "base_source is not the source the module runs",
            }[origin]
            names = ", ".join(sorted(set(mismatched))[:5])
            raise BaseSourceMismatch(
                f"{self.display}: live code of {names} does not match the {origin} base "
                f"source ({hint})"
            )
        if strays:
            self.out.notes.append(
                f"{self.display}: {strays} function object(s) from this module match neither "
                "the base source nor an earlier patch (an earlier version of the module?); "
                "they are not patched"
            )
        if not self.found.heap_scanned:
            self.out.notes.append(
                f"{self.display}: heap not scanned: closures made by calls and functions held "
                "only outside the module namespace are not patched"
            )

    # ------------------------------------------------------------------ module statements
    def _exec(self, stmt: ast.stmt, globals_: dict[str, Any], locals_: dict[str, Any]) -> None:
        tree = ast.Module(body=[*self.guard, stmt], type_ignores=[])
        try:
            code = compile(tree, self.filename, "exec", flags=self.future_flags, dont_inherit=True)
            exec(code, globals_, locals_)
        except Exception as e:
            cls = PatchImportError if isinstance(e, ImportError) else PatchExecError
            raise cls(
                f"{self.display}:{stmt.lineno}: {type(e).__name__}: {e} "
                "(while preparing a statement the patch adds)"
            ) from e

    def exec_module(self, diff: ModuleDiff) -> None:
        self.future_flags = diff.future_flags
        # Code compiled for one statement must equal the whole compile of the new source.
        self.guard = import_guard(sorted(set(module_imports(self.new_tree.body))))
        revived: set[str] = set()
        for stmt in diff.exec_stmts:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                live = self.moddict.get(stmt.name)
                if (
                    not stmt.decorator_list
                    and type(live) is FunctionType
                    and live.__globals__ is self.moddict
                    and live.__code__.co_filename == self.filename
                ):
                    key = self.new_idx.find_at(stmt.name, stmt.lineno)
                    lf = self.found.functions.get(id(live))
                    if key is not None and lf is not None:
                        self.revived.append((lf, key))
                        revived.add(stmt.name)
                        continue
            self._exec(stmt, self.moddict, self.scratch)
        for name in diff.exec_names:
            if name in revived or name not in self.scratch:
                continue
            value = self.scratch[name]
            live = self.moddict.get(name, MISSING)
            if live is value:
                continue
            self.store("item", self.moddict, name, value)
            what = _kind_of(value)
            if live is MISSING:
                self.out.added.append(Added(what, name, f"executed at prepare: {short(value)}"))
            else:
                self.out.changed.append(Change("name", name, f"rebound to {short(value)}"))
        if any(True for s in diff.exec_stmts if getattr(s, "decorator_list", None)):
            self.out.notes.append(
                f"{self.display}: new decorated definitions ran their decorators at prepare; "
                "a discard or rollback unbinds them but cannot undo what decorators did"
            )
        hooks: dict[str, Any] = {}
        for stmt in diff.hooks:
            self._exec(stmt, self.moddict, hooks)
        self.out.migrate = _hook(hooks, "__swapd_migrate__", self.display)
        self.out.rollback_hook = _hook(hooks, "__swapd_rollback__", self.display)
        self.cells_hook = hooks.get("__swapd_cells__")
        if self.cells_hook is not None and not (
            callable(self.cells_hook) or isinstance(self.cells_hook, dict)
        ):
            raise PatchExecError(f"{self.display}: __swapd_cells__ must be a dict or a callable")
        if diff.doc is not None:
            old, new = diff.doc
            if self.moddict.get("__doc__") == old:
                self.store("item", self.moddict, "__doc__", new, data=True)
                self.out.changed.append(Change("doc", self.module.__name__, "module docstring"))
        if self.prune:
            for name in diff.removed_names:
                if name in self.moddict and name not in diff.exec_names:
                    self.store("item", self.moddict, name, DELETE)
                    self.out.changed.append(Change("name", name, "deleted (prune)"))
        elif diff.removed_names:
            self.out.notes.append(
                f"{self.display}: removed names are kept in the module "
                f"({', '.join(sorted(set(diff.removed_names))[:8])}); prune=True deletes them"
            )

    def constants(self, diff: ModuleDiff) -> None:
        for cu in diff.consts:
            old_val = ast.literal_eval(cu.old)
            new_val = ast.literal_eval(cu.new)
            if cu.scope:
                cls = self.live_class(cu.scope)
                if cls is None:
                    continue
                live = cls.__dict__.get(cu.name, MISSING)
                label = f"{cu.scope}.{cu.name}"
            else:
                live = self.moddict.get(cu.name, MISSING)
                label = cu.name
            if live is not MISSING and type(live) is type(old_val) and live == old_val:
                if cu.scope:
                    self.store("type", cls, cu.name, new_val, data=True)
                    self.class_values.setdefault(cu.scope, {})[cu.name] = new_val
                else:
                    self.store("item", self.moddict, cu.name, new_val, data=True)
                    self.aliases(cu.name, live)
                self.out.changed.append(
                    Change("constant", label, f"{short(old_val)} -> {short(new_val)}")
                )
            else:
                self.out.notes.append(
                    f"{self.display}:{cu.lineno}: {label} keeps its live value "
                    f"{short(live)}: it no longer equals the old literal {short(old_val)}, "
                    f"so the new literal {short(new_val)} is not applied"
                )

    def aliases(self, name: str, live: object) -> None:
        # Numbers, bools and None can be one object in unrelated modules (small-int cache,
        # singletons): an identity match would prove no import.  docs/patching.md says so.
        if live is None or isinstance(live, bool | int | float):
            return
        holders = [
            m.__name__
            for m in list(sys.modules.values())
            if issubclass(type(m), ModuleType)
            and m is not self.module
            and getattr(m, "__dict__", {}).get(name) is live
        ]
        if holders:
            self.out.notes.append(
                f"{self.display}: {', '.join(holders[:5])} also bind(s)"
                f" {name} to the same object (a `from {self.module.__name__} import {name}`?); "
                "it keeps the old value"
            )

    # ------------------------------------------------------------------ classes
    def class_members(self, work: ClassWork) -> None:
        cls = self.found.classes.get(work.qualname)
        if cls is None:
            return
        if work.exec_stmts:
            ns = self.shell_exec(work.qualname, work.exec_stmts, work.node)
            for name in work.exec_names:
                if name not in ns:
                    continue
                value = ns[name]
                old = cls.__dict__.get(name, MISSING)
                if name in work.regroup:
                    value = self.rebuild(cls, value)
                if value is old:
                    continue
                set_name = getattr(type(value), "__set_name__", None)
                if set_name is not None:
                    try:
                        set_name(value, cls, name)
                    except Exception as e:
                        raise PatchExecError(
                            f"{self.display}: {work.qualname}.{name}.__set_name__ raised "
                            f"{type(e).__name__}: {e}"
                        ) from e
                self.store("type", cls, name, value)
                label = f"{work.qualname}.{name}"
                if old is MISSING:
                    self.out.added.append(Added("member", label, _kind_of(value)))
                else:
                    self.out.changed.append(
                        Change("member", label, f"{_kind_of(old)} -> {_kind_of(value)}")
                    )
        for name in work.removed:
            if self.prune and name in cls.__dict__ and name not in work.exec_names:
                self.store("type", cls, name, DELETE)
                self.out.changed.append(Change("member", f"{work.qualname}.{name}", "deleted"))
        if work.removed and not self.prune:
            self.out.notes.append(
                f"{self.display}: members removed from {work.qualname} are kept "
                f"({', '.join(work.removed[:8])}); prune=True deletes them"
            )
        if work.doc is not None:
            old_doc, new_doc = work.doc
            if cls.__dict__.get("__doc__") == old_doc:
                self.store("type", cls, "__doc__", new_doc, data=True)
                self.out.changed.append(Change("doc", work.qualname, "class docstring"))

    def shell_exec(self, qualname: str, stmts: list[ast.stmt], anchor: ast.AST) -> dict[str, Any]:
        """Run ``stmts`` as if in the body of the live class ``qualname`` and return the
        resulting namespace.  The statement is wrapped in one carrier class per enclosing
        class so the compiler gives new code objects their real qualified names
        (``A.B.method``), hence the same code as the full compile of the new source."""
        cls = self.found.classes[qualname]
        prefill = dict(cls.__dict__)
        prefill.update(self.class_values.get(qualname, {}))
        path = qualname.split(".")
        metas = [f"__swapd_shell_{i}__" for i in range(len(path))]
        shells = [_Shell({}) for _ in path[:-1]] + [_Shell(prefill)]
        # The metaclass expression of level d is evaluated in the namespace of level d-1.
        for depth in range(1, len(path)):
            shells[depth - 1].prefill[metas[depth]] = shells[depth]
        node: ast.stmt = _class_node(path[-1], stmts or [ast.Pass()], anchor, metas[-1])
        for depth in range(len(path) - 2, -1, -1):
            node = _class_node(path[depth], [node], anchor, metas[depth])
        locals_ = dict(self.scratch)
        locals_[metas[0]] = shells[0]
        self._exec(node, self.moddict, locals_)
        ns = shells[-1].ns
        cell = ns.get("__classcell__")
        if isinstance(cell, CellType):
            cell.cell_contents = cls  # a fresh cell: super() in new methods finds the live class
        return ns

    def rebuild(self, cls: type, value: Any) -> Any:
        """A descriptor whose kind changed: rebuild it around the live function objects (kept
        and patched in place) instead of the copies the class shell created."""

        def live(fn: Any) -> Any:
            if type(fn) is not FunctionType:
                return fn
            new_key = self.new_idx.find(fn.__code__)
            old_key = self.to_old.get(new_key) if new_key else None
            for lf in self.live_by_key.get(old_key, []) if old_key else []:
                if cls in lf.owners:
                    return lf.fn
            return fn

        t = type(value)
        if t is staticmethod:
            return staticmethod(live(value.__func__))
        if t is classmethod:
            return classmethod(live(value.__func__))
        if t is property:
            return property(live(value.fget), live(value.fset), live(value.fdel), value.__doc__)
        if t is functools.cached_property:
            return functools.cached_property(live(value.func))
        if t is FunctionType:
            return live(value)
        return value

    # ------------------------------------------------------------------ signatures
    def defaults(self, diff: ModuleDiff) -> None:
        for dw in diff.defaults:
            stripped = copy.copy(dw.new)
            stripped.decorator_list = []
            stripped.body = [ast.copy_location(ast.Pass(), dw.new)]
            if dw.scope:
                if dw.scope not in self.found.classes:
                    continue
                ns = self.shell_exec(dw.scope, [stripped], dw.new)
                fn = ns.get(dw.new.name)
            else:
                locals_ = dict(self.scratch)
                self._exec(stripped, self.moddict, locals_)
                fn = locals_.get(dw.new.name)
            if type(fn) is not FunctionType:
                continue
            sig: dict[str, Any] = {}
            if "defaults" in dw.parts:
                sig["__defaults__"] = fn.__defaults__
                sig["__kwdefaults__"] = fn.__kwdefaults__
            if "annotations" in dw.parts:
                sig["__annotations__"] = fn.__annotations__
            self.signature[(dw.qualname, dw.ordinal)] = sig

    # ------------------------------------------------------------------ functions
    def match_keys(self) -> set[CodeKey]:
        """Map base keys to new keys (``self.to_new``/``self.to_old``).  A qualified name
        defined as often as before keeps its ordinals.  When the count changed (a property
        gained a setter, a lambda was added), codes are matched by signature shape, and
        what stays ambiguous is returned."""
        unresolved: set[CodeKey] = set()
        old_counts, new_counts = self.old_idx.counts, self.new_idx.counts
        for qual in set(old_counts) | set(new_counts):
            olds = [(qual, i) for i in range(old_counts[qual])]
            news = [(qual, i) for i in range(new_counts[qual])]
            if len(olds) == len(news):
                pairs = list(zip(olds, news, strict=True))
            else:
                shape_old = {k: _shape(self.old_idx.by_key[k]) for k in olds}
                shape_new = {k: _shape(self.new_idx.by_key[k]) for k in news}
                pairs = []
                for k in olds:
                    cands = [n for n in news if shape_new[n] == shape_old[k]]
                    rivals = [o for o in olds if shape_old[o] == shape_old[k]]
                    if len(cands) == 1 and len(rivals) == 1:
                        pairs.append((k, cands[0]))
                    elif cands:
                        unresolved.add(k)
            for old_key, new_key in pairs:
                self.to_new[old_key] = new_key
                self.to_old[new_key] = old_key
        return unresolved

    def functions(self) -> None:
        for key, lfs in self.live_by_key.items():
            new_key = self.to_new.get(key)
            if key in self.unresolved:
                self.refuse(
                    Refusal(
                        self.display,
                        key[0],
                        f"the number of definitions named {key[0]} changed "
                        f"({self.old_idx.counts[key[0]]} -> {self.new_idx.counts[key[0]]}) "
                        "and the live ones cannot be matched to the new ones",
                    )
                )
                continue
            if new_key is None:
                if "<locals>" in key[0]:
                    self.out.notes.append(
                        f"{self.display}: {len(lfs)} live closure(s) {key[0]} keep their code: "
                        "the definition is gone from the new source"
                    )
                continue
            for lf in lfs:
                self.plan_function(lf, new_key, self.new_idx.by_key[new_key])
        for lf, key in self.revived:
            self.plan_function(lf, key, self.new_idx.by_key[key])
        self.resolve_absent()
        for inst in self.instances:
            self.build(inst)
        for key, details in self.changed.items():
            self.out.changed.append(
                Change("function", key[0], f"{details[0]}; {len(details)} object(s)")
            )

    def plan_function(self, lf: LiveFunction, key: CodeKey, new: CodeType) -> None:
        cur = lf.current()
        oc = cur.__code__
        if kind(oc) != kind(new):
            self.refuse(
                Refusal(
                    f"{self.display}:{new.co_firstlineno}",
                    f"def {key[0]}",
                    f"function kind changed ({kind(oc)} -> {kind(new)})",
                )
            )
            return
        sig = self.signature.get(key, {})
        if same_code(oc, new) and not sig:
            return  # unchanged (a trampolined function keeps its trampoline)
        cells: list[CellType | None] = []
        pending: list[str] = []
        old_cells = dict(zip(oc.co_freevars, cur.__closure__ or (), strict=True))
        for name in new.co_freevars:
            if name in old_cells:
                cells.append(old_cells[name])
            elif name == "__class__":
                cells.append(self.class_cell(lf, key))
            else:
                cells.append(None)
                pending.append(name)
        for name in oc.co_freevars:
            if name not in new.co_freevars:
                self.add_removed(Removed("freevar", key[0], name))
        self.instances.append(_Instance(lf, key, new, cells, pending, sig))

    def class_cell(self, lf: LiveFunction, key: CodeKey) -> CellType | None:
        owner = self.new_idx.owner_of_cell(key, "__class__")
        cls = self.found.classes.get(owner[0]) if owner else None
        if cls is None:
            self.refuse(
                Refusal(self.display, key[0], "uses super()/__class__ but its class is not live")
            )
            return None
        cell = self.class_cells.get(id(cls))
        if cell is None:
            for other in self.found.functions.values():
                real = other.current()
                names = real.__code__.co_freevars
                if "__class__" in names and real.__closure__:
                    candidate = real.__closure__[names.index("__class__")]
                    try:
                        if candidate.cell_contents is cls:
                            cell = candidate
                            break
                    except ValueError:
                        continue
            if cell is None:
                cell = CellType(cls)
            self.class_cells[id(cls)] = cell
        absent = AbsentCell(key[0], "__class__", "__class__", short(cls))
        if absent not in self.absent_seen:
            self.absent_seen.add(absent)
            self.out.absent.append(absent)
        return cell

    def resolve_absent(self) -> None:
        # (owner scope, name) -> instances that need a new cell for it
        wanted: dict[tuple[CodeKey, str], list[_Instance]] = {}
        for inst in self.instances:
            for name in inst.pending:
                owner = self.new_idx.owner_of_cell(inst.key, name)
                if owner is None:
                    self.refuse(
                        Refusal(self.display, inst.key[0], f"cannot find the scope of {name!r}")
                    )
                    continue
                wanted.setdefault((owner, name), []).append(inst)
        for (owner, name), insts in wanted.items():
            for group, known in self.sibling_groups(owner, insts):
                rep = group[0]
                source, value = self.cell_value(owner, name, rep)
                if not known and len(insts) > 1 and source != "hook":
                    self.refuse(
                        Refusal(
                            self.display,
                            rep.key[0],
                            f"absent cell sharing unknown for {name!r}: the live closures "
                            "share no cell with their siblings; give it a value with "
                            "__swapd_cells__",
                        )
                    )
                    continue
                if not known and len(insts) > 1:
                    self.out.notes.append(
                        f"{self.display}: {rep.key[0]}: each closure gets its own {name!r} cell "
                        "(siblings unknown)"
                    )
                cell = CellType() if source == "EMPTY" else CellType(value)
                for inst in group:
                    inst.cells[inst.code.co_freevars.index(name)] = cell
                    record = AbsentCell(
                        inst.key[0], name, source, "" if source == "EMPTY" else short(value)
                    )
                    if record not in self.absent_seen:
                        self.absent_seen.add(record)
                        self.out.absent.append(record)
                if source == "EMPTY":
                    self.out.needs_ack = True

    def sibling_groups(
        self, owner: CodeKey, insts: list[_Instance]
    ) -> list[tuple[list[_Instance], bool]]:
        """Closures made by the same call of ``owner`` share the cells that call created;
        group instances by those shared cells (union-find)."""
        old_key = self.to_old.get(owner)
        old_owner = self.old_idx.by_key.get(old_key) if old_key else None
        owner_cells = set(old_owner.co_cellvars) if old_owner else set()
        parent = list(range(len(insts)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        first_holder: dict[int, int] = {}  # id(cell) -> first instance holding it
        has_owned = [False] * len(insts)
        for i, inst in enumerate(insts):
            cur = inst.lf.current()
            pairs = zip(cur.__code__.co_freevars, cur.__closure__ or (), strict=True)
            for name, cell in pairs:
                if name not in owner_cells:
                    continue
                has_owned[i] = True
                j = first_holder.setdefault(id(cell), i)
                parent[find(i)] = find(j)
        groups: dict[int, list[_Instance]] = {}
        out: list[tuple[list[_Instance], bool]] = []
        for i, inst in enumerate(insts):
            if has_owned[i]:
                groups.setdefault(find(i), []).append(inst)
            else:
                out.append(([inst], False))
        out.extend((g, True) for g in groups.values())
        return out

    def cell_value(self, owner: CodeKey, name: str, rep: _Instance) -> tuple[str, Any]:
        hook = self.cells_hook
        qual = rep.key[0]
        if hook is not None:
            try:
                if isinstance(hook, dict):
                    value = hook.get(qual, {}).get(name, MISSING)
                else:
                    value = hook(qual, name, rep.lf.fn)
            except LookupError:
                value = MISSING
            except Exception as e:
                raise PatchExecError(
                    f"{self.display}: __swapd_cells__({qual!r}, {name!r}) raised "
                    f"{type(e).__name__}: {e}"
                ) from e
            if value is not MISSING:
                return "hook", value
        code = self.new_idx.by_key[owner]
        node = self.nodes(new=True).find(code.co_name, code.co_firstlineno)
        if node is not None:
            init = literal_initializer(node, name)
            if init is not None:
                return "constexpr", ast.literal_eval(init)
        return "EMPTY", None

    def build(self, inst: _Instance) -> None:
        cells = tuple(c for c in inst.cells if c is not None)
        if len(cells) != len(inst.cells):
            return  # refused above
        fn, cur, new = inst.lf.fn, inst.lf.current(), inst.code
        sig = inst.sig
        defaults = sig.get("__defaults__", cur.__defaults__)
        kwdefaults = sig.get("__kwdefaults__", cur.__kwdefaults__)
        old_doc, new_doc = docstring(cur.__code__), docstring(new)
        doc_changes = old_doc != new_doc and cur.__doc__ == old_doc
        own = fn.__closure__ or ()
        wrapped = fn.__dict__.get("__wrapped__", MISSING)
        ours = wrapped is not MISSING and type(wrapped) is FunctionType and is_target(wrapped)
        if new.co_freevars == fn.__code__.co_freevars and all(
            a is b for a, b in zip(cells, own, strict=True)
        ):
            detail = "code" if not same_but_positions(cur.__code__, new) else "line numbers"
            if fn.__code__ is not new:
                self.store("attr", fn, "__code__", new)
            if fn.__defaults__ is not defaults:
                self.store("attr", fn, "__defaults__", defaults)
                detail += ", defaults"
            if fn.__kwdefaults__ is not kwdefaults:
                self.store("attr", fn, "__kwdefaults__", kwdefaults)
            if "__annotations__" in sig:
                self.store("attr", fn, "__annotations__", sig["__annotations__"])
            if doc_changes:
                self.store("attr", fn, "__doc__", new_doc)
            if ours:
                self.store("attr", fn, "__wrapped__", MISSING)
        else:
            if kind(new) == "async generator":
                self.refuse(
                    Refusal(
                        f"{self.display}:{new.co_firstlineno}",
                        f"def {inst.key[0]}",
                        "an async generator whose free variables change cannot be redirected "
                        "in place",
                    )
                )
                return
            target = FunctionType(new, fn.__globals__, fn.__name__, defaults, cells)
            target.__kwdefaults__ = kwdefaults
            target.__qualname__ = fn.__qualname__
            target.__module__ = fn.__module__
            target.__doc__ = new_doc if doc_changes else cur.__doc__
            for k, v in fn.__dict__.items():
                if not (k == "__wrapped__" and ours):
                    target.__dict__[k] = v
            target.__annotations__ = sig.get("__annotations__", cur.__annotations__)
            if hasattr(cur, "__type_params__"):  # 3.12+
                setattr(target, "__type_params__", cur.__type_params__)  # noqa: B010
            tramp = make_trampoline(fn, target)
            self.store("attr", fn, "__code__", tramp)
            if wrapped is MISSING or ours:
                self.store("attr", fn, "__wrapped__", target)
            detail = "code via trampoline (free variables changed)"
        self.changed.setdefault(inst.key, []).append(detail)
        self.out.touched.add(id(fn))
        if id(cur.__code__) not in self.superseded_ids:
            self.superseded_ids.add(id(cur.__code__))
            self.out.superseded.append((cur.__code__, inst.key))
        self.install(new, inst.key)
        if "<locals>" in inst.key[0]:
            self.closure_defaults_note(inst.key, cur.__code__, new)

    def install(self, new: CodeType, key: CodeKey) -> None:
        """Record the code objects the commit puts in place, and those nested in them (the
        code of closures the new code will create), with the base key each replaces, so a
        rollback can switch functions made from them since back to the old code.  A nested
        code equal to the old one needs nothing; one without an old counterpart goes to
        ``installed_new`` (the rollback reports the functions made from it)."""
        if id(new) in self.installed_ids:
            return
        self.installed_ids.add(id(new))
        old_key = self.to_old.get(key)
        if old_key is not None:
            self.out.installed.append((new, old_key))
        for code in nested_codes(new):
            nested_key = self.new_idx.key_of.get(id(code))
            if nested_key is None or id(code) in self.installed_ids:
                continue
            self.installed_ids.add(id(code))
            old_key = self.to_old.get(nested_key)
            old = self.old_idx.by_key.get(old_key) if old_key is not None else None
            if old_key is None or old is None:
                self.out.installed_new.append(code)
            elif not same_code(old, code):
                self.out.installed.append((code, old_key))

    def closure_defaults_note(self, key: CodeKey, old: CodeType, new: CodeType) -> None:
        o = self.nodes(new=False).find(old.co_name, old.co_firstlineno)
        n = self.nodes(new=True).find(new.co_name, new.co_firstlineno)
        if o is None or n is None:
            return
        if ast.dump(ast.List(o.args.defaults + o.args.kw_defaults)) != ast.dump(  # type: ignore[operator]
            ast.List(n.args.defaults + n.args.kw_defaults)  # type: ignore[operator]
        ):
            note = f"{self.display}: live closures {key[0]} keep their creation-time defaults"
            if note not in self.out.notes:
                self.out.notes.append(note)

    # ------------------------------------------------------------------ reports
    def caches(self) -> None:
        for wrapper in self.found.lru:
            wrapped = getattr(wrapper, "__wrapped__", None)
            if id(wrapped) in self.out.touched:
                self.out.lru_clear.append(wrapper)
                self.out.changed.append(
                    Change(
                        "cache", getattr(wrapper, "__qualname__", "?"), "cache_clear() after commit"
                    )
                )
        for cls, name, cp in self.found.cached_properties:
            if id(cp.func) in self.out.touched:
                self.out.notes.append(
                    f"{self.display}: instances keep values already cached by "
                    f"{cls.__qualname__}.{name} (cached_property)"
                )

    def runners(self) -> None:
        old = {id(code): key[0] for code, key in self.out.superseded}
        counts: dict[str, int] = {}
        for runner in self.found.runners:
            code = runner_code(runner)
            if code is not None and id(code) in old:
                counts[old[id(code)]] = counts.get(old[id(code)], 0) + 1
        for name, count in sorted(counts.items()):
            self.out.notes.append(
                f"{self.display}: {count} running generator(s)/coroutine(s) of {name} "
                "finish on the old code"
            )
        for line in threads_running(old):
            self.out.notes.append(f"{self.display}: {line} (it finishes on the old code)")


def _shape(code: CodeType) -> tuple[object, ...]:
    """What a call site sees of a code object: its kind and parameters."""
    nargs = code.co_argcount + code.co_kwonlyargcount
    nargs += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
    return (
        kind(code),
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_varnames[:nargs],
        code.co_flags & 0x0C,
    )


def _class_node(name: str, body: list[ast.stmt], anchor: ast.AST, meta: str) -> ast.ClassDef:
    node = ast.ClassDef(
        name=name,
        bases=[],
        keywords=[ast.keyword(arg="metaclass", value=ast.Name(meta, ast.Load()))],
        body=body,
        decorator_list=[],
    )
    if sys.version_info >= (3, 12):
        node.type_params = []
    ast.copy_location(node, anchor)
    return ast.fix_missing_locations(node)


def _bound_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {stmt.name}
    if isinstance(stmt, ast.Assign):
        return {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    return set()


def _kind_of(value: object) -> str:
    if isinstance(value, type):
        return "class"
    if isinstance(value, ModuleType):
        return "module"
    if isinstance(value, FunctionType):
        return "function"
    if isinstance(value, staticmethod | classmethod | property):
        return type(value).__name__
    return "name"


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


def _hook(hooks: dict[str, Any], name: str, display: str) -> Callable[[Any], object] | None:
    value = hooks.get(name)
    if value is None:
        return None
    if not callable(value):
        raise PatchExecError(f"{display}: {name} must be a function taking one argument (ctx)")
    return value  # type: ignore[no-any-return]
