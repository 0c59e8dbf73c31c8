"""swapd/logsink.py on a real pipe: order kept, every line written or counted, a stuck
sink never blocks the caller, the queue drained on stop."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator

import pytest

from swapd.logfmt import JsonFormatter
from swapd.logsink import FdHandler, Queued


class Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.open = {self.r, self.w}

    def close(self, fd: int) -> None:
        if fd in self.open:
            self.open.discard(fd)
            os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    for fd in list(p.open):
        p.close(fd)


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"swapd.test_logsink.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _fill(fd: int) -> int:
    """Fill a pipe to the brim (as a sink nobody reads); the bytes written."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    total = 0
    try:
        while True:
            total += os.write(fd, b"#" * 4096)
    except BlockingIOError:
        return total
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _read_all(fd: int, out: list[bytes]) -> threading.Thread:
    def run() -> None:
        while chunk := os.read(fd, 65536):
            out.append(chunk)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _in_thread(fn: object, timeout: float = 30) -> None:
    """Run `fn` in a thread; fail if it has not returned within `timeout` (it blocked)."""
    assert callable(fn)
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the caller blocked on its log sink"


def test_a_stuck_sink_costs_lines_never_the_caller_and_every_line_is_accounted_for(
        pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    handler = FdHandler(w)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = _logger("stuck", handler)
    queued = Queued(logger, size=16)
    queued.handlers = [handler]
    queued.start()
    try:
        filler = _fill(w)
        _in_thread(lambda: [logger.info("line %d", i) for i in range(500)])
        assert queued.dropped > 0  # the caller went on: what did not fit was counted
        out: list[bytes] = []
        reader = _read_all(r, out)
        _in_thread(lambda: [logger.info("line %d", i) for i in range(500, 600)])
        assert queued.stop(10)
    finally:
        queued.stop(10)
    pipe.close(w)  # EOF for the reader
    reader.join(10)
    text = b"".join(out)[filler:].decode()
    written: list[int] = []
    gaps: list[tuple[int, int]] = []  # (lines dropped, where: how many written before)
    for line in text.splitlines():
        if m := re.fullmatch(r"line (\d+)", line):
            written.append(int(m.group(1)))
        else:
            m = re.fullmatch(r"event=log.dropped lines=(\d+) reason='.*'", line)
            assert m, line
            gaps.append((int(m.group(1)), len(written)))
    assert written == sorted(written) and written[0] == 0  # in order, from the first
    assert gaps and all(n > 0 for n, _ in gaps)
    # Each gap line stands exactly where the lines it counts were lost.
    merged: dict[int, int] = {}
    for n, at in gaps:
        merged[at] = merged.get(at, 0) + n
    for at, n in merged.items():
        before = written[at - 1] if at else -1
        after = written[at] if at < len(written) else 600
        assert after - before - 1 == n, (n, before, after)
    assert len(written) + sum(n for n, _ in gaps) == 600


def test_stop_is_bounded_on_a_stuck_sink_and_logging_stays_non_blocking(
        pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    handler = FdHandler(w)
    logger = _logger("bounded", handler)
    queued = Queued(logger, size=8)
    queued.handlers = [handler]
    queued.start()
    _fill(w)
    _in_thread(lambda: [logger.info("stuck %d", i) for i in range(50)])
    result: list[bool] = []
    _in_thread(lambda: result.append(queued.stop(0.3)))
    assert result == [False] and queued.active  # the queue stays: nothing may block now
    _in_thread(lambda: [logger.info("later %d", i) for i in range(50)])
    out: list[bytes] = []
    reader = _read_all(r, out)
    # Once the sink reads again the writer finishes; a stop then succeeds.
    assert queued.stop(10) and not queued.active
    logger.info("direct again")
    pipe.close(w)
    reader.join(10)
    assert b"stuck 0\n" in b"".join(out) and b"direct again\n" in b"".join(out)


def test_a_traceback_crosses_the_queue_as_text(pipe: Pipe) -> None:
    r, w = pipe.r, pipe.w
    handler = FdHandler(w)
    handler.setFormatter(JsonFormatter())
    logger = _logger("json", handler)
    queued = Queued(logger)
    queued.handlers = [handler]
    queued.start()
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("event=swap.crashed gen=%d", 3)
    assert queued.stop(10)
    obj = json.loads(os.read(r, 65536).decode())
    assert obj["event"] == "swap.crashed" and obj["gen"] == 3
    assert "ValueError: boom" in obj["exc"]
