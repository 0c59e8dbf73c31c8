"""Planning new code for live functions: cell joining, absent cells, the stores that put the
new code in place, and the reports about what keeps running old code.

Joining (the Python form of Lua's ``upvaluejoin``): a live function keeps every closure
cell whose *name* still appears in the new code's free variables; a name that is new gets
``__class__`` (the owning class) or a fresh cell shared by all live closures made by the same
call of the enclosing function (found through the cells they already share), valued from
``__swapd_cells__``, else from a literal initializer in the enclosing function, else EMPTY.
When the new free variables are the function's own cells, ``__code__`` is assigned;
otherwise the function gets code compiled from its new ``def`` for the closure it has
(`swapd.patch.closures`): same identity, real signature, no extra frame.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from types import CellType, CodeType, FunctionType
from typing import TYPE_CHECKING, Any

from swapd.patch.closures import Adapter, CannotAdapt
from swapd.patch.code import (
    CodeKey,
    LiveFunction,
    docstring,
    kind,
    nested_codes,
    register_adapted,
    same_but_positions,
    same_code,
)
from swapd.patch.commit import MISSING
from swapd.patch.introspected import SignatureChange, compare
from swapd.patch.model import AbsentCell, Change, PatchExecError, Refusal, Removed, short
from swapd.patch.nodes import default_exprs, literal_initializer

if TYPE_CHECKING:
    from swapd.patch.matching import Matching
    from swapd.patch.planning import Inputs, PlanData
    from swapd.patch.statements import Constants, Executed, NewSignature, Runner


FuncNodes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass
class Updates:
    """What the function plan changes, for the phases that follow (`swapd.patch.followups`):
    the functions whose code or attributes change, and their docstrings and annotations
    (old, new) where those change."""

    functions: dict[int, FunctionType] = field(default_factory=dict)
    docs: dict[int, tuple[str | None, str | None]] = field(default_factory=dict)
    annotations: dict[int, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    signatures: dict[int, SignatureChange] = field(default_factory=dict)  # changed ones


@dataclass(eq=False)
class _Instance:
    """One live function to get new code: its joined cells (None where absent) and the
    names still pending a new cell."""

    lf: LiveFunction
    key: CodeKey
    code: CodeType
    cells: list[CellType | None]
    pending: list[str]
    sig: NewSignature | None


def plan_functions(
    inp: Inputs,
    out: PlanData,
    match: Matching,
    signatures: dict[CodeKey, NewSignature],
    executed: Executed,
    run: Runner,
    consts: Constants,
) -> Updates:
    adapter = Adapter(inp.filename, run.future_flags, run.guard)
    planner = _FunctionPlanner(inp, out, match, signatures, executed.cells_hook, adapter)
    planner.run(executed.revived, set(consts.module))
    return planner.updates


class _FunctionPlanner:
    def __init__(
        self,
        inp: Inputs,
        out: PlanData,
        match: Matching,
        signatures: dict[CodeKey, NewSignature],
        cells_hook: Any,
        adapter: Adapter,
    ) -> None:
        self.inp = inp
        self.adapter = adapter
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
        self.signature_changes: dict[CodeKey, SignatureChange | None] = {}
        self.updates = Updates()

    def run(self, revived: list[tuple[LiveFunction, CodeKey]], constants: set[str]) -> None:
        inp, match = self.inp, self.match
        for key, lfs in match.live_by_key.items():
            new_key = match.to_new.get(key)
            if new_key is not None and "<locals>" in key[0] and key not in match.unresolved:
                self.closure_defaults_note(key, new_key, len(lfs), constants)
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
        oc = lf.code()
        if kind(oc) != kind(new):
            self.out.refuse(
                Refusal(
                    f"{self.display}:{new.co_firstlineno}",
                    f"def {key[0]}",
                    f"function kind changed ({kind(oc)} -> {kind(new)})",
                )
            )
            return
        sig = self.signatures.get(key)
        if same_code(oc, new) and sig is None:
            return  # unchanged (adapted code stays: it runs this code on the function's cells)
        cells: list[CellType | None] = []
        pending: list[str] = []
        old_cells = lf.cells()
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
                candidate = other.cells().get("__class__")
                if candidate is not None:
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
            for name, cell in inst.lf.cells().items():
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
        if any(c is None for c in inst.cells):
            return  # refused above
        out = self.out
        fn, new, key = inst.lf.fn, inst.code, inst.key
        running = fn.__code__  # what the function runs now (maybe adapted code)
        current = inst.lf.code()  # the source code that stands for
        joined = {n: c for n, c in zip(new.co_freevars, inst.cells, strict=True) if c is not None}
        own = dict(zip(running.co_freevars, fn.__closure__ or (), strict=True))
        if new.co_freevars == running.co_freevars and all(
            joined[n] is own[n] for n in new.co_freevars
        ):
            code = new
            detail = "line numbers" if same_but_positions(current, new) else "code"
        else:
            adapted = self.adapt(inst, joined, own)
            if adapted is None:
                return
            code = adapted
            gained = [n for n in new.co_freevars if n not in current.co_freevars]
            lost = [n for n in current.co_freevars if n not in new.co_freevars]
            change = ", ".join([f"+{n}" for n in gained] + [f"-{n}" for n in lost])
            detail = f"code compiled for its closure (free variables {change or 'rebound'})"
        defaults, kwdefaults, params = _merge_defaults(fn, current, new, inst.sig)
        old_doc, new_doc = docstring(current), docstring(new)
        parts = [] if same_code(current, new) else [detail]
        if running is not code:
            out.store("attr", fn, "__code__", code)
        if fn.__defaults__ is not defaults:
            out.store("attr", fn, "__defaults__", defaults)
        if fn.__kwdefaults__ is not kwdefaults:
            out.store("attr", fn, "__kwdefaults__", kwdefaults)
        if params:
            parts.append(f"defaults ({', '.join(params)})")
        if inst.sig is not None and inst.sig.annotations is not None:
            self.updates.annotations[id(fn)] = (fn.__annotations__, inst.sig.annotations)
            out.store("attr", fn, "__annotations__", inst.sig.annotations)
            parts.append("annotations")
        if old_doc != new_doc and fn.__doc__ == old_doc:
            self.updates.docs[id(fn)] = (old_doc, new_doc)
            out.store("attr", fn, "__doc__", new_doc)
            parts.append("docstring")
        signature = self.signature_change(key, params)
        if signature is not None:
            self.updates.signatures[id(fn)] = signature
            if signature.parameters:
                parts.append("signature")
        self.changed.setdefault(key, []).append(", ".join(parts) or "line numbers")
        out.touched.add(id(fn))
        self.updates.functions[id(fn)] = fn
        for superseded in {id(running): running, id(current): current}.values():
            if id(superseded) not in self.superseded_ids:
                self.superseded_ids.add(id(superseded))
                out.superseded.append((superseded, key))
        self.install(new, key)

    def signature_change(self, key: CodeKey, new_defaults: list[str]) -> SignatureChange | None:
        """How the source changes the signature of the functions of ``key`` (once per key);
        ``new_defaults``: the parameters whose default value the plan changes."""
        if key not in self.signature_changes:
            old_key = self.match.to_old.get(key)
            old = self.match.old_sites.node(old_key) if old_key is not None else None
            self.signature_changes[key] = compare(
                key[0], self.display, old, self.match.new_sites.node(key), bool(new_defaults))
        return self.signature_changes[key]

    def adapt(self, inst: _Instance, joined: dict[str, CellType], own: dict[str, CellType]
              ) -> CodeType | None:
        """Code for ``inst``'s function that runs the new code on the closure it has; None
        (and a refusal) if there is none."""
        fn, new, key = inst.lf.fn, inst.code, inst.key
        moved = tuple(n for n in new.co_freevars if own.get(n) is not joined[n])
        node = self.match.new_sites.node(key)
        where = f"{self.display}:{new.co_firstlineno}"
        try:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                raise CannotAdapt("its definition cannot be found in the new source")
            template = self.adapter.template(node, new, fn.__code__.co_freevars, moved)
            pairs = self.adapter.bind(template, new, {n: joined[n] for n in moved})
        except CannotAdapt as e:
            self.out.refuse(Refusal(where, f"def {key[0]}", f"its free variables change and {e}"))
            return None
        cells = {n: joined[n] for n in moved}
        for code, logical in pairs:
            register_adapted(code, logical, cells)
            nested_key = self.inp.new_idx.key_of.get(id(logical))
            old_key = self.match.to_old.get(nested_key) if nested_key is not None else None
            if code is not pairs[0][0] and old_key is not None:
                self._installed(code, old_key)
        return pairs[0][0]

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
            self._installed(new, old_key)
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
                self._installed(code, old_key)

    def _installed(self, code: CodeType, old_key: CodeKey) -> None:
        """``code`` replaces the base code ``old_key``: kept (that one base code object, not
        the whole base compile) so a rollback can switch functions made from it back."""
        self.out.installed.append((code, old_key))
        self.out.old_codes[old_key] = self.inp.old_idx.by_key[old_key]

    def closure_defaults_note(self, key: CodeKey, new_key: CodeKey, count: int,
                              constants: set[str]) -> None:
        """Closures made before the patch keep the default values they were made with:
        their defaults were evaluated by a call of the enclosing function, in its scope,
        which the patch cannot repeat.  Say which parameters differ from the new source."""
        old = self.match.old_sites.node(key)
        new = self.match.new_sites.node(new_key)
        if not isinstance(old, FuncNodes) or not isinstance(new, FuncNodes):
            return
        before, after = default_exprs(old), default_exprs(new)
        params = [
            n for n, e in after.items()
            if n not in before or ast.dump(before[n]) != ast.dump(e)
            or any(isinstance(x, ast.Name) and x.id in constants for x in ast.walk(e))
        ]
        if params:
            self.out.note(
                f"{self.display}: {count} live closure(s) {key[0]} keep the default values "
                f"they were made with ({', '.join(params)}); closures made after the commit "
                "get the new ones"
            )


def _merge_defaults(
    fn: FunctionType, current: CodeType, new: CodeType, sig: NewSignature | None
) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None, list[str]]:
    """``fn``'s defaults under the new signature: the new value for each parameter whose
    default changed, the live value (the same object) for every other one; and the names
    of the parameters whose value changes.  The live tuple and dict themselves when nothing
    differs."""
    if sig is None:
        return fn.__defaults__, fn.__kwdefaults__, []
    positional = current.co_varnames[:current.co_argcount]
    live = dict(zip(positional[len(positional) - len(fn.__defaults__ or ()):],
                    fn.__defaults__ or (), strict=True))
    live.update(fn.__kwdefaults__ or {})
    changed: list[str] = []

    def pick(name: str, value: Any) -> Any:
        if name not in sig.changed and name in live:
            return live[name]
        changed.append(name)
        return value

    positional = new.co_varnames[:new.co_argcount]
    values = sig.defaults or ()
    names = positional[len(positional) - len(values):]
    defaults = tuple(pick(n, v) for n, v in zip(names, values, strict=True)) or None
    kw = {n: pick(n, v) for n, v in (sig.kwdefaults or {}).items()} or None
    old = fn.__defaults__
    if old is not None and defaults is not None and len(old) == len(defaults) and all(
        a is b for a, b in zip(old, defaults, strict=True)
    ):
        defaults = old
    old_kw = fn.__kwdefaults__
    if old_kw is not None and kw is not None and old_kw.keys() == kw.keys() and all(
        old_kw[k] is kw[k] for k in kw
    ):
        kw = old_kw
    return defaults, kw, changed
