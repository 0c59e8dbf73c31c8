"""Promises that broke under a careless release or operator: a listener shut down by a
worker, a restart after a supervisor crash, SIGHUP bursts, stateful mode with a worker that
cannot hand over state."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.integration.supervised import (
    MISBEHAVE,
    http_get,
    supervised,
    write_behavior,
)


def _refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=10):
            return False
    except ConnectionRefusedError:
        return True


def test_listener_shut_down_by_a_release_is_reported_and_rebound(tmp_path: Path) -> None:
    behavior = tmp_path / "b.json"
    write_behavior(behavior, shutdown_on_drain=True)  # release 1 shuts fd 3 down on its way out
    with supervised(tmp_path, MISBEHAVE, env={"BEHAVIOR": str(behavior)}) as s:
        address = s.address()
        # Release 2 accepts on nothing: the dead socket makes it spin in no accept loop.
        write_behavior(behavior, serve=False)
        mark = s.log_mark()
        assert s.upgrade()["ok"]
        s.wait_log(r"\| shutting down listener fd=3", start=mark)
        s.wait_log(r"event=listener.dead name=http address=127\.0\.0\.1:\d+ gen=2 ", start=mark)
        assert _refused(address)  # the kernel refuses: the one shared socket is dead
        st = s.status()
        assert any("listener http" in w and "does not listen" in w for w in st["warnings"])
        assert st["listeners"][0]["listening"] is False
        # The next release gets a new socket at the same address and serves.
        write_behavior(behavior, version="v3")
        mark = s.log_mark()
        assert s.upgrade()["ok"]
        s.wait_log(r"event=listener.rebound name=http ", start=mark)
        assert s.address() == address
        status, body = http_get(address)
        assert (status, body.split()[0]) == (200, "v3")
        st = s.status()
        assert st["listeners"][0]["listening"] is True
        assert not any("listener http" in w for w in st["warnings"])
