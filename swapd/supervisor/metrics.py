"""The Prometheus/OpenMetrics endpoint (`--metrics HOST:PORT`, extra `swapd[metrics]`).

The exposition is prometheus-client's (its WSGI app: formats, content negotiation, gzip);
the HTTP serving is metricsserver.py's, in threads of its own and bounded (connections,
deadlines, request size, threads), so that neither a slow scraper nor a local user
holding connections touches the supervisor's event loop or its descriptors. Counters and
histograms are prometheus-client objects, updated from the loop as things happen (they
lock internally). What is read at scrape time (generations, workers, listener queues, the
watch window) is built *by the loop*: the answering thread asks for it with
`call_soon_threadsafe` and waits at most SNAPSHOT_WAIT; the loop spends microseconds on
it, and a scrape while the loop is stuck gets the counters without the gauges rather than
a torn read of live structures.

The names, for dashboards (docs/operations.md has the list with suggested queries):

    swapd_swaps_total{kind,outcome}          swapd_swap_duration_seconds{kind} (histogram)
    swapd_patches_total{action,outcome}      swapd_handoff_pause_seconds (histogram)
    swapd_rollbacks_total{trigger,outcome}   swapd_reexecs_total{outcome}
    swapd_worker_restarts_total              swapd_crash_loops_total
    swapd_release_info{release,generation,state}   swapd_generations{state}
    swapd_workers{state,generation_state}    swapd_crash_loop_slots
    swapd_watch_remaining_seconds            swapd_swap_in_progress
    swapd_last_swap_timestamp_seconds        swapd_last_swap_success
    swapd_listener_queue_length{listener}    swapd_listener_queue_max{listener}
    swapd_build_info{version}                process_* (the supervisor: RSS, fds, CPU)

Listener queue: for TCP listeners, TCP_INFO on the listening socket, where Linux reports
the accept queue's length (tcpi_unacked) and its limit (tcpi_sacked): the same numbers as
`ss -lt`'s Recv-Q/Send-Q. The kernel reports nothing comparable for a Unix listener
without sock_diag netlink; those have no series.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from swapd import __version__
from swapd.supervisor.metricsserver import MetricsServer, bind

log = logging.getLogger("swapd")

SNAPSHOT_WAIT = 2.0
_TCP_LISTEN = 10
_TCP_INFO_QUEUE = struct.Struct("=II")  # tcpi_unacked, tcpi_sacked at offset 24
_SWAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class MetricsUnavailable(RuntimeError):
    """--metrics without prometheus-client installed."""


@dataclass
class Snapshot:
    """What the loop reports at scrape time (plain data, built on the loop)."""

    generations: list[tuple[int, str, str]] = field(default_factory=list)  # id, state, release
    workers: list[tuple[str, str]] = field(default_factory=list)  # slot state, gen state
    listeners: list[tuple[str, int, int]] = field(default_factory=list)  # name, queue, max
    crash_loop_slots: int = 0
    watch_remaining: float = 0.0
    swap_in_progress: bool = False
    last_swap: tuple[float, bool] | None = None  # when the last swap ended, and if it committed


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(accept queue length, its limit) of a TCP listening socket; None if not reported."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return None
    if len(info) < 32 or info[0] != _TCP_LISTEN:
        return None
    queue, limit = _TCP_INFO_QUEUE.unpack_from(info, 24)
    return queue, limit


class Metrics:
    def __init__(self, address: str) -> None:
        try:
            import prometheus_client as pc
        except ImportError as e:
            raise MetricsUnavailable(
                "--metrics needs prometheus-client: pip install 'swapd[metrics]'") from e
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.process_collector import ProcessCollector

        self.address = address
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        # No *_created series: they would double the output for no dashboard's use.
        pc.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.swaps = pc.Counter("swapd_swaps", "Swaps by kind (upgrade, reload) and outcome",
                                ["kind", "outcome"], registry=r)
        self.patches = pc.Counter("swapd_patches", "Patches by action and outcome",
                                  ["action", "outcome"], registry=r)
        self.rollbacks = pc.Counter("swapd_rollbacks", "Rollbacks by trigger and outcome",
                                    ["trigger", "outcome"], registry=r)
        self.reexecs = pc.Counter("swapd_reexecs", "Supervisor re-execs by outcome",
                                  ["outcome"], registry=r)
        self.restarts = pc.Counter("swapd_worker_restarts", "Workers restarted after a crash",
                                   registry=r)
        self.crash_loops = pc.Counter("swapd_crash_loops", "Crash loops entered", registry=r)
        self.swap_seconds = pc.Histogram("swapd_swap_duration_seconds",
                                         "Duration of swaps, request to outcome", ["kind"],
                                         buckets=_SWAP_BUCKETS, registry=r)
        self.pause_seconds = pc.Histogram("swapd_handoff_pause_seconds",
                                          "Time no worker accepted during a stateful handoff",
                                          buckets=_PAUSE_BUCKETS, registry=r)
        pc.Info("swapd_build", "This supervisor", registry=r).info({"version": __version__})
        for kind in ("upgrade", "reload"):
            for outcome in ("ok", "failed"):
                self.swaps.labels(kind, outcome)
        ProcessCollector(registry=r)
        self._gauge = GaugeMetricFamily
        r.register(_Live(self))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._provider: Callable[[], Snapshot] | None = None
        self.server: MetricsServer | None = None

    def start(self, **bounds: Any) -> None:
        """Bind and serve; OSError (e.g. EADDRINUSE) if the address cannot be had.
        `bounds`: MetricsServer's keyword arguments (tests use smaller ones)."""
        from prometheus_client import make_wsgi_app

        sock = bind(self._host, self._port)
        try:
            self.server = MetricsServer(sock, make_wsgi_app(self.registry), **bounds)
        except BaseException:
            sock.close()
            raise
        self.server.start()
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.address = f"{host}:{sock.getsockname()[1]}"

    def attach(self, loop: asyncio.AbstractEventLoop, provider: Callable[[], Snapshot]) -> None:
        self._loop, self._provider = loop, provider

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- updates, from the loop -------------------------------------------------------

    def swap_done(self, kind: str, ok: bool, duration_s: float, pause_ms: float | None
                  ) -> None:
        self.swaps.labels(kind, "ok" if ok else "failed").inc()
        self.swap_seconds.labels(kind).observe(duration_s)
        if pause_ms is not None:
            self.pause_seconds.observe(pause_ms / 1000)

    # -- scrape time, in a server thread ----------------------------------------------

    def snapshot(self) -> Snapshot | None:
        loop, provider = self._loop, self._provider
        if loop is None or provider is None or loop.is_closed():
            return None
        result: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def build() -> None:
            try:
                result.set_result(provider())
            except BaseException as e:
                result.set_exception(e)

        try:
            loop.call_soon_threadsafe(build)
            return result.result(timeout=SNAPSHOT_WAIT)
        except concurrent.futures.TimeoutError:
            log.warning("event=metrics.stale reason='event loop busy for %gs'", SNAPSHOT_WAIT)
        except Exception as e:  # the loop closed under us, or a bug: serve the counters
            log.warning("event=metrics.snapshot_failed error=%r", str(e))
        return None


class _Live:
    """The gauges read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # no collect() at registration (the loop is not there yet)

    def collect(self) -> Iterator[Any]:
        snap = self.metrics.snapshot()
        if snap is None:
            return
        gauge = self.metrics._gauge
        release = gauge("swapd_release_info", "Release of each live generation",
                        labels=["release", "generation", "state"])
        gens: dict[str, int] = {}
        for gen_id, state, label in snap.generations:
            release.add_metric([label, str(gen_id), state], 1)
            gens[state] = gens.get(state, 0) + 1
        yield release
        g = gauge("swapd_generations", "Live generations by state", labels=["state"])
        for state, count in sorted(gens.items()):
            g.add_metric([state], count)
        yield g
        w = gauge("swapd_workers", "Live workers by state and their generation's state",
                  labels=["state", "generation_state"])
        counts: dict[tuple[str, str], int] = {}
        for key in snap.workers:
            counts[key] = counts.get(key, 0) + 1
        for (state, gen_state), count in sorted(counts.items()):
            w.add_metric([state, gen_state], count)
        yield w
        q = gauge("swapd_listener_queue_length", "Connections waiting in the accept queue",
                  labels=["listener"])
        m = gauge("swapd_listener_queue_max", "Limit of the accept queue (backlog)",
                  labels=["listener"])
        for name, length, limit in snap.listeners:
            q.add_metric([name], length)
            m.add_metric([name], limit)
        yield q
        yield m
        yield gauge("swapd_crash_loop_slots", "Worker slots in a crash loop",
                    value=snap.crash_loop_slots)
        yield gauge("swapd_watch_remaining_seconds",
                    "Seconds left in the watch window (0: none open)", value=snap.watch_remaining)
        yield gauge("swapd_swap_in_progress", "1 while a swap is in flight",
                    value=1 if snap.swap_in_progress else 0)
        # Absent until a swap has ended (kept across `upgrade --self`): a 0 at start would
        # fire a "last swap failed" alert on every restart.
        if snap.last_swap is not None:
            ended, ok = snap.last_swap
            yield gauge("swapd_last_swap_timestamp_seconds",
                        "When the last swap ended (Unix time)", value=ended)
            yield gauge("swapd_last_swap_success", "1 if the last swap committed, else 0",
                        value=1 if ok else 0)
