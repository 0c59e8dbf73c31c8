"""The control socket: permissions, peer credentials, malformed requests, CLI output."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.supervised import (
    HELLO,
    MISBEHAVE,
    SWAPD,
    Supervised,
    open_gate,
    supervised,
    write_behavior,
)


def raw_exchange(path: str, payload: bytes) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def service(tmp_path: Path):  # type: ignore[no-untyped-def]
    with supervised(tmp_path, HELLO) as s:
        yield s


def test_control_socket_is_private(service) -> None:  # type: ignore[no-untyped-def]
    mode = stat.S_IMODE(os.stat(service.control).st_mode)
    assert mode == 0o600


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"this is not json\n", "malformed request: not JSON"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b'{"v": 99, "cmd": "status"}\n', "unsupported protocol version 99"),
        (b'{"v": 1}\n', "missing 'cmd'"),
        (b'{"v": 1, "cmd": "explode"}\n', "unknown command 'explode'"),
        (b'{"v": 1, "cmd": "status", "args": []}\n', "'args' must be an object"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b'{"v": 1, "cmd": "status"}', "not terminated by a newline"),
    ],
)
def test_malformed_requests_get_errors(service, payload: bytes, error: str) -> None:  # type: ignore[no-untyped-def]
    replies = raw_exchange(service.control, payload)
    assert len(replies) == 1
    assert replies[0]["type"] == "result" and replies[0]["ok"] is False
    assert error in str(replies[0]["error"])
    assert service.status()["active"] == 1  # the supervisor keeps running


def test_several_requests_on_one_connection(service) -> None:  # type: ignore[no-untyped-def]
    replies = raw_exchange(service.control,
                           b'garbage\n{"v": 1, "cmd": "status"}\n{"v": 1, "cmd": "status"}\n')
    assert [r["ok"] for r in replies] == [False, True, True]


@pytest.mark.slow
def test_other_uid_is_refused(tmp_path: Path) -> None:
    """Even with the file mode opened up, peer credentials are checked."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    shared = Path(tempfile.mkdtemp(prefix="swapd-peercred-"))
    try:
        shared.chmod(0o755)  # pytest's tmp_path is 0700 all the way up
        control = str(shared / "ctl.sock")
        with supervised(tmp_path, HELLO, control=control) as s:
            os.chmod(control, 0o666)
            # The supervisor answers the refusal as soon as it accepts, and closes: the send
            # may then meet a closed socket, the answer is still there to read.
            script = (
                "import contextlib, socket, sys\n"
                "c = socket.socket(socket.AF_UNIX)\n"
                "c.connect(sys.argv[1])\n"
                "with contextlib.suppress(BrokenPipeError, ConnectionResetError):\n"
                "    c.sendall(b'{\"v\":1,\"cmd\":\"stop\"}\\n')\n"
                "print(c.recv(4096).decode())\n"
            )
            # the system interpreter: uid 65534 cannot enter root's pyenv or venv
            python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
            out = subprocess.run([python, "-c", script, control], capture_output=True,
                                 text=True, timeout=30, user=65534, group=65534)
            assert out.returncode == 0, out.stderr
            reply = json.loads(out.stdout)
            assert reply["ok"] is False and reply["error"] == "permission denied for uid 65534"
            assert s.status()["active"] == 1
            s.wait_log(r"event=control.refused peer_pid=\d+ peer_uid=65534")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.slow
def test_cli_json_and_exit_codes(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = service.cli("status", "--json")
    assert out.returncode == 0
    msg = json.loads(out.stdout.splitlines()[-1])
    assert msg["type"] == "result" and msg["data"]["pid"] == service.pid

    text = service.cli("status").stdout
    assert "listeners:" in text and "gen 1" in text and "ACTIVE" in text

    out = subprocess.run(["python3", "-m", "swapd", "status", "--control",
                          str(tmp_path / "nowhere.sock")], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 3
    assert "no supervisor: control socket" in out.stderr

    up = service.cli("upgrade", "--json")
    lines = [json.loads(x) for x in up.stdout.splitlines()]
    assert [m["type"] for m in lines][-1] == "result"
    assert {m.get("event") for m in lines} >= {"spawned", "ready", "committed"}


def test_control_env_default(service) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "SWAPD_CONTROL": service.control}
    out = subprocess.run(["python3", "-m", "swapd", "status"], capture_output=True, text=True,
                         timeout=30, env=env)
    assert out.returncode == 0, out.stderr


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    fd, data, end = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        assert ready, f"no line within {timeout}s (so far {data!r})"
        chunk = os.read(fd, 1)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


@pytest.mark.slow
def test_a_client_that_stops_waiting_says_the_upgrade_goes_on(tmp_path: Path) -> None:
    """Ctrl-C, or --timeout once the supervisor took the upgrade on: one line saying it
    continues and where to follow it, exit 130 / 4 (not 1 / 3, "no supervisor"), and the
    upgrade does go on to commit. A stdout nobody reads does not stop the wait either."""
    behavior, gate = tmp_path / "behavior.json", tmp_path / "gate"
    os.mkfifo(f"{gate}-0")
    write_behavior(behavior, version="v1")
    s = Supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)}).start()
    try:
        write_behavior(behavior, version="v2", gate=str(gate))  # gen 2 waits at the gate
        client = subprocess.Popen([*SWAPD, "upgrade", "--control", s.control], env=s.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert _read_line(client, 30).startswith(b"swapd: gen=2 started 1 worker(s)")
            client.send_signal(signal.SIGINT)
            _, err = client.communicate(timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
        assert client.returncode == 130
        assert err.decode() == ("swapd upgrade: stopped waiting (interrupted); the upgrade "
                                "(gen=2) continues in the supervisor: see `swapd status`\n")
        assert open_gate(f"{gate}-0", timeout=30)
        s.wait_log(r"event=swap.commit kind=upgrade gen=2 ")

        write_behavior(behavior, version="v3", gate=str(gate))
        out = s.cli("upgrade", "--timeout", "5")
        assert out.returncode == 4, out
        assert out.stderr == ("swapd upgrade: no result from supervisor within 5s; stopped "
                              "waiting; the upgrade (gen=3) continues in the supervisor: see "
                              "`swapd status`\n")
        assert open_gate(f"{gate}-0", timeout=30)
        s.wait_log(r"event=swap.commit kind=upgrade gen=3 ")

        write_behavior(behavior, version="v4")
        read, write = os.pipe()
        os.close(read)  # `swapd upgrade | true`: the reader is gone before the first line
        try:
            out = subprocess.run([*SWAPD, "upgrade", "--control", s.control], env=s.env,
                                 stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        assert (out.returncode, out.stderr) == (0, "")
        assert s.status()["active"] == 4
    finally:
        write_behavior(behavior, version="v1")
        open_gate(f"{gate}-0", timeout=0)  # a worker still waiting there may go
        s.stop()
