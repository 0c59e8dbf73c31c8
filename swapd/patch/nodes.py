"""AST helpers shared by the planner's phases: comparing statements, literals, imports,
default values, ``__future__`` flags, and finding the node of a function by name and line."""

from __future__ import annotations
import __future__

import ast
import copy

FuncNode = ast.FunctionDef | ast.AsyncFunctionDef


def dump(node: ast.AST | list[ast.expr] | list[ast.keyword] | None) -> str:
    if node is None:
        return ""
    if isinstance(node, list):
        return "[" + ", ".join(ast.dump(n) for n in node) + "]"
    return ast.dump(node)


class _Blank(ast.NodeTransformer):
    """Blank nested function bodies: their changes are code changes, not statement changes."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = [ast.Pass()]
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = [ast.Pass()]
        return node

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        self.generic_visit(node)
        node.body = ast.Constant(None)
        return node


def shape(node: ast.stmt) -> str:
    return ast.dump(_Blank().visit(copy.deepcopy(node)))


def is_literal(node: ast.expr | None) -> bool:
    if node is None:
        return False
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def import_names(node: ast.Import | ast.ImportFrom) -> tuple[str, ...]:
    """The names an import statement binds (``import a.b`` binds ``a``; ``*`` none we know)."""
    out = []
    for alias in node.names:
        if alias.name == "*":
            continue
        out.append(alias.asname or alias.name.split(".")[0])
    return tuple(out)


def is_overload(node: FuncNode) -> bool:
    """A ``typing.overload`` stub: its decorator returns a dummy, the name stays bound to
    the implementation."""
    return any(
        (isinstance(d, ast.Name) and d.id == "overload")
        or (isinstance(d, ast.Attribute) and d.attr == "overload")
        for d in node.decorator_list
    )


def default_exprs(fn: FuncNode | ast.Lambda) -> dict[str, ast.expr]:
    """Each parameter's default expression, by parameter name."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    out = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults):]], a.defaults,
                   strict=True))
    out.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                if d is not None})
    return out


# The only __future__ features that still change how Python 3 compiles; the others are
# accepted and ignored by the compiler, and passing their flags would mark code objects.
_FUTURES = ("annotations", "barry_as_FLUFL")


def future_flags(tree: ast.Module) -> int:
    """Compiler flags equivalent to the module's ``from __future__`` imports."""
    flags = 0
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                if alias.name in _FUTURES:
                    flags |= getattr(__future__, alias.name).compiler_flag
    return flags


# ---------------------------------------------------------------- function lookups


AnyFunction = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


class FunctionNodes:
    """The defs and lambdas of a tree by (name, first line), the way a code object names
    them (``co_name``, ``co_firstlineno``: the line of the first decorator)."""

    def __init__(self, tree: ast.Module) -> None:
        self.nodes: dict[tuple[str, int], AnyFunction] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                self.nodes.setdefault((node.name, first), node)
            elif isinstance(node, ast.Lambda):
                self.nodes.setdefault(("<lambda>", node.lineno), node)

    def find(self, name: str, firstlineno: int) -> AnyFunction | None:
        return self.nodes.get((name, firstlineno))


# The nodes that open a scope of their own (names bound inside are not the enclosing one's).
SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ClassDef,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)


def literal_initializer(
    fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda, var: str
) -> ast.expr | None:
    """The literal ``var`` is initialised with in ``fn``, if ``fn`` binds it exactly once and
    that binding is ``var = <literal>``."""
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]
    if any(p.arg == var for p in params):
        return None
    bindings = 0
    value: ast.expr | None = None
    roots = fn.body if isinstance(fn.body, list) else [fn.body]
    stack: list[ast.AST] = list(roots)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == var:
                bindings += 1
            continue
        if isinstance(node, SCOPES):
            continue
        if (
            (isinstance(node, ast.Name) and node.id == var and not isinstance(node.ctx, ast.Load))
            or (isinstance(node, ast.Import | ast.ImportFrom) and var in import_names(node))
            or (isinstance(node, ast.ExceptHandler) and node.name == var)
        ):
            bindings += 1
        elif isinstance(node, ast.Nonlocal | ast.Global) and var in node.names:
            return None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == var and is_literal(node.value):
                value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            value = node.value if node.target.id == var and is_literal(node.value) else value
        stack.extend(ast.iter_child_nodes(node))
    return value if bindings == 1 else None
