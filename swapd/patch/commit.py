"""Stores, the indivisible batch that applies them, per-module patch state, migrations.

A plan is a list of `Store`s: one attribute of a function, one entry of a class dictionary
or one module global, with the value it had at prepare (``old``) and the value it gets
(``new``).  Each store becomes a tuple ``(c_callable, *args)``; the whole list runs as

    deque(starmap(operator.call, ops), maxlen=0)

which executes entirely in C: ``setattr`` on a function reaches ``func_set_code`` and
friends, ``type.__setattr__`` and ``dict.__setitem__`` are C, and nothing in between
executes a bytecode.  Under the GIL a thread switch can only happen at a bytecode boundary
of some thread, so the batch is one indivisible step for every other thread.  Two things
could run bytecode inside it and are disarmed: the cyclic garbage collector (finalizers),
paused for the batch, and deallocation of replaced values, which cannot happen because the
undo log holds them.  A Python audit hook (``sys.addaudithook``) does run bytecode on each
``__code__`` assignment; with one installed, every store is still atomic, the batch is not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import operator
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from itertools import starmap
from types import CodeType, ModuleType
from typing import Any, NamedTuple, TypeVar

from swapd.patch.code import CodeKey
from swapd.patch.source import recorded


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING: Any = _Sentinel("MISSING")  # the attribute or key did not exist
DELETE: Any = _Sentinel("DELETE")  # the store deletes the attribute or key

Op = tuple[Any, ...]
T = TypeVar("T")


class Store(NamedTuple):
    kind: str  # "attr": setattr on any object; "type": a class dict entry; "item": a dict key
    target: Any
    name: Any  # an attribute name; for "item", the key (a class in a singledispatch registry)
    new: Any
    old: Any
    data: bool = False  # a data value (constant): a rollback leaves a value changed since

    def describe(self) -> str:
        if self.kind == "item":
            return f"global {self.name}" if isinstance(self.name, str) else f"[{self.name!r}]"
        owner = getattr(self.target, "__qualname__", type(self.target).__name__)
        return f"{owner}.{self.name}"

    def read_op(self) -> Op:
        return read_op(self.kind, self.target, self.name)


def _set_op(s: Store, value: Any, absent_ok: bool) -> Op:
    if s.kind == "attr":
        if value is DELETE or value is MISSING:
            return (delattr, s.target, s.name)
        return (setattr, s.target, s.name, value)
    if s.kind == "type":
        if value is DELETE or value is MISSING:
            return (type.__delattr__, s.target, s.name)
        return (type.__setattr__, s.target, s.name, value)
    if value is DELETE or value is MISSING:
        return (
            (dict.pop, s.target, s.name, None)
            if absent_ok
            else (dict.__delitem__, s.target, s.name)
        )
    return (dict.__setitem__, s.target, s.name, value)


def forward_ops(stores: list[Store]) -> list[Op]:
    return [_set_op(s, s.new, absent_ok=False) for s in stores]


def undo_ops(stores: list[Store]) -> list[Op]:
    """Undo of each store, in the same order as ``stores`` (run them reversed)."""
    return [_set_op(s, s.old, absent_ok=True) for s in stores]


def read_op(kind: str, target: Any, name: str) -> Op:
    """A C-level call that returns what a store of ``kind`` to ``name`` would replace, or
    MISSING.  That is the target's own value: a dict key, an entry of a class's or an object's
    own dictionary (never a value inherited from its class), or, behind a data descriptor
    (``__code__``, a slot, a property), what ``getattr`` returns."""
    if kind == "item":
        return (target.get, name, MISSING)
    if kind == "type" or isinstance(target, type):
        return (target.__dict__.get, name, MISSING)
    own = getattr(target, "__dict__", None)
    if type(own) is dict and not _data_descriptor(type(target), name):
        return (own.get, name, MISSING)
    return (getattr, target, name, MISSING)


def read_value(kind: str, target: Any, name: str) -> Any:
    """The value `read_op` reads, now."""
    fn, *args = read_op(kind, target, name)
    return fn(*args)


def _data_descriptor(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            t = type(klass.__dict__[name])
            return hasattr(t, "__set__") or hasattr(t, "__delete__")
    return False


def changed_since(reads: list[Op], expected: list[Any]) -> list[int]:
    """Indices of reads whose value is no longer ``expected`` (identity)."""
    if all(map(operator.is_, starmap(operator.call, reads), expected)):
        return []  # the common case allocates nothing
    values = list(starmap(operator.call, reads))
    return [i for i, (v, e) in enumerate(zip(values, expected, strict=True)) if v is not e]


class PartialBatch(Exception):
    def __init__(self, applied: int) -> None:
        super().__init__(f"{applied} stores applied")
        self.applied = applied


_consume = deque[Any]


def run_atomic(ops: list[Op]) -> None:
    """Run every op in one C-level call (see the module docstring).  If one raises, the
    ops before it stay applied and `PartialBatch` says how many; the caller undoes them."""
    if not ops:
        return
    it = iter(ops)
    enabled = gc.isenabled()
    gc.disable()
    try:
        _consume(starmap(operator.call, it), maxlen=0)
    except Exception as e:
        applied = len(ops) - operator.length_hint(it) - 1
        raise PartialBatch(applied) from e
    finally:
        if enabled:
            gc.enable()


class UndoFailed(Exception):
    """A batch failed and undoing its applied prefix failed too: some stores stay applied."""

    def __init__(self, cause: BaseException, failures: list[BaseException]) -> None:
        first = failures[0]
        super().__init__(
            f"{type(cause).__name__}: {cause}; undoing the stores already applied failed "
            f"({type(first).__name__}: {first}), {len(failures)} store(s) stay applied"
        )
        self.cause = cause
        self.failures = failures


def apply_or_undo(forward: list[Op], undo: list[Op]) -> None:
    """Run ``forward``; if a store fails, undo the applied prefix and re-raise the cause.

    If an undo store fails too, the others are still undone (each remaining run is again one
    C-level call) and `UndoFailed` says how many stay applied."""
    try:
        run_atomic(forward)
    except PartialBatch as p:
        cause = p.__cause__
        assert cause is not None
        rest = list(reversed(undo[: p.applied]))
        failures: list[BaseException] = []
        while rest:
            try:
                run_atomic(rest)
            except PartialBatch as q:
                assert q.__cause__ is not None
                failures.append(q.__cause__)
                rest = rest[q.applied + 1 :]
            else:
                break
        if failures:
            raise UndoFailed(cause, failures) from failures[0]
        raise cause from None


# ---------------------------------------------------------------- helpers of commits and rollbacks


def run_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``fn`` on ``loop``'s thread between two callbacks; a future for the result."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)
            if not isinstance(e, Exception):
                raise

    loop.call_soon_threadsafe(run)
    return future


def records(items: list[Any]) -> list[dict[str, Any]]:
    return [dict(item._asdict()) for item in items]


class Locks:
    """The locks of several modules' states, taken in name order (no deadlock between two
    transactions over the same modules)."""

    def __init__(self, states: Iterable[ModuleState]) -> None:
        unique = {id(s): s for s in states}
        self.states = sorted(unique.values(), key=lambda s: s.name)

    def __enter__(self) -> None:
        for s in self.states:
            s.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for s in reversed(self.states):
            s.lock.release()


# ---------------------------------------------------------------- per-module state


class ModuleState:
    """What the engine knows about one module: the patches committed (a LIFO stack), the
    source the module now runs, and the code objects patches replaced (so closures still
    running them can be found by key later)."""

    def __init__(self, module: ModuleType, record_serial: int) -> None:
        self.name = module.__name__
        self.module_ref = weakref.ref(module)
        self.record_serial = record_serial
        self.version = 0
        self.stack: list[Any] = []
        self.current: str | None = None
        self.superseded: dict[int, tuple[weakref.ref[CodeType], CodeKey]] = {}
        # What a commit or rollback replaced and the event loop should not free (the lines
        # of the previous linecache entry): freed by the next prepare, on its thread.
        self.trash: list[object] = []
        self.lock = threading.RLock()

    def superseded_key(self, code: CodeType) -> CodeKey | None:
        entry = self.superseded.get(id(code))
        if entry is not None and entry[0]() is code:
            return entry[1]
        return None

    def entries(
        self, pairs: list[tuple[CodeType, CodeKey]]
    ) -> dict[int, tuple[weakref.ref[CodeType], CodeKey]]:
        """Entries for `superseded`, built ahead so a commit only merges a dict."""
        return {id(c): (weakref.ref(c, self._drop(id(c))), key) for c, key in pairs}

    def _drop(self, ident: int) -> Callable[[object], None]:
        def drop(ref: object) -> None:
            entry = self.superseded.get(ident)
            if entry is not None and entry[0] is ref:
                self.superseded.pop(ident, None)

        return drop


_states: dict[str, ModuleState] = {}
_states_lock = threading.Lock()


def _serial(name: str) -> int:
    rec = recorded(name)
    return rec.serial if rec is not None else 0


def state_for(module: ModuleType) -> ModuleState:
    """The module's state; a fresh one if the module object was replaced or reloaded."""
    with _states_lock:
        state = _states.get(module.__name__)
        serial = _serial(module.__name__)
        if state is None or state.module_ref() is not module or state.record_serial != serial:
            state = ModuleState(module, serial)
            _states[module.__name__] = state
        return state


def is_current(state: ModuleState) -> bool:
    module = state.module_ref()
    if module is None:
        return False
    with _states_lock:
        return _states.get(state.name) is state and state.record_serial == _serial(state.name)


def all_states() -> list[ModuleState]:
    with _states_lock:
        return [s for s in _states.values() if s.module_ref() is not None]


def existing_state(name: str) -> ModuleState | None:
    with _states_lock:
        return _states.get(name)


def drop_state(name: str) -> None:
    with _states_lock:
        _states.pop(name, None)


# ---------------------------------------------------------------- migrations


class MigrationContext:
    """Passed to ``__swapd_migrate__(ctx)`` and ``__swapd_rollback__(ctx)``.

    Changes made through it are undo-logged: they are reverted if the hook raises, and (for
    the migration) when the patch is rolled back.  An undo restores a value only if it is
    still the one the hook left: a value the application changed since is kept, and the
    undo says so.  ``on_rollback(fn)`` registers anything else to do at rollback;
    ``note(text)`` adds a line to the patch's notes.
    """

    def __init__(self, module: ModuleType, phase: str, plan: dict[str, Any]) -> None:
        self.module = module
        self.phase = phase  # "migrate" or "rollback"
        self.plan = plan
        self.notes: list[str] = []
        self._undo: list[Callable[[], str | None]] = []
        self._on_rollback: list[Callable[[], object]] = []

    def set(self, obj: object, name: str, value: object) -> None:
        old = read_value("attr", obj, name)  # the undo deletes an attribute it added
        setattr(obj, name, value)
        left = read_value("attr", obj, name)  # what the migration left (a setter may convert)

        def undo() -> str | None:
            if read_value("attr", obj, name) is not left:
                return self._kept(f"{self._label(obj)}.{name}")
            if old is MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
            return None

        self._undo.append(undo)

    def delete(self, obj: object, name: str) -> None:
        old = getattr(obj, name)
        delattr(obj, name)

        def undo() -> str | None:
            if read_value("attr", obj, name) is not MISSING:
                return self._kept(f"{self._label(obj)}.{name}", "set again")
            setattr(obj, name, old)
            return None

        self._undo.append(undo)

    def setitem(self, mapping: Any, key: Any, value: object) -> None:
        old = mapping.get(key, MISSING)
        mapping[key] = value
        left = mapping.get(key, MISSING)

        def undo() -> str | None:
            if mapping.get(key, MISSING) is not left:
                return self._kept(f"{self._label(mapping)}[{key!r}]")
            if old is MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old
            return None

        self._undo.append(undo)

    def delitem(self, mapping: Any, key: Any) -> None:
        old = mapping[key]
        del mapping[key]

        def undo() -> str | None:
            if mapping.get(key, MISSING) is not MISSING:
                return self._kept(f"{self._label(mapping)}[{key!r}]", "set again")
            mapping[key] = old
            return None

        self._undo.append(undo)

    def on_rollback(self, fn: Callable[[], object]) -> None:
        self._on_rollback.append(fn)

    def note(self, text: str) -> None:
        self.notes.append(" ".join(str(text).split()))

    @property
    def recorded(self) -> bool:
        """Is there anything to undo (changes made or ``on_rollback`` functions)?"""
        return bool(self._undo or self._on_rollback)

    def undo(self) -> list[str]:
        """Revert everything done through this context, newest first; returns what it left
        as the application changed it since, one line each."""
        left: list[str] = []
        while self._on_rollback:
            self._on_rollback.pop()()
        while self._undo:
            kept = self._undo.pop()()
            if kept is not None:
                left.append(kept)
        return left

    def _kept(self, what: str, how: str = "changed") -> str:
        return (f"{self.module.__name__}: {what} was {how} since __swapd_{self.phase}__ set "
                "it; kept")

    def _label(self, obj: object) -> str:
        """How to name ``obj`` in a note: the module global bound to it, if there is one."""
        if obj is self.module:
            return self.module.__name__
        for name, value in list(vars(self.module).items()):
            if value is obj:
                return name
        return getattr(obj, "__qualname__", None) or f"<{type(obj).__name__} object>"
