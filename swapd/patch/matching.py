"""Which live function runs which base code object, and which new code object replaces it.

`match` maps every live function of the module to the key of the base code object it runs
(or of the code an earlier patch replaced), refusing to plan against a base that does not
describe the live code, then pairs base keys with keys of the new source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING

from swapd.patch.code import CodeKey, LiveFunction, kind
from swapd.patch.diff import HOOKS
from swapd.patch.model import BaseSourceMismatch

if TYPE_CHECKING:
    from swapd.patch.plan import Inputs, PlanData


@dataclass
class Matching:
    live_by_key: dict[CodeKey, list[LiveFunction]] = field(default_factory=dict)
    to_new: dict[CodeKey, CodeKey] = field(default_factory=dict)  # base key -> new key
    to_old: dict[CodeKey, CodeKey] = field(default_factory=dict)  # new key -> base key
    unresolved: set[CodeKey] = field(default_factory=set)  # base keys that cannot be paired


def match(inp: Inputs, out: PlanData) -> Matching:
    m = Matching(live_by_key=live_functions(inp, out))
    m.unresolved = pair_keys(inp, m.to_new, m.to_old)
    return m


def live_functions(inp: Inputs, out: PlanData) -> dict[CodeKey, list[LiveFunction]]:
    """The module's live functions by the base key of the code they run."""
    by_key: dict[CodeKey, list[LiveFunction]] = {}
    mismatched: list[str] = []
    strays = 0
    for lf in inp.found.functions.values():
        code = lf.current().__code__
        if code.co_filename != inp.filename:
            continue  # generated code (dataclass __init__ and friends)
        if code.co_qualname.split(".")[0] in HOOKS:
            continue
        key = inp.old_idx.find(code) or inp.state.superseded_key(code)
        if key is None:
            if lf.reachable and inp.old_idx.counts[code.co_qualname]:
                mismatched.append(code.co_qualname)
            elif not lf.reachable:
                strays += 1
            continue
        by_key.setdefault(key, []).append(lf)
    if mismatched:
        origin = out.base.origin
        hint = {
            "disk": "the file changed since it was imported; pass base_source= or call "
            "swapd.patch.record_sources() before importing the application",
            "recorded": "the module was changed by something other than swapd",
            "patched": "the module was changed by something other than swapd",
            "explicit": "base_source is not the source the module runs",
        }[origin]
        names = ", ".join(sorted(set(mismatched))[:5])
        raise BaseSourceMismatch(
            f"{inp.display}: live code of {names} does not match the {origin} base "
            f"source ({hint})"
        )
    if strays:
        out.notes.append(
            f"{inp.display}: {strays} function object(s) from this module match neither "
            "the base source nor an earlier patch (an earlier version of the module?); "
            "they are not patched"
        )
    if not inp.found.heap_scanned:
        out.notes.append(
            f"{inp.display}: heap not scanned: closures made by calls and functions held "
            "only outside the module namespace are not patched"
        )
    return by_key


def pair_keys(inp: Inputs, to_new: dict[CodeKey, CodeKey], to_old: dict[CodeKey, CodeKey]
              ) -> set[CodeKey]:
    """Fill ``to_new``/``to_old``.  A qualified name defined as often as before keeps its
    ordinals.  When the count changed (a property gained a setter, a lambda was added),
    codes are matched by signature shape, and what stays ambiguous is returned."""
    unresolved: set[CodeKey] = set()
    old_counts, new_counts = inp.old_idx.counts, inp.new_idx.counts
    for qual in set(old_counts) | set(new_counts):
        olds = [(qual, i) for i in range(old_counts[qual])]
        news = [(qual, i) for i in range(new_counts[qual])]
        if len(olds) == len(news):
            pairs = list(zip(olds, news, strict=True))
        else:
            shape_old = {k: _shape(inp.old_idx.by_key[k]) for k in olds}
            shape_new = {k: _shape(inp.new_idx.by_key[k]) for k in news}
            pairs = []
            for k in olds:
                cands = [n for n in news if shape_new[n] == shape_old[k]]
                rivals = [o for o in olds if shape_old[o] == shape_old[k]]
                if len(cands) == 1 and len(rivals) == 1:
                    pairs.append((k, cands[0]))
                elif cands:
                    unresolved.add(k)
        for old_key, new_key in pairs:
            to_new[old_key] = new_key
            to_old[new_key] = old_key
    return unresolved


def _shape(code: CodeType) -> tuple[object, ...]:
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
