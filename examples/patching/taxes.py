"""Taxes of the shop: the second module of the patch set in vat/ (see shop.py)."""

from __future__ import annotations

VAT_PERCENT = 20


def vat(amount: int) -> int:
    """VAT on an amount in cents."""
    return amount * VAT_PERCENT // 100
