"""The health probe against real sockets (what counts as healthy, as not HTTP) and the
metrics endpoint scraped by a real HTTP client, parsed strictly as OpenMetrics."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from swapd.sockets import parse_address
from swapd.supervisor import probe
from swapd.supervisor.listeners import Listener
from swapd.supervisor.metrics import Metrics, Snapshot, listen_queue

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def replying(data: bytes) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()
        writer.close()
    return answer


async def probe_once(answer: Answer | None, path: str = "/healthz", unix: Path | None = None,
                     timeout: float = 5.0) -> str | None:
    if unix is not None:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(unix))
        address = parse_address(f"unix:{unix}")
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        address = parse_address("127.0.0.1:0")
    sock.listen(8)
    lis = Listener("http", address, sock, "bound")
    server = None
    if answer is not None:
        starter = asyncio.start_unix_server if unix is not None else asyncio.start_server
        server = await starter(answer, sock=sock)  # type: ignore[operator]
    try:
        return await probe.probe(lis, path, timeout=timeout)
    finally:
        if server is not None:
            server.close()
        sock.close()


def test_healthy_and_unhealthy_answers(tmp_path: Path) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert asyncio.run(probe_once(replying(ok))) is None
    assert asyncio.run(probe_once(replying(b"HTTP/1.0 204 No Content\r\n\r\n"))) is None
    assert asyncio.run(probe_once(replying(ok), unix=tmp_path / "h.sock")) is None
    assert asyncio.run(probe_once(replying(b"HTTP/1.1 503 Busy\r\n\r\n"))) == (
        "GET /healthz: status 503")
    assert asyncio.run(probe_once(replying(b""))) == (
        "GET /healthz: connection closed without an answer")
    # a listener nobody accepts on: no answer in time, not a crash
    assert asyncio.run(probe_once(None, timeout=0.3)) == "GET /healthz: no answer within 0.3s"


@pytest.mark.parametrize("data", [b"ERR\n", b"220 smtp ready\r\n", b"HTTP/2 200\r\n",
                                  b"OK"])
def test_not_http(data: bytes) -> None:
    with pytest.raises(probe.NotHttp, match=r"not (an )?HTTP"):
        asyncio.run(probe_once(replying(data)))


def test_listen_queue_is_what_the_kernel_reports() -> None:
    lis = socket.socket()
    lis.bind(("127.0.0.1", 0))
    lis.listen(7)
    clients = []
    try:
        assert listen_queue(lis) == (0, 7)
        for _ in range(3):
            c = socket.create_connection(lis.getsockname(), timeout=5)
            clients.append(c)
        assert listen_queue(lis) == (3, 7)  # connected, not yet accepted
        conn, _ = lis.accept()
        conn.close()
        assert listen_queue(lis) == (2, 7)
        connected = socket.socket()
        connected.connect(lis.getsockname())
        clients.append(connected)
        assert listen_queue(connected) is None  # not a listener
        unix = socket.socket(socket.AF_UNIX)
        assert listen_queue(unix) is None  # not reported for unix sockets
        unix.close()
    finally:
        for c in clients:
            c.close()
        lis.close()


def test_scraped_by_a_real_client_and_parsed_strictly() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    metrics = Metrics("127.0.0.1:0")
    metrics.start()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    lis = socket.socket()
    lis.bind(("127.0.0.1", 0))
    lis.listen(16)
    try:
        def snapshot() -> Snapshot:
            assert threading.current_thread() is runner  # built on the loop, not the scraper
            snap = Snapshot(crash_loop_slots=1, watch_remaining=12.5,
                            last_swap=(1700000001.0, False))
            snap.generations = [(3, "held", "v41"), (4, "active", "v42")]
            snap.workers = [("ready", "active"), ("ready", "active"), ("ready", "held")]
            queue = listen_queue(lis)
            assert queue is not None
            snap.listeners = [("http", *queue)]
            return snap

        metrics.attach(loop, snapshot)
        metrics.swap_done("upgrade", True, 0.8, 2.5)
        metrics.swap_done("reload", False, 31.0, None)
        metrics.rollbacks.labels("health-probe", "ok").inc()
        metrics.restarts.inc()
        request = urllib.request.Request(f"http://{metrics.address}/metrics",
                                         headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            text = resp.read().decode()
        families = list(text_string_to_metric_families(text))  # strict: types, # EOF...
        samples = [s for f in families for s in f.samples]

        def value(name: str, **labels: str) -> float:
            for s in samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
            raise AssertionError(f"no {name}{labels} in:\n{text}")

        assert value("swapd_swaps_total", kind="upgrade", outcome="ok") == 1
        assert value("swapd_swaps_total", kind="reload", outcome="failed") == 1
        assert value("swapd_swaps_total", kind="upgrade", outcome="failed") == 0
        assert value("swapd_swap_duration_seconds_count", kind="upgrade") == 1
        assert value("swapd_handoff_pause_seconds_bucket", le="0.0025") == 1
        assert value("swapd_handoff_pause_seconds_bucket", le="0.001") == 0
        assert value("swapd_rollbacks_total", trigger="health-probe", outcome="ok") == 1
        assert value("swapd_worker_restarts_total") == 1
        assert value("swapd_last_swap_success") == 0
        assert value("swapd_last_swap_timestamp_seconds") == 1700000001.0
        assert value("swapd_release_info", release="v42", generation="4", state="active") == 1
        assert value("swapd_release_info", release="v41", generation="3", state="held") == 1
        assert value("swapd_workers", state="ready", generation_state="active") == 2
        assert value("swapd_generations", state="held") == 1
        assert value("swapd_listener_queue_length", listener="http") == 0
        assert value("swapd_listener_queue_max", listener="http") == 16
        assert value("swapd_crash_loop_slots") == 1
        assert value("swapd_watch_remaining_seconds") == 12.5
        assert value("process_resident_memory_bytes") > 1e6  # the supervisor's own
        assert value("process_open_fds") > 3
        assert value("swapd_build_info", version=__import__("swapd").__version__) == 1
    finally:
        metrics.close()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
        lis.close()


def test_a_busy_port_is_an_error_at_start() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        metrics = Metrics(f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(OSError, match="in use"):
            metrics.start()
    finally:
        taken.close()


def test_a_stuck_loop_costs_the_gauges_not_the_scrape() -> None:
    metrics = Metrics("127.0.0.1:0")
    metrics.start()
    loop = asyncio.new_event_loop()  # never run: a loop that does not answer
    try:
        metrics.attach(loop, Snapshot)
        import swapd.supervisor.metrics as mod

        mod_wait, mod.SNAPSHOT_WAIT = mod.SNAPSHOT_WAIT, 0.2
        try:
            with urllib.request.urlopen(f"http://{metrics.address}/metrics", timeout=10) as r:
                text = r.read().decode()
        finally:
            mod.SNAPSHOT_WAIT = mod_wait
        assert "swapd_swaps_total" in text and "swapd_workers" not in text
    finally:
        metrics.close()
        loop.close()
