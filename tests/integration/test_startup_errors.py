"""Bad input at start: one clear line on stderr, exit code 2, nothing started."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.integration.supervised import HELLO, MISBEHAVE, ROOT, SWAPD, write_behavior


def run_swapd(tmp_path: Path, *argv: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    control = tmp_path / "ctl.sock"
    import os

    proc = subprocess.run([*SWAPD, "run", "--control", str(control), *argv],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env={**os.environ, **(env or {})})
    assert not control.exists(), "nothing may be left behind"
    return proc


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bind", "http=localhost:80", "--", *HELLO],
         "'localhost' is not an IP address"),
        (["--bind", "http=127.0.0.1:99999", "--", *HELLO], "port must be 0-65535"),
        (["--bind", "http=::1:80", "--", *HELLO], "IPv6 addresses need brackets"),
        (["--bind", "h ttp=127.0.0.1:0", "--", *HELLO], "bad listener name"),
        (["--bind", "http=127.0.0.1:0"], "no worker command"),
        (["--bind", "http=127.0.0.1:0", "--", "/no/such/program"],
         "worker command not found or not executable: /no/such/program"),
        (["--bind", "http=127.0.0.1:0", "--", "no-such-program-xyz"],
         "worker command not found"),
        (["--", *HELLO], "no listeners"),
        (["--workers", "0", "--bind", "http=127.0.0.1:0", "--", *HELLO],
         "workers must be an integer >= 1"),
        (["--bogus-flag", "--", *HELLO], "unrecognized arguments"),
        (["--bind", "http=127.0.0.1:0", "--bind", "http=[::1]:0", "--", *HELLO],
         "swapd: listener 'http' given twice (--bind http=127.0.0.1:0, --bind http=[::1]:0)"),
        (["--cwd", "/nonexistent/dir", "--bind", "http=127.0.0.1:0", "--", *HELLO],
         "swapd: cwd /nonexistent/dir: no such directory"),
        (["--ready-timeout", "inf", "--bind", "http=127.0.0.1:0", "--", *HELLO],
         "argument --ready-timeout: must be a positive number of seconds (at most 10000000)"),
    ],
)
def test_bad_arguments(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = run_swapd(tmp_path, *argv)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_swapd(tmp_path, "--bind", f"http=127.0.0.1:{port}", "--", *HELLO)
    assert proc.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}: address already in use" in last_line(proc.stderr)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('command = ["x"]\nwrokers = 2\n', "unknown key 'wrokers'"),
        ('command = ["x"]\n[timeouts]\nredy = 1\n', "unknown key 'timeouts.redy'"),
        ('command = ["x"]\nmode = "magic"\n', "mode must be one of stateless, stateful"),
        ("command = [\n", "invalid TOML"),
        ('command = ["x"]\n[bind]\nadmin = "nope"\n', "bad address 'nope'"),
        ('command = ["x"]\n[timeouts]\nready = inf\n',
         "timeouts.ready must be a positive number of seconds (at most 10000000)"),
    ],
)
def test_bad_config_file(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "swapd.toml"
    cfg.write_text(toml)
    proc = run_swapd(tmp_path, "--config", str(cfg), "--bind", "http=127.0.0.1:0")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and str(cfg) in proc.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    proc = run_swapd(tmp_path, "--config", str(tmp_path / "absent.toml"))
    assert proc.returncode == 2
    assert "no such config file" in last_line(proc.stderr)


def test_first_generation_crashing_on_import(tmp_path: Path) -> None:
    """Workers that cannot start: exit 1 with the reason and the worker's traceback."""
    behavior = tmp_path / "b.json"
    write_behavior(behavior, import_error=True)
    proc = run_swapd(tmp_path, "--bind", "http=127.0.0.1:0", "--", *MISBEHAVE,
                     env={"BEHAVIOR": str(behavior)})
    assert proc.returncode == 1
    assert ("before it was ready: RuntimeError: simulated import failure in the new code"
            in proc.stderr)


def test_unknown_subcommand() -> None:
    proc = subprocess.run([*SWAPD, "frobnicate"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
