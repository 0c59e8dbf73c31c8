"""Which live function runs which base code object, and which new code object replaces it.

`match` maps every live function of the module to the key of the base code object it runs
(or of the code an earlier patch replaced), refusing to plan against a base that does not
describe the live code, then pairs base keys with keys of the new source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swapd.patch.code import CodeKey, LiveFunction, same_but_positions
from swapd.patch.diff import HOOKS
from swapd.patch.model import BaseSourceMismatch
from swapd.patch.sites import Sites, is_class_body, pair_by_site

if TYPE_CHECKING:
    from swapd.patch.planning import Inputs, PlanData


@dataclass
class Matching:
    old_sites: Sites
    new_sites: Sites
    live_by_key: dict[CodeKey, list[LiveFunction]] = field(default_factory=dict)
    to_new: dict[CodeKey, CodeKey] = field(default_factory=dict)  # base key -> new key
    to_old: dict[CodeKey, CodeKey] = field(default_factory=dict)  # new key -> base key
    unresolved: set[CodeKey] = field(default_factory=set)  # base keys that cannot be paired


def match(inp: Inputs, out: PlanData) -> Matching:
    m = Matching(Sites(inp.old_tree, inp.old_idx), Sites(inp.new_tree, inp.new_idx),
                 live_by_key=live_functions(inp, out))
    m.unresolved = pair_keys(inp, m.old_sites, m.new_sites, m.to_new, m.to_old)
    return m


def live_functions(inp: Inputs, out: PlanData) -> dict[CodeKey, list[LiveFunction]]:
    """The module's live functions by the base key of the code they run."""
    by_key: dict[CodeKey, list[LiveFunction]] = {}
    mismatched: list[str] = []
    strays = 0
    for lf in inp.found.functions.values():
        code = lf.code()
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


def pair_keys(inp: Inputs, old_sites: Sites, new_sites: Sites, to_new: dict[CodeKey, CodeKey],
              to_old: dict[CodeKey, CodeKey]) -> set[CodeKey]:
    """Fill ``to_new``/``to_old``; returns the base keys that cannot be paired.

    A qualified name defined once on both sides pairs directly.  Names defined more than
    once (lambdas of one scope, a property's getter and setter, singledispatch
    implementations) pair in compile order only when that is trivially right (same count,
    same code but for positions); otherwise by the site that binds each definition
    (`swapd.patch.sites`).  A class body never pairs with a function: a name that turns
    from one into the other is refused by the statement diff."""
    unresolved: set[CodeKey] = set()
    old_idx, new_idx = inp.old_idx, inp.new_idx
    quals = set(old_idx.counts) | set(new_idx.counts)
    duplicated = {q for q in quals if old_idx.counts[q] > 1 or new_idx.counts[q] > 1}
    for qual in quals:
        olds = [(qual, i) for i in range(old_idx.counts[qual])]
        news = [(qual, i) for i in range(new_idx.counts[qual])]
        if not olds or not news:
            continue
        if qual not in duplicated:
            pairs = [(olds[0], news[0])]
        elif len(olds) == len(news) and all(
            same_but_positions(old_idx.by_key[o], new_idx.by_key[n])
            for o, n in zip(olds, news, strict=True)
        ):
            pairs = list(zip(olds, news, strict=True))
        else:
            found = pair_by_site(olds, news, old_sites, new_sites, duplicated)
            if found is None:
                unresolved.update(olds)
                continue
            pairs, ambiguous = found
            unresolved.update(ambiguous)
        for old_key, new_key in pairs:
            if is_class_body(old_idx.by_key[old_key]) != is_class_body(new_idx.by_key[new_key]):
                continue
            to_new[old_key] = new_key
            to_old[new_key] = old_key
    return unresolved
