"""summarise(): a run's attempts and timeline in, its LoadReport out. Pure.

In named steps: the attempts in completion order are split into columns of successes and
failures (_split), each window is measured over its span (_windows), the successes outside
every span are the baseline the windows are compared with (_outside), and a counting run's
acknowledged values are checked for state that went back (_counter).
"""

from __future__ import annotations

import bisect
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from swapd.loadgen.analysis import (
    count_duplicates,
    longest_gap,
    merge_spans,
    percentile,
    rate,
    window_span,
)
from swapd.loadgen.outcomes import NO_VALUE, OK_CODE, OUTCOMES
from swapd.loadgen.records import AttemptLog, Window
from swapd.loadgen.report import LoadReport, RunInfo, WindowReport


def summarise(
    log: AttemptLog,
    run: RunInfo,
    marks: Sequence[tuple[str, float]] = (),
    windows: Sequence[Window] = (),
) -> LoadReport:
    """Compute a report from recorded attempts. Pure: the same input gives the same report.

    Success and failure times are completion times (t_end). Gaps, windows and rates use the
    measured interval [started_at, stopped_at]; attempts completing after the stop (in flight
    when it came) count in the totals only. The overall gap includes the wait for the first
    success (a service that never answers shows one gap as long as the run); window gaps are
    the figures to compare across swaps.
    """
    start, stop = run.started_at, max(run.started_at, run.stopped_at)
    split = _split(log, run.counts)
    window_reports, spans = _windows(split, windows, start, stop, run.window_margin)
    outside = _outside(split, merge_spans(spans), start, stop)
    counter = _counter(split) if run.counts else _Counter()
    latencies = sorted(split.ok_latency)
    gap = longest_gap(split.ok_times, start, stop)
    return LoadReport(
        target=run.target,
        request=run.request,
        mode=run.mode,
        clients=run.clients,
        started_at=start,
        stopped_at=stop,
        duration=stop - start,
        stop_reason=run.stop_reason,
        attempts=len(log),
        ok=len(split.ok_times),
        failed=len(split.fail_times),
        failures=_by_outcome(split.fail_codes),
        failed_on_reused=sum(split.fail_reused),
        failures_on_reused=_by_outcome(
            c for c, r in zip(split.fail_codes, split.fail_reused, strict=True) if r
        ),
        requests_per_s=rate(len(log), stop - start),
        ok_per_s=rate(len(split.ok_times), stop - start),
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        latency_max=latencies[-1] if latencies else None,
        longest_gap=gap.length,
        longest_gap_at=gap.start - start,
        window_margin=run.window_margin,
        windows=tuple(window_reports),
        failed_in_windows=sum(w.failed for w in window_reports),  # overlaps count twice
        ok_per_s_outside=outside.ok_per_s,
        latency_p99_outside=outside.latency_p99,
        inside_outside_ratio=outside.inside_outside_ratio,
        marks=tuple((label, t - start) for label, t in marks),
        connections_opened=run.connections_opened,
        server_ended=run.server_ended,
        closed_while_idle=run.closed_while_idle,
        acknowledged=counter.acknowledged,
        max_acknowledged=counter.max_acknowledged,
        duplicate_values=counter.duplicate_values,
        value_regressions=counter.value_regressions,
        details=run.details,
    )


@dataclass
class _Columns:
    """The attempts in completion order, successes and failures apart, column by column."""

    ok_times: array[float] = field(default_factory=lambda: array("d"))  # t_end, ascending
    ok_latency: array[float] = field(default_factory=lambda: array("d"))
    fail_times: array[float] = field(default_factory=lambda: array("d"))  # t_end, ascending
    fail_codes: array[int] = field(default_factory=lambda: array("B"))
    fail_reused: array[int] = field(default_factory=lambda: array("B"))
    acknowledged: array[int] = field(default_factory=lambda: array("q"))  # counting runs only
    regressions: int = 0  # a client saw a value not above its previous one


def _split(log: AttemptLog, counts: bool) -> _Columns:
    t_end, t_start, codes = log.t_end, log.t_start, log.outcome
    order: Iterable[int] = range(len(log))
    if any(t_end[i] < t_end[i - 1] for i in range(1, len(log))):
        order = sorted(order, key=t_end.__getitem__)  # synthetic logs; live ones are in order
    cols = _Columns()
    last_value: dict[int, int] = {}
    for i in order:
        if codes[i] == OK_CODE:
            cols.ok_times.append(t_end[i])
            cols.ok_latency.append(t_end[i] - t_start[i])
            value = log.value[i]
            if counts and value != NO_VALUE:
                cols.acknowledged.append(value)
                client = log.client[i]
                if client in last_value and value <= last_value[client]:
                    cols.regressions += 1
                last_value[client] = value
        else:
            cols.fail_times.append(t_end[i])
            cols.fail_codes.append(codes[i])
            cols.fail_reused.append(log.reused[i])
    return cols


def _by_outcome(codes: Iterable[int]) -> dict[str, int]:
    """Failures counted per outcome, in the order of Outcome."""
    counter = Counter(OUTCOMES[c].value for c in codes)
    return {o.value: counter[o.value] for o in OUTCOMES if counter[o.value]}


def _windows(
    cols: _Columns, windows: Sequence[Window], start: float, stop: float, margin: float
) -> tuple[list[WindowReport], list[tuple[float, float]]]:
    """A report per window, and the span [lo, hi] each was measured over (monotonic times)."""
    reports: list[WindowReport] = []
    spans: list[tuple[float, float]] = []
    for w in windows:
        end = stop if w.end is None else w.end  # still open: it lasts until the run's end
        lo, hi = window_span(w.begin, end, start, stop, margin)
        spans.append((lo, hi))
        reports.append(_window_report(cols, w, end, lo, hi, start))
    return reports, spans


def _window_report(
    cols: _Columns, w: Window, end: float, lo: float, hi: float, start: float
) -> WindowReport:
    ok_lo, ok_hi = bisect.bisect_left(cols.ok_times, lo), bisect.bisect_right(cols.ok_times, hi)
    f_lo, f_hi = bisect.bisect_left(cols.fail_times, lo), bisect.bisect_right(cols.fail_times, hi)
    return WindowReport(
        label=w.label,
        begin=w.begin - start,
        end=end - start,
        ended=w.end is not None,
        span_start=lo - start,
        span_end=hi - start,
        attempts=(ok_hi - ok_lo) + (f_hi - f_lo),
        ok=ok_hi - ok_lo,
        failed=f_hi - f_lo,
        failures=_by_outcome(cols.fail_codes[f_lo:f_hi]),
        failed_on_reused=sum(cols.fail_reused[f_lo:f_hi]),
        longest_gap=longest_gap(cols.ok_times[ok_lo:ok_hi], lo, hi).length,
        latency_p99=percentile(sorted(cols.ok_latency[ok_lo:ok_hi]), 99),
        ok_per_s=rate(ok_hi - ok_lo, hi - lo),
    )


class _Outside(NamedTuple):
    ok_per_s: float | None
    latency_p99: float | None
    inside_outside_ratio: float | None  # ok/s inside the windows' spans / ok/s outside


def _outside(
    cols: _Columns, merged: list[tuple[float, float]], start: float, stop: float
) -> _Outside:
    """The successes of [start, stop] outside every window's span: the undisturbed baseline.

    ``merged`` are the spans merged and sorted, so one pass over the ascending success times
    places each inside or outside.
    """
    inside_seconds = sum(hi - lo for lo, hi in merged)
    outside_latency: list[float] = []
    ok_inside = 0
    k = 0
    for t, latency in zip(cols.ok_times, cols.ok_latency, strict=True):
        if not start <= t <= stop:
            continue
        while k < len(merged) and merged[k][1] < t:
            k += 1
        if k < len(merged) and merged[k][0] <= t:
            ok_inside += 1
        else:
            outside_latency.append(latency)
    inside_rate = rate(ok_inside, inside_seconds)
    outside_rate = rate(len(outside_latency), (stop - start) - inside_seconds)
    return _Outside(
        ok_per_s=outside_rate,
        latency_p99=percentile(sorted(outside_latency), 99),
        inside_outside_ratio=(
            inside_rate / outside_rate if inside_rate is not None and outside_rate else None
        ),
    )


class _Counter(NamedTuple):
    """A counting run's check of its acknowledged values (all None for other runs)."""

    acknowledged: int | None = None
    max_acknowledged: int | None = None
    duplicate_values: int | None = None  # the same value acknowledged twice: state went back
    value_regressions: int | None = None


def _counter(cols: _Columns) -> _Counter:
    values = cols.acknowledged
    return _Counter(
        acknowledged=len(values),
        max_acknowledged=max(values) if values else None,
        duplicate_values=count_duplicates(values),
        value_regressions=cols.regressions,
    )
