"""Where a definition is bound: the key that pairs code objects sharing a qualified name.

Two lambdas of one scope, a property's getter and setter, the implementations registered on
one ``singledispatch`` function: code objects with the same ``co_qualname``.  Pairing them
by compile order is wrong as soon as the order changes (swap ``INC = lambda…`` and
``DEC = lambda…`` and each would run the other's code), so they are paired by their *site*:
the path from the enclosing scope to the definition, spelled by what binds it on the way —
the assigned name, the attribute, the dict key or list slot, the keyword, the call argument,
the decorators of a ``def``, the ``if``/``for``/``with`` it sits in.

A code object is found in the tree by the position of the instruction that loads it in its
parent's code: CPython gives that instruction exactly the span of the ``def``/``lambda``/
``class``/comprehension node (checked on the whole standard library).  Sites are computed
only for qualified names that occur more than once, and only when compile order is not
trivially right.
"""

from __future__ import annotations

import ast
import dis
from types import CodeType

from swapd.patch.code import CodeIndex, CodeKey, kind
from swapd.patch.nodes import SCOPES

Span = tuple[int, int, int, int]  # lineno, end_lineno, col_offset, end_col_offset

_BY_NAME: dict[str, tuple[type[ast.AST], ...]] = {
    "<lambda>": (ast.Lambda,),
    "<listcomp>": (ast.ListComp,),
    "<setcomp>": (ast.SetComp,),
    "<dictcomp>": (ast.DictComp,),
    "<genexpr>": (ast.GeneratorExp,),
}
_NEWLOCALS = 0x0002  # CO_NEWLOCALS: set for functions, not for class bodies


def is_class_body(code: CodeType) -> bool:
    return not code.co_flags & _NEWLOCALS


class Sites:
    """Sites of the code objects of one compiled source (its tree and its code index)."""

    def __init__(self, tree: ast.Module, index: CodeIndex) -> None:
        self.tree = tree
        self.index = index
        self._spans: dict[Span, list[ast.AST]] | None = None
        self._parents: dict[int, ast.AST] = {}
        self._loaded: dict[int, dict[int, Span]] = {}  # id(parent code) -> id(code) -> span
        self._memo: dict[tuple[CodeKey, bool], str | None] = {}

    def site(self, key: CodeKey, duplicated: set[str], decorators: bool = True) -> str | None:
        """The site of ``key``: its enclosing definitions' sites (where their names are
        duplicated too) and its own path from its scope; None if it cannot be found.
        ``decorators=False`` leaves out the decorators of ``key`` itself."""
        memo = (key, decorators)
        if memo in self._memo:
            return self._memo[memo]
        self._memo[memo] = None  # no cycles, but never recurse forever
        parent = self.index.parent.get(key)
        if parent is None:
            outer = ""
        elif parent[0] in duplicated:
            found = self.site(parent, duplicated)
            if found is None:
                return None
            outer = found
        else:
            outer = parent[0]
        node = self._node(key)
        local = None if node is None else self._local(node, decorators)
        result = None if local is None else f"{outer}/{local}"
        self._memo[memo] = result
        return result

    # ------------------------------------------------------------------ code -> node
    def node(self, key: CodeKey) -> ast.AST | None:
        """The ``def``/``lambda``/``class``/comprehension node that compiles to ``key``."""
        return self._node(key)

    def _node(self, key: CodeKey) -> ast.AST | None:
        code = self.index.by_key[key]
        parent_code = self.index.container.get(key)
        if parent_code is None:
            return None
        spans = self._loaded.get(id(parent_code))
        if spans is None:
            spans = self._loaded[id(parent_code)] = {}
            for ins in dis.get_instructions(parent_code):
                if ins.opname == "LOAD_CONST" and isinstance(ins.argval, CodeType):
                    p = ins.positions
                    if p is None:
                        continue
                    a, b, c, d = p.lineno, p.end_lineno, p.col_offset, p.end_col_offset
                    if a is not None and b is not None and c is not None and d is not None:
                        spans[id(ins.argval)] = (a, b, c, d)
        span = spans.get(id(code))
        if span is None:
            return None
        if code.co_name in _BY_NAME:
            types: tuple[type[ast.AST], ...] = _BY_NAME[code.co_name]
        elif is_class_body(code):
            types = (ast.ClassDef,)
        else:
            types = (ast.FunctionDef, ast.AsyncFunctionDef)
        nodes = [n for n in self._all_spans().get(span, ()) if isinstance(n, types)]
        return nodes[0] if len(nodes) == 1 else None

    def _all_spans(self) -> dict[Span, list[ast.AST]]:
        if self._spans is None:
            self._spans = {}
            for node in ast.walk(self.tree):
                for child in ast.iter_child_nodes(node):
                    self._parents[id(child)] = node
                if isinstance(node, SCOPES):
                    span = (node.lineno, node.end_lineno or node.lineno, node.col_offset,
                            node.end_col_offset or 0)
                    self._spans.setdefault(span, []).append(node)
        return self._spans

    # ------------------------------------------------------------------ node -> site
    def _local(self, node: ast.AST, decorators: bool) -> str:
        parts = [_identity(node, decorators)]
        cur = node
        while True:
            parent = self._parents.get(id(cur))
            if parent is None or _encloses(parent, cur):
                break
            parts.append(_step(parent, cur))
            cur = parent
        return "/".join(reversed(parts))


def _identity(node: ast.AST, decorators: bool = True) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        if not decorators:
            return f"def {node.name}"
        text = f"def {node.name}@{','.join(_src(d) for d in node.decorator_list)}"
        if any(_is_overload(d) for d in node.decorator_list):
            # Overload stubs share name and decorator: their signature tells them apart.
            text += f"({_src(node.args)})->{_src(node.returns) if node.returns else ''}"
        return text
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    return type(node).__name__.lower()


def _is_overload(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "overload"
    return isinstance(node, ast.Attribute) and node.attr == "overload"


def _encloses(parent: ast.AST, child: ast.AST) -> bool:
    """Is ``child`` inside the scope ``parent`` creates (its body), rather than in a part
    the enclosing scope evaluates (decorators, defaults, annotations, bases, the first
    iterable of a comprehension)?"""
    if isinstance(parent, ast.Module):
        return True
    if isinstance(parent, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return any(child is s for s in parent.body)
    if isinstance(parent, ast.Lambda):
        return child is parent.body
    if isinstance(parent, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
        return not (parent.generators and child is parent.generators[0])
    return False


def _field_of(parent: ast.AST, child: ast.AST) -> tuple[str, int | None]:
    for name, value in ast.iter_fields(parent):
        if value is child:
            return name, None
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is child:
                    return name, i
    return "?", None


def _step(parent: ast.AST, child: ast.AST) -> str:
    """One step of a site: how ``parent`` holds ``child``."""
    field, i = _field_of(parent, child)
    if isinstance(parent, ast.Assign) and field == "value":
        return "=" + ",".join(_src(t) for t in parent.targets)
    if isinstance(parent, ast.AnnAssign | ast.AugAssign | ast.NamedExpr) and field == "value":
        return "=" + _src(parent.target)
    if isinstance(parent, ast.keyword):
        return f"{parent.arg or '**'}="
    if isinstance(parent, ast.Call) and field == "args":
        return f"{_src(parent.func)}(#{i})"
    if isinstance(parent, ast.Call) and field == "keywords":
        return f"{_src(parent.func)}()"
    if isinstance(parent, ast.Dict) and field == "values" and i is not None:
        key = parent.keys[i]
        return "{" + (_src(key) if key is not None else f"**#{i}") + "}"
    if isinstance(parent, ast.If | ast.While):
        return f"{type(parent).__name__.lower()} {_src(parent.test)}:{field}"
    if isinstance(parent, ast.For | ast.AsyncFor):
        return f"for {_src(parent.target)} in {_src(parent.iter)}:{field}"
    if isinstance(parent, ast.With | ast.AsyncWith):
        return f"with {','.join(_src(w) for w in parent.items)}:{field}"
    if isinstance(parent, ast.ExceptHandler):
        return f"except {_src(parent.type) if parent.type else ''}:{field}"
    if isinstance(parent, ast.match_case):
        return f"case {_src(parent.pattern)}:{field}"
    if isinstance(parent, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        # Reached from a decorator, a default or a base: part of the enclosing scope.
        return f"{_identity(parent)}.{field}" + (f"#{i}" if i is not None else "")
    if isinstance(parent, ast.stmt) and i is not None and field in ("body", "orelse",
                                                                      "finalbody", "handlers"):
        return f"{type(parent).__name__.lower()}:{field}"
    return f"{type(parent).__name__}.{field}" + (f"[{i}]" if i is not None else "")


def _src(node: ast.AST) -> str:
    return " ".join(ast.unparse(node).split())


def pair_by_site(
    olds: list[CodeKey],
    news: list[CodeKey],
    old_sites: Sites,
    new_sites: Sites,
    duplicated: set[str],
) -> tuple[list[tuple[CodeKey, CodeKey]], list[CodeKey]] | None:
    """Pair base keys with new keys of one qualified name; returns the pairs and the base
    keys that cannot be paired, or None if a site cannot be found.

    Definitions at the same site pair in compile order.  What is left (a site whose count
    changed, a ``def`` whose decorators changed: a method becoming a property with a setter)
    is grouped again by the site without decorators, and paired there when the group is one
    to one or when the call signature tells them apart (a getter takes ``self``, a setter
    ``self, value``).  A base key left with candidates is ambiguous."""
    exact: dict[str, tuple[list[CodeKey], list[CodeKey]]] = {}
    for keys, sites, side in ((olds, old_sites, 0), (news, new_sites, 1)):
        for key in keys:
            site = sites.site(key, duplicated)
            if site is None:
                return None
            exact.setdefault(site, ([], []))[side].append(key)
    pairs: list[tuple[CodeKey, CodeKey]] = []
    loose: dict[str, tuple[list[CodeKey], list[CodeKey]]] = {}
    for o, n in exact.values():
        if len(o) == len(n):
            pairs.extend(zip(o, n, strict=True))
            continue
        for keys, sites, side in ((o, old_sites, 0), (n, new_sites, 1)):
            for key in keys:
                site = sites.site(key, duplicated, decorators=False)
                if site is None:
                    return None
                loose.setdefault(site, ([], []))[side].append(key)
    unresolved: list[CodeKey] = []
    for o, n in loose.values():
        if len(o) == len(n) == 1:
            pairs.append((o[0], n[0]))
            continue
        old_shape = {k: call_shape(old_sites.index.by_key[k]) for k in o}
        new_shape = {k: call_shape(new_sites.index.by_key[k]) for k in n}
        for k in o:
            cands = [x for x in n if new_shape[x] == old_shape[k]]
            rivals = [x for x in o if old_shape[x] == old_shape[k]]
            if len(cands) == 1 and len(rivals) == 1:
                pairs.append((k, cands[0]))
            elif cands:
                unresolved.append(k)
    return pairs, unresolved


def call_shape(code: CodeType) -> tuple[object, ...]:
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
