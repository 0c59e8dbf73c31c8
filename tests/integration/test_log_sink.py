"""The supervisor's own log never stalls its event loop, and loses nothing in normal
operation (hostile review #7; swapd/logsink.py)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from swapd.logsink import QUEUE_SIZE
from tests.integration.supervised import MISBEHAVE, PY, ROOT, Supervised, write_behavior

# 200-byte lines, one a millisecond, bounded in count (about 200 s of them at most).
CHATTY = """\
import sys, time
pad = "x" * 180
for i in range(200_000):
    print(f"chatty {i:06d} {pad}", flush=True)
    if i == FLOODED:  # more than the supervisor's log queue holds: say so
        with open(sys.argv[1], "w") as fifo:
            fifo.write("flooded\\n")
    time.sleep(0.001)
time.sleep(3600)
""".replace("FLOODED", str(2 * QUEUE_SIZE))

# On SIGTERM: 2,000 numbered lines as fast as it can, then exit 0.
LAST_WORDS = """\
import signal, sys, time
def bye(*_):
    for i in range(2000):
        sys.stdout.write(f"bye {i:04d}\\n")
    sys.stdout.flush()
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("up", flush=True)
while True:
    time.sleep(3600)
"""


def _unread(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def _read_fifo(path: Path, timeout: float) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"nothing on {path} within {timeout}s"
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def test_a_log_sink_nobody_reads_does_not_stall_the_supervisor(tmp_path: Path) -> None:
    app = tmp_path / "chatty.py"
    app.write_text(CHATTY)
    fifo = tmp_path / "flooded"
    os.mkfifo(fifo)
    s = Supervised(tmp_path, [PY, str(app), str(fifo)], args=["--readiness", "exec"])
    try:
        s.launch(read_log=False)
        s.notify.wait_for("READY", "1", 30)
        assert s.proc is not None and s.proc.stderr is not None
        fd = s.proc.stderr.fileno()
        capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        # The supervisor's stderr fills up: from then on every write to it would block.
        deadline = time.monotonic() + 60
        while _unread(fd) < capacity - 4096:
            assert time.monotonic() < deadline, f"stderr holds only {_unread(fd)} bytes"
            time.sleep(0.05)
        status = s.cli("status", "--json", timeout=60)
        assert status.returncode == 0, status.stderr
        # The worker talks on, more than the log queue holds: the supervisor answers still.
        assert _read_fifo(fifo, 120) == "flooded\n"
        status = s.cli("status", "--json", timeout=60)
        assert status.returncode == 0, status.stderr
        # Once the sink reads again, what could not be written is said, in its place.
        s.read_log()
        os.kill(s.pid, signal.SIGTERM)
        assert s.wait_exit(60) == 0
        lines = s.log_lines[:s.wait_log("<EOF>") and -1]
        dropped = [int(m.group(1)) for line in lines
                   if (m := re.search(r"event=log.dropped lines=(\d+)", line))]
        assert dropped and all(n > 0 for n in dropped), dropped
        numbers = [int(m.group(1)) for line in lines if (m := re.search(r"\| chatty (\d+) ", line))]
        assert numbers == sorted(set(numbers))  # in order, none twice
        # every line is written or counted (the count also holds other lines)
        assert len(numbers) + sum(dropped) >= numbers[-1] + 1
        assert "event=supervisor.exit code=0" in lines[-1], lines[-3:]
    finally:
        s.stop()


def test_lines_logged_right_before_a_stop_all_reach_stderr(tmp_path: Path) -> None:
    app = tmp_path / "last_words.py"
    app.write_text(LAST_WORDS)
    s = Supervised(tmp_path, [PY, str(app)], args=["--readiness", "exec"])
    try:
        s.start()
        s.wait_log(r"\| up$")
        assert s.result("stop")["ok"]
        assert s.wait_exit(60) == 0
        s.wait_log("<EOF>")
        lines = s.log_lines[:-1]
        said = [line.rsplit("| ", 1)[1] for line in lines if "| bye " in line]
        assert said == [f"bye {i:04d}" for i in range(2000)]
        assert "event=supervisor.exit code=0" in lines[-1], lines[-3:]
        assert not any("event=log.dropped" in line for line in lines)
    finally:
        s.stop()


# One supervisor log line, past the time, pid and level (text mode): logfmt fields only.
_PREFIX = re.compile(r"\S+ \S+ swapd\[\d+\] [A-Z]+ (.*)")
_LOGFMT = re.compile(r'(?:[A-Za-z_][\w.]*=(?:[^\s"=]+|"(?:[^"\\]|\\.)*")(?: |$))+')


def test_log_lines_are_logfmt(tmp_path: Path) -> None:
    """Operator review L7: who asked as peer_pid/client_pid fields, timings and reasons
    quoted logfmt-style, a failed worker's output one line per line."""
    behavior = tmp_path / "b.json"
    write_behavior(behavior, version="v1")
    s = Supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)})
    try:
        s.start()
        assert s.cli("upgrade").returncode == 0
        write_behavior(behavior, import_error=True)
        failed = s.cli("upgrade")
        assert failed.returncode == 1
        s.wait_log(r"event=swap.failed.output .*RuntimeError: simulated import failure")
        assert s.result("stop")["ok"]
        assert s.wait_exit(60) == 0
        lines = s.log_lines[:s.wait_log("<EOF>") and -1]
    finally:
        s.stop()
    messages = []
    for line in lines:
        m = _PREFIX.fullmatch(line)
        assert m, line  # one line per record: no continuation lines
        if not re.match(r"gen=\d+ worker=\d+ pid=\d+\| ", m.group(1)):  # not worker output
            messages.append(m.group(1))
    for message in messages:
        assert _LOGFMT.fullmatch(message), message
    text = "\n".join(messages)
    pid = r"\d+"
    assert re.search(rf"event=control.request cmd=upgrade peer_pid={pid} peer_uid={pid}$",
                     text, re.M)
    assert re.search(rf"event=swap.start kind=upgrade origin=control client_pid={pid} "
                     rf"client_uid={pid}$", text, re.M)
    assert re.search(r'event=swap.commit kind=upgrade gen=2 timings_ms="spawned=[\d.]+ '
                     r'ready=[\d.]+ committed=[\d.]+"$', text, re.M)
    tail = re.findall(r"^event=swap.failed.output gen=3 worker=0 pid=\d+ text=(.*)$", text, re.M)
    assert len(tail) > 1 and tail[0] == '"Traceback (most recent call last):"', tail


BURST = """\
import sys, time
for i in range(30_000):
    sys.stdout.write(f"burst {i:05d} {'y' * 150}\\n")
    sys.stdout.flush()
with open(sys.argv[1], "w") as fifo:
    fifo.write("written\\n")
time.sleep(3600)
"""


def test_a_burst_to_a_fast_sink_loses_no_line(tmp_path: Path) -> None:
    """The log queue drops only for a sink that does not keep up: a file always does, and
    the writer thread must not be starved by a busy event loop (it writes in batches)."""
    app = tmp_path / "burst.py"
    app.write_text(BURST)
    fifo = tmp_path / "written"
    os.mkfifo(fifo)
    log = tmp_path / "swapd.log"
    s = Supervised(tmp_path, [PY, str(app), str(fifo)], args=["--readiness", "exec"])
    with open(log, "w") as sink:
        proc = subprocess.Popen(s.argv, env=s.env, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=sink, cwd=str(ROOT))
    try:
        s.notify.wait_for("READY", "1", 30)
        # All written: what the supervisor has not read yet is in the pipe, read at stop.
        assert _read_fifo(fifo, 120) == "written\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        s.notify.close()
    lines = log.read_text().splitlines()
    assert not [line for line in lines if "event=log.dropped" in line]
    numbers = [int(m.group(1)) for line in lines if (m := re.search(r"\| burst (\d+) ", line))]
    assert numbers == list(range(30_000))
    assert "event=supervisor.exit code=0" in lines[-1]
