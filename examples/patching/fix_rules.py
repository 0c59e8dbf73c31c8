"""rules.py with its two bugs fixed: what `swapd patch ... --module rules` sends.

Only `price` and `order` differ from rules.py. Everything else is unchanged, so it
is not run again: STATS and the quote counter keep their live values.
"""

from __future__ import annotations

import taxes

UNIT_PRICE = 250  # cents

STATS = {"orders": 0, "revenue": 0}  # module data: a patch keeps its live value


def _make_counter():  # type: ignore[no-untyped-def]
    served = 0

    def quoted() -> int:
        nonlocal served  # closure state: a patch joins this cell, the count goes on
        served += 1
        return served

    def total() -> int:
        return served

    return quoted, total


count_quote, quotes_served = _make_counter()


def price(qty: int) -> int:
    """Price in cents; 10% off from 10 items."""
    total = qty * UNIT_PRICE
    if qty >= 10:
        total = total * 90 // 100  # fixed: take 10% off
    return total


def order(qty: int) -> int:
    if qty <= 0:  # fixed: refuse what cannot be an order
        raise ValueError(f"bad quantity {qty}")
    amount = price(qty)
    STATS["orders"] += 1
    STATS["revenue"] += amount
    return amount


def total(qty: int) -> int:
    """What an order of ``qty`` items costs, VAT included."""
    amount = price(qty)
    return amount + taxes.vat(amount)
