"""Code objects and the live functions that run them.

Keys.  A code object is named by ``(co_qualname, ordinal)``: the ordinal counts code objects
with the same qualified name in compile order (two lambdas in one function, a property's
getter and setter); `swapd.patch.sites` pairs such keys across versions by where each is
bound.  Line numbers are never part of a key, so adding lines above a function does not lose
it.  A live code object is mapped to its key by structural equality with the code compiled
from the base source (CPython's code equality covers bytecode, constants, names and
positions; we add the qualified name).

Adapted code.  A function whose free variables a patch changed runs code compiled for its
own closure (`swapd.patch.closures`); the registry here maps such code to the code it stands
for, so the engine sees the function as the source defines it.
"""

from __future__ import annotations

import functools
import gc
import inspect
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import (
    AsyncGeneratorType,
    CellType,
    CodeType,
    CoroutineType,
    FunctionType,
    GeneratorType,
    MethodType,
    ModuleType,
)
from typing import Any

CodeKey = tuple[str, int]

CO_GENERATOR = inspect.CO_GENERATOR
CO_COROUTINE = inspect.CO_COROUTINE
CO_ASYNC_GENERATOR = inspect.CO_ASYNC_GENERATOR
CO_ITERABLE_COROUTINE = inspect.CO_ITERABLE_COROUTINE
_KIND_FLAGS = CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR | CO_ITERABLE_COROUTINE

LruWrapper: type = type(functools.lru_cache()(lambda: None))


def kind(code: CodeType) -> str:
    flags = code.co_flags & _KIND_FLAGS
    if flags & CO_ASYNC_GENERATOR:
        return "async generator"
    if flags & CO_COROUTINE:
        return "coroutine"
    if flags & (CO_GENERATOR | CO_ITERABLE_COROUTINE):
        return "generator"
    return "function"


def nested_codes(code: CodeType) -> Iterator[CodeType]:
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield const
            yield from nested_codes(const)


def same_code(a: CodeType, b: CodeType) -> bool:
    """Identical code, positions included (CPython's equality ignores the qualified name)."""
    return a is b or (a.co_qualname == b.co_qualname and a == b)


def _without_positions(code: CodeType) -> CodeType:
    consts = tuple(_without_positions(c) if isinstance(c, CodeType) else c for c in code.co_consts)
    return code.replace(co_firstlineno=1, co_linetable=b"", co_consts=consts)


def same_but_positions(a: CodeType, b: CodeType) -> bool:
    return a.co_qualname == b.co_qualname and _without_positions(a) == _without_positions(b)


def docstring(code: CodeType) -> str | None:
    # A function's docstring is its first constant; a function without one has None there
    # (3.11-3.13).  Lambdas never have one.
    if code.co_name == "<lambda>" or not code.co_consts:
        return None
    first = code.co_consts[0]
    return first if isinstance(first, str) else None


class CodeIndex:
    """Every code object nested in one compiled module (given as one code object per piece
    of the module, in order), by key."""

    def __init__(self, module_codes: list[CodeType]) -> None:
        self.by_key: dict[CodeKey, CodeType] = {}
        self.parent: dict[CodeKey, CodeKey | None] = {}
        self.container: dict[CodeKey, CodeType] = {}  # the code object holding it
        self.key_of: dict[int, CodeKey] = {}
        self._by_pos: dict[tuple[str, int], list[CodeKey]] = {}
        self.counts: Counter[str] = Counter()
        for code in module_codes:
            self._walk(code, None)

    def _walk(self, code: CodeType, parent: CodeKey | None) -> None:
        for const in code.co_consts:
            if not isinstance(const, CodeType):
                continue
            qual = const.co_qualname
            key = (qual, self.counts[qual])
            self.counts[qual] += 1
            self.by_key[key] = const
            self.parent[key] = parent
            self.container[key] = code
            self.key_of[id(const)] = key
            self._by_pos.setdefault((qual, const.co_firstlineno), []).append(key)
            self._walk(const, key)

    def find(self, code: CodeType) -> CodeKey | None:
        """The key of the indexed code object structurally equal to ``code``."""
        key = self.key_of.get(id(code))
        if key is not None and self.by_key[key] is code:
            return key
        for key in self._by_pos.get((code.co_qualname, code.co_firstlineno), ()):
            if same_code(code, self.by_key[key]):
                return key
        return None

    def find_at(self, qualname: str, firstlineno: int) -> CodeKey | None:
        keys = self._by_pos.get((qualname, firstlineno))
        return keys[0] if keys else None

    def owner_of_cell(self, key: CodeKey, name: str) -> CodeKey | None:
        """The nearest enclosing scope whose code creates the cell ``name`` used by ``key``."""
        parent = self.parent.get(key)
        while parent is not None:
            if name in self.by_key[parent].co_cellvars:
                return parent
            parent = self.parent.get(parent)
        return None


# id(adapted code) -> (weakref to it, the code it stands for, the cells in its constants).
# Adapted code (`swapd.patch.closures`) runs a function's new code on the closure it has;
# the engine sees such a function as the new source defines it: that code, those cells.
# No lock: single dict operations are atomic under the GIL, and a lock taken in a weakref
# callback can deadlock when the collector runs while it is held.
_adapted: dict[int, tuple[weakref.ref[CodeType], CodeType, dict[str, CellType]]] = {}


def register_adapted(code: CodeType, logical: CodeType, cells: dict[str, CellType]) -> None:
    ident = id(code)

    def drop(ref: object) -> None:
        entry = _adapted.get(ident)
        if entry is not None and entry[0] is ref:  # not an entry registered since under a reused id
            _adapted.pop(ident, None)

    _adapted[ident] = (weakref.ref(code, drop), logical, cells)


def _entry(code: CodeType) -> tuple[weakref.ref[CodeType], CodeType, dict[str, CellType]] | None:
    entry = _adapted.get(id(code))
    return entry if entry is not None and entry[0]() is code else None


def logical_code(code: CodeType) -> CodeType:
    """The code of the source that ``code`` runs (itself, unless it is adapted code)."""
    entry = _entry(code)
    return code if entry is None else entry[1]


def logical_cells(fn: FunctionType) -> dict[str, CellType]:
    """The cells of ``fn`` by the names its logical code uses for them: its closure, and
    for adapted code also the cells held in its constants (names it no longer uses are
    left out)."""
    own = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))
    entry = _entry(fn.__code__)
    if entry is None:
        return own
    _, logical, moved = entry
    return {n: own[n] if n in own else moved[n] for n in logical.co_freevars}


# ---------------------------------------------------------------- live discovery


class LiveFunction:
    """A live function object of the module (a plain class: a dataclass field typed as a
    function would be treated as a method by type checkers)."""

    __slots__ = ("fn", "owners", "paths", "reachable")

    def __init__(self, fn: FunctionType, reachable: bool) -> None:
        self.fn = fn
        self.reachable = reachable
        self.paths: list[str] = []
        self.owners: list[type] = []

    def code(self) -> CodeType:
        """The code of the source the function runs (see `logical_code`)."""
        return logical_code(self.fn.__code__)

    def cells(self) -> dict[str, CellType]:
        """Its cells by the names that code uses (see `logical_cells`)."""
        return logical_cells(self.fn)


@dataclass
class Discovery:
    functions: dict[int, LiveFunction] = field(default_factory=dict)
    classes: dict[str, type] = field(default_factory=dict)
    lru: list[Any] = field(default_factory=list)
    cached_properties: list[tuple[type, str, functools.cached_property[Any]]] = field(
        default_factory=list
    )
    runners: list[Any] = field(default_factory=list)
    properties: list[tuple[type, str, property]] = field(default_factory=list)
    wrappers: list[tuple[Any, Any]] = field(default_factory=list)  # (wrapper, __wrapped__)
    dispatchers: list[Any] = field(default_factory=list)  # functools.singledispatch functions
    heap_scanned: bool = False


class _Walker:
    """Everything reachable from the module namespace through the places functions hide:
    class dictionaries, descriptors, wrappers (``__wrapped__``, lru_cache, partial,
    singledispatch) and closure cells.  Never calls user code: only ``__dict__`` entries
    and C-level attributes are read."""

    def __init__(self, module: ModuleType, found: Discovery) -> None:
        self.module = module
        self.globals = module.__dict__
        self.found = found
        self.seen: set[int] = set()

    def run(self) -> None:
        for name, value in list(self.globals.items()):
            self.visit(value, name, None)

    def visit(self, obj: object, path: str, owner: type | None) -> None:
        t = type(obj)
        if t is FunctionType:
            assert isinstance(obj, FunctionType)
            self.function(obj, path, owner)
            return
        if id(obj) in self.seen:
            return
        # Only type(obj) is consulted: isinstance() would read obj.__class__, which runs
        # code on proxies (a planner must not execute application code on live objects).
        if issubclass(t, type):
            self.seen.add(id(obj))
            self.klass(obj)  # type: ignore[arg-type]
        elif t is staticmethod or t is classmethod:
            self.visit(obj.__func__, path, owner)  # type: ignore[attr-defined]
        elif issubclass(t, property):
            if owner is not None and all(p is not obj for _, _, p in self.found.properties):
                self.found.properties.append((owner, path.rsplit(".", 1)[-1], obj))  # type: ignore[arg-type]
            for part in (obj.fget, obj.fset, obj.fdel):  # type: ignore[attr-defined]
                if part is not None:
                    self.visit(part, path, owner)
        elif issubclass(t, functools.cached_property):
            self.seen.add(id(obj))
            attrname = obj.attrname  # type: ignore[attr-defined]
            if owner is not None and attrname:
                self.found.cached_properties.append((owner, attrname, obj))  # type: ignore[arg-type]
            self.visit(obj.func, path, owner)  # type: ignore[attr-defined]
        elif issubclass(t, functools.partial | functools.partialmethod):
            self.seen.add(id(obj))
            self.visit(obj.func, path, owner)  # type: ignore[attr-defined]
        elif t is LruWrapper:
            self.seen.add(id(obj))
            self.found.lru.append(obj)
            self.found.wrappers.append((obj, obj.__wrapped__))  # type: ignore[attr-defined]
            self.visit(obj.__wrapped__, path, owner)  # type: ignore[attr-defined]
        elif issubclass(t, functools.singledispatchmethod):
            self.seen.add(id(obj))
            self.visit(obj.dispatcher, path, owner)  # type: ignore[attr-defined]
            self.visit(obj.func, path, owner)  # type: ignore[attr-defined]
        elif t is MethodType:
            self.visit(obj.__func__, path, owner)  # type: ignore[attr-defined]

    def function(self, fn: FunctionType, path: str, owner: type | None) -> None:
        entry = self.found.functions.get(id(fn))
        if entry is None and fn.__globals__ is self.globals:
            entry = LiveFunction(fn, reachable=True)
            self.found.functions[id(fn)] = entry
        if entry is not None:
            entry.paths.append(path)
            if owner is not None and owner not in entry.owners:
                entry.owners.append(owner)
        if id(fn) in self.seen:
            return
        self.seen.add(id(fn))
        for cell in logical_cells(fn).values():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            self.visit(content, f"{path}.<cell>", None)
        for extra in ("__wrapped__", "registry"):
            value = fn.__dict__.get(extra)
            if extra == "__wrapped__" and value is not None:
                self.found.wrappers.append((fn, value))
                self.visit(value, path, owner)
            elif extra == "registry" and value is not None and "dispatch" in fn.__dict__:
                self.found.dispatchers.append(fn)  # functools.singledispatch
                for impl in list(value.values()):
                    self.visit(impl, path, None)

    def klass(self, cls: type) -> None:
        if cls.__dict__.get("__module__") != self.module.__name__:
            return
        self.found.classes.setdefault(cls.__qualname__, cls)
        for name, value in list(cls.__dict__.items()):
            self.visit(value, f"{cls.__qualname__}.{name}", cls)


def discover(module: ModuleType, filename: str, scan_heap: bool) -> Discovery:
    """The module's live functions and classes.  With ``scan_heap`` also every other
    function object whose globals are the module's (closures made by calls, functions
    held only by registries or timers), lru_cache wrappers around them, and running
    generators and coroutines whose code comes from the module's file."""
    found = Discovery()
    _Walker(module, found).run()
    if not scan_heap:
        return found
    found.heap_scanned = True
    moddict = module.__dict__
    runner_types = (GeneratorType, CoroutineType, AsyncGeneratorType)
    objects = gc.get_objects()
    try:
        for obj in objects:
            t = type(obj)
            if t is FunctionType:
                known = id(obj) in found.functions
                if obj.__globals__ is moddict and not known:
                    found.functions[id(obj)] = LiveFunction(obj, reachable=False)
            elif t in runner_types:
                code = runner_code(obj)
                if code is not None and code.co_filename == filename:
                    found.runners.append(obj)
            elif t is LruWrapper:
                wrapped = getattr(obj, "__wrapped__", None)
                ours = type(wrapped) is FunctionType and wrapped.__globals__ is moddict
                if ours and all(w is not obj for w in found.lru):
                    found.lru.append(obj)
    finally:
        del objects
    return found


def runner_code(obj: object) -> CodeType | None:
    if isinstance(obj, GeneratorType):
        return obj.gi_code if obj.gi_frame is not None else None
    if isinstance(obj, CoroutineType):
        return obj.cr_code if obj.cr_frame is not None else None
    if isinstance(obj, AsyncGeneratorType):
        return obj.ag_code if obj.ag_frame is not None else None
    return None


def threads_running(codes: dict[int, str]) -> list[str]:
    """Threads whose stack currently executes one of ``codes`` (id -> qualname)."""
    out = []
    me = threading.get_ident()
    for tid, frame in sys._current_frames().items():
        if tid == me:
            continue
        f: Any = frame
        while f is not None:
            name = codes.get(id(f.f_code))
            if name is not None:
                out.append(f"thread {tid} is inside {name}")
                break
            f = f.f_back
    return out
