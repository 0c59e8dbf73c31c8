"""Hostile clients of the metrics endpoint, against the real server on real sockets: idle
connections beyond the cap, requests that never complete, oversized and malformed
requests, and accept() at the fd limit. The answers themselves stay prometheus-client's."""

from __future__ import annotations

import gzip
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import psutil
import pytest

from swapd.supervisor.metrics import Metrics, listen_queue
from swapd.supervisor.metricsserver import BACKLOG, MAX_CONNECTIONS, MAX_REQUEST, WORKERS

DEADLINE = 10.0


def wait_until(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """A condition of the server's that no event announces, with a deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def read_to_eof(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def exchange(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=DEADLINE) as c:
        c.sendall(request)
        return read_to_eof(c)


def held_by_server(port: int) -> int:
    """Descriptors of this process that are the server's end of a metrics connection."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.laddr and c.laddr.port == port and c.raddr
               and c.status == psutil.CONN_ESTABLISHED)


@pytest.fixture
def metrics(request: pytest.FixtureRequest) -> Iterator[Metrics]:
    m = Metrics("127.0.0.1:0")
    # The request deadline, shortened (the tests wait it out), but not so short that the
    # first test's scrape could come after it on a loaded machine.
    m.start(request_timeout=getattr(request, "param", 2.0))
    try:
        yield m
    finally:
        m.close()


def address_of(m: Metrics) -> tuple[str, int]:
    host, _, port = m.address.rpartition(":")
    return host, int(port)


def test_idle_connections_beyond_the_cap_cost_nothing_and_a_scrape_gets_through(
        metrics: Metrics) -> None:
    server = metrics.server
    assert server is not None
    address = address_of(metrics)
    threads = threading.active_count()
    assert listen_queue(server.socket) == (0, BACKLOG)

    def accept_queue() -> int:
        queue = listen_queue(server.socket)
        assert queue is not None
        return queue[0]

    idle: list[socket.socket] = []
    try:
        for _ in range(3 * MAX_CONNECTIONS):  # connected, never a byte sent
            idle.append(socket.create_connection(address, timeout=DEADLINE))
        wait_until("every connection accepted", lambda: accept_queue() == 0)
        # (a) bounded: the newest MAX_CONNECTIONS are held, no thread per connection
        assert held_by_server(address[1]) == server.connections == MAX_CONNECTIONS
        assert threading.active_count() == threads
        # (b) a real scrape is answered at once: it takes the oldest idle one's place
        with urllib.request.urlopen(f"http://{metrics.address}/metrics",
                                    timeout=DEADLINE) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert "swapd_swaps_total" in resp.read().decode()
        assert threading.active_count() <= threads + WORKERS
        # the oldest 2*cap + 1 were closed unanswered to make room, in order; the rest
        # are told at the deadline
        answers = [read_to_eof(c) for c in idle]
        evicted = 2 * MAX_CONNECTIONS + 1
        assert answers[:evicted] == [b""] * evicted
        for a in answers[evicted:]:
            assert a.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), a
            assert a.endswith(b"no complete request within 2s\n"), a
        wait_until("every connection closed", lambda: server.connections == 0)
        assert held_by_server(address[1]) == 0
    finally:
        for c in idle:
            c.close()


@pytest.mark.parametrize("metrics", [0.5], indirect=True)
def test_bad_requests_are_answered_and_closed_and_good_ones_are_prometheus_clients(
        metrics: Metrics) -> None:
    address = address_of(metrics)
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST + b"\r\n\r\n"
    assert exchange(address, huge).startswith(b"HTTP/1.1 431 ")
    assert exchange(address, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(address, b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert exchange(address, b"GET / HTTP/1.1\r\nno colon\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    many = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n"
    assert exchange(address, many).startswith(b"HTTP/1.1 431 ")
    # half a request, then nothing: told at the deadline
    with socket.create_connection(address, timeout=DEADLINE) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nAccept: text/plain\r\n")
        assert read_to_eof(c).startswith(b"HTTP/1.1 408 ")
    # what prometheus-client's app answers: methods, gzip, name[] filters, bare LF lines
    assert exchange(address, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 405 Method Not Allowed\r\n")
    head, _, body = exchange(address, b"GET /metrics?name[]=swapd_build_info HTTP/1.0\n"
                                      b"Accept-Encoding: gzip\n\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Encoding: gzip" in head
    text = gzip.decompress(body).decode()
    assert "swapd_build_info{" in text and "swapd_swaps_total" not in text
    head, _, body = exchange(address, b"HEAD /metrics HTTP/1.1\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ") and body == b""
    server = metrics.server
    assert server is not None
    wait_until("every connection closed", lambda: server.connections == 0)


EMFILE_SERVER = textwrap.dedent(
    """
    import logging, os, resource, sys, time
    from swapd.supervisor.metrics import Metrics

    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(message)s")
    m = Metrics("127.0.0.1:0")
    m.start(accept_retry=0.1)
    print(m.address, flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))
    hog = []
    try:
        while True:
            hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print("full", flush=True)
    sys.stdin.readline()  # a connection is waiting and accept() has failed
    before = m.server.accept_failures
    time.sleep(1.0)  # not a wait for something: the window in which tries are counted
    tries = m.server.accept_failures - before
    for fd in hog:
        os.close(fd)
    print(f"free {tries}", flush=True)
    sys.stdin.readline()
    m.close()
    """
)


def test_at_the_fd_limit_accept_backs_off_logs_once_and_recovers() -> None:
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    failed = threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "event=metrics.accept_failed" in line:
                failed.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        host, _, port = proc.stdout.readline().strip().rpartition(":")
        assert proc.stdout.readline() == "full\n"
        with socket.create_connection((host, int(port)), timeout=DEADLINE) as c:
            assert failed.wait(DEADLINE), "".join(lines)
            proc.stdin.write("\n")
            proc.stdin.flush()
            free, tries = proc.stdout.readline().split()
            assert free == "free"
            # one try per 0.1 s (a timer never fires early), not a busy loop
            assert 1 <= int(tries) <= 12, tries
            c.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # the connection that waited
            assert read_to_eof(c).startswith(b"HTTP/1.1 200 OK\r\n")
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(DEADLINE)
        reader.join(DEADLINE)
        assert proc.returncode == 0, "".join(lines)
        failures = [x for x in lines if "event=metrics.accept_failed" in x]
        assert failures == ["event=metrics.accept_failed error='Too many open files' "
                            "action='retry every 0.1s'\n"], lines
        assert any("event=metrics.accept_resumed failures=" in x for x in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
