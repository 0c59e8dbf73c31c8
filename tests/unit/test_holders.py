"""Who holds an address at start (holders.py), on real processes: every process holding
the listening socket is found (psutil names only one per socket), a wait says every few
seconds who is left, and what counts as a live supervisor."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from swapd.sockets import Address
from swapd.supervisor import holders
from swapd.supervisor.holders import Holder

WAIT_FOR_STDIN = "import sys; sys.stdin.read()"


@pytest.fixture
def orphans() -> Iterator[tuple[Address, list[subprocess.Popen[bytes]]]]:
    """Two processes holding one listening socket, with a worker's environment, whose
    parent (this test) is no swapd supervisor; this process closed its copy."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    address = Address(socket.AF_INET, "127.0.0.1", sock.getsockname()[1])
    env = {**os.environ, "SWAPD_GENERATION": "3", "SWAPD_DRAIN_TIMEOUT": "30"}
    procs = [subprocess.Popen([sys.executable, "-c", WAIT_FOR_STDIN], stdin=subprocess.PIPE,
                              pass_fds=[sock.fileno()], env=env) for _ in range(2)]
    sock.close()
    try:
        yield address, procs
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_every_holder_of_the_socket_is_found(
        orphans: tuple[Address, list[subprocess.Popen[bytes]]]) -> None:
    address, procs = orphans
    found = holders.holders(address)
    assert sorted(h.pid for h in found) == sorted(p.pid for p in procs)
    assert all(h.generation == 3 and h.drain_timeout == 30 and h.orphan for h in found)
    assert holders.named(found) == f" (held by {', '.join(map(str, found))})"


def test_a_wait_says_who_is_left_every_few_seconds(
        orphans: tuple[Address, list[subprocess.Popen[bytes]]],
        caplog: pytest.LogCaptureFixture) -> None:
    address, procs = orphans
    found = holders.holders(address)
    said = threading.Event()

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("event=listener.waiting"):
                said.set()

    handler = Said()
    logging.getLogger("swapd").addHandler(handler)
    left: list[list[Holder]] = []
    try:
        with caplog.at_level(logging.INFO, logger="swapd"):
            waiter = threading.Thread(
                target=lambda: left.append(holders.wait_for(found, address, 30, progress=0.1)))
            waiter.start()
            assert said.wait(20)
            for p in procs:  # their drain ends
                assert p.stdin is not None
                p.stdin.close()
            waiter.join(30)
    finally:
        logging.getLogger("swapd").removeHandler(handler)
    assert left == [[]]
    pids = ",".join(str(p.pid) for p in sorted(procs, key=lambda p: p.pid))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"event=listener.waiting address={address} holders={pids} waited=")
               for m in messages), messages


@pytest.mark.parametrize(("cmdline", "supervisor"), [
    (["/usr/bin/python3", "/usr/local/bin/swapd", "run", "--", "python3", "app.py"], True),
    (["swapd", "run", "--control", "/tmp/x.sock", "--", "app"], True),
    (["/venv/bin/python", "-P", "-m", "swapd", "run", "--config", "c.toml"], True),
    (["python", "-m", "swapd", "serve", "app:run"], False),  # a worker (swapd serve)
    (["python", "-m", "swapd", "status"], False),
    (["python3", "app.py", "swapd", "run"], False),
    (["python3", "-X", "dev", "-m", "swapd", "run"], True),
    (["python3", "-m", "other", "swapd", "run"], False),
    (["python3", "-m", "http.server"], False),
    ([], False),
])
def test_what_is_a_supervisor(cmdline: list[str], supervisor: bool) -> None:
    assert holders.is_supervisor(cmdline) is supervisor
