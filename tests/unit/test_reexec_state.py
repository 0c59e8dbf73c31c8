"""`upgrade --self` state: the sealed memfd, its format check, the pre-flight `check()` run by the
new code, and the argv the supervisor re-execs with."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swapd import __version__
from swapd.config import build, to_overrides
from swapd.supervisor.reexec import (
    CHECK_TIMEOUT,
    FORMAT,
    ReexecError,
    check,
    exec_argv,
    preflight,
    read_state,
    write_state,
)

DEADLINE = 30.0  # a fresh interpreter importing all of swapd; only reached when broken
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Fds a test opens, closed whatever happens."""
    opened: list[int] = []
    try:
        yield opened
    finally:
        for fd in opened:
            os.close(fd)


def raw_memfd(data: bytes) -> int:
    fd = os.memfd_create("swapd-test-state")
    os.write(fd, data)
    return fd


def valid_state() -> dict[str, Any]:
    config = to_overrides(build({"command": ["python", "app.py"], "workers": 2,
                                 "bind": {"http": "127.0.0.1:0"}}, {},
                                environ={"SWAPD_CONTROL": "/run/test/ctl.sock"}))
    worker = {"slot": 0, "role": "active", "pid": 812, "pidfd": 7, "channel_fd": 8,
              "notify_fd": None, "output_fd": 9, "state": "ready", "started": 12.5,
              "ready_at": 13.0, "hello": {"pid": 812}, "status": "", "tail": ["line"]}
    return {
        "format": FORMAT, "version": __version__, "config": config, "config_file": None,
        "overrides": {}, "control_fd": 5, "reply_fd": None, "started": 1.0, "next_gen": 4,
        "active": 3, "swaps": {}, "last_swap": None, "crashes": {"0": [1.5]},
        "listeners": [{"name": "http", "address": "127.0.0.1:8000", "fd": 3,
                       "source": "bound"}],
        "generations": [{"id": 3, "state": "active", "config": config, "config_file": None,
                         "created": 1.0, "committed": 2.0, "restarts": [0, 0, 1],
                         "drain_deadline": None,
                         "workers": [worker, None, {"slot": 2, "dead": True,
                                                    "state": "backoff"}]}],
        "journal": [],
    }


# -- the memfd ----------------------------------------------------------------------------


def test_round_trip(fds: list[int]) -> None:
    state = valid_state()
    state["note"] = "snowman \u2603, and a NUL \0 inside a string"
    state["big"] = "x" * (2 * 1024 * 1024)  # far beyond one write() to a pipe: a memfd
    fd = write_state(state)
    fds.append(fd)
    assert read_state(fd) == state
    assert read_state(fd) == state  # pread: reading does not consume it


def test_the_memfd_is_sealed_and_inheritable(fds: list[int]) -> None:
    fd = write_state({"format": FORMAT})
    fds.append(fd)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"{", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    with pytest.raises(PermissionError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)  # no one can unseal or re-seal it
    # It must cross execve to the new image, unlike every other fd swapd opens.
    assert os.get_inheritable(fd)
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:swapd-reexec-state")


@pytest.mark.parametrize(
    ("state", "shown"),
    [({"format": 2}, "2"), ({}, "None"), ({"format": "1"}, "'1'"), ({"format": None}, "None")],
)
def test_format_refusal(fds: list[int], state: dict[str, Any], shown: str) -> None:
    fd = write_state(state)
    fds.append(fd)
    with pytest.raises(ReexecError) as info:
        read_state(fd)
    assert str(info.value) == f"re-exec state format {shown} is not {FORMAT}"
    assert info.value.tail == ""


@pytest.mark.parametrize("document", [b"[1, 2]", b'"state"', b"null", b"3"])
def test_a_state_that_is_not_an_object(fds: list[int], document: bytes) -> None:
    fd = raw_memfd(document)
    fds.append(fd)
    with pytest.raises(ReexecError):
        read_state(fd)


def test_a_state_that_is_not_json(fds: list[int]) -> None:
    fd = raw_memfd(b"not json {")
    fds.append(fd)
    with pytest.raises(ReexecError, match="re-exec state is not JSON: Expecting value"):
        read_state(fd)


def test_read_state_of_a_closed_fd() -> None:
    fd = write_state({"format": FORMAT})
    os.close(fd)
    with pytest.raises(OSError):
        read_state(fd)


# -- check(): what the new code runs on the state -----------------------------------------


def test_check_accepts_a_valid_state(fds: list[int]) -> None:
    fd = write_state(valid_state())
    fds.append(fd)
    check(fd)  # no exception: the new code can take over


@pytest.mark.parametrize("missing", ["slot", "pid", "pidfd", "state", "started", "role"])
def test_check_refuses_a_worker_without_a_key(fds: list[int], missing: str) -> None:
    state = valid_state()
    del state["generations"][0]["workers"][0][missing]
    fd = write_state(state)
    fds.append(fd)
    with pytest.raises(ReexecError) as info:
        check(fd)
    assert str(info.value) == f"re-exec state: an entry without {missing!r}"


def _set(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    state = valid_state()
    target: Any = state
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return state


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("generations", 0, "state"), "hibernating", "'hibernating' is not a valid GenState"),
        (("generations", 0, "workers", 0, "state"), "asleep", "not a valid SlotState"),
        (("generations", 0, "workers", 0, "pidfd"), "7", "'pidfd' is '7', of the wrong type"),
        (("generations", 0, "committed"), None, None),  # never committed: accepted
        (("generations", 0, "created"), None, "'created' is None"),
        (("generations", 0, "restarts"), 0, "'restarts' is 0"),
        (("listeners", 0, "address"), "nowhere", "AddressError"),
        (("journal",), [{"id": 1, "module": "m", "renamed_field": 1}], "TypeError"),
        (("crashes",), {"zero": [1.0]}, "ValueError"),
    ],
    ids=["gen-state", "slot-state", "pidfd-type", "committed-null", "created-null",
         "restarts-type", "address", "journal", "crashes"],
)
def test_check_builds_what_the_new_image_builds(
    fds: list[int], path: tuple[Any, ...], value: Any, error: str | None
) -> None:
    """What the new image would choke on after the exec fails here, as one ReexecError:
    the pre-flight and the new image run the same parse."""
    fd = write_state(_set(path, value))
    fds.append(fd)
    if error is None:
        check(fd)
    else:
        with pytest.raises(ReexecError, match=re.escape(error)):
            check(fd)


def test_check_refuses_a_config_the_new_code_rejects(fds: list[int]) -> None:
    state = valid_state()
    state["generations"][0]["config"]["workers"] = 0
    fd = write_state(state)
    fds.append(fd)
    with pytest.raises(ReexecError, match="workers must be an integer >= 1"):
        check(fd)


def test_check_refuses_another_format(fds: list[int]) -> None:
    state = valid_state()
    state["format"] = FORMAT + 1
    fd = write_state(state)
    fds.append(fd)
    with pytest.raises(ReexecError, match="re-exec state format"):
        check(fd)


def test_check_refuses_a_truncated_state(fds: list[int]) -> None:
    state = valid_state()
    del state["generations"]
    fd = write_state(state)
    fds.append(fd)
    with pytest.raises(ReexecError, match="an entry without 'generations'"):
        check(fd)


# -- the pre-flight and the exec argv -----------------------------------------------------


def test_exec_argv_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/swapd", "run", "--bind",
                                      "http=127.0.0.1:0", "--", "python", "app.py"])
    assert exec_argv() == [sys.executable, "-P", "-m", "swapd", "run", "--bind",
                           "http=127.0.0.1:0", "--", "python", "app.py"]
    monkeypatch.setattr(sys, "argv", ["-m"])  # as under `python -m swapd` with no arguments
    assert exec_argv() == [sys.executable, "-P", "-m", "swapd"]


def test_exec_argv_runs_the_installed_swapd_not_one_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fds: list[int]
) -> None:
    # A `swapd/` package in the supervisor's working directory must not be what re-execs.
    decoy = tmp_path / "swapd"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text("import sys; sys.exit('decoy swapd ran')\n")
    fd = write_state(valid_state())
    fds.append(fd)
    monkeypatch.setattr(sys, "argv", ["swapd", "_reexec-check", str(fd)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(exec_argv(), cwd=tmp_path, pass_fds=[fd], capture_output=True,
                          text=True, timeout=DEADLINE, env=env, stdin=subprocess.DEVNULL)
    assert "decoy" not in proc.stderr
    assert proc.returncode == 0, proc.stderr


def test_preflight_accepts_a_valid_state(fds: list[int]) -> None:
    assert CHECK_TIMEOUT <= DEADLINE
    fd = write_state(valid_state())
    fds.append(fd)
    preflight(fd)


def test_preflight_reports_the_refusal_with_the_tail(fds: list[int]) -> None:
    state = valid_state()
    del state["generations"][0]["workers"][0]["pid"]
    fd = write_state(state)
    fds.append(fd)
    with pytest.raises(ReexecError) as info:
        preflight(fd)
    assert str(info.value) == "the new code refused the supervisor state (exit 1)"
    assert info.value.tail.splitlines()[-1] == (
        "swapd: cannot take over this supervisor state: ReexecError: re-exec state: an entry "
        "without 'pid'"
    )


def test_preflight_reads_the_state_it_was_given(fds: list[int]) -> None:
    # The check runs in another process on the inherited fd, not on a copy we re-serialise.
    fd = raw_memfd(json.dumps({"format": FORMAT + 5}).encode())
    fds.append(fd)
    with pytest.raises(ReexecError) as info:
        preflight(fd)
    assert f"re-exec state format {FORMAT + 5} is not {FORMAT}" in info.value.tail
