"""Statement-level diff of a module's base source and a patch source.

Function *bodies* are not compared here: they are compiled once with the whole new source
and matched to live functions by code key (`_patch_code`).  This module decides what happens
to everything else:

| statement in the new source            | outcome                                           |
|----------------------------------------|---------------------------------------------------|
| unchanged (any kind)                   | nothing; never re-run                             |
| ``def`` with changed decorators        | refused (in a class: rebuilt if only ``property``, |
|                                        | ``staticmethod``, ``classmethod``, ``x.setter``…)  |
| ``def`` with changed defaults/annots   | evaluated at prepare (decorators stripped)         |
| ``class`` with changed bases/metaclass/decorators, ``__slots__``, dataclass   | refused |
| fields, enum members, NamedTuple/TypedDict/attrs fields                      |         |
| ``NAME = <literal>`` changed           | constant rule, decided by the planner              |
| ``NAME = <expr>`` changed, other stmts | refused, or left to ``__swapd_migrate__``          |
| new def/class/assignment/import        | executed at prepare in scratch locals, bound at    |
|                                        | commit                                             |
| removed names                          | reported and kept (deleted with ``prune``)         |
| ``if __name__ == "__main__":``         | ignored (noted)                                    |

Statements are matched by what they bind (``def``/``class``/assignment name), imports and
other statements by their text without positions (and with nested function bodies blanked,
so a body change inside ``if``/``try`` is just a code change).
"""

from __future__ import annotations

import abc
import ast
import enum
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from swapd.patch.model import Refusal, Removed
from swapd.patch.nodes import (
    FuncNode,
    default_exprs,
    dump,
    future_flags,
    import_names,
    is_literal,
    is_overload,
    shape,
)

HOOKS = ("__swapd_migrate__", "__swapd_rollback__", "__swapd_cells__")
_DESCRIPTOR_DECORATORS = {"staticmethod", "classmethod", "property", "cached_property"}
_FIELD_REASON = {
    "dataclass": "dataclass fields changed",
    "attrs": "attrs fields changed",
    "namedtuple": "NamedTuple fields changed",
    "typeddict": "TypedDict fields changed",
    "enum": "enum members changed",
    "metaclass": "annotated attributes of a class with a custom metaclass changed",
    "decorated": "annotated attributes of a decorated class changed",
}


@dataclass
class ConstUpdate:
    scope: str  # "" for the module, else the class qualname
    name: str
    old: ast.expr
    new: ast.expr
    lineno: int


@dataclass
class DefaultsWork:
    """A ``def`` whose default values or annotations may change.  ``changed`` names the
    parameters whose default expression changed; ``refs`` the names each default expression
    reads (a default reading a constant the patch changes changes too)."""

    scope: str
    qualname: str
    new: FuncNode
    changed: frozenset[str]
    refs: dict[str, frozenset[str]]
    annotations: bool


@dataclass
class ClassWork:
    qualname: str
    node: ast.ClassDef
    live: bool = True
    exec_stmts: list[ast.stmt] = field(default_factory=list)
    exec_names: list[str] = field(default_factory=list)
    regroup: set[str] = field(default_factory=set)
    removed: list[str] = field(default_factory=list)
    doc: tuple[str | None, str | None] | None = None


@dataclass
class ModuleDiff:
    refusals: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)
    consts: list[ConstUpdate] = field(default_factory=list)
    exec_stmts: list[ast.stmt] = field(default_factory=list)
    exec_names: list[str] = field(default_factory=list)
    hooks: list[ast.stmt] = field(default_factory=list)
    classes: list[ClassWork] = field(default_factory=list)
    defaults: list[DefaultsWork] = field(default_factory=list)
    doc: tuple[str | None, str | None] | None = None
    removed_names: list[str] = field(default_factory=list)
    unexecuted: list[str] = field(default_factory=list)  # left to __swapd_migrate__
    future_flags: int = 0


@dataclass
class _Stmt:
    node: ast.stmt
    kind: str  # def class assign annot import future doc main noop stmt
    key: str  # name for def/class/annot, names for assign, dump for others
    names: tuple[str, ...] = ()


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    t = node.test
    sides = [t.left, *t.comparators]
    return (
        len(t.ops) == 1
        and isinstance(t.ops[0], ast.Eq)
        and any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
        and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
    )


def _classify(node: ast.stmt, first: bool) -> _Stmt:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return _Stmt(node, "def", node.name, (node.name,))
    if isinstance(node, ast.ClassDef):
        return _Stmt(node, "class", node.name, (node.name,))
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        return _Stmt(node, "future", dump(node))
    if isinstance(node, ast.Import | ast.ImportFrom):
        return _Stmt(node, "import", dump(node), import_names(node))
    if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
        names = tuple(t.id for t in node.targets if isinstance(t, ast.Name))
        return _Stmt(node, "assign", ",".join(names), names)
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        name = node.target.id
        return _Stmt(node, "assign" if node.value is not None else "annot", name, (name,))
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        if first and isinstance(node.value.value, str):
            return _Stmt(node, "doc", "")
        return _Stmt(node, "noop", "")
    if isinstance(node, ast.Pass):
        return _Stmt(node, "noop", "")
    if _is_main_guard(node):
        return _Stmt(node, "main", shape(node))
    return _Stmt(node, "stmt", shape(node))


def _downgrade_duplicates(items: list[_Stmt]) -> None:
    """A name bound by two assignments (or two classes) is not a simple binding: treat
    those statements as plain statements."""
    counts: Counter[str] = Counter()
    for s in items:
        if s.kind in ("assign", "class", "annot"):
            counts.update(s.names)
    for s in items:
        if s.kind in ("assign", "class", "annot") and any(counts[n] > 1 for n in s.names):
            s.kind, s.key = "stmt", shape(s.node)


def _docstring(items: list[_Stmt]) -> str | None:
    for s in items:
        if s.kind == "doc":
            assert isinstance(s.node, ast.Expr) and isinstance(s.node.value, ast.Constant)
            value = s.node.value.value
            return value if isinstance(value, str) else None
    return None


def _decorator_known(node: ast.expr, name: str) -> bool:
    if isinstance(node, ast.Name):
        return node.id in _DESCRIPTOR_DECORATORS
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id == name and node.attr in ("setter", "getter", "deleter"):
            return True
        return node.value.id == "functools" and node.attr == "cached_property"
    return False


def _is_stub(s: _Stmt) -> bool:
    return isinstance(s.node, ast.FunctionDef | ast.AsyncFunctionDef) and is_overload(s.node)


_KIND_WORDS = {
    "def": "a function",
    "class": "a class",
    "assign": "an assigned value",
    "import": "an import",
    "stmt": "the result of a statement",
}


def _defaults_work(scope: str, qual: str, old: FuncNode, new: FuncNode) -> DefaultsWork | None:
    before, after = default_exprs(old), default_exprs(new)
    changed = frozenset(n for n, e in after.items()
                        if n not in before or dump(before[n]) != dump(e))
    refs = {n: frozenset(x.id for x in ast.walk(e) if isinstance(x, ast.Name))
            for n, e in after.items()}

    def annotations(fn: FuncNode) -> str:
        a = fn.args
        every = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        every += [x for x in (a.vararg, a.kwarg) if x is not None]
        return "|".join(dump(x.annotation) for x in every) + "->" + dump(fn.returns)

    annotated = annotations(old) != annotations(new)
    if not (changed or annotated or any(refs.values())):
        return None
    return DefaultsWork(scope, qual, new, changed, refs, annotated)


def class_kind(live: type | None, node: ast.ClassDef) -> str:
    if live is not None:
        if isinstance(live, enum.EnumMeta):
            return "enum"
        if "__dataclass_fields__" in live.__dict__:
            return "dataclass"
        if "__attrs_attrs__" in live.__dict__:
            return "attrs"
        if issubclass(live, tuple) and "_fields" in live.__dict__:
            return "namedtuple"
        if typing.is_typeddict(live):
            return "typeddict"
        if type(live) not in (type, abc.ABCMeta):
            return "metaclass"
    text = dump(node.decorator_list)
    if "dataclass" in text:
        return "dataclass"
    if node.decorator_list:
        return "decorated"
    return "plain"


def _is_field(s: _Stmt, ckind: str) -> bool:
    if ckind == "plain":
        return False
    if ckind == "enum":
        return s.kind in ("assign", "annot") and not any(n.startswith("__") for n in s.names)
    if ckind == "attrs":
        return s.kind in ("assign", "annot")
    return isinstance(s.node, ast.AnnAssign)


class Differ:
    def __init__(
        self,
        old: ast.Module,
        new: ast.Module,
        display: str,
        live_class: Callable[[str], type | None],
        has_migrate: bool,
    ) -> None:
        self.old, self.new = old, new
        self.display = display
        self.live_class = live_class
        self.has_migrate = has_migrate
        self.out = ModuleDiff()

    def run(self) -> ModuleDiff:
        self.out.future_flags = future_flags(self.new)
        if future_flags(self.old) != self.out.future_flags:
            self.refuse(1, "from __future__ imports", "compiler flags of the module changed")
        self.body(self.old.body, self.new.body, "", None, "plain")
        # Keep the signatures that may change: a changed default or annotation, or a default
        # reading a constant this diff changes (in the module, or in the method's class).
        consts: dict[str, set[str]] = {}
        for cu in self.out.consts:
            consts.setdefault(cu.scope, set()).add(cu.name)
        self.out.defaults = [
            dw for dw in self.out.defaults
            if dw.changed or dw.annotations or any(
                names & (consts.get("", set()) | consts.get(dw.scope, set()))
                for names in dw.refs.values()
            )
        ]
        return self.out

    # ------------------------------------------------------------------ helpers
    def where(self, lineno: int) -> str:
        return f"{self.display}:{lineno}"

    def refuse(self, lineno: int, what: str, reason: str) -> None:
        self.out.refusals.append(Refusal(self.where(lineno), what, reason))

    def unexecuted(self, lineno: int, what: str, why: str) -> None:
        """A statement that changed but cannot be re-run in place."""
        if self.has_migrate:
            text = f"{self.where(lineno)}: {what} {why}; not executed (left to __swapd_migrate__)"
            self.out.unexecuted.append(text)
            self.out.notes.append(text)
        else:
            self.refuse(lineno, what, f"{why} and cannot be re-run in place; add __swapd_migrate__")

    # ------------------------------------------------------------------ bodies
    def body(
        self,
        old_body: list[ast.stmt],
        new_body: list[ast.stmt],
        scope: str,
        work: ClassWork | None,
        ckind: str,
    ) -> None:
        old = [_classify(s, i == 0) for i, s in enumerate(old_body)]
        new = [_classify(s, i == 0) for i, s in enumerate(new_body)]
        if not scope:
            old = [s for s in old if not set(s.names) & set(HOOKS)]
            self.out.hooks = [s.node for s in new if set(s.names) & set(HOOKS)]
            new = [s for s in new if not set(s.names) & set(HOOKS)]
        _downgrade_duplicates(old)
        _downgrade_duplicates(new)
        label = f"class {scope}" if scope else "module"

        if ckind != "plain":
            old_fields = [dump(s.node) for s in old if _is_field(s, ckind)]
            new_fields = [dump(s.node) for s in new if _is_field(s, ckind)]
            if old_fields != new_fields:
                first = next((s for s in new if _is_field(s, ckind)), None)
                lineno = first.node.lineno if first else (new[0].node.lineno if new else 1)
                self.refuse(lineno, label, _FIELD_REASON[ckind])
            old = [s for s in old if not _is_field(s, ckind)]
            new = [s for s in new if not _is_field(s, ckind)]

        old_doc, new_doc = _docstring(old), _docstring(new)
        if old_doc != new_doc:
            if work is None:
                self.out.doc = (old_doc, new_doc)
            else:
                work.doc = (old_doc, new_doc)

        self.kind_changes(old, new, scope)
        self.defs(old, new, scope, work)
        self.classes(old, new, scope, work)
        self.assigns(old, new, scope, work)
        self.imports(old, new, scope, work)
        self.others(old, new, scope, label)
        busy = work is not None and (work.exec_stmts or work.doc or work.removed or work.regroup)
        if work is not None and work.live and busy:
            self.out.classes.append(work)

    def _add_exec(self, s: _Stmt, work: ClassWork | None) -> None:
        target = self.out if work is None else work
        target.exec_stmts.append(s.node)
        for name in s.names:
            if name not in target.exec_names:
                target.exec_names.append(name)

    def _removed(self, kind: str, scope: str, name: str, work: ClassWork | None) -> None:
        self.out.removed.append(Removed(kind, scope or self.display, name))
        if work is None:
            self.out.removed_names.append(name)
        else:
            work.removed.append(name)

    def kind_changes(self, old: list[_Stmt], new: list[_Stmt], scope: str) -> None:
        """Refuse a name bound by a ``def`` (or a ``class``) that the new source binds to
        something else: references taken before the patch (a callback list, another
        module's ``from m import f``) hold the old function or class, which can neither
        become the new object nor keep working as the new source means it to."""

        def kinds(items: list[_Stmt]) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for s in items:
                if s.kind != "annot":  # a bare annotation binds nothing
                    for name in s.names:
                        out.setdefault(name, set()).add(s.kind)
            return out

        before, after = kinds(old), kinds(new)
        for name, was in before.items():
            now = after.get(name)
            for kind, what in (("def", "a function"), ("class", "a class")):
                if not now or kind not in was or kind in now:
                    continue
                became = _KIND_WORDS.get(sorted(now)[0], "something else")
                lineno = next(s.node.lineno for s in new if name in s.names)
                qual = f"{scope}.{name}" if scope else name
                self.refuse(
                    lineno,
                    qual,
                    f"was {what} and becomes {became}: references taken before the patch "
                    f"(callbacks, registries, `from … import {name}`) would keep the old "
                    "object",
                )

    def defs(self, old: list[_Stmt], new: list[_Stmt], scope: str, work: ClassWork | None) -> None:
        def groups(items: list[_Stmt]) -> dict[str, list[FuncNode]]:
            out: dict[str, list[FuncNode]] = {}
            for s in items:
                if s.kind == "def":
                    assert isinstance(s.node, ast.FunctionDef | ast.AsyncFunctionDef)
                    if not is_overload(s.node):
                        out.setdefault(s.key, []).append(s.node)
            return out

        def stubs(items: list[_Stmt]) -> Counter[str]:
            return Counter(dump(s.node) for s in items if _is_stub(s))

        og, ng = groups(old), groups(new)
        if stubs(old) != stubs(new):
            names = sorted({s.key for s in [*old, *new] if _is_stub(s)})
            self.out.notes.append(
                f"{self.display}: typing.overload stubs of {', '.join(names)} changed; they are "
                "not executed (typing.get_overloads() keeps listing the old ones)"
            )
        for s in new:
            if s.kind == "def" and s.key not in og and s.node is ng[s.key][0]:
                for node in ng[s.key]:
                    self._add_exec(_Stmt(node, "def", s.key, (s.key,)), work)
        for name, olds in og.items():
            qual = f"{scope}.{name}" if scope else name
            news = ng.get(name)
            if news is None:
                self._removed("member" if scope else "function", scope, name, work)
                continue
            same_kind = [type(o) for o in olds] == [type(n) for n in news]
            same_decorators = [dump(o.decorator_list) for o in olds] == [
                dump(n.decorator_list) for n in news
            ]
            if len(olds) == len(news) and not same_kind:
                self.refuse(news[0].lineno, f"def {qual}", "function kind changed (def/async def)")
                continue
            if not same_decorators:
                known = all(
                    _decorator_known(d, name) for fn in [*olds, *news] for d in fn.decorator_list
                )
                if work is None or not known:
                    self.refuse(news[0].lineno, f"def {qual}", "decorator expressions changed")
                    continue
                work.regroup.add(name)
                for node in news:
                    self._add_exec(_Stmt(node, "def", name, (name,)), work)
            for o, n in zip(olds, news, strict=False):
                work_item = _defaults_work(scope, qual, o, n)
                if work_item is not None:
                    self.out.defaults.append(work_item)

    def classes(
        self, old: list[_Stmt], new: list[_Stmt], scope: str, work: ClassWork | None
    ) -> None:
        oc = {s.key: s.node for s in old if s.kind == "class"}
        for s in new:
            if s.kind != "class":
                continue
            n = s.node
            assert isinstance(n, ast.ClassDef)
            qual = f"{scope}.{n.name}" if scope else n.name
            o = oc.get(s.key)
            if o is None:
                self._add_exec(s, work)
                continue
            assert isinstance(o, ast.ClassDef)
            if dump(o.bases) != dump(n.bases) or dump(o.keywords) != dump(n.keywords):
                self.refuse(n.lineno, f"class {qual}", "bases or metaclass changed")
                continue
            if dump(o.decorator_list) != dump(n.decorator_list):
                self.refuse(n.lineno, f"class {qual}", "class decorators changed")
                continue
            live = self.live_class(qual)
            if live is None:
                self.out.notes.append(
                    f"{self.where(n.lineno)}: class {qual} is not bound in the live module; "
                    "only the code of its functions is patched"
                )
            sub = ClassWork(qual, n, live=live is not None)
            self.body(o.body, n.body, qual, sub, class_kind(live, n))
        new_names = {s.key for s in new if s.kind == "class"}
        for name in oc:
            if name not in new_names:
                self._removed("class", scope, name, work)

    def assigns(
        self, old: list[_Stmt], new: list[_Stmt], scope: str, work: ClassWork | None
    ) -> None:
        label = f"{scope}." if scope else ""
        oa = {s.key: s for s in old if s.kind in ("assign", "annot")}
        for s in new:
            if s.kind not in ("assign", "annot"):
                continue
            node = s.node
            assert isinstance(node, ast.Assign | ast.AnnAssign)
            what = f"{label}{s.key}"
            if "__slots__" in s.names:
                o = oa.get(s.key)
                if o is None or dump(o.node) != dump(node):
                    self.refuse(node.lineno, what, "__slots__ changed")
                continue
            o = oa.get(s.key)
            if o is None:
                if s.kind == "assign":
                    self._add_exec(s, work)
                continue
            assert isinstance(o.node, ast.Assign | ast.AnnAssign)
            if shape(o.node) == shape(node):
                continue  # identical, or only lambda bodies changed (a code change)
            # Shapes differ, so with a bare annotation or the same value it is the annotation.
            if s.kind == "annot" or o.kind == "annot" or dump(o.node.value) == dump(node.value):
                self.out.notes.append(
                    f"{self.where(node.lineno)}: annotation of {what} changed; not re-evaluated"
                )
                continue
            assert o.node.value is not None and node.value is not None
            if is_literal(o.node.value) and is_literal(node.value):
                for name in s.names:
                    self.out.consts.append(
                        ConstUpdate(scope, name, o.node.value, node.value, node.lineno)
                    )
            else:
                self.unexecuted(node.lineno, what, "initializer changed (not a literal)")
        new_keys = {s.key for s in new if s.kind in ("assign", "annot")}
        for key, s in oa.items():
            if key not in new_keys:
                for name in s.names:
                    if name == "__slots__":
                        self.refuse(s.node.lineno, f"{label}__slots__", "__slots__ changed")
                    elif s.kind == "assign":
                        self._removed("member" if scope else "name", scope, name, work)

    def imports(
        self, old: list[_Stmt], new: list[_Stmt], scope: str, work: ClassWork | None
    ) -> None:
        old_count = Counter(s.key for s in old if s.kind == "import")
        new_bound: set[str] = set()
        for s in new:
            if s.kind in ("def", "class", "assign", "import"):
                new_bound.update(s.names)
            if s.kind != "import":
                continue
            if old_count[s.key] > 0:
                old_count[s.key] -= 1
                continue
            if scope:
                self.unexecuted(s.node.lineno, f"import in class {scope}", "is new or changed")
            else:
                self._add_exec(s, work)
                self.out.notes.append(
                    f"{self.where(s.node.lineno)}: import executed at prepare ({_src(s.node)})"
                )
        for s in old:
            if s.kind == "import" and old_count[s.key] > 0:
                old_count[s.key] -= 1
                for name in s.names:
                    if name not in new_bound:
                        self._removed("name", scope, name, work)

    def others(self, old: list[_Stmt], new: list[_Stmt], scope: str, label: str) -> None:
        old_count = Counter(s.key for s in old if s.kind in ("stmt", "main"))
        for s in new:
            if s.kind not in ("stmt", "main"):
                continue
            if old_count[s.key] > 0:
                old_count[s.key] -= 1
                continue
            if s.kind == "main":
                self.out.notes.append(
                    f"{self.where(s.node.lineno)}: changes under "
                    "`if __name__ == '__main__':` are ignored"
                )
                continue
            self.unexecuted(s.node.lineno, f"statement in {label}", f"`{_src(s.node)}` is new")
        for s in old:
            if s.kind == "stmt" and old_count[s.key] > 0:
                old_count[s.key] -= 1
                self.out.removed.append(Removed("statement", scope or self.display, _src(s.node)))
                self.out.notes.append(
                    f"{self.display}: statement `{_src(s.node)}` (old line {s.node.lineno}) "
                    "is gone from the source; what it did stays"
                )


def _src(node: ast.AST, limit: int = 60) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
