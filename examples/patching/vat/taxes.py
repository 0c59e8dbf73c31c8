"""taxes.py for the VAT change, the other half of the patch set with vat/rules.py."""

from __future__ import annotations

VAT_PERCENT = 10


def vat(amount: int) -> tuple[int, int]:
    """VAT on an amount in cents, and the rate applied (for the invoice)."""
    return amount * VAT_PERCENT // 100, VAT_PERCENT
