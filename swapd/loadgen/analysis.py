"""Pure statistics on completion times: the longest gap without a success, a window's measured
span, nearest-rank percentiles, merged spans, duplicate values and rates."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

_MAX_BYTEMAP = 1 << 24  # largest value range checked for duplicates with a byte map


class Gap(NamedTuple):
    length: float
    start: float
    end: float


def longest_gap(ok_times: Iterable[float], start: float, end: float) -> Gap:
    """Longest interval of [start, end] containing no successful completion.

    The edges count as boundaries: a span with no success at all is one gap of its full length.
    Ties go to the earliest gap.
    """
    if end <= start:
        return Gap(0.0, start, start)
    best = Gap(0.0, start, start)
    previous = start
    for t in sorted(t for t in ok_times if start <= t <= end):
        if t - previous > best.length:
            best = Gap(t - previous, previous, t)
        previous = t
    if end - previous > best.length:
        best = Gap(end - previous, previous, end)
    return best


def window_span(
    begin: float, end: float, run_start: float, run_end: float, margin: float = 1.0
) -> tuple[float, float]:
    """The measured interval of a window: [begin - margin, end + margin] clipped to the run."""
    lo = min(max(run_start, begin - margin), run_end)
    hi = max(min(run_end, end + margin), lo)
    return lo, hi


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(rank, 1)) - 1]


def merge_spans(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def count_duplicates(values: array[int]) -> int:
    if not values:
        return 0
    lo = min(values)
    span = max(values) - lo + 1
    if span > _MAX_BYTEMAP:
        return len(values) - len(set(values))
    seen = bytearray(span)
    duplicates = 0
    for v in values:
        if seen[v - lo]:
            duplicates += 1
        else:
            seen[v - lo] = 1
    return duplicates


def rate(count: int, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None
