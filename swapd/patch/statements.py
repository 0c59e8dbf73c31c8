"""Planning what the statement-level diff asks for: new module statements (run at prepare in
scratch locals), the ``__swapd_*`` hooks, constants, class members, and the default values
and annotations of changed signatures.

Everything here that executes code runs it over the live globals with scratch locals, so the
live module is never written to; the resulting values become stores of the plan.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CellType, FunctionType, ModuleType
from typing import TYPE_CHECKING, Any

from swapd.patch.code import CodeKey, LiveFunction
from swapd.patch.commit import DELETE, MISSING
from swapd.patch.diff import ClassWork, ModuleDiff
from swapd.patch.model import Added, Change, PatchExecError, PatchImportError, short

if TYPE_CHECKING:
    from swapd.patch.matching import Matching
    from swapd.patch.planning import Inputs, PlanData


class Runner:
    """Compiles and runs one statement of the new source the way the whole module compiles
    (the same ``__future__`` flags, the same import prelude)."""

    def __init__(self, inp: Inputs, future_flags: int, guard: list[ast.stmt]) -> None:
        self.filename = inp.filename
        self.display = inp.display
        self.future_flags = future_flags
        self.guard = guard

    def __call__(self, stmt: ast.stmt, globals_: dict[str, Any], locals_: dict[str, Any]) -> None:
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


@dataclass
class Executed:
    """What running the module's new statements produced."""

    scratch: dict[str, Any] = field(default_factory=dict)  # names they bound
    revived: list[tuple[LiveFunction, CodeKey]] = field(default_factory=list)
    cells_hook: Any = None  # __swapd_cells__


# ---------------------------------------------------------------- module statements


def exec_module(inp: Inputs, out: PlanData, diff: ModuleDiff, run: Runner) -> Executed:
    moddict = inp.moddict
    done = Executed()
    revived: set[str] = set()
    for stmt in diff.exec_stmts:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            live = moddict.get(stmt.name)
            if (
                not stmt.decorator_list
                and type(live) is FunctionType
                and live.__globals__ is moddict
                and live.__code__.co_filename == inp.filename
            ):
                key = inp.new_idx.find_at(stmt.name, stmt.lineno)
                lf = inp.found.functions.get(id(live))
                if key is not None and lf is not None:
                    done.revived.append((lf, key))
                    revived.add(stmt.name)
                    continue
        if isinstance(stmt, ast.ImportFrom) and _import_from_peer(inp, stmt, done.scratch):
            continue
        run(stmt, moddict, done.scratch)
    for name in diff.exec_names:
        if name in revived or name not in done.scratch:
            continue
        value = done.scratch[name]
        live = moddict.get(name, MISSING)
        if live is value:
            continue
        out.store("item", moddict, name, value)
        what = kind_of(value)
        if live is MISSING:
            out.added.append(Added(what, name, f"executed at prepare: {short(value)}"))
        else:
            out.changed.append(Change("name", name, f"rebound to {short(value)}"))
    if any(True for s in diff.exec_stmts if getattr(s, "decorator_list", None)):
        out.notes.append(
            f"{inp.display}: new decorated definitions ran their decorators at prepare; "
            "a discard or rollback unbinds them but cannot undo what decorators did"
        )
    hooks: dict[str, Any] = {}
    for stmt in diff.hooks:
        run(stmt, moddict, hooks)
    out.migrate = _hook(hooks, "__swapd_migrate__", inp.display)
    out.rollback_hook = _hook(hooks, "__swapd_rollback__", inp.display)
    done.cells_hook = hooks.get("__swapd_cells__")
    if done.cells_hook is not None and not (
        callable(done.cells_hook) or isinstance(done.cells_hook, dict)
    ):
        raise PatchExecError(f"{inp.display}: __swapd_cells__ must be a dict or a callable")
    if diff.doc is not None:
        old, new = diff.doc
        if moddict.get("__doc__") == old:
            out.store("item", moddict, "__doc__", new, data=True)
            out.changed.append(Change("doc", inp.module.__name__, "module docstring"))
    if inp.prune:
        for name in diff.removed_names:
            if name in moddict and name not in diff.exec_names:
                out.store("item", moddict, name, DELETE)
                out.changed.append(Change("name", name, "deleted (prune)"))
    elif diff.removed_names:
        out.notes.append(
            f"{inp.display}: removed names are kept in the module "
            f"({', '.join(sorted(set(diff.removed_names))[:8])}); prune=True deletes them"
        )
    return done


@dataclass
class Constants:
    """The new values of the constants the plan changes: code run at prepare (class bodies,
    default values) must see them."""

    module: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _import_from_peer(inp: Inputs, stmt: ast.ImportFrom, scratch: dict[str, Any]) -> bool:
    """A new ``from other import name`` where ``other`` is patched in the same set: bind
    ``name`` to what ``other`` will hold after the commit (its plan's value, else its live
    value).  False if the statement is not one (it then runs as usual)."""
    if not inp.peers or any(a.name == "*" for a in stmt.names):
        return False
    target = "." * stmt.level + (stmt.module or "")
    try:
        name = importlib.util.resolve_name(target, inp.module.__package__ or "")
    except (ImportError, ValueError):
        return False
    if name not in inp.peers:
        return False
    bound, live = inp.peers[name], sys.modules.get(name)
    for alias in stmt.names:
        value = bound.get(alias.name, MISSING)
        if value is MISSING:
            value = getattr(live, alias.name, MISSING)
        if value is MISSING:
            raise PatchImportError(
                f"{inp.display}:{stmt.lineno}: ImportError: cannot import name "
                f"{alias.name!r} from {name!r}, not even from its patch in this set"
            )
        scratch[alias.asname or alias.name] = value
    return True


def constants(inp: Inputs, out: PlanData, diff: ModuleDiff) -> Constants:
    """Plan the changed ``NAME = <literal>`` statements; returns the values applied."""
    applied = Constants()
    for cu in diff.consts:
        old_val = ast.literal_eval(cu.old)
        new_val = ast.literal_eval(cu.new)
        cls: type | None = None
        if cu.scope:
            cls = inp.live_class(cu.scope)
            if cls is None:
                continue
            live = cls.__dict__.get(cu.name, MISSING)
            label = f"{cu.scope}.{cu.name}"
        else:
            live = inp.moddict.get(cu.name, MISSING)
            label = cu.name
        if live is not MISSING and type(live) is type(old_val) and live == old_val:
            if cls is not None:
                out.store("type", cls, cu.name, new_val, data=True)
                applied.classes.setdefault(cu.scope, {})[cu.name] = new_val
            else:
                out.store("item", inp.moddict, cu.name, new_val, data=True)
                applied.module[cu.name] = new_val
                _aliases(inp, out, cu.name, live)
            out.changed.append(Change("constant", label, f"{short(old_val)} -> {short(new_val)}"))
        else:
            out.notes.append(
                f"{inp.display}:{cu.lineno}: {label} keeps its live value "
                f"{short(live)}: it no longer equals the old literal {short(old_val)}, "
                f"so the new literal {short(new_val)} is not applied"
            )
    return applied


def _aliases(inp: Inputs, out: PlanData, name: str, live: object) -> None:
    # Numbers, bools and None can be one object in unrelated modules (small-int cache,
    # singletons): an identity match would prove no import.  docs/patching.md says so.
    if live is None or isinstance(live, bool | int | float):
        return
    holders = [
        m.__name__
        for m in list(sys.modules.values())
        if issubclass(type(m), ModuleType)
        and m is not inp.module
        and getattr(m, "__dict__", {}).get(name) is live
    ]
    if holders:
        out.notes.append(
            f"{inp.display}: {', '.join(holders[:5])} also bind(s)"
            f" {name} to the same object (a `from {inp.module.__name__} import {name}`?); "
            "it keeps the old value"
        )


# ---------------------------------------------------------------- classes


def class_members(
    inp: Inputs,
    out: PlanData,
    work: ClassWork,
    run: Runner,
    scratch: dict[str, Any],
    consts: Constants,
    match: Matching,
) -> None:
    cls = inp.found.classes.get(work.qualname)
    if cls is None:
        return
    if work.exec_stmts:
        ns = shell_exec(inp, run, scratch, consts, work.qualname, work.exec_stmts, work.node)
        for name in work.exec_names:
            if name not in ns:
                continue
            value = ns[name]
            old = cls.__dict__.get(name, MISSING)
            if name in work.regroup:
                value = _rebuild(inp, match, cls, value)
            if value is old:
                continue
            set_name = getattr(type(value), "__set_name__", None)
            if set_name is not None:
                try:
                    set_name(value, cls, name)
                except Exception as e:
                    raise PatchExecError(
                        f"{inp.display}: {work.qualname}.{name}.__set_name__ raised "
                        f"{type(e).__name__}: {e}"
                    ) from e
            out.store("type", cls, name, value)
            label = f"{work.qualname}.{name}"
            if old is MISSING:
                out.added.append(Added("member", label, kind_of(value)))
            else:
                out.changed.append(Change("member", label, f"{kind_of(old)} -> {kind_of(value)}"))
    for name in work.removed:
        if inp.prune and name in cls.__dict__ and name not in work.exec_names:
            out.store("type", cls, name, DELETE)
            out.changed.append(Change("member", f"{work.qualname}.{name}", "deleted"))
    if work.removed and not inp.prune:
        out.notes.append(
            f"{inp.display}: members removed from {work.qualname} are kept "
            f"({', '.join(work.removed[:8])}); prune=True deletes them"
        )
    if work.doc is not None:
        old_doc, new_doc = work.doc
        if cls.__dict__.get("__doc__") == old_doc:
            out.store("type", cls, "__doc__", new_doc, data=True)
            out.changed.append(Change("doc", work.qualname, "class docstring"))


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


def shell_exec(
    inp: Inputs,
    run: Runner,
    scratch: dict[str, Any],
    consts: Constants,
    qualname: str,
    stmts: list[ast.stmt],
    anchor: ast.AST,
) -> dict[str, Any]:
    """Run ``stmts`` as if in the body of the live class ``qualname`` and return the
    resulting namespace.  The statement is wrapped in one carrier class per enclosing
    class so the compiler gives new code objects their real qualified names
    (``A.B.method``), hence the same code as the full compile of the new source.  The
    namespace holds the class's dictionary and the new values of the constants the plan
    changes (a class body reads names from its namespace, then from the module's globals,
    which still hold the old values at prepare)."""
    cls = inp.found.classes[qualname]
    prefill = dict(consts.module)
    prefill.update(cls.__dict__)
    prefill.update(consts.classes.get(qualname, {}))
    path = qualname.split(".")
    metas = [f"__swapd_shell_{i}__" for i in range(len(path))]
    shells = [_Shell({}) for _ in path[:-1]] + [_Shell(prefill)]
    # The metaclass expression of level d is evaluated in the namespace of level d-1.
    for depth in range(1, len(path)):
        shells[depth - 1].prefill[metas[depth]] = shells[depth]
    node: ast.stmt = _class_node(path[-1], stmts or [ast.Pass()], anchor, metas[-1])
    for depth in range(len(path) - 2, -1, -1):
        node = _class_node(path[depth], [node], anchor, metas[depth])
    locals_ = dict(scratch)
    locals_[metas[0]] = shells[0]
    run(node, inp.moddict, locals_)
    ns = shells[-1].ns
    cell = ns.get("__classcell__")
    if isinstance(cell, CellType):
        cell.cell_contents = cls  # a fresh cell: super() in new methods finds the live class
    return ns


def _rebuild(inp: Inputs, match: Matching, cls: type, value: Any) -> Any:
    """A descriptor whose kind changed: rebuild it around the live function objects (kept
    and patched in place) instead of the copies the class shell created."""

    def live(fn: Any) -> Any:
        if type(fn) is not FunctionType:
            return fn
        new_key = inp.new_idx.find(fn.__code__)
        old_key = match.to_old.get(new_key) if new_key else None
        for lf in match.live_by_key.get(old_key, []) if old_key else []:
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


# ---------------------------------------------------------------- signatures


@dataclass
class NewSignature:
    """The default values and annotations a function gets from the patch.  Only the defaults
    of the parameters in ``changed`` change: every other parameter keeps the value its live
    function holds (an unchanged ``seen=[]`` keeps its contents)."""

    changed: frozenset[str]
    defaults: tuple[Any, ...] | None  # as the new ``def`` evaluates them, every parameter
    kwdefaults: dict[str, Any] | None
    annotations: dict[str, Any] | None  # None: unchanged


def signatures(
    inp: Inputs,
    diff: ModuleDiff,
    run: Runner,
    scratch: dict[str, Any],
    consts: Constants,
) -> dict[CodeKey, NewSignature]:
    """The new signatures, by the new key of the function: the ``def`` without decorators
    or body, run against the live module (and the class namespace for methods), with the
    new values of the constants the plan changes.  A default changes when its expression
    changed or reads such a constant."""
    out: dict[CodeKey, NewSignature] = {}
    applied = set(consts.module)
    for dw in diff.defaults:
        visible = applied | set(consts.classes.get(dw.scope, {}))
        changed = dw.changed | {p for p, names in dw.refs.items() if names & visible}
        if not changed and not dw.annotations:
            continue
        first = dw.new.decorator_list[0].lineno if dw.new.decorator_list else dw.new.lineno
        key = inp.new_idx.find_at(dw.qualname, first)
        if key is None:
            continue
        stripped = copy.copy(dw.new)
        stripped.decorator_list = []
        stripped.body = [ast.copy_location(ast.Pass(), dw.new)]
        if dw.scope:
            if dw.scope not in inp.found.classes:
                continue
            ns = shell_exec(inp, run, scratch, consts, dw.scope, [stripped], dw.new)
            fn = ns.get(dw.new.name)
        else:
            locals_ = dict(scratch)
            locals_.update(consts.module)
            run(stripped, inp.moddict, locals_)
            fn = locals_.get(dw.new.name)
        if type(fn) is not FunctionType:
            continue
        out[key] = NewSignature(
            frozenset(changed),
            fn.__defaults__,
            fn.__kwdefaults__,
            fn.__annotations__ if dw.annotations else None,
        )
    return out


# ---------------------------------------------------------------- helpers


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


def bound_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {stmt.name}
    if isinstance(stmt, ast.Assign):
        return {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    return set()


def kind_of(value: object) -> str:
    if isinstance(value, type):
        return "class"
    if isinstance(value, ModuleType):
        return "module"
    if isinstance(value, FunctionType):
        return "function"
    if isinstance(value, staticmethod | classmethod | property):
        return type(value).__name__
    return "name"


def _hook(hooks: dict[str, Any], name: str, display: str) -> Callable[[Any], object] | None:
    value = hooks.get(name)
    if value is None:
        return None
    if not callable(value):
        raise PatchExecError(f"{display}: {name} must be a function taking one argument (ctx)")
    return value  # type: ignore[no-any-return]
