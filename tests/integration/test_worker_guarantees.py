"""What swapd.worker guarantees under slow clients, busy handlers, descriptor limits and a
dead supervisor (docs/reliability.md, "Worker-side guarantees"), on real processes.

No test here measures time: a failure mode that used to stall until a deadline is shown
by the reason swapd gives (the worker's own error, not "no reply"), or by an event.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.integration.supervised import MISBEHAVE, Supervised, wait_pid_gone, write_behavior


def post_incr(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/incr")
    resp = conn.getresponse()
    assert resp.status == 200
    return int(resp.read())


def get(conn: http.client.HTTPConnection, path: str) -> str:
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200
    return resp.read().decode()


def start(tmp_path: Path, behavior: dict[str, object] | None = None, *args: str,
          quiesce: str = "5") -> tuple[Supervised, Path]:
    path = tmp_path / "b.json"
    write_behavior(path, **(behavior or {}))
    s = Supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(path)},
                   args=["--mode", "stateful", "--quiesce-timeout", quiesce, *args]).start()
    return s, path


def recv_response(sock: socket.socket) -> bytes:
    """One HTTP response with a Content-Length body, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "EOF in the body"
        body += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


# -- item 9: a client holding half a request ------------------------------------------------


def test_a_client_mid_request_neither_blocks_nor_loses_the_swap(tmp_path: Path) -> None:
    """Half a request sent before the swap, the rest after: the swap commits (today it
    waited out quiesce_timeout and aborted), and the new worker answers that request
    exactly once, on the same TCP connection."""
    s, _ = start(tmp_path, quiesce="5")
    try:
        conn = http.client.HTTPConnection(*s.address(), timeout=30)
        assert [post_incr(conn) for _ in range(3)] == [1, 2, 3]
        slow = socket.create_connection(s.address(), timeout=30)
        slow.sendall(b"POST /incr HTTP/1.1\r\nHost: x\r\n")  # no end of head yet
        assert post_incr(conn) == 4  # the half request is in the old worker, unanswered
        old = s.active_pids()
        messages = s.call("upgrade")
        assert messages[-1]["ok"], messages[-1]
        assert any("1 of them mid-request" in msg.get("message", "") for msg in messages), \
            messages
        s.status()
        slow.sendall(b"Content-Length: 0\r\n\r\n")
        assert recv_response(slow) == b"5", "answered once, by the new worker's count"
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _, pid = recv_response(slow).decode().split()
        assert int(pid) == s.active_pids()[0] != old[0]
        assert post_incr(conn) == 6
        slow.close()
    finally:
        s.stop()


# -- item 10: work after the response ---------------------------------------------------------


def test_work_after_the_response_does_not_hold_the_swap(tmp_path: Path) -> None:
    """The handler keeps working after its response (until its worker drains); the
    connection is at a boundary as soon as the response is sent, so the swap commits and
    the next request on that connection reaches the new worker."""
    s, _ = start(tmp_path, quiesce="5")
    try:
        conn = http.client.HTTPConnection(*s.address(), timeout=30)
        assert post_incr(conn) == 1
        old = s.active_pids()[0]
        mark = s.log_mark()
        assert get(conn, "/linger") == f"lingering {old}"
        s.wait_log(rf"pid={old}\| lingering after the response", start=mark)
        res = s.upgrade()
        assert res["ok"], res
        new = s.active_pids()[0]
        assert get(conn, "/") == f"v1 {new}"
        assert post_incr(conn) == 2, "the count travelled"
        assert wait_pid_gone(old, 60), "the old worker's lingering handler ended at its drain"
    finally:
        s.stop()


# -- item 8: a snapshot that cannot be sent ---------------------------------------------------


def test_a_snapshot_that_cannot_be_sent_is_answered_with_the_error(tmp_path: Path) -> None:
    """Out of descriptors while sending the snapshot: the old worker answers with the
    error (the swap aborts on it, not on the quiesce deadline) and serves on."""
    s, path = start(tmp_path, {"snapshot_emfile": True}, quiesce="60")
    try:
        address = s.address()
        conn = http.client.HTTPConnection(*address, timeout=30)
        assert [post_incr(conn) for _ in range(2)] == [1, 2]
        conn.close()  # (a connection would travel too; without one, no fd but the memfd's)
        write_behavior(path)  # the new generation behaves; the old one (gen 1) exhausts
        proc = s.cli("upgrade")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        # (the channel names what failed: "ChannelError: cannot pass descriptors: ...")
        assert re.search(r"quiesce and snapshot failed: \w+Error: .*Too many open files",
                         proc.stderr), proc.stderr
        assert "no reply" not in proc.stderr
        conn = http.client.HTTPConnection(*address, timeout=30)
        assert post_incr(conn) == 3, "the old worker resumed with its state"
    finally:
        s.stop()


# -- item 11: an orphaned worker ---------------------------------------------------------------


def test_an_orphaned_worker_drains_within_its_deadline_and_exits(tmp_path: Path) -> None:
    """The supervisor dies (SIGKILL) while a client holds half a request: the worker
    (SIGTERM from PR_SET_PDEATHSIG, channel EOF) drains, closes that client at
    SWAPD_DRAIN_TIMEOUT and exits."""
    path = tmp_path / "b.json"
    write_behavior(path)
    s = Supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(path)},
                   args=["--drain-timeout", "1"]).start()
    try:
        worker = s.active_pids()[0]
        pidfd = os.pidfd_open(worker)
        slow = socket.create_connection(s.address(), timeout=30)
        slow.sendall(b"GET / HTTP/1.1\r\nHo")
        idle = http.client.HTTPConnection(*s.address(), timeout=30)
        assert get(idle, "/").startswith("v1 ")
        os.kill(s.pid, signal.SIGKILL)
        s.wait_exit(30)
        try:
            ready, _, _ = select.select([pidfd], [], [], 60)
            assert ready, "the orphaned worker is still running"
        finally:
            os.close(pidfd)
        assert slow.recv(4096) == b"", "the slow client's connection was closed"
        slow.close()
    finally:
        s.stop()


# -- issue 13: connections at scale, descriptor budget ----------------------------------------


REQUEST = b"POST /incr HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def round_trip(socks: list[socket.socket]) -> list[int]:
    """One POST /incr on every connection at once; the counts answered."""
    for sock in socks:
        sock.sendall(REQUEST)
    poller = select.epoll()
    pending = {sock.fileno(): sock for sock in socks}
    buffers = {fd: b"" for fd in pending}
    answers: list[int] = []
    for fd in pending:
        poller.register(fd, select.EPOLLIN)
    deadline = time.monotonic() + 120
    try:
        while pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(pending)} connection(s) unanswered"
            for fd, _ in poller.poll(remaining):
                chunk = pending[fd].recv(4096)
                assert chunk, "a connection closed"
                buffers[fd] += chunk
                head, sep, body = buffers[fd].partition(b"\r\n\r\n")
                if sep and body:  # the counter's bodies fit one segment
                    assert head.startswith(b"HTTP/1.1 200"), head
                    answers.append(int(body))
                    poller.unregister(fd)
                    del pending[fd]
    finally:
        poller.close()
    return answers


@pytest.mark.slow
def test_two_thousand_connections_survive_a_swap_on_two_workers(tmp_path: Path) -> None:
    """2,000 keep-alive connections over 2 workers, pre-sent over the handoff link: every
    one answers after each swap, on the same TCP connection, and no increment is lost."""
    s, _ = start(tmp_path, None, "--workers", "2")
    socks: list[socket.socket] = []
    try:
        address = s.address()
        socks = [socket.create_connection(address, timeout=30) for _ in range(2000)]
        ports = [sock.getsockname() for sock in socks]
        first = round_trip(socks)
        assert len(first) == 2000
        for _ in range(2):
            messages = s.call("upgrade")
            assert messages[-1]["ok"], messages[-1]
            assert any("holds 2000 connection(s)" in msg.get("message", "")
                       for msg in messages), messages
            s.status()
            answers = round_trip(socks)
            assert len(answers) == 2000
            assert [sock.getsockname() for sock in socks] == ports
        # Each worker keeps its own count (its shard); together they hold every increment.
        assert sum(_counts_per_worker(s)) == 3 * 2000
    finally:
        for sock in socks:
            sock.close()
        s.stop()


def _counts_per_worker(s: Supervised) -> list[int]:
    """GET /count until both workers answered (each answers its own shard)."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered"
        conn = http.client.HTTPConnection(*s.address(), timeout=30)
        count = int(get(conn, "/count"))
        pid = int(get(conn, "/").split()[1])
        conn.close()
        seen[pid] = count
    return list(seen.values())


def test_a_descriptor_shortage_is_refused_up_front_with_the_figures(tmp_path: Path) -> None:
    """The new generation may open 256 descriptors, the old worker has 300 connections:
    the swap is refused before any pause, with the figures, and nothing changed."""
    s, path = start(tmp_path)
    socks: list[socket.socket] = []
    try:
        address = s.address()
        socks = [socket.create_connection(address, timeout=30) for _ in range(300)]
        assert len(round_trip(socks)) == 300
        old = s.active_pids()
        write_behavior(path, nofile=256)
        proc = s.cli("upgrade")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        m = re.search(r"handoff needs (\d+) descriptors in gen=2 worker=0 pid=\d+ .*"
                      r"limit is 256", proc.stderr)
        assert m and int(m.group(1)) > 300, proc.stderr
        assert "quiesce" not in proc.stdout, "refused before the pause"
        assert s.active_pids() == old
        assert sorted(round_trip(socks)) == list(range(301, 601))
    finally:
        for sock in socks:
            sock.close()
        s.stop()
