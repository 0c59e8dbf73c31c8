"""Where the supervisor's log goes, and why its event loop never waits for it.

`setup()` (`swapd run`, before anything is logged) sends every record to stderr as one
write(2) of one line, text or JSON (logfmt.py). While the supervisor's event loop runs,
`start_queue()` puts a bounded queue in between (the stdlib's QueueHandler, and a writer
thread that takes what is queued a batch at a time): the loop only makes the message and
enqueues it, the writer formats and writes. A burst that fills the queue while the
writer's writes go through (a file, a reading journald) waits for room: the loop then
goes at the sink's pace and nothing is lost. A sink that does not take a write for
0.2 s (a pipe nobody reads, a terminal on a stopped ssh session) costs lines, never the
loop: with the queue full a record is dropped and counted, and once there is room again
one `event=log.dropped lines=N` line stands in the stream where those lines were, so the
order of what is written is the order of what was logged.

`stop_queue()` drains it, within a bound: when the loop ends (every exit path of the
supervisor's run) and right before `upgrade --self`'s execve, which would end the writer
thread with whatever it still holds. In normal operation nothing is lost. A sink that
stays stuck past the bound keeps the queue in place (dropping), so that no later line
can block the exit or the exec either.

The writer never holds a lock while write(2) blocks (no buffered file object, no handler
lock): a writer stuck on a dead sink must not hang the interpreter's exit, which flushes
sys.stderr and takes every handler's lock.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import os
import select
import threading
import time
from queue import Empty, Full, Queue
from typing import Any

from swapd.logfmt import JsonFormatter, LogfmtFormatter

QUEUE_SIZE = 4096  # records; a line is at most ~4 KiB (worker output is cut there)
DRAIN_TIMEOUT = 5.0  # seconds to write what is queued at exit or before an exec
_BATCH = 256  # records the writer takes from the queue at once
_PIPE_BUF = 4096  # bytes a write(2) to a pipe keeps in one piece
_STUCK = 0.2  # seconds in one write(2) after which the sink counts as not keeping up


class _NoLock:
    """The handler lock of FdHandler: none (see the module docstring)."""

    def acquire(self, *args: Any) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass


class FdHandler(logging.Handler):
    """Lines written straight to a descriptor, whole lines per write(2).

    A write of up to PIPE_BUF (4 KiB) goes to a pipe in one piece, between whole lines
    of the workers that share it (`--worker-output passthrough`): the writer thread
    writes what it has queued in writes of whole lines up to that size (one system call,
    and one GIL hand-over, per batch rather than per line: a writer that gave the GIL
    back after every line would be starved by a busy event loop)."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd

    def createLock(self) -> None:
        self.lock = _NoLock()  # type: ignore[assignment]

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_many([record])

    def emit_many(self, records: list[logging.LogRecord]) -> None:
        batch: list[bytes] = []
        size = 0
        for record in records:
            if record.levelno < self.level:
                continue
            try:
                line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            except Exception:
                self.handleError(record)
                continue
            if batch and size + len(line) > _PIPE_BUF:
                self._write(b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:  # someone made the shared description non-blocking
                poller = select.poll()
                poller.register(self.fd, select.POLLOUT)
                poller.poll()
            except OSError:  # EPIPE, EBADF: nowhere to write, and nobody to tell
                return


def setup(level: str, style: str = "text", fd: int = 2) -> FdHandler:
    """The supervisor's logging: root logger, one FdHandler on `fd` (stderr)."""
    if style == "json":
        formatter: logging.Formatter = JsonFormatter()
    elif os.environ.get("JOURNAL_STREAM"):  # under systemd the journal adds time and pid
        formatter = LogfmtFormatter("%(levelname)s %(message)s")
    else:
        formatter = LogfmtFormatter("%(asctime)s swapd[%(process)d] %(levelname)s %(message)s")
    handler = FdHandler(fd)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _queue.handlers = [handler]
    return handler


def _dropped(count: int) -> logging.LogRecord:
    return logging.LogRecord("swapd", logging.WARNING, __file__, 0,
                             "event=log.dropped lines=%d reason='the log sink did not keep up'",
                             (count,), None)


class _Enqueue(logging.handlers.QueueHandler):
    """The loop's side: the message made now, the record queued or dropped and counted."""

    queue: Queue[logging.LogRecord | None]

    def __init__(self, q: Queue[logging.LogRecord | None]) -> None:
        super().__init__(q)
        self.dropped = 0
        self._gate = threading.Lock()  # other threads log too (metrics, executors)
        # When the writer's current write(2) began (None: not writing). A full queue with
        # a writer that is not stuck in a write is a burst, not a dead sink: wait for room
        # (the loop then goes at the sink's pace) rather than drop.
        self.writing_since: float | None = None

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The arguments may change once we return: the message is made now. The rest of
        # the line (time, level, JSON) is the writer's work. A traceback travels as text.
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(
                record.exc_info)
            record.exc_info = None
        return record

    def take_dropped(self) -> logging.LogRecord | None:
        """For the writer, the queue just emptied: the gap so far, if any (the drops came
        after everything it wrote, before anything queued since: there is nothing)."""
        with self._gate:
            if not self.dropped or not self.queue.empty():
                return None
            count, self.dropped = self.dropped, 0
        return self.prepare(_dropped(count))

    def enqueue(self, record: logging.LogRecord) -> None:
        with self._gate:
            if self.dropped:  # the gap is said where it is, once there is room for it
                if self.queue.qsize() + 2 > self.queue.maxsize:
                    self.dropped += 1
                    return
                self.queue.put_nowait(self.prepare(_dropped(self.dropped)))
                self.dropped = 0
            try:
                self.queue.put_nowait(record)
            except Full:
                if self._sink_stuck():
                    self.dropped += 1
                    return
                try:
                    self.queue.put(record, timeout=_STUCK)
                except Full:
                    self.dropped += 1

    def _sink_stuck(self) -> bool:
        since = self.writing_since
        return since is not None and time.monotonic() - since > _STUCK


class _Writer:
    """The writer thread: takes what is queued, a batch at a time, and writes it (a
    daemon: one stuck on a dead sink must not keep the process alive)."""

    def __init__(self, enqueue: _Enqueue, handlers: list[logging.Handler]) -> None:
        self.queue = enqueue.queue
        self._enqueue = enqueue
        self._handlers = handlers
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="swapd-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < _BATCH and batch[-1] is not None:
                try:
                    batch.append(self.queue.get_nowait())
                except Empty:
                    break
            records = [r for r in batch if r is not None]
            if self.queue.empty():  # drained: a gap is said now, not at the next line
                gap = self._enqueue.take_dropped()
                if gap is not None:
                    records.append(gap)
            self._enqueue.writing_since = time.monotonic()
            self._write(records)
            self._enqueue.writing_since = None
            if batch[-1] is None:  # the sentinel: stop
                return

    def _write(self, records: list[logging.LogRecord]) -> None:
        for handler in self._handlers:
            if isinstance(handler, FdHandler):
                handler.emit_many(records)
                continue
            for record in records:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def write_left(self) -> None:
        """The thread has ended: write what is still queued, here."""
        left: list[logging.LogRecord] = []
        while True:
            try:
                record = self.queue.get_nowait()
            except Empty:
                break
            if record is not None:
                left.append(record)
        self._write(left)

    def stop_within(self, timeout: float) -> bool:
        """Everything queued written, the thread ended; False if not within `timeout`."""
        deadline = time.monotonic() + timeout
        thread = self._thread
        if thread is None:
            return True
        try:
            self.queue.put(None, timeout=timeout)  # the sentinel
        except Full:
            return False
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            return False
        self._thread = None
        return True


class Queued:
    """The queue between a logger's handlers and the event loop (start, stop)."""

    def __init__(self, logger: logging.Logger | None = None, size: int = QUEUE_SIZE) -> None:
        self.logger = logger or logging.getLogger()
        self.size = size
        self.handlers: list[logging.Handler] = []  # the ones to put behind the queue
        self._enqueue: _Enqueue | None = None
        self._writer: _Writer | None = None

    @property
    def active(self) -> bool:
        return self._writer is not None

    @property
    def dropped(self) -> int:
        return self._enqueue.dropped if self._enqueue is not None else 0

    def start(self) -> None:
        """Route `handlers`' records through the queue (a no-op when already done, or when
        nothing was set up: tests that run a supervisor keep their own handlers direct)."""
        if self._writer is not None or not self.handlers:
            return
        q: Queue[logging.LogRecord | None] = Queue(self.size)
        self._enqueue = _Enqueue(q)
        self._writer = _Writer(self._enqueue, self.handlers)
        for handler in self.handlers:
            self.logger.removeHandler(handler)
        self.logger.addHandler(self._enqueue)
        self._writer.start()

    def stop(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Write what is queued, then log directly again; True if it was all written.

        False: the sink did not take it within `timeout`. The queue then stays (the
        writer goes on if the sink comes back), so nothing logged later can block."""
        writer, enqueue = self._writer, self._enqueue
        if writer is None or enqueue is None:
            return True
        if not writer.stop_within(timeout):
            return False
        self.logger.removeHandler(enqueue)
        for handler in self.handlers:
            self.logger.addHandler(handler)
        self._writer = self._enqueue = None
        writer.write_left()  # what another thread queued after the sentinel
        if enqueue.dropped:  # dropped after the last line that made it: said last
            self.logger.handle(_dropped(enqueue.dropped))
        return True


_queue = Queued()


def start_queue() -> None:
    """The supervisor's event loop starts: its log goes through the queue."""
    _queue.start()


def stop_queue(timeout: float = DRAIN_TIMEOUT) -> bool:
    """The loop ends, or the process is about to exec: write out the queue (bounded)."""
    return _queue.stop(timeout)
