"""Planning new code for live functions: cell joining, absent cells, the stores that put the
new code in place, and the reports about what keeps running old code.

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
from dataclasses import dataclass
from types import CellType, CodeType, FunctionType
from typing import TYPE_CHECKING, Any

from swapd.patch.code import (
    CodeKey,
    LiveFunction,
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
from swapd.patch.commit import MISSING
from swapd.patch.diff import literal_initializer
from swapd.patch.model import AbsentCell, Change, PatchExecError, Refusal, Removed, short

if TYPE_CHECKING:
    from swapd.patch.matching import Matching
    from swapd.patch.plan import Inputs, PlanData
    from swapd.patch.statements import Executed


@dataclass(eq=False)
class _Instance:
    """One live function to get new code: its joined cells (None where absent) and the
    names still pending a new cell."""

    lf: LiveFunction
    key: CodeKey
    code: CodeType
    cells: list[CellType | None]
    pending: list[str]
    sig: dict[str, Any]


def plan_functions(
    inp: Inputs,
    out: PlanData,
    match: Matching,
    signatures: dict[CodeKey, dict[str, Any]],
    executed: Executed,
) -> None:
    _FunctionPlanner(inp, out, match, signatures, executed.cells_hook).run(executed.revived)


class _FunctionPlanner:
    def __init__(
        self,
        inp: Inputs,
        out: PlanData,
        match: Matching,
        signatures: dict[CodeKey, dict[str, Any]],
        cells_hook: Any,
    ) -> None:
        self.inp = inp
        self.out = out
        self.match = match
        self.signatures = signatures
        self.cells_hook = cells_hook
        self.display = inp.display
        # State local to this phase.
        self.instances: list[_Instance] = []
        self.class_cells: dict[int, CellType] = {}
        self.changed: dict[CodeKey, list[str]] = {}
        self.superseded_ids: set[int] = set()
        self.installed_ids: set[int] = set()

    def run(self, revived: list[tuple[LiveFunction, CodeKey]]) -> None:
        inp, match = self.inp, self.match
        for key, lfs in match.live_by_key.items():
            new_key = match.to_new.get(key)
            if key in match.unresolved:
                self.out.refuse(
                    Refusal(
                        self.display,
                        key[0],
                        f"{inp.old_idx.counts[key[0]]} definition(s) named {key[0]} before "
                        f"and {inp.new_idx.counts[key[0]]} now: the live ones cannot be paired "
                        "with the new ones by where they are bound (assigned name, decorators, "
                        "container slot)",
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
                self.plan_function(lf, new_key, inp.new_idx.by_key[new_key])
        for lf, key in revived:
            self.plan_function(lf, key, inp.new_idx.by_key[key])
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
            self.out.refuse(
                Refusal(
                    f"{self.display}:{new.co_firstlineno}",
                    f"def {key[0]}",
                    f"function kind changed ({kind(oc)} -> {kind(new)})",
                )
            )
            return
        sig = self.signatures.get(key, {})
        if same_code(oc, new) and not sig:
            return  # unchanged (a trampolined function keeps its trampoline)
        cells: list[CellType | None] = []
        pending: list[str] = []
        old_cells = dict(zip(oc.co_freevars, cur.__closure__ or (), strict=True))
        for name in new.co_freevars:
            if name in old_cells:
                cells.append(old_cells[name])
            elif name == "__class__":
                cells.append(self.class_cell(key))
            else:
                cells.append(None)
                pending.append(name)
        for name in oc.co_freevars:
            if name not in new.co_freevars:
                self.out.add_removed(Removed("freevar", key[0], name))
        self.instances.append(_Instance(lf, key, new, cells, pending, sig))

    def class_cell(self, key: CodeKey) -> CellType | None:
        owner = self.inp.new_idx.owner_of_cell(key, "__class__")
        cls = self.inp.found.classes.get(owner[0]) if owner else None
        if cls is None:
            self.out.refuse(
                Refusal(self.display, key[0], "uses super()/__class__ but its class is not live")
            )
            return None
        cell = self.class_cells.get(id(cls))
        if cell is None:
            for other in self.inp.found.functions.values():
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
        self.out.add_absent(AbsentCell(key[0], "__class__", "__class__", short(cls)))
        return cell

    def resolve_absent(self) -> None:
        # (owner scope, name) -> instances that need a new cell for it
        wanted: dict[tuple[CodeKey, str], list[_Instance]] = {}
        for inst in self.instances:
            for name in inst.pending:
                owner = self.inp.new_idx.owner_of_cell(inst.key, name)
                if owner is None:
                    self.out.refuse(
                        Refusal(self.display, inst.key[0], f"cannot find the scope of {name!r}")
                    )
                    continue
                wanted.setdefault((owner, name), []).append(inst)
        for (owner, name), insts in wanted.items():
            for group, known in self.sibling_groups(owner, insts):
                rep = group[0]
                source, value = self.cell_value(owner, name, rep)
                if not known and len(insts) > 1 and source != "hook":
                    self.out.refuse(
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
                    self.out.add_absent(AbsentCell(
                        inst.key[0], name, source, "" if source == "EMPTY" else short(value)
                    ))
                if source == "EMPTY":
                    self.out.needs_ack = True

    def sibling_groups(
        self, owner: CodeKey, insts: list[_Instance]
    ) -> list[tuple[list[_Instance], bool]]:
        """Closures made by the same call of ``owner`` share the cells that call created;
        group instances by those shared cells (union-find)."""
        old_key = self.match.to_old.get(owner)
        old_owner = self.inp.old_idx.by_key.get(old_key) if old_key else None
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
        code = self.inp.new_idx.by_key[owner]
        node = self.inp.nodes(new=True).find(code.co_name, code.co_firstlineno)
        if node is not None:
            init = literal_initializer(node, name)
            if init is not None:
                return "constexpr", ast.literal_eval(init)
        return "EMPTY", None

    def build(self, inst: _Instance) -> None:
        cells = tuple(c for c in inst.cells if c is not None)
        if len(cells) != len(inst.cells):
            return  # refused above
        out = self.out
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
                out.store("attr", fn, "__code__", new)
            if fn.__defaults__ is not defaults:
                out.store("attr", fn, "__defaults__", defaults)
                detail += ", defaults"
            if fn.__kwdefaults__ is not kwdefaults:
                out.store("attr", fn, "__kwdefaults__", kwdefaults)
            if "__annotations__" in sig:
                out.store("attr", fn, "__annotations__", sig["__annotations__"])
            if doc_changes:
                out.store("attr", fn, "__doc__", new_doc)
            if ours:
                out.store("attr", fn, "__wrapped__", MISSING)
        else:
            if kind(new) == "async generator":
                out.refuse(
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
            out.store("attr", fn, "__code__", tramp)
            if wrapped is MISSING or ours:
                out.store("attr", fn, "__wrapped__", target)
            detail = "code via trampoline (free variables changed)"
        self.changed.setdefault(inst.key, []).append(detail)
        out.touched.add(id(fn))
        if id(cur.__code__) not in self.superseded_ids:
            self.superseded_ids.add(id(cur.__code__))
            out.superseded.append((cur.__code__, inst.key))
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
        old_key = self.match.to_old.get(key)
        if old_key is not None:
            self.out.installed.append((new, old_key))
        for code in nested_codes(new):
            nested_key = self.inp.new_idx.key_of.get(id(code))
            if nested_key is None or id(code) in self.installed_ids:
                continue
            self.installed_ids.add(id(code))
            old_key = self.match.to_old.get(nested_key)
            old = self.inp.old_idx.by_key.get(old_key) if old_key is not None else None
            if old_key is None or old is None:
                self.out.installed_new.append(code)
            elif not same_code(old, code):
                self.out.installed.append((code, old_key))

    def closure_defaults_note(self, key: CodeKey, old: CodeType, new: CodeType) -> None:
        o = self.inp.nodes(new=False).find(old.co_name, old.co_firstlineno)
        n = self.inp.nodes(new=True).find(new.co_name, new.co_firstlineno)
        if o is None or n is None:
            return
        if ast.dump(ast.List(o.args.defaults + o.args.kw_defaults)) != ast.dump(  # type: ignore[operator]
            ast.List(n.args.defaults + n.args.kw_defaults)  # type: ignore[operator]
        ):
            self.out.note(f"{self.display}: live closures {key[0]} keep their creation-time "
                          "defaults")


# ---------------------------------------------------------------- reports


def caches(inp: Inputs, out: PlanData) -> None:
    for wrapper in inp.found.lru:
        wrapped = getattr(wrapper, "__wrapped__", None)
        if id(wrapped) in out.touched:
            out.lru_clear.append(wrapper)
            out.changed.append(
                Change("cache", getattr(wrapper, "__qualname__", "?"), "cache_clear() after commit")
            )
    for cls, name, cp in inp.found.cached_properties:
        if id(cp.func) in out.touched:
            out.notes.append(
                f"{inp.display}: instances keep values already cached by "
                f"{cls.__qualname__}.{name} (cached_property)"
            )


def runners(inp: Inputs, out: PlanData) -> None:
    old = {id(code): key[0] for code, key in out.superseded}
    counts: dict[str, int] = {}
    for runner in inp.found.runners:
        code = runner_code(runner)
        if code is not None and id(code) in old:
            counts[old[id(code)]] = counts.get(old[id(code)], 0) + 1
    for name, count in sorted(counts.items()):
        out.notes.append(
            f"{inp.display}: {count} running generator(s)/coroutine(s) of {name} "
            "finish on the old code"
        )
    for line in threads_running(old):
        out.notes.append(f"{inp.display}: {line} (it finishes on the old code)")
