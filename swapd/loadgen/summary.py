"""summarise(): a run's attempts and timeline in, its LoadReport out. Pure."""

from __future__ import annotations

import bisect
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence

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


def _ordered(counter: Counter[str]) -> dict[str, int]:
    return {o.value: counter[o.value] for o in OUTCOMES if counter[o.value]}


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
    t_end, t_start, codes = log.t_end, log.t_start, log.outcome
    order: Iterable[int] = range(len(log))
    if any(t_end[i] < t_end[i - 1] for i in range(1, len(log))):
        order = sorted(order, key=t_end.__getitem__)  # synthetic logs; live ones are in order

    ok_times, ok_latency = array("d"), array("d")
    fail_times, fail_codes, fail_reused = array("d"), array("B"), array("B")
    acknowledged = array("q")
    regressions = 0
    last_value: dict[int, int] = {}
    for i in order:
        if codes[i] == OK_CODE:
            ok_times.append(t_end[i])
            ok_latency.append(t_end[i] - t_start[i])
            value = log.value[i]
            if run.counts and value != NO_VALUE:
                acknowledged.append(value)
                client = log.client[i]
                if client in last_value and value <= last_value[client]:
                    regressions += 1
                last_value[client] = value
        else:
            fail_times.append(t_end[i])
            fail_codes.append(codes[i])
            fail_reused.append(log.reused[i])

    failures: Counter[str] = Counter(OUTCOMES[c].value for c in fail_codes)
    on_reused: Counter[str] = Counter(
        OUTCOMES[c].value for c, r in zip(fail_codes, fail_reused, strict=True) if r
    )
    latencies = sorted(ok_latency)
    gap = longest_gap(ok_times, start, stop)

    window_reports: list[WindowReport] = []
    spans: list[tuple[float, float]] = []
    for w in windows:
        end = stop if w.end is None else w.end
        lo, hi = window_span(w.begin, end, start, stop, run.window_margin)
        spans.append((lo, hi))
        ok_lo, ok_hi = bisect.bisect_left(ok_times, lo), bisect.bisect_right(ok_times, hi)
        f_lo, f_hi = bisect.bisect_left(fail_times, lo), bisect.bisect_right(fail_times, hi)
        in_failures: Counter[str] = Counter(OUTCOMES[c].value for c in fail_codes[f_lo:f_hi])
        window_reports.append(
            WindowReport(
                label=w.label,
                begin=w.begin - start,
                end=end - start,
                ended=w.end is not None,
                span_start=lo - start,
                span_end=hi - start,
                attempts=(ok_hi - ok_lo) + (f_hi - f_lo),
                ok=ok_hi - ok_lo,
                failed=f_hi - f_lo,
                failures=_ordered(in_failures),
                failed_on_reused=sum(fail_reused[f_lo:f_hi]),
                longest_gap=longest_gap(ok_times[ok_lo:ok_hi], lo, hi).length,
                latency_p99=percentile(sorted(ok_latency[ok_lo:ok_hi]), 99),
                ok_per_s=rate(ok_hi - ok_lo, hi - lo),
            )
        )

    merged = merge_spans(spans)
    inside_seconds = sum(hi - lo for lo, hi in merged)
    outside_latency: list[float] = []
    ok_inside = 0
    k = 0
    for t, latency in zip(ok_times, ok_latency, strict=True):
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
    failed_inside = sum(w.failed for w in window_reports)  # overlapping windows count twice

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
        ok=len(ok_times),
        failed=len(fail_times),
        failures=_ordered(failures),
        failed_on_reused=sum(fail_reused),
        failures_on_reused=_ordered(on_reused),
        requests_per_s=rate(len(log), stop - start),
        ok_per_s=rate(len(ok_times), stop - start),
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        latency_max=latencies[-1] if latencies else None,
        longest_gap=gap.length,
        longest_gap_at=gap.start - start,
        window_margin=run.window_margin,
        windows=tuple(window_reports),
        failed_in_windows=failed_inside,
        ok_per_s_outside=outside_rate,
        latency_p99_outside=percentile(sorted(outside_latency), 99),
        inside_outside_ratio=(
            inside_rate / outside_rate if inside_rate is not None and outside_rate else None
        ),
        marks=tuple((label, t - start) for label, t in marks),
        connections_opened=run.connections_opened,
        server_ended=run.server_ended,
        closed_while_idle=run.closed_while_idle,
        acknowledged=len(acknowledged) if run.counts else None,
        max_acknowledged=max(acknowledged) if run.counts and acknowledged else None,
        duplicate_values=count_duplicates(acknowledged) if run.counts else None,
        value_regressions=regressions if run.counts else None,
        details=run.details,
    )
