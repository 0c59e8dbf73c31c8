"""What refers to the functions a patch changes, and must follow them.

* a ``property`` keeps its own copy of the getter's docstring (what ``help()`` shows);
* a ``functools.wraps`` wrapper (and an ``lru_cache`` wrapper) holds copies of the wrapped
  function's ``__doc__`` and its ``__annotations__`` dict;
* a ``functools.singledispatch`` registry maps the type an implementation was annotated with
  to it: when the annotation changes, the registry must change with it;
* an ``lru_cache``/``cache`` holds results computed by the old code: cleared after the
  commit when the cached function changed, or when it reads, directly or through other
  functions of the module, a name the patch changes (a constant, a function, a member);
* generators, coroutines and threads still running old code are reported;
* objects that analysed the old signature of a function whose signature changes (a FastAPI
  route) make the plan refused; other signature changes are a warning
  (`swapd.patch.introspected`).

Each of these becomes stores of the plan (undone by a rollback) or an action run right after
the commit and after a rollback (cache clears).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from types import CodeType, FunctionType
from typing import TYPE_CHECKING, Any

from swapd.patch import introspected
from swapd.patch.code import nested_codes, runner_code, threads_running
from swapd.patch.commit import DELETE
from swapd.patch.model import Change

if TYPE_CHECKING:
    from swapd.patch.functions import Updates
    from swapd.patch.planning import Inputs, PlanData


def follow(inp: Inputs, out: PlanData, updates: Updates) -> None:
    property_docs(inp, out, updates)
    wrappers(inp, out, updates)
    dispatch(inp, out, updates)
    caches(inp, out, updates)
    runners(inp, out)
    introspected.check(out, updates.signatures, updates.functions)


def property_docs(inp: Inputs, out: PlanData, updates: Updates) -> None:
    for owner, name, prop in inp.found.properties:
        change = updates.docs.get(id(prop.fget))
        if change is not None and prop.__doc__ == change[0]:
            out.store("attr", prop, "__doc__", change[1])
            out.changed.append(Change("doc", f"{owner.__qualname__}.{name}", "property docstring"))


def wrappers(inp: Inputs, out: PlanData, updates: Updates) -> None:
    """Wrappers made by ``functools.update_wrapper`` copied the wrapped function's docstring
    and share its annotations dict; give them the new ones where they still hold the old.
    Repeated until nothing changes, for wrappers of wrappers."""
    docs, annotations = dict(updates.docs), dict(updates.annotations)
    done: set[int] = set()
    progress = True
    while progress:
        progress = False
        for wrapper, inner in inp.found.wrappers:
            if id(wrapper) in done or id(inner) not in docs | annotations:
                continue
            done.add(id(wrapper))
            progress = True
            label = getattr(wrapper, "__qualname__", type(wrapper).__name__)
            doc = docs.get(id(inner))
            if doc is not None and getattr(wrapper, "__doc__", None) == doc[0]:
                out.store("attr", wrapper, "__doc__", doc[1])
                docs[id(wrapper)] = doc
                out.changed.append(Change("doc", label, "wrapper docstring"))
            ann = annotations.get(id(inner))
            held = getattr(wrapper, "__annotations__", None)
            if ann is not None and held is not None and (held is ann[0] or held == ann[0]):
                out.store("attr", wrapper, "__annotations__", ann[1])
                annotations[id(wrapper)] = (held, ann[1])
                out.changed.append(Change("annotations", label, "wrapper annotations"))


def dispatch(inp: Inputs, out: PlanData, updates: Updates) -> None:
    """Move singledispatch registrations whose annotated type changed."""
    for dispatcher in inp.found.dispatchers:
        registry = _registry(dispatcher)
        for fid, (old_ann, new_ann) in updates.annotations.items():
            fn = updates.functions[fid]
            label = getattr(dispatcher, "__qualname__", "?")
            registered = set() if registry is None else {t for t, f in registry.items()
                                                          if f is fn}
            if registry is None:
                if any(f is fn for f in dispatcher.registry.values()):
                    out.notes.append(
                        f"{inp.display}: {label}: cannot find the registry of this "
                        f"singledispatch function; {fn.__qualname__} stays registered for the "
                        "types it was registered for"
                    )
                continue
            if not registered or _dispatch_types(fn, old_ann) != registered:
                continue  # not registered here, or registered with an explicit type
            new = _dispatch_types(fn, new_ann)
            if new is None:
                out.notes.append(
                    f"{inp.display}: {label}: the new annotation of {fn.__qualname__} is not "
                    "a class or a union of classes; it stays registered for "
                    f"{_names(registered)}"
                )
                continue
            if new == registered:
                continue
            for t in sorted(registered - new, key=_name):
                out.store("item", registry, t, DELETE)
            for t in sorted(new - registered, key=_name):
                out.store("item", registry, t, fn)
            clear = getattr(dispatcher, "_clear_cache", None)
            if callable(clear):
                out.after_commit.append(clear)
            out.changed.append(Change(
                "dispatch", label,
                f"{fn.__qualname__} registered for {_names(new)} instead of {_names(registered)}",
            ))


def _registry(dispatcher: Any) -> dict[Any, Any] | None:
    """The dict behind ``dispatcher.registry`` (a read-only proxy of it), held in the
    closure of ``register`` in CPython's ``functools.singledispatch``."""
    proxy = dispatcher.registry
    for helper in (dispatcher.__dict__.get("register"), dispatcher.__dict__.get("dispatch")):
        if type(helper) is not FunctionType or not helper.__closure__:
            continue
        cells = dict(zip(helper.__code__.co_freevars, helper.__closure__, strict=True))
        cell = cells.get("registry")
        try:
            value = cell.cell_contents if cell is not None else None
        except ValueError:
            continue
        if type(value) is dict and len(value) == len(proxy) and all(
            proxy.get(k) is v for k, v in value.items()
        ):
            return value
    return None


def _dispatch_types(fn: FunctionType, annotations: dict[str, Any]) -> set[type] | None:
    """The classes ``register`` derives from annotations, as functools does: the first
    annotation, a class or a union of classes."""
    if not annotations:
        return None
    hint = next(iter(annotations.values()))
    if isinstance(hint, str):
        try:
            hint = eval(hint, fn.__globals__)  # what typing.get_type_hints does
        except Exception:
            return None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        found = set(typing.get_args(hint))
    else:
        found = {hint}
    return found if all(isinstance(t, type) for t in found) else None


def _name(t: type) -> str:
    return t.__qualname__


def _names(found: set[type]) -> str:
    return " | ".join(sorted(_name(t) for t in found))


def caches(inp: Inputs, out: PlanData, updates: Updates) -> None:
    changed = {s.name for s in out.stores if isinstance(s.name, str) and (
        (s.kind == "item" and s.target is inp.moddict) or s.kind == "type")}
    changed |= {fn.__name__ for fn in updates.functions.values()}
    by_name: dict[str, list[CodeType]] = {}
    for lf in inp.found.functions.values():
        by_name.setdefault(lf.fn.__name__, []).append(lf.code())
    for wrapper in inp.found.lru:
        wrapped = getattr(wrapper, "__wrapped__", None)
        label = getattr(wrapper, "__qualname__", "?")
        if id(wrapped) in out.touched:
            why = "its function changed"
        elif type(wrapped) is FunctionType:
            reads = _reads(wrapped, by_name) & changed
            if not reads:
                continue
            why = f"it reads {', '.join(sorted(reads)[:4])}, which the patch changes"
        else:
            continue
        clear: Callable[[], object] = wrapper.cache_clear
        out.after_commit.append(clear)
        out.changed.append(Change("cache", label, f"cache_clear() after commit: {why}"))
    for cls, name, cp in inp.found.cached_properties:
        if id(cp.func) in out.touched:
            out.notes.append(
                f"{inp.display}: instances keep values already cached by "
                f"{cls.__qualname__}.{name} (cached_property)"
            )


def _reads(fn: FunctionType, by_name: dict[str, list[CodeType]]) -> set[str]:
    """The names ``fn``'s code reads (globals and attributes), and those read by the
    functions of the module it may call, by name: an over-approximation, so that a cache
    is cleared rather than left stale."""
    names: set[str] = set()
    seen: set[int] = set()
    stack = [fn.__code__]
    while stack:
        code = stack.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        stack.extend(nested_codes(code))
        for name in code.co_names:
            if name not in names:
                names.add(name)
                stack.extend(by_name.get(name, ()))
    return names


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
