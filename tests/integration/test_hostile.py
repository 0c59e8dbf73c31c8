"""Hostile local users and misbehaving workers against a real supervisor (issue 9, items 1-5, 7):
forged readiness, hostile control clients, a worker flooding its channel, the fd limit, idle
connections to the metrics endpoint.

Other uids are played by forked children that drop to uid 65534 (these tests need root;
they are skipped, with the reason, elsewhere)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from swapd.control import MAX_CLIENTS, Client
from swapd.supervisor.metricsserver import MAX_CONNECTIONS, WORKERS
from tests.integration.supervised import (
    MISBEHAVE,
    SWAPD,
    Supervised,
    fd_count,
    open_gate,
    supervised,
    wait_pid_gone,
    write_behavior,
)

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def notify_address(pid: int) -> str:
    """A worker's NOTIFY_SOCKET, as anyone able to read its environment finds it."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return env[b"NOTIFY_SOCKET"].decode()


def forge(address: str, payload: bytes, *, uid: int | None = None, count: int = 1) -> None:
    """Send sd_notify datagrams to `address` from a forked child (as `uid` if given)."""
    target = "\0" + address[1:] if address.startswith("@") else address
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                for _ in range(count):
                    try:
                        s.sendto(payload, target)
                    except BlockingIOError:
                        select.select([], [s], [], 1.0)  # its queue is full: it reads slowly
            code = 0
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    try:
        assert select.select([pidfd], [], [], 30)[0], "forger did not finish"
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        os.close(pidfd)


def raw_lines(path: str, payload: bytes) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return [json.loads(x) for x in data.splitlines()]


# -- item 1: forged readiness ------------------------------------------------------------------


@as_root
def test_forged_readiness_is_refused(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior)
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)},
                    args=["--workers", "2", "--ready-timeout", "3"]) as s:
        old = s.active_pids()
        write_behavior(behavior, never_ready=True)  # the release hangs at start-up
        mark = s.log_mark()
        proc = s.cli_background("upgrade")
        pids = [int(s.wait_log(rf"event=worker.spawn gen=2 worker={i} pid=(\d+)",
                               start=mark).group(1)) for i in (0, 1)]
        s.worker_pids.update(pids)
        # worker 0: another user; worker 1: our own uid, but not the worker's process tree
        forge(notify_address(pids[0]), b"READY=1", uid=NOBODY)
        forge(notify_address(pids[1]), b"READY=1\nSTATUS=forged")
        for i in (0, 1):
            uid = NOBODY if i == 0 else 0
            s.wait_log(rf"event=notify.refused gen=2 worker={i} pid={pids[i]} sender_pid=\d+ "
                       rf'sender_uid={uid} reason="sender is not the worker', start=mark)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, out + err
        assert "not ready within 3s (ready_timeout)" in err
        assert s.active_pids() == old
        # a flood at the active workers' sockets costs a throttled log line, nothing more
        mark = s.log_mark()
        forge(notify_address(old[0]), b"READY=1", uid=NOBODY, count=5000)
        assert s.status()["active"] == 1
        refused = [x for x in s.log_lines[mark:] if "event=notify.refused" in x]
        assert len(refused) <= 2, refused


def test_a_wrapper_child_outside_the_group_may_report_ready(tmp_path: Path) -> None:
    """A shell wrapper whose child (in a session of its own) sends READY=1: still the worker."""
    pidfile = tmp_path / "child.pid"
    child = (
        "import os, socket, time\n"
        "os.setsid()\n"
        f"open({str(pidfile)!r} + '.' + str(os.getppid()), 'w').write(str(os.getpid()))\n"
        "a = os.environ['NOTIFY_SOCKET']\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'READY=1\\nSTATUS=child of the wrapper', '\\0' + a[1:])\n"
        "time.sleep(600)\n"
    )
    command = ["sh", "-c", f'"{sys.executable}" -c "$0"; true', child]
    children: list[int] = []
    try:
        with supervised(tmp_path, command, args=["--drain-timeout", "2"]) as s:
            first = s.status()["generations"][0]["workers"][0]
            assert first["status"] == "child of the wrapper"
            res = s.upgrade()
            assert res["ok"], res
            children = [int(p.read_text()) for p in tmp_path.glob("child.pid.*")]
            assert len(children) == 2
    finally:
        children = children or [int(p.read_text()) for p in tmp_path.glob("child.pid.*")]
        for pid in children:  # they left the worker's process group: end them by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            assert wait_pid_gone(pid, 10)


# -- items 4, 5: hostile control clients --------------------------------------------------------


def test_hostile_control_clients(tmp_path: Path) -> None:
    with supervised(tmp_path, MISBEHAVE) as s:
        huge = raw_lines(s.control, b'{"v": 1, "cmd": "status", "args": {"n": '
                         + b"9" * 5000 + b"}}\n")
        assert len(huge) == 1 and huge[0]["ok"] is False
        assert str(huge[0]["error"]).startswith("malformed request: Exceeds the limit")
        for cmd, args, error in [
            ("stop", {"fast": "no"}, "stop argument 'fast': str is not bool"),
            ("upgrade", {"self": "false"}, "upgrade argument 'self': str is not bool"),
            ("stop", {"fast": 0}, "stop argument 'fast': int is not bool"),
        ]:
            reply = list(Client(s.control, timeout=30).call(cmd, args))[-1]
            assert reply["ok"] is False and error in reply["error"], reply
        # nothing stopped, nothing re-exec'd
        status = s.status()
        assert status["pid"] == s.pid and status["active"] == 1 and status["swaps"]["ok"] == 0

        # every slot taken by idle clients: one more is told so at once, and status works
        # again as soon as they go (idle ones are let go after 10 s: tests/unit)
        idle = [socket.socket(socket.AF_UNIX) for _ in range(MAX_CLIENTS)]
        try:
            for c in idle:  # each admitted (it is answered), then left open
                c.connect(s.control)
                c.sendall(b'{"v": 1, "cmd": "status"}\n')
                c.settimeout(10)
                assert b'"ok":true' in c.recv(1 << 20)
            extra = raw_lines(s.control, b"")
            assert extra == [{"v": 1, "type": "result", "ok": False, "data": {}, "error":
                              f"too many control connections ({MAX_CLIENTS} open, limit "
                              f"{MAX_CLIENTS}); retry later"}]
        finally:
            for c in idle:
                c.close()
        out = s.cli("status", "--timeout", "10")
        assert out.returncode == 0, out.stderr
        s.wait_log(r"event=control.busy clients=\d+ limit=32")


# -- item 3: a worker flooding its channel ------------------------------------------------------


def post_incr(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/incr")
    resp = conn.getresponse()
    assert resp.status == 200
    return int(resp.read())


def get_count(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/count")
    return int(conn.getresponse().read())


def test_a_worker_flooding_its_channel_fails_only_its_own_request(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior, flood_fds=10_000, flood_body=256 * 2**20)
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)},
                    args=["--mode", "stateful", "--quiesce-timeout", "5"]) as s:
        # 10,000 descriptors no request asked for: closed on arrival, the message refused
        s.wait_log(r"event=channel.refused gen=1 worker=0 pid=\d+ reason=\"'status' message "
                   r"refused: more than 0 descriptors \(10000 descriptors\)\"")
        assert fd_count(s.pid) < 100
        (old,) = s.active_pids()
        conn = http.client.HTTPConnection(*s.address(), timeout=10)
        assert [post_incr(conn) for _ in range(3)] == [1, 2, 3]
        write_behavior(behavior)
        # its snapshot begins with a 256 MiB message: refused unread, that request fails
        out = s.cli("upgrade")
        assert out.returncode == 1, out.stdout + out.stderr
        assert re.search(r"quiesce and snapshot failed: unreadable frame refused: body of "
                         r"268435456 bytes \(limit 16777216\)", out.stderr), out.stderr
        assert "serving again with its state" in out.stdout
        assert s.active_pids() == [old]
        assert get_count(conn) == 3, "the same worker, its state, on the same connection"
        assert psutil.Process(s.pid).memory_info().rss < 128 * 2**20
        assert s.status()["swaps"] == {"ok": 0, "failed": 1}


# -- item 7: the supervisor at its fd limit during a handoff ------------------------------------


@pytest.fixture
def connections() -> Iterator[list[http.client.HTTPConnection]]:
    conns: list[http.client.HTTPConnection] = []
    yield conns
    for c in conns:
        c.close()


@pytest.mark.slow
@as_root
def test_at_the_fd_limit_a_handoff_fails_cleanly_and_keeps_the_state(
        tmp_path: Path, connections: list[http.client.HTTPConnection]) -> None:
    behavior = tmp_path / "b.json"
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # The connections through the supervisor, as from a swapd.worker without the handoff
    # link (or in a rollback): over the link its descriptors are not needed.
    write_behavior(behavior, snapshot_gate=str(gate), no_link=True)
    s = Supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)},
                   args=["--mode", "stateful", "--quiesce-timeout", "10"]).start()
    try:
        write_behavior(behavior)  # the next generations: no gate
        (old,) = s.active_pids()
        for _ in range(40):
            connections.append(http.client.HTTPConnection(*s.address(), timeout=30))
            post_incr(connections[-1])
        ports = [c.sock.getsockname() for c in connections]
        soft, hard = resource.prlimit(s.pid, resource.RLIMIT_NOFILE)

        # 1. too little headroom: refused before anything starts, with the figures
        resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (fd_count(s.pid) + 60, hard))
        out = s.cli("upgrade")
        resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert out.returncode == 1
        m = re.search(r"handoff needs (\d+) descriptors, limit is (\d+) \(RLIMIT_NOFILE",
                      out.stderr)
        assert m and int(m.group(1)) > int(m.group(2)), out.stderr
        assert [g["id"] for g in s.status()["generations"]] == [1]

        # 2. the limit drops while the snapshot is being made: its 40 connections cannot all
        # be received (MSG_CTRUNC). That reply fails, the old worker resumes with its state.
        mark = s.log_mark()
        proc = s.cli_background("upgrade")
        s.wait_log(rf"gen=1 worker=0 pid={old}\| snapshot gate", start=mark)
        resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (fd_count(s.pid) + 10, hard))
        with open(gate, "w") as g:
            g.write("go\n")
        out_text, err = proc.communicate(timeout=60)
        resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert proc.returncode == 1, out_text + err
        assert re.search(r"quiesce and snapshot failed: reply to request \d+ refused: "
                         r"descriptors lost: .* \(\d+ open now, limit \d+\)", err), err
        assert "serving again with its state" in out_text
        assert s.active_pids() == [old]
        assert [post_incr(c) for c in connections] == list(range(41, 81)), \
            "every connection still served by the old worker, the count intact"

        # 3. with the limit back, the same handoff goes through: state and connections travel
        mark = s.log_mark()
        proc = s.cli_background("upgrade")
        s.wait_log(rf"gen=1 worker=0 pid={old}\| snapshot gate", start=mark)
        with open(gate, "w") as g:
            g.write("go\n")
        out_text, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out_text + err
        s.status()
        assert s.active_pids() != [old]
        assert [post_incr(c) for c in connections] == list(range(81, 121))
        assert [c.sock.getsockname() for c in connections] == ports
        assert wait_pid_gone(old, 30)
    finally:
        s.stop()


# A worker that leaves a writer behind: `yes` in a session of its own, deaf to SIGTERM, holding
# the worker's stdout and writing to it as fast as it can; the worker exits 1 once told.
LEAVES_A_WRITER = """
import os, signal, subprocess, sys
deaf = lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["yes", "y" * 99], start_new_session=True, preexec_fn=deaf)
with open(sys.argv[1], "a") as f:
    f.write(f"{child.pid}\\n")
with open(sys.argv[2]) as gate:
    gate.readline()
os._exit(1)
"""


@pytest.mark.slow
def test_a_leftover_that_keeps_writing_does_not_freeze_the_supervisor(tmp_path: Path) -> None:
    """Once a worker has exited, its output is read up to what its pipe holds, then the pipe
    is closed: a writer it left behind can neither keep the supervisor reading forever (its
    loop never got back to anything else) nor outlive the closed pipe."""
    script, writers, gate = tmp_path / "worker.py", tmp_path / "writers", tmp_path / "gate"
    script.write_text(LEAVES_A_WRITER)
    os.mkfifo(gate)
    s = Supervised(tmp_path, [sys.executable, str(script), str(writers), str(gate)],
                   args=["--readiness", "exec"]).start()
    try:
        [worker] = s.active_pids()
        mark = s.log_mark()
        assert open_gate(str(gate), timeout=30)
        s.wait_log(rf"event=worker.died gen=1 worker=0 pid={worker}", start=mark)
        status = s.cli("status")  # its own deadline: 10 s for an answer
        assert status.returncode == 0, status.stderr
        first_writer = int(writers.read_text().split()[0])
        assert wait_pid_gone(first_writer, 10), "the leftover writer outlived its closed pipe"
    finally:
        s.stop()  # ends what is left of the workers' trees (their SWAPD_GENERATION)
        for pid in map(int, writers.read_text().split()) if writers.exists() else ():
            # A writer still there despite that is ended, if the pid is still that writer.
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).cmdline() == ["yes", "y" * 99]:
                    psutil.Process(pid).kill()


SQUAT = """
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
os.write(1, b"%d\\n" % s.getsockname()[1])
sys.stdin.read()  # until the test closes our stdin
"""


@as_root
def test_a_port_squatter_posing_as_a_worker_fails_the_start_at_once(tmp_path: Path) -> None:
    """Another user's process that holds the port with SWAPD_GENERATION in its environment is
    not taken for an orphan of a crashed swapd (whose drain the start would wait out: here
    "wait up to 86005s"): the start fails at once, naming it."""
    env = {"PATH": os.environ["PATH"], "SWAPD_GENERATION": "7", "SWAPD_DRAIN_TIMEOUT": "86000"}
    # The system interpreter: the test's own (a venv) may be in a directory uid 65534 cannot read.
    squatter = subprocess.Popen(
        ["/usr/bin/python3", "-c", SQUAT], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        assert squatter.stdout is not None
        port = int(squatter.stdout.readline())
        control = tmp_path / "ctl.sock"
        proc = subprocess.run([*SWAPD, "run", "--control", str(control),
                               "--bind", f"http=127.0.0.1:{port}", "--", *MISBEHAVE],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "event=listener.busy" not in proc.stderr
        assert (f"address already in use (held by pid {squatter.pid} (python3, runs as uid "
                f"{NOBODY} with SWAPD_GENERATION") in proc.stderr.splitlines()[-1], proc.stderr
    finally:
        squatter.kill()
        squatter.communicate(timeout=10)


# -- the metrics endpoint: idle connections from any local user ----------------------------------


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the TCP listener on `port` (the
    kernel's rx_queue of a LISTEN socket in /proc/net/tcp is its accept backlog)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in list(f)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener on port {port}")


@contextlib.contextmanager
def idle_connections(address: tuple[str, int], count: int, uid: int | None
                     ) -> Iterator[int]:
    """A forked child (as `uid`) connects `count` times, one after another, and holds the
    connections without sending a byte until the block ends; yields how many connected."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ours.close()
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            held = []
            with contextlib.suppress(OSError):  # a connect that does not complete in time
                for _ in range(count):
                    held.append(socket.create_connection(address, timeout=5))
            theirs.sendall(f"{len(held)}\n".encode())
            theirs.recv(1)  # hold them until told (or the test is gone)
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    pidfd = os.pidfd_open(pid)
    try:
        ours.settimeout(60)
        yield int(ours.recv(64))
    finally:
        ours.close()  # the child's recv returns: it exits, its connections close
        if not select.select([pidfd], [], [], 30)[0]:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(pidfd)


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith("Threads:")).split()[1])


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


@pytest.mark.slow
def test_idle_metrics_connections_cannot_exhaust_the_supervisor(tmp_path: Path) -> None:
    """The reported attack: 600 idle connections to the metrics port (from uid nobody when
    we are root) against a supervisor whose RLIMIT_NOFILE is 512."""
    with supervised(tmp_path, MISBEHAVE, args=["--metrics", "127.0.0.1:0"]) as s:
        address = s.status()["metrics"]
        port = int(address.rpartition(":")[2])
        hard = resource.prlimit(s.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (512, hard))
        assert "swapd_swaps_total" in scrape(address)  # the answering threads exist now
        fds, threads = s.status()["open_fds"], threads_of(s.pid)
        with idle_connections(("127.0.0.1", port), 600,
                              NOBODY if os.geteuid() == 0 else None) as connected:
            assert connected == 600  # none left hanging in a full backlog
            deadline = time.monotonic() + 30
            while accept_queue(port):  # the supervisor has taken what it will take
                assert time.monotonic() < deadline, "the metrics accept queue stays full"
                time.sleep(0.01)
            assert s.status()["open_fds"] <= fds + MAX_CONNECTIONS
            assert threads_of(s.pid) <= threads + WORKERS  # not one per connection
            # a scrape is answered now, not after the idle ones' deadline
            text = scrape(address)
            assert "swapd_workers{" in text, "gauges too: the supervisor's loop answered"
            out = s.cli("status", "--timeout", "10")
            assert out.returncode == 0, out.stderr
        s.wait_log(r'event=metrics.busy connections=16 limit=16 action="closed the oldest '
                   r'idle one"')
        assert s.status()["open_fds"] <= fds + MAX_CONNECTIONS
