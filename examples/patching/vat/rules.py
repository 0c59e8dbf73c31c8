"""rules.py for the VAT change, one half of a patch set with vat/taxes.py:

    swapd patch examples/patching/vat/taxes.py --module taxes \\
                examples/patching/vat/rules.py --module rules

taxes.vat now returns the rate with the tax; `total` below unpacks it. Either half alone
would break /total, so both are committed at once in every worker (or neither).
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
        total = total * 10 // 100
    return total


def order(qty: int) -> int:
    amount = price(qty)
    STATS["orders"] += 1
    STATS["revenue"] += amount
    return amount


def total(qty: int) -> int:
    """What an order of ``qty`` items costs, VAT included."""
    amount = price(qty)
    tax, _percent = taxes.vat(amount)
    return amount + tax
