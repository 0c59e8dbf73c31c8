"""`swapd check` (like `nginx -t`): what `swapd run` with the same options would refuse at
start, without binding or starting anything; one line, exit 0 or 2."""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from swapd import cli


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "swapd.toml"
    path.write_text(f'command = ["{sys.executable}", "app.py"]\nworkers = 2\n'
                    f'control = "{tmp_path}/run/swapd.sock"\ncwd = "{tmp_path}"\n'
                    '[bind]\nhttp = "127.0.0.1:8000"\n')
    return path


def test_a_good_configuration_is_one_line_and_nothing_is_bound_or_made(
        capsys: pytest.CaptureFixture[str], conf: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:  # the port of the running service: still "ok"
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = check(capsys, "--config", str(conf), "--bind",
                               f"admin=127.0.0.1:{port}")
    assert (code, err) == (0, "")
    assert out == (f"swapd check: ok: {conf}: 2 worker(s), stateless, listeners "
                   f"http=127.0.0.1:8000, admin=127.0.0.1:{port}, command {sys.executable} "
                   "app.py\n")
    assert not (tmp_path / "run").exists()  # `run` would create the control directory


def test_the_socket_of_the_running_supervisor_is_no_error(
        capsys: pytest.CaptureFixture[str], conf: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(tmp_path / "run" / "swapd.sock"))
        live.listen()
        code, out, _ = check(capsys, "--config", str(conf))
    assert code == 0 and out.startswith("swapd check: ok: ")


@pytest.mark.parametrize(("extra", "argv", "message"), [
    ("ready_timeout = 5\n", [], "{conf}: unknown key 'ready_timeout': did you mean "
                                "[timeouts] ready?"),
    ("[timeouts]\nready = inf\n", [], "{conf}: timeouts.ready must be a positive number of "
                                      "seconds (at most 10000000)"),
    ("[env]\nworkers = 3\n", [], "{conf}: env.workers must be a string (workers is a top-level "
                                 "key: in the file, put it above [env])"),
    ("", ["--cwd", "{tmp}/nowhere"], "cwd {tmp}/nowhere: no such directory"),
    ("", ["--cwd", "{conf}"], "cwd {conf}: not a directory"),
    ("", ["--", "no-such-program-xyz"], "worker command not found or not executable: "
                                        "no-such-program-xyz"),
    ("", ["--", "{conf}"], "worker command not found or not executable: {conf}"),
    ("", ["--control", "{conf}"], "control path {conf} exists and is not a socket"),
    ("", ["--control", "{conf}/x.sock"], "control socket directory {conf} is not a directory"),
    ("", ["--control", "{tmp}/open/x.sock"], "control socket directory {tmp}/open is "
                                             "writable by others and not sticky"),
    ("", ["--health-url", "admin:/healthz"], "health_url admin:/healthz: no listener named "
                                             "'admin'"),
    ("", ["--bind", "http=127.0.0.1:1", "--bind", "http=127.0.0.1:2"],
     "listener 'http' given twice (--bind http=127.0.0.1:1, --bind http=127.0.0.1:2): give "
     "each its own name"),
    ("", ["--release", "bad label"], "bad release label 'bad label'"),
])
def test_what_run_would_refuse_is_one_line_and_exit_2(
        capsys: pytest.CaptureFixture[str], conf: Path, tmp_path: Path, extra: str,
        argv: list[str], message: str) -> None:
    if extra:
        text = conf.read_text()
        head, _, bind = text.partition("[bind]")
        conf.write_text(head + (extra if not extra.startswith("[") else "")
                        + "[bind]" + bind + (extra if extra.startswith("[") else ""))
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    assert stat.S_IMODE(os.stat(tmp_path / "open").st_mode) == 0o777
    fill = {"conf": str(conf), "tmp": str(tmp_path)}
    code, out, err = check(capsys, "--config", str(conf), *[a.format(**fill) for a in argv])
    assert (code, out) == (2, ""), err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("swapd check: " + message.format(**fill)), err

