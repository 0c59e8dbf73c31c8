"""Parsing and compiling a module's source for the planner.

Both the base source and the patch source are compiled the way the import system compiles
the module, so code objects compare equal to the live ones; see `compile_source` for why it
is done one top-level definition at a time.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from types import CodeType
from typing import TypeVar

from swapd.patch.code import CodeIndex
from swapd.patch.model import BaseSourceMismatch, PatchSyntaxError
from swapd.patch.nodes import future_flags, import_names

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
