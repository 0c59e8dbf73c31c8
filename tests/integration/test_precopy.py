"""Pre-copy: bulk state ships while the old worker serves; only changes ship in the pause.

Also: hundreds of live connections travel with the state (more fds than one datagram takes).
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

import pytest

from tests.integration.supervised import PY, ROOT, Supervised

KV = [PY, str(ROOT / "tests" / "apps" / "kvstore.py")]
PRELOAD = 20_000
CONNECTIONS = 300


class Client:
    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.file = self.sock.makefile("rwb")
        self.local = self.sock.getsockname()

    def cmd(self, text: str) -> str:
        self.file.write(text.encode() + b"\n")
        self.file.flush()
        reply = self.file.readline().decode().strip()
        assert reply, "connection closed"
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def writer(address: tuple[str, int], model: dict[str, str], stop: threading.Event,
           started: threading.Event, errors: list[str]) -> None:
    """Mutates keys (sets, deletes) and records what was acknowledged."""
    rnd = random.Random(7)
    c = Client(address)
    try:
        for n in range(200_000):  # bounded; the test stops it much earlier
            if stop.is_set():
                return
            key = f"k{rnd.randrange(PRELOAD + 500)}"
            if rnd.random() < 0.2:
                assert c.cmd(f"DEL {key}") == "OK"
                model.pop(key, None)
            else:
                assert c.cmd(f"SET {key} w{n}") == "OK"
                model[key] = f"w{n}"
            if n == 500:
                started.set()
    except Exception as e:
        errors.append(repr(e))
        started.set()
    finally:
        c.close()


@pytest.mark.slow
def test_precopy_swap_keeps_every_change_and_every_connection(tmp_path: Path) -> None:
    s = Supervised(tmp_path, KV, binds=["kv=127.0.0.1:0"], env={"PRELOAD": str(PRELOAD)},
                   args=["--mode", "stateful", "--precopy"]).start()
    clients: list[Client] = []
    try:
        address = s.address("kv")
        clients = [Client(address) for _ in range(CONNECTIONS)]
        old_pid = clients[0].cmd("PID")
        model = {f"k{i}": f"v{i}" for i in range(PRELOAD)}
        stop, started, errors = threading.Event(), threading.Event(), []  # type: ignore[var-annotated]
        t = threading.Thread(target=writer, args=(address, model, stop, started, errors))
        t.start()
        assert started.wait(60)
        messages = s.call("upgrade")  # writes go on during the pre-copy and after the swap
        stop.set()
        t.join(60)
        assert errors == []
        result = messages[-1]
        assert result["ok"], result
        events = [m.get("event") for m in messages]
        assert "precopy" in events, "bulk state was shipped before the pause"
        assert "pause" in result["data"]["timings_ms"]
        for c in clients:
            assert c.sock.getsockname() == c.local
            assert c.cmd("PID") != old_pid, "the same connection, served by the new worker"
        check = clients[0]
        assert check.cmd("COUNT") == str(len(model))
        for key in [f"k{i}" for i in range(PRELOAD + 500)]:
            assert check.cmd(f"GET {key}") == model.get(key, "NONE"), key
    finally:
        for c in clients:
            c.close()
        s.stop()


def test_precopy_with_migration(tmp_path: Path) -> None:
    """A new state version migrates every entry: bulk outside the pause, delta inside."""
    cfg = tmp_path / "kv.toml"

    def write(version: int) -> None:
        cfg.write_text(f'command = {KV!r}\nmode = "stateful"\nprecopy = true\n'
                       f'[bind]\nkv = "127.0.0.1:0"\n[env]\nPRELOAD = "1000"\n'
                       f'KV_VERSION = "{version}"\n'.replace("'", '"'))

    write(1)
    s = Supervised(tmp_path, [], args=["--config", str(cfg)], binds=[]).start()
    try:
        c = Client(s.address("kv"))
        assert c.cmd("SET k5 changed") == "OK"
        write(2)
        res = s.result("reload")
        assert res["ok"], res
        assert c.cmd("GET k5") == "CHANGED"
        assert c.cmd("GET k999") == "V999"
        assert c.cmd("COUNT") == "1000"
        c.close()
    finally:
        s.stop()
