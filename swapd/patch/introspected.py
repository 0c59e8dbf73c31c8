"""Functions whose signature a patch changes, and the live objects that read the old one.

A signature change (parameter names, kinds, order, which have defaults, default values,
annotations) reaches every caller at once.  Most callers pass arguments at each call, so the
patch is only as safe as those calls: the plan warns, and the operator decides (a plain
function is committed with that warning).

Some objects went further: they analysed the signature once, when the function was
registered with them, and kept the result.  FastAPI's ``Dependant`` (a route's endpoint,
every ``Depends`` dependency) holds the parameters it fills from the request and the
defaults and types it uses for them; pydantic's ``validate_call`` holds a validator built
from the parameters.  After the patch such an object keeps passing the old arguments: a
renamed parameter fails every call, a new one is never filled, a new default or annotation
is ignored.  Nothing in place can rebuild what they derived, so a change to the signature of
a function one of them holds is refused ("needs a swap").

They are recognised by class (`INTROSPECTORS`), looked up in ``sys.modules`` only: a
framework the process never imported is never imported here, and then nothing holds a
function.  The objects are found by a scan of the garbage collector's objects, run only when
a signature changes and one of these frameworks is loaded (then even with
``scan_heap=False``).  What an object holds counts when ``inspect.signature`` of it reports
the patched function's signature: through ``functools.wraps`` (``__wrapped__``),
``partial``, bound methods, a class's ``__init__``/``__new__`` and an instance's
``__call__``.

Flask, Django and Starlette's own ``Route`` call views with the arguments of each request
and keep no signature: their views get the warning only.
"""

from __future__ import annotations

import ast
import functools
import gc
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FunctionType, MemberDescriptorType, MethodType
from typing import TYPE_CHECKING, NamedTuple

from swapd.patch.model import Refusal

if TYPE_CHECKING:
    from swapd.patch.planning import PlanData

_TEXT_LIMIT = 80


@dataclass(frozen=True)
class SignatureChange:
    """How the ``def`` of one function changes its signature, as the source says.
    ``parameters``: names, kinds, order or the presence of defaults (calls written for the
    old signature may fail); ``annotations`` and ``defaults``: values only."""

    qualname: str
    where: str
    before: str
    after: str
    parameters: bool
    annotations: bool
    defaults: bool
    compatible: bool  # every call written for the old parameters binds the same way

    def text(self) -> str:
        return f"from {self.before} to {self.after}"


Params = tuple[tuple[str, str, bool], ...]  # (kind, name, has a default) per parameter


def _params(a: ast.arguments) -> Params:
    """(kind, name, has a default) for each parameter, in order."""
    positional = [*a.posonlyargs, *a.args]
    first_default = len(positional) - len(a.defaults)
    out = [("positional-only" if i < len(a.posonlyargs) else "positional", p.arg,
            i >= first_default) for i, p in enumerate(positional)]
    if a.vararg is not None:
        out.append(("*", a.vararg.arg, False))
    out += [("keyword-only", p.arg, d is not None)
            for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if a.kwarg is not None:
        out.append(("**", a.kwarg.arg, False))
    return tuple(out)


def _compatible(old: Params, new: Params) -> bool:
    """Whether every call that binds to ``old`` binds to ``new``, each argument to the
    parameter of the same name: the old parameters keep their positions, names, ways of
    being passed and defaults, and what the new ones add has a default and takes no argument
    that ``*args`` or ``**kwargs`` used to take."""
    def split(ps: Params) -> tuple[Params, dict[str, tuple[str, str, bool]], bool, bool]:
        positional = tuple(p for p in ps if p[0] in ("positional-only", "positional"))
        by_keyword = {p[1]: p for p in ps if p[0] in ("positional", "keyword-only")}
        return (positional, by_keyword, any(p[0] == "*" for p in ps),
                any(p[0] == "**" for p in ps))

    opos, okw, ostar, ostars = split(old)
    npos, nkw, nstar, nstars = split(new)
    if (ostar and not nstar) or (ostars and not nstars) or len(npos) < len(opos):
        return False
    for (kind, name, default), (new_kind, new_name, new_default) in zip(
            opos, npos[:len(opos)], strict=True):
        if name != new_name or (default and not new_default):
            return False
        if kind == "positional" and new_kind != "positional":
            return False
    # A parameter now after the old positional ones: old calls pass it by keyword, if at all.
    if any(ostar or (p[1] not in okw and not p[2]) for p in npos[len(opos):]):
        return False
    for name, (_, _, default) in okw.items():
        if name not in nkw or (default and not nkw[name][2]):
            return False
    positional_only = {p[1] for p in opos if p[0] == "positional-only"}
    return not any(ostars or (name not in positional_only and not p[2])
                   for name, p in nkw.items() if name not in okw)


def _annotations(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> list[str]:
    a = node.args
    every = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]
    returns = None if isinstance(node, ast.Lambda) else node.returns
    return [ast.dump(x.annotation) if x.annotation else "" for x in every] + [
        ast.dump(returns) if returns else ""]


def _defaults(a: ast.arguments) -> list[str]:
    return [ast.dump(d) if d is not None else "" for d in [*a.defaults, *a.kw_defaults]]


def _text(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> str:
    text = f"({ast.unparse(node.args)})"
    if not isinstance(node, ast.Lambda) and node.returns is not None:
        text += f" -> {ast.unparse(node.returns)}"
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1] + "…"


def compare(qualname: str, display: str, old: ast.AST | None, new: ast.AST | None,
            defaults_follow: bool) -> SignatureChange | None:
    """The change between two definitions of one function; None if its signature stays.
    ``defaults_follow``: a default value changes although its expression does not (it reads
    a constant the patch changes)."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    if not isinstance(old, kinds) or not isinstance(new, kinds):
        return None
    before, after = _params(old.args), _params(new.args)
    parameters = before != after
    annotations = _annotations(old) != _annotations(new)
    defaults = defaults_follow or _defaults(old.args) != _defaults(new.args)
    if not (parameters or annotations or defaults):
        return None
    return SignatureChange(qualname, f"{display}:{new.lineno}", _text(old), _text(new),
                           parameters, annotations, defaults, _compatible(before, after))


# ---------------------------------------------------------------- who read the old one


class Introspector(NamedTuple):
    """A class whose instances keep what they derived from the signature of a callable
    they hold (in one of ``attrs``); ``label`` names an instance for the operator."""

    module: str
    cls: str
    attrs: tuple[str, ...]
    label: Callable[[object], str]


def _route(kind: str) -> Callable[[object], str]:
    def label(route: object) -> str:
        path = _attribute(route, "path")
        methods = _attribute(route, "methods")
        verbs = ""
        if type(methods) in (set, frozenset, list):  # not isinstance: no code of proxies
            assert isinstance(methods, set | frozenset | list)
            verbs = ",".join(sorted(m for m in methods if type(m) is str)) + " "
        return f"{kind} {verbs}{path if type(path) is str else '?'}"
    return label


def _dependant(route: object) -> str:
    path = _attribute(route, "path")
    return "a FastAPI dependency" + (f" of {path}" if type(path) is str else "")


def _validate_call(_: object) -> str:
    return "pydantic's validate_call"


INTROSPECTORS = (
    Introspector("fastapi.routing", "APIRoute", ("endpoint",), _route("FastAPI route")),
    Introspector("fastapi.routing", "APIWebSocketRoute", ("endpoint",),
                 _route("FastAPI websocket route")),
    Introspector("fastapi.dependencies.models", "Dependant", ("call",), _dependant),
    Introspector("pydantic._internal._validate_call", "ValidateCallWrapper",
                 ("function", "raw_function"), _validate_call),
)


def introspector_types() -> dict[type, Introspector]:
    """The classes of `INTROSPECTORS` the process has imported, and their subclasses."""
    out: dict[type, Introspector] = {}
    for row in INTROSPECTORS:
        module = sys.modules.get(row.module)
        cls = getattr(module, "__dict__", {}).get(row.cls) if module is not None else None
        if not isinstance(cls, type):
            continue
        stack = [cls]
        while stack:
            t = stack.pop()
            if t not in out:
                out[t] = row
                stack.extend(type.__subclasses__(t))
    return out


def _class_attr(cls: type, name: str) -> object:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def _attribute(obj: object, name: str) -> object:
    """``obj.name`` read without running application code: a slot or an entry of the
    instance dict, never a property or ``__getattr__``; None if it is neither."""
    found = _class_attr(type(obj), name)
    if type(found) is MemberDescriptorType:
        try:
            return found.__get__(obj, type(obj))
        except AttributeError:  # an unset slot
            return None
    if found is not None and hasattr(type(found), "__set__"):
        return None  # a data descriptor (property...): its value is code's to compute
    try:
        held = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None
    return held.get(name) if type(held) is dict else None


def signature_sources(obj: object) -> Iterator[FunctionType]:
    """The functions whose signatures ``inspect.signature(obj)`` may report, following
    what it follows, without calling anything."""
    stack: list[object] = [obj]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or len(seen) > 64:
            continue
        seen.add(id(obj))
        t = type(obj)
        if t is FunctionType:
            assert isinstance(obj, FunctionType)
            yield obj
            if "__signature__" not in obj.__dict__:
                stack.append(obj.__dict__.get("__wrapped__"))
        elif t is MethodType or t is staticmethod or t is classmethod:
            stack.append(obj.__func__)  # type: ignore[attr-defined]
        elif issubclass(t, functools.partial):
            stack.append(obj.func)  # type: ignore[attr-defined]
        elif issubclass(t, type):
            assert isinstance(obj, type)
            stack += [_class_attr(obj, "__init__"), _class_attr(obj, "__new__")]
        elif _attribute(obj, "__signature__") is None:
            wrapped = _attribute(obj, "__wrapped__")  # lru_cache and other C wrappers
            stack.append(wrapped if wrapped is not None else _class_attr(t, "__call__"))


def _holders(wanted: dict[int, FunctionType]) -> dict[int, list[str]]:
    """For each function of ``wanted`` that a live introspector holds: who holds it."""
    types_ = introspector_types()
    found: dict[int, list[str]] = {}
    if not types_:
        return found
    objects = gc.get_objects()
    try:
        holders = [(obj, types_[type(obj)]) for obj in objects if type(obj) in types_]
    finally:
        del objects
    for holder, row in holders:
        for attr in row.attrs:
            held = _attribute(holder, attr)
            if held is None:
                continue
            for fn in signature_sources(held):
                if wanted.get(id(fn)) is fn:
                    label = row.label(holder)
                    if label not in found.setdefault(id(fn), []):
                        found[id(fn)].append(label)
    return found


def _who(labels: list[str]) -> str:
    routes = sorted(x for x in labels if "route" in x)
    shown = routes or sorted(labels)
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    return ", ".join(shown[:3]) + more


def check(out: PlanData, changes: dict[int, SignatureChange],
          functions: dict[int, FunctionType]) -> None:
    """Refuse the signature changes (by function id) of functions an introspector holds;
    warn about the others that change parameters."""
    if not changes:
        return
    wanted = {fid: functions[fid] for fid in changes}
    # Even when the plan was asked not to scan the heap: this scan runs only for a signature
    # change in a process that loaded one of these frameworks, and without it the patch could
    # break every request of a route.
    held = _holders(wanted)
    # One entry per definition (closures made by calls share theirs).
    by_function: dict[tuple[str, str], tuple[SignatureChange, list[str]]] = {}
    for fid, change in changes.items():
        entry = by_function.setdefault((change.qualname, change.where), (change, []))
        entry[1].extend(x for x in held.get(fid, ()) if x not in entry[1])
    for change, labels in by_function.values():
        if labels:
            out.refuse(Refusal(
                change.where, f"def {change.qualname}",
                f"its signature changes {change.text()} and {_who(labels)} introspected "
                "the old one: it would keep calling it with the old arguments and ignore "
                "new parameters, defaults and annotations",
            ))
        elif change.parameters:
            out.note(f"{change.where}: warning: signature of {change.qualname} changed "
                     f"{change.text()}: " + (
                         "calls written for the old one still bind the same way; what "
                         "analysed the old one keeps it" if change.compatible else
                         "callers that pass the old arguments break"))
