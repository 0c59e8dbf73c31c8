"""Patch sets (several modules committed as one) and folding committed patches
(issue 12, items 16 and 17, engine side)."""

from __future__ import annotations

import gc
import weakref
from types import ModuleType

import pytest

from swapd import patch
from tests.unit.patch_support import Mods, edit

PRICES = "RATE = 2\n\ndef price(qty):\n    return qty * RATE\n"
ORDERS = "import {prices}\n\ndef order(qty):\n    return {prices}.price(qty)\n"


def pair(mods: Mods) -> tuple[ModuleType, ModuleType]:
    prices = mods.load(PRICES)
    orders = mods.load(ORDERS.format(prices=prices.__name__))
    return prices, orders


def test_a_fix_spanning_two_modules_commits_as_one(mods: Mods) -> None:
    prices, orders = pair(mods)
    p, o = prices.__name__, orders.__name__
    # prices gains a helper; orders imports it (a new import of a name the set adds)
    new_prices = PRICES + "\ndef with_tax(amount):\n    return amount * 11 // 10\n"
    new_orders = f"import {p}\nfrom {p} import with_tax\n\ndef order(qty):\n" \
                 f"    return with_tax({p}.price(qty))\n"
    plan_p = patch.prepare(prices, new_prices)
    plan_o = patch.prepare(orders, new_orders, peers=[plan_p])
    order = orders.order
    handles = patch.commit_all([plan_p, plan_o])
    assert [h.module_name for h in handles] == [p, o]
    assert order(10) == 22 and orders.with_tax is prices.with_tax
    assert handles[0].group == handles
    notes = handles[1].rollback()  # either handle rolls back the whole set
    assert order(10) == 20 and not hasattr(prices, "with_tax"), notes
    assert patch.applied(prices) == [] and patch.applied(orders) == []


def test_a_failing_migration_in_one_module_undoes_the_whole_set(mods: Mods) -> None:
    prices, orders = pair(mods)
    plan_p = patch.prepare(prices, edit(PRICES, ("RATE = 2", "RATE = 3")))
    broken = ORDERS.format(prices=prices.__name__).replace("price(qty)\n", "price(qty) + 1\n")
    broken += "\ndef __swapd_migrate__(ctx):\n    raise RuntimeError('no')\n"
    plan_o = patch.prepare(orders, broken, peers=[plan_p])
    with pytest.raises(patch.MigrationFailed, match="rolled back"):
        patch.commit_all([plan_p, plan_o])
    assert prices.RATE == 2 and orders.order(10) == 20
    assert plan_p.status == plan_o.status == "prepared"


def test_a_stale_plan_in_a_set_changes_nothing(mods: Mods) -> None:
    prices, orders = pair(mods)
    plan_p = patch.prepare(prices, edit(PRICES, ("RATE = 2", "RATE = 3")))
    source = ORDERS.format(prices=prices.__name__)
    plan_o = patch.prepare(orders, source.replace("price(qty)\n", "price(qty) * 100\n"))
    patch.apply(orders, source + "\nX = 1\n")  # orders changed since: its plan is stale
    with pytest.raises(patch.PlanStale):
        patch.commit_all([plan_p, plan_o])
    assert prices.RATE == 2 and orders.order(1) == 2
    with pytest.raises(patch.PatchError, match="one plan per module"):
        patch.commit_all([plan_p, plan_p])


def test_make_permanent_drops_what_rollback_needed(mods: Mods) -> None:
    m = mods.load(PRICES)
    old_code = weakref.ref(m.price.__code__)
    handle = patch.apply(m, edit(PRICES, ("qty * RATE", "qty * RATE * 2")))
    second = patch.apply(m, edit(PRICES, ("qty * RATE", "qty * RATE * 3")))
    gc.collect()
    assert old_code() is not None  # kept by the undo log
    assert patch.make_permanent(m) == 2
    gc.collect()
    assert old_code() is None  # the engine holds nothing to undo with any more
    assert m.price(1) == 6 and patch.applied(m) == []
    assert handle.permanent and second.permanent and not second.active
    with pytest.raises(patch.RollbackError, match="made permanent"):
        second.rollback()
    # patching goes on from the current source, and the next patch can be rolled back
    third = patch.apply(m, edit(PRICES, ("qty * RATE", "qty * RATE * 4")))
    assert m.price(1) == 8
    third.rollback()
    assert m.price(1) == 6
