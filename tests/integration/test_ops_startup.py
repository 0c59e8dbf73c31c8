"""Bad operations input at start: a metrics port in use, a health URL that is not HTTP,
a bad release label; each one clear error, exit code 2, and nothing left running."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.integration.supervised import HELLO, PY, ROOT, SWAPD

KVSTORE = [PY, str(ROOT / "tests" / "apps" / "kvstore.py")]


def run_swapd(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    control = tmp_path / "ctl.sock"
    proc = subprocess.run([*SWAPD, "run", "--control", str(control), *argv],
                          capture_output=True, text=True, timeout=90, cwd=str(ROOT),
                          env={**os.environ, "SWAPD_RELEASE": ""})
    assert not control.exists(), "nothing may be left behind"
    return proc


def test_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_swapd(tmp_path, "--bind", "http=127.0.0.1:0", "--metrics",
                         f"127.0.0.1:{port}", "--", *HELLO)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        f"swapd: metrics endpoint 127.0.0.1:{port}: Address already in use")


# (The keys' own checks are unit tests of config.build: tests/unit/test_config.py.)
@pytest.mark.parametrize(("argv", "message"), [
    (["--metrics", "localhost:9100"], "metrics: bad address 'localhost:9100'"),
    (["--release", "two words"], "bad release label 'two words'"),
    (["--health-url", "admin:/healthz"], "health_url admin:/healthz: no listener named 'admin'"),
])
def test_bad_operations_flags(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = run_swapd(tmp_path, "--bind", "http=127.0.0.1:0", *argv, "--", *HELLO)
    assert proc.returncode == 2, proc
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.slow
def test_health_url_on_a_listener_that_is_not_http(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    proc = run_swapd(tmp_path, "--bind", "kv=127.0.0.1:0", "--watch", "30", "--health-url",
                     "/healthz", "--", *KVSTORE)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "swapd: health_url /healthz: listener kv is not an HTTP listener: it answered "
        "b'ERR\\n', not an HTTP status line")
    assert "event=start.failed" in proc.stderr
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before  # its workers are gone with it
