"""Listeners: by name, Unix sockets, IPv6, and listeners changed by a reload."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest

from tests.integration.supervised import MISBEHAVE, http_get, supervised, write_behavior


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def unix_get(path: str, target: str = "/") -> tuple[int, str]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("fdstore", [True, False], ids=["fdstore", "no-fdstore"])
def test_named_listeners_reach_the_worker_by_name(tmp_path: Path, fdstore: bool) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior)
    sock_path = str(tmp_path / "admin.sock")
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)},
                    args=[] if fdstore else ["--no-fdstore"],
                    binds=["http=127.0.0.1:0", f"admin=unix:{sock_path}", "v6=[::1]:0"]) as s:
        names = {lis["name"]: lis for lis in s.status()["listeners"]}
        assert set(names) == {"http", "admin", "v6"}
        assert names["admin"]["address"] == f"unix:{sock_path}"
        assert http_get(s.address("http"), "/listeners") == (200, "admin http v6")
        assert unix_get(sock_path, "/listeners") == (200, "admin http v6")
        v6 = s.address("v6")
        assert v6[0] == "::1"
        assert http_get(v6)[0] == 200
        assert s.upgrade()["ok"]
        assert unix_get(sock_path)[0] == 200
        assert http_get(v6)[0] == 200
    # With the fd store (the harness plays systemd) the socket lives on for the next
    # supervisor, which needs its path; without, swapd removes the socket it bound.
    assert Path(sock_path).exists() == fdstore


def test_reload_adds_and_moves_listeners(tmp_path: Path) -> None:
    cfg = tmp_path / "swapd.toml"
    behavior = tmp_path / "b.json"
    write_behavior(behavior)
    command = json.dumps(MISBEHAVE)
    cfg.write_text(f'command = {command}\n[bind]\nhttp = "127.0.0.1:0"\n')
    with supervised(tmp_path, [], args=["--config", str(cfg)], binds=[],
                    env={"BEHAVIOR": str(behavior)}) as s:
        first = s.address("http")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        cfg.write_text(f'command = {command}\n[bind]\nhttp = "127.0.0.1:{first[1]}"\n'
                       f'admin = "127.0.0.1:{free_port}"\n')
        res = s.cli("reload")
        assert res.returncode == 0, res.stderr
        assert s.address("http") == first, "an unchanged listener is kept, not rebound"
        assert http_get(("127.0.0.1", free_port), "/listeners") == (200, "admin http")

        # a reload that asks for a port somebody else holds fails and changes nothing
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            cfg.write_text(f'command = {command}\n[bind]\nhttp = "127.0.0.1:{taken}"\n')
            res = s.cli("reload")
            assert res.returncode == 1
            assert f"listener http: cannot bind 127.0.0.1:{taken}: address already in use" \
                in res.stderr
            assert s.address("http") == first
            assert http_get(first)[0] == 200

        cfg.write_text(f'command = {command}\n[bind]\nhttp = "127.0.0.1:{first[1]}"\n')
        mark = s.log_mark()
        assert s.cli("reload").returncode == 0
        assert [lis["name"] for lis in s.status()["listeners"]] == ["http"]
        # the draining generation holds its copy of the dropped listener until it exits
        s.wait_log(r"event=gen.exited gen=2", start=mark)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", free_port), timeout=5)
