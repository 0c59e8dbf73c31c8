"""The figures of one run (LoadReport, one WindowReport per window) and how they print."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """What summarise() needs to know about a run besides its attempts."""

    started_at: float  # time.monotonic() when the clients were started
    stopped_at: float  # when new requests stopped being issued
    stop_reason: str  # duration | max_requests | stopped | running
    target: str = ""
    request: str = ""
    counts: bool = False
    mode: str = ""
    clients: int = 0
    window_margin: float = 1.0
    connections_opened: int = 0
    server_ended: int = 0  # by Connection: close or an EOF-framed body
    closed_while_idle: int = 0  # found closed by the poll before reuse
    details: tuple[tuple[str, str, int], ...] = ()  # (outcome, text, count)


@dataclass(frozen=True)
class WindowReport:
    """One window. Times are seconds since the run started; attempts are placed by t_end."""

    label: str
    begin: float
    end: float
    ended: bool  # False: still open when the run stopped, so end = the run's end
    span_start: float  # [begin - margin, end + margin] clipped to the run
    span_end: float
    attempts: int
    ok: int
    failed: int
    failures: dict[str, int]
    failed_on_reused: int
    longest_gap: float
    latency_p99: float | None
    ok_per_s: float | None


@dataclass(frozen=True)
class LoadReport:
    """The figures of one run. Durations and latencies in seconds, times relative to the start."""

    target: str
    request: str
    mode: str
    clients: int
    started_at: float  # time.monotonic()
    stopped_at: float
    duration: float
    stop_reason: str
    attempts: int
    ok: int
    failed: int
    failures: dict[str, int]
    failed_on_reused: int
    failures_on_reused: dict[str, int]
    requests_per_s: float | None
    ok_per_s: float | None
    latency_p50: float | None
    latency_p99: float | None
    latency_max: float | None
    longest_gap: float
    longest_gap_at: float
    window_margin: float
    windows: tuple[WindowReport, ...]
    failed_in_windows: int
    ok_per_s_outside: float | None
    latency_p99_outside: float | None
    inside_outside_ratio: float | None  # ok/s inside windows / ok/s outside
    marks: tuple[tuple[str, float], ...]
    connections_opened: int
    server_ended: int
    closed_while_idle: int
    acknowledged: int | None  # counting requests only
    max_acknowledged: int | None
    duplicate_values: int | None  # the same value acknowledged twice: state went back
    value_regressions: int | None  # a client saw a value not above its previous one
    details: tuple[tuple[str, str, int], ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"load      {self.request} -> {self.target}, {self.mode}, {self.clients} clients",
            f"run       {self.duration:.3f} s, ended by {self.stop_reason}",
            f"requests  {self.attempts:,} ({_fmt_rate(self.requests_per_s)})   "
            f"ok {self.ok:,} ({_fmt_rate(self.ok_per_s)})   failed {self.failed:,}"
            + (f" [{_fmt_counts(self.failures)}]" if self.failed else ""),
            f"reused    {self.failed_on_reused:,} failures on reused connections"
            + (f" [{_fmt_counts(self.failures_on_reused)}]" if self.failed_on_reused else ""),
            f"latency   ok p50 {_ms(self.latency_p50)}  p99 {_ms(self.latency_p99)}  "
            f"max {_ms(self.latency_max)}",
            f"gap       longest without a success {_ms(self.longest_gap)} "
            f"at +{self.longest_gap_at:.3f} s",
            f"conns     opened {self.connections_opened:,}, ended by server "
            f"{self.server_ended:,}, found closed before reuse {self.closed_while_idle:,}",
        ]
        if self.acknowledged is not None:
            lines.append(
                f"counter   acknowledged {self.acknowledged:,}, max value "
                f"{self.max_acknowledged}, duplicate values {self.duplicate_values}, "
                f"per-client regressions {self.value_regressions}"
            )
        if self.windows:
            lines.append(
                f"windows   edges +-{self.window_margin:g} s, clipped to the run; "
                f"{self.failed_in_windows:,} failures inside"
            )
            lines.append(
                f"  {'label':<16} {'begin s':>8} {'end s':>8} {'ok':>8} {'failed':>7} "
                f"{'gap':>10} {'p99':>10} {'ok/s':>10}  failures"
            )
            for w in self.windows:
                end = f"{w.end:8.3f}" if w.ended else "    open"
                lines.append(
                    f"  {w.label[:16]:<16} {w.begin:8.3f} {end} {w.ok:8,} {w.failed:7,} "
                    f"{_ms(w.longest_gap):>10} {_ms(w.latency_p99):>10} "
                    f"{_fmt_number(w.ok_per_s):>10}  {_fmt_counts(w.failures) or '-'}"
                )
            ratio = "-" if self.inside_outside_ratio is None else f"{self.inside_outside_ratio:.2f}"
            lines.append(
                f"  outside: ok/s {_fmt_number(self.ok_per_s_outside)}, "
                f"p99 {_ms(self.latency_p99_outside)}; ok/s inside / outside {ratio}"
            )
        if self.marks:
            lines.append("marks     " + ", ".join(f"{lbl} +{t:.3f} s" for lbl, t in self.marks))
        for outcome, text, count in self.details:
            lines.append(f"detail    {outcome} x{count:,}: {text}")
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _fmt_number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _fmt_rate(value: float | None) -> str:
    return f"{_fmt_number(value)}/s"


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())
