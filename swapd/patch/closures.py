"""New code for a function whose free variables changed, run by the function itself.

A function's closure is fixed when it is created (``__closure__`` is read-only) and
``__code__`` only takes code with as many free variables as the closure has cells.  When a
patch changes the free variables of a live closure (it starts using a variable of its
enclosing function, or stops), the function keeps its identity, so references held
elsewhere run the new code, and gets code *compiled from its new ``def``* for its own
closure:

* variables it still uses and still holds a cell for stay ordinary free variables;
* variables it now uses but has no cell for (``absent`` cells, or a cell that is not the
  one the join chose) are read and written through that cell, put in the code's constants:
  ``limit`` becomes ``<cell>.cell_contents``, ``nonlocal limit`` goes;
* variables it no longer uses are named in dead code after a final ``return``, so the code
  has exactly the closure's free variables (CPython checks only their number, and they are
  sorted, so the names must match too).

The result has the real parameters (``inspect.signature``, ``getfullargspec`` and
``co_argcount`` see the new ``def``), runs in the function's own frame (no extra frame per
call: recursion depth is unchanged), works for every kind (generators, coroutines, async
generators) and costs one attribute read per access of a moved variable.  The compile uses
the module's ``__future__`` flags and import prelude, so code nested in it equals the code
of a whole compile of the new source.

`swapd.patch.code` keeps, for each such code object, the code it stands for (the new
source's own compile) and the cells held in its constants, so later patches and rollbacks
see the function as the new source defines it.
"""

from __future__ import annotations

import ast
import copy
import secrets
import sys
from types import CellType, CodeType
from typing import TypeVar

from swapd.patch.nodes import SCOPES

_OUTER = "__swapd_outer__"
_LAMBDA = "__swapd_lambda__"
FuncNode = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


class CannotAdapt(Exception):
    """The new code cannot be compiled for the function's closure; the message says why."""


class Adapter:
    """Compiles adapted code for one patch: each (definition, closure layout) once; the cells
    are put in per function (`bind`)."""

    def __init__(self, filename: str, future_flags: int, guard: list[ast.stmt]) -> None:
        self.filename = filename
        self.future_flags = future_flags
        self.guard = guard
        self.token = secrets.token_hex(4)
        self._templates: dict[tuple[int, tuple[str, ...], tuple[str, ...]], CodeType] = {}

    def placeholder(self, name: str) -> str:
        return f"__swapd_cell_{name}_{self.token}__"

    def template(
        self, node: FuncNode, logical: CodeType, own: tuple[str, ...], moved: tuple[str, ...]
    ) -> CodeType:
        """Code of ``node`` (which compiles to ``logical`` in the whole module) whose free
        variables are exactly ``own``; the names in ``moved`` are read through placeholder
        constants that `bind` replaces with cells."""
        key = (id(logical), own, moved)
        found = self._templates.get(key)
        if found is None:
            found = self._templates[key] = self._compile(node, logical, own, moved)
        return found

    def bind(
        self, template: CodeType, logical: CodeType, cells: dict[str, CellType]
    ) -> list[tuple[CodeType, CodeType]]:
        """The template with its placeholders replaced by ``cells``: the code for the
        function first, then every code nested in it, each paired with the code of the
        whole compile it stands for."""
        swap = {self.placeholder(name): cell for name, cell in cells.items()}
        nested: list[tuple[CodeType, CodeType]] = []
        top = _bind(template, logical, swap, nested)
        return [(top, logical), *nested]

    # ------------------------------------------------------------------ compiling
    def _compile(
        self, node: FuncNode, logical: CodeType, own: tuple[str, ...], moved: tuple[str, ...]
    ) -> CodeType:
        fdef = _as_def(node)
        problem = _binding_problem(fdef, set(moved))
        if problem:
            raise CannotAdapt(problem)
        names = {name: self.placeholder(name) for name in moved}
        first = _first_param(fdef)
        fdef.body = [_Rewrite(names, first).visit(s) for s in fdef.body]
        dead = [n for n in own if n not in logical.co_freevars or n in moved]
        end = fdef.body[-1]
        tail: list[ast.stmt] = [ast.Return(value=None)]
        if dead:
            tail.append(ast.Expr(ast.Tuple([ast.Name(n, ast.Load()) for n in dead], ast.Load())))
        for stmt in tail:
            _locate(stmt, end)
        fdef.body += tail
        body: list[ast.stmt] = []
        if own:
            cells = ast.Assign(targets=[ast.Name(n, ast.Store()) for n in own],
                               value=ast.Constant(None))
            body.append(_locate(cells, fdef))
        body.append(fdef)
        outer = ast.FunctionDef(name=_OUTER, args=_no_args(), body=body, decorator_list=[],
                                returns=None)
        if sys.version_info >= (3, 12):
            outer.type_params = []
        _locate(outer, fdef)
        module = ast.Module(body=[*self.guard, outer], type_ignores=[])
        try:
            code = compile(module, self.filename, "exec", flags=self.future_flags,
                           dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            raise CannotAdapt(f"it does not compile for its closure ({e})") from e
        outer_code = next(c for c in code.co_consts
                          if isinstance(c, CodeType) and c.co_name == _OUTER)
        inner = next(c for c in outer_code.co_consts
                     if isinstance(c, CodeType) and c.co_name == fdef.name)
        if inner.co_freevars != own:
            raise CannotAdapt(f"its code would have the free variables {inner.co_freevars}, "
                              f"its closure has {own}")
        return _rename(inner, f"{_OUTER}.<locals>.{fdef.name}", logical.co_qualname,
                       logical.co_name)


def _bind(code: CodeType, logical: CodeType, swap: dict[str, CellType],
          out: list[tuple[CodeType, CodeType]]) -> CodeType:
    mine = [c for c in code.co_consts if isinstance(c, CodeType)]
    theirs = [c for c in logical.co_consts if isinstance(c, CodeType)]
    if len(mine) != len(theirs):
        raise CannotAdapt("its nested definitions do not line up with the new source's")
    nested = {id(m): _bind(m, t, swap, out) for m, t in zip(mine, theirs, strict=True)}
    for m, t in zip(mine, theirs, strict=True):
        out.append((nested[id(m)], t))
    consts = tuple(
        nested[id(c)] if isinstance(c, CodeType)
        else swap[c] if isinstance(c, str) and c in swap
        else c
        for c in code.co_consts
    )
    return code.replace(co_consts=consts)


def _rename(code: CodeType, old: str, new: str, name: str | None) -> CodeType:
    consts = tuple(_rename(c, old, new, None) if isinstance(c, CodeType) else c
                   for c in code.co_consts)
    qual = code.co_qualname
    if qual == old or qual.startswith(old + "."):
        qual = new + qual[len(old):]
    return code.replace(co_consts=consts, co_qualname=qual, co_name=name or code.co_name)


# ---------------------------------------------------------------- the source transformation


class _Rewrite(ast.NodeTransformer):
    """``name`` -> ``<placeholder>.cell_contents`` for the moved names; their ``nonlocal``
    declarations go; a zero-argument ``super()`` gets its class from the moved
    ``__class__`` cell."""

    def __init__(self, names: dict[str, str], first: str | None) -> None:
        self.names = names
        self.first = first
        self.depth = 0

    def _cell(self, name: str, ctx: ast.expr_context, where: ast.AST) -> ast.Attribute:
        value = _locate(ast.Constant(self.names[name]), where)
        return _locate(ast.Attribute(value=value, attr="cell_contents", ctx=ctx), where)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.names:
            return self._cell(node.id, node.ctx, node)
        return node

    def visit_Nonlocal(self, node: ast.Nonlocal) -> ast.AST:
        keep = [n for n in node.names if n not in self.names]
        if not keep:
            return _locate(ast.Pass(), node)
        node.names = keep
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if (
            "__class__" in self.names
            and isinstance(node.func, ast.Name)
            and node.func.id == "super"
            and not node.args
            and not node.keywords
        ):
            if self.depth or self.first is None:
                raise CannotAdapt("it calls super() where the class cannot be passed")
            node.args = [self._cell("__class__", ast.Load(), node),
                         _locate(ast.Name(self.first, ast.Load()), node)]
        return node

    def _nested(self, node: ast.AST) -> ast.AST:
        self.depth += 1
        try:
            return self.generic_visit(node)
        finally:
            self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _nested


def _binding_problem(fdef: ast.FunctionDef | ast.AsyncFunctionDef, moved: set[str]) -> str:
    """Why the moved names cannot be rewritten as cell accesses ('' if they can): a nested
    scope that binds one of them locally (it would shadow it), or a binding that cannot
    target an attribute (import, def, class, except ... as, walrus, match capture)."""
    return _scan(fdef, moved, own=True)


def _scan(scope: ast.AST, moved: set[str], own: bool) -> str:
    declared: set[str] = set()
    bound: dict[str, str] = {}
    nested: list[ast.AST] = []
    if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        a = scope.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                bound.setdefault(arg.arg, "a parameter")
        body: list[ast.AST] = list(scope.body) if isinstance(scope.body, list) else [scope.body]
    elif isinstance(scope, ast.ClassDef):
        body = list(scope.body)
    else:
        body = [scope]  # a comprehension: its targets bind in its own scope
    stack = body
    while stack:
        node = stack.pop()
        if node is not scope and isinstance(node, SCOPES):
            nested.append(node)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bound.setdefault(node.name, "a def or class")
            continue
        if isinstance(node, ast.Global) and moved & set(node.names):
            return "it declares a moved variable global"
        if isinstance(node, ast.Nonlocal):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.setdefault(node.id, "assignment")
        elif isinstance(node, ast.alias):
            bound.setdefault(node.asname or node.name.split(".")[0], "an import")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.setdefault(node.name, "except ... as")
        elif isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            bound[node.target.id] = "an assignment expression (:=)"
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            bound.setdefault(node.name, "a match pattern")
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.setdefault(node.rest, "a match pattern")
        stack.extend(ast.iter_child_nodes(node))
    for name in sorted(moved & set(bound)):
        how = bound[name]
        if own and how != "assignment":
            return f"{name!r} is bound by {how}"
        if not own and (how != "assignment" or name not in declared):
            return f"{name!r} is bound by {how} in a nested scope"
    for child in nested:
        problem = _scan(child, moved, own=False)
        if problem:
            return problem
    return ""


def _as_def(node: FuncNode) -> ast.FunctionDef | ast.AsyncFunctionDef:
    if isinstance(node, ast.Lambda):
        ret = _locate(ast.Return(value=copy.deepcopy(node.body)), node.body)
        fdef = ast.FunctionDef(name=_LAMBDA, args=copy.deepcopy(node.args), body=[ret],
                               decorator_list=[], returns=None)
        if sys.version_info >= (3, 12):
            fdef.type_params = []
        return _locate(fdef, node)
    return copy.deepcopy(node)


def _first_param(fdef: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    a = fdef.args
    params = [*a.posonlyargs, *a.args]
    return params[0].arg if params else None


def _no_args() -> ast.arguments:
    return ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                         kwarg=None, defaults=[])


_L = TypeVar("_L", bound=ast.AST)


def _locate(node: _L, where: ast.AST) -> _L:
    """Give ``node`` (and children without one) the position of ``where``."""
    ast.copy_location(node, where)
    for child in ast.walk(node):
        if not hasattr(child, "lineno") and "lineno" in child._attributes:
            ast.copy_location(child, where)
    return node
