"""Configuration: TOML file + flags merged into a frozen Config; every error an operator sees."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapd import config as config_mod
from swapd.config import (
    Config,
    ConfigError,
    Timeouts,
    build,
    default_control_path,
    from_overrides,
    load,
    read_file,
    to_overrides,
)
from swapd.sockets import Address

NO_ENV: dict[str, str] = {}
CMD = {"command": ["python", "app.py"]}
WHERE = "command line"


def write(tmp_path: Path, text: str, name: str = "swapd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(file_data: dict[str, Any], overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build(file_data, overrides, environ={"SWAPD_CONTROL": "/run/test/swapd.sock"})
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- defaults and merging ---------------------------------------------------------------


def test_defaults_with_only_a_command() -> None:
    cfg = build(CMD, {}, environ={"SWAPD_CONTROL": "/run/x/ctl.sock"})
    assert cfg == Config(
        command=("python", "app.py"),
        binds=(),
        control="/run/x/ctl.sock",
        workers=1,
        mode="stateless",
        readiness="notify",
        backlog=1024,
        precopy=False,
        fdstore=True,
        cwd=None,
        env=(),
        timeouts=Timeouts(ready=30.0, drain=30.0, quiesce=10.0, restore=30.0, idle_grace=1.0,
                          probe=2.0),
        config_file=None,
    )


def test_config_is_frozen() -> None:
    cfg = build(CMD, {}, environ=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 3  # type: ignore[misc]


FULL_FILE = """\
command = ["python", "app.py"]
workers = 2
mode = "stateful"
control = "/run/app/ctl.sock"
cwd = "/srv/app"
readiness = "notify"
backlog = 512
precopy = true
fdstore = false

[bind]
http = "127.0.0.1:8000"
admin = "unix:/run/app/admin.sock"

[timeouts]
ready = 5
drain = 7.5
idle_grace = 0.25

[env]
APP_ENV = "prod"
LEVEL = "info"
"""


def test_every_file_setting_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_FILE)
    cfg = load(path, {}, environ=NO_ENV)
    assert cfg.command == ("python", "app.py")
    assert cfg.workers == 2 and cfg.mode == "stateful" and cfg.readiness == "notify"
    assert cfg.control == "/run/app/ctl.sock" and cfg.cwd == "/srv/app"
    assert cfg.backlog == 512 and cfg.precopy is True and cfg.fdstore is False
    assert cfg.binds == (
        ("http", Address(socket.AF_INET, host="127.0.0.1", port=8000)),
        ("admin", Address(socket.AF_UNIX, path="/run/app/admin.sock")),
    )
    assert [name for name, _ in cfg.binds] == ["http", "admin"]
    assert cfg.timeouts == Timeouts(ready=5.0, drain=7.5, quiesce=10.0, restore=30.0,
                                    idle_grace=0.25)
    assert all(isinstance(getattr(cfg.timeouts, f.name), float)
               for f in dataclasses.fields(Timeouts))
    assert cfg.env == (("APP_ENV", "prod"), ("LEVEL", "info"))
    assert cfg.config_file == path


def test_flags_win_and_tables_merge_key_by_key(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_FILE)
    flags = {
        "command": ["./new-app"],  # a list flag replaces the file's list as a whole
        "workers": 4,
        "mode": None,  # None = flag not given: the file's value stays
        "precopy": False,
        "bind": {"http": "127.0.0.1:9000", "extra": "[::1]:0"},
        "timeouts": {"ready": 1},
        "env": {"LEVEL": "debug"},
    }
    cfg = load(path, flags, environ=NO_ENV)
    assert cfg.command == ("./new-app",)
    assert cfg.workers == 4 and cfg.mode == "stateful" and cfg.precopy is False
    assert dict(cfg.binds) == {
        "http": Address(socket.AF_INET, host="127.0.0.1", port=9000),
        "admin": Address(socket.AF_UNIX, path="/run/app/admin.sock"),
        "extra": Address(socket.AF_INET6, host="::1", port=0),
    }
    assert cfg.timeouts == Timeouts(ready=1.0, drain=7.5, idle_grace=0.25)
    assert dict(cfg.env) == {"APP_ENV": "prod", "LEVEL": "debug"}


def test_none_tables_in_flags_leave_the_file_alone() -> None:
    cfg = build({**CMD, "bind": {"http": "127.0.0.1:1"}}, {"bind": None, "env": None},
                environ=NO_ENV)
    assert [name for name, _ in cfg.binds] == ["http"]


def test_load_without_a_file_uses_flags_only() -> None:
    cfg = load(None, {**CMD, "workers": 3}, environ={"SWAPD_CONTROL": "/c.sock"})
    assert cfg.workers == 3 and cfg.config_file is None and cfg.control == "/c.sock"


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'command = ["x"]\ncwd = "app"\ncontrol = "run/ctl.sock"\n', "rel.toml")
    cfg = load("rel.toml", {"bind": {"u": "unix:sock/u.sock"}}, environ=NO_ENV)
    assert cfg.cwd == str(tmp_path / "app")
    assert cfg.control == str(tmp_path / "run" / "ctl.sock")
    assert cfg.config_file == str(tmp_path / "rel.toml")
    assert dict(cfg.binds)["u"].path == str(tmp_path / "sock" / "u.sock")


def test_empty_cwd_and_control_mean_unset() -> None:
    cfg = build({**CMD, "cwd": "", "control": ""}, {}, environ={"SWAPD_CONTROL": "/d.sock"})
    assert cfg.cwd is None and cfg.control == "/d.sock"


# -- read_file errors ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"^.*nope\.toml: no such config file$"):
        read_file(path)


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'command = ["x"\nworkers = \n')
    with pytest.raises(ConfigError) as info:
        read_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ") and "\n" not in message
    assert "line" in message  # tomllib says where


def test_a_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_file(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"
    assert isinstance(info.value.__cause__, OSError)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'command = ["caf\xe9"]\n')
    with pytest.raises(ConfigError, match=r"invalid TOML|UTF-8|utf-8"):
        read_file(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wokers = 2\n", "unknown key 'wokers': did you mean workers?"),
        ("frobnicate = 2\n",
         "unknown key 'frobnicate' (known: app, app_args, backlog, bind, command, control, cwd, "
         "env, fdstore, health_failures, health_interval, health_url, metrics, mode, precopy, "
         "probe, readiness, state_dir, timeouts, watch, worker_output, workers)"),
        ("[timeouts]\nready = 1\nboot = 3\n",
         "unknown key 'timeouts.boot' (known: drain, idle_grace, probe, quiesce, ready, restore)"),
        ("bind = \"127.0.0.1:80\"\n", "[bind] must be a table"),
        ("timeouts = 5\n", "[timeouts] must be a table"),
        ("env = [\"A=1\"]\n", "[env] must be a table"),
    ],
    ids=["typo", "top-level", "timeouts", "bind-not-table", "timeouts-not-table",
         "env-not-table"],
)
def test_file_structure_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_file(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(("text", "hint"), [
    ("ready_timeout = 5\n", "unknown key 'ready_timeout': did you mean [timeouts] ready?"),
    ("drain-timeout = 5\n", "unknown key 'drain-timeout': did you mean [timeouts] drain?"),
    ("probe_timeout = 1\n", "unknown key 'probe_timeout': did you mean [timeouts] probe?"),
    ("idle_grace = 1\n", "unknown key 'idle_grace': did you mean [timeouts] idle_grace?"),
    ("quiesce = 1\n", "unknown key 'quiesce': did you mean [timeouts] quiesce?"),
    ("no_fdstore = true\n", "unknown key 'no_fdstore': did you mean fdstore = false?"),
    ("health-url = '/h'\n", "unknown key 'health-url': did you mean health_url?"),
    ("release = 'v1'\n",
     "unknown key 'release': release is not a file key: give --release (or $SWAPD_RELEASE)"),
    ("log_level = 'debug'\n", "unknown key 'log_level': log_level is not a file key: give "
                               "--log-level"),
    ("[timeouts]\nready_timeout = 5\n",
     "unknown key 'timeouts.ready_timeout': did you mean ready?"),
    ("[timeouts]\nready = 5\nworkers = 2\n",
     "unknown key 'timeouts.workers': workers is a top-level key: move it above [timeouts]"),
])
def test_a_flags_name_in_the_file_gets_the_key_it_meant(tmp_path: Path, text: str,
                                                        hint: str) -> None:
    """README said every flag is a key with `_` for `-`; for the timeouts it is not, and
    the error only listed the known keys."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_file(path)
    assert str(info.value) == f"{path}: {hint}"


@pytest.mark.parametrize(("text", "message"), [
    ('command = ["x"]\n[bind]\nhttp = "127.0.0.1:0"\nworkers = "x"\n',
     "bind.workers: bad address 'x': expected HOST:PORT, [IPv6]:PORT or unix:PATH (workers "
     "is a top-level key: in the file, put it above [bind])"),
    ('command = ["x"]\n[bind]\nhttp = "127.0.0.1:0"\nworkers = 2\n',
     "bind.workers must be a string address (workers is a top-level key: in the file, put it "
     "above [bind])"),
    ('[bind]\nhttp = "127.0.0.1:0"\ncommand = ["x"]\n',
     "no worker command (give it after `--`, or `command = [...]` in the file) (command is a "
     "top-level key: in the file, put it above [bind])"),
    ('command = ["x"]\n[env]\nA = "1"\nworkers = 2\n',
     "env.workers must be a string (workers is a top-level key: in the file, put it above "
     "[env])"),
    ('command = ["x"]\n[bind]\nadmin = "nope"\n',
     "bind.admin: bad address 'nope': expected HOST:PORT, [IPv6]:PORT or unix:PATH"),
])
def test_errors_in_tables_name_the_key_and_a_misplaced_one(tmp_path: Path, text: str,
                                                           message: str) -> None:
    """`workers = "x"` appended after [bind] said only "bad address 'x'"."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, {}, environ=NO_ENV)
    assert str(info.value) == f"{path}: {message}"


def test_no_misplaced_hint_for_a_flag() -> None:
    assert error_of(CMD, {"bind": {"workers": "x"}}) == (
        f"{WHERE}: bind.workers: bad address 'x': expected HOST:PORT, [IPv6]:PORT or unix:PATH")


def test_bind_and_env_tables_take_any_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[bind]\nanything = "127.0.0.1:0"\n[env]\nWHATEVER = "1"\n')
    assert read_file(path) == {"bind": {"anything": "127.0.0.1:0"}, "env": {"WHATEVER": "1"}}


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'command = ["x"]\nworkers = 0\n')
    with pytest.raises(ConfigError) as info:
        load(path, {}, environ=NO_ENV)
    assert str(info.value) == f"{path}: workers must be an integer >= 1"


# -- build validation ---------------------------------------------------------------------

NO_COMMAND = (f"{WHERE}: no worker command (give it after `--`, or `command = [...]` in the "
              "file)")

VALIDATION: list[tuple[str, dict[str, Any], str]] = [
    ("no-command", {}, NO_COMMAND),
    ("command-none", {"command": None}, NO_COMMAND),
    ("command-empty", {"command": []}, NO_COMMAND),
    ("command-string", {"command": "python app.py"}, f"{WHERE}: command must be a list of strings"),
    ("command-not-strings", {"command": ["python", 3]},
     f"{WHERE}: command must be a list of strings"),
    ("bind-not-string", {**CMD, "bind": {"http": 8000}},
     f"{WHERE}: bind.http must be a string address"),
    ("bind-subtable", {**CMD, "bind": {"http": {"port": 1}}},
     f"{WHERE}: bind.http must be a string address"),
    ("bind-bad-name", {**CMD, "bind": {"a b": "127.0.0.1:1"}},
     f"{WHERE}: bad listener name 'a b': use 1-64 letters, digits, '_', '-' or '.'"),
    ("bind-bad-address", {**CMD, "bind": {"http": "localhost:80"}},
     f"{WHERE}: bind.http: bad address 'localhost:80': 'localhost' is not an IP address "
     "(names are not resolved)"),
    ("bind-bad-port", {**CMD, "bind": {"http": "127.0.0.1:70000"}},
     f"{WHERE}: bind.http: bad address '127.0.0.1:70000': port must be 0-65535"),
    ("workers-zero", {**CMD, "workers": 0}, f"{WHERE}: workers must be an integer >= 1"),
    ("workers-negative", {**CMD, "workers": -2}, f"{WHERE}: workers must be an integer >= 1"),
    ("workers-string", {**CMD, "workers": "2"}, f"{WHERE}: workers must be an integer >= 1"),
    ("workers-float", {**CMD, "workers": 2.0}, f"{WHERE}: workers must be an integer >= 1"),
    ("workers-bool", {**CMD, "workers": True}, f"{WHERE}: workers must be an integer >= 1"),
    ("backlog-zero", {**CMD, "backlog": 0}, f"{WHERE}: backlog must be an integer >= 1"),
    ("backlog-string", {**CMD, "backlog": "big"}, f"{WHERE}: backlog must be an integer >= 1"),
    ("mode", {**CMD, "mode": "fast"},
     f"{WHERE}: mode must be one of stateless, stateful, not 'fast'"),
    ("mode-case", {**CMD, "mode": "Stateful"},
     f"{WHERE}: mode must be one of stateless, stateful, not 'Stateful'"),
    ("readiness", {**CMD, "readiness": "tcp"},
     f"{WHERE}: readiness must be one of notify, exec, probe, not 'tcp'"),
    ("stateful-exec", {**CMD, "mode": "stateful", "readiness": "exec"},
     f"{WHERE}: mode stateful needs readiness notify (a successor says over swapd's channel "
     "when it stands by for state), not 'exec'"),
    ("precopy", {**CMD, "precopy": "yes"}, f"{WHERE}: precopy must be true or false"),
    ("fdstore", {**CMD, "fdstore": 1}, f"{WHERE}: fdstore must be true or false"),
    ("timeout-unknown", {**CMD, "timeouts": {"boot": 3}}, f"{WHERE}: unknown timeout 'boot'"),
    ("timeout-zero", {**CMD, "timeouts": {"ready": 0}},
     f"{WHERE}: timeouts.ready must be a positive number of seconds (at most 10000000)"),
    ("timeout-negative", {**CMD, "timeouts": {"drain": -1.5}},
     f"{WHERE}: timeouts.drain must be a positive number of seconds (at most 10000000)"),
    ("timeout-string", {**CMD, "timeouts": {"quiesce": "10"}},
     f"{WHERE}: timeouts.quiesce must be a positive number of seconds (at most 10000000)"),
    ("timeout-bool", {**CMD, "timeouts": {"restore": True}},
     f"{WHERE}: timeouts.restore must be a positive number of seconds (at most 10000000)"),
    ("env-value", {**CMD, "env": {"PORT": 8000}}, f"{WHERE}: env.PORT must be a string"),
    ("env-empty-key", {**CMD, "env": {"": "x"}}, f"{WHERE}: env. must be a string"),
    ("env-key-with-equals", {**CMD, "env": {"A=B": "x"}}, f"{WHERE}: env.A=B must be a string"),
    ("cwd", {**CMD, "cwd": 5}, f"{WHERE}: cwd must be a path"),
    ("control", {**CMD, "control": ["/a"]}, f"{WHERE}: control must be a path"),
]


@pytest.mark.parametrize(("flags", "message"), [(f, m) for _, f, m in VALIDATION],
                         ids=[i for i, _, _ in VALIDATION])
def test_validation_error_from_flags(flags: dict[str, Any], message: str) -> None:
    assert error_of({}, flags) == message


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in VALIDATION],
                         ids=[i for i, _, _ in VALIDATION])
def test_validation_error_from_the_file(data: dict[str, Any], message: str) -> None:
    # The same check applies whatever the source; only the prefix names the file.
    with pytest.raises(ConfigError) as info:
        build(data, {}, config_file="/etc/swapd/app.toml", environ=NO_ENV)
    assert str(info.value) == message.replace(WHERE, "/etc/swapd/app.toml", 1)


def test_a_bad_file_value_is_forgiven_when_a_flag_replaces_it() -> None:
    cfg = build({**CMD, "workers": 0, "bind": {"http": "nonsense"}},
                {"workers": 2, "bind": {"http": "127.0.0.1:0"}}, environ=NO_ENV)
    assert cfg.workers == 2


def test_address_errors_are_not_chained_into_tracebacks() -> None:
    with pytest.raises(ConfigError) as info:
        build({**CMD, "bind": {"http": "nonsense"}}, {}, environ=NO_ENV)
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(5, id="integer"),
        pytest.param({"python": "app.py"}, id="table"),
    ],
)
def test_command_of_the_wrong_type(command: object) -> None:
    assert error_of({"command": command}, {}) == f"{WHERE}: command must be a list of strings"


def test_nan_timeout_is_refused() -> None:
    assert error_of({**CMD, "timeouts": {"ready": float("nan")}}, {}) == (
        f"{WHERE}: timeouts.ready must be a positive number of seconds (at most 10000000)"
    )


@pytest.mark.parametrize(("text", "key"), [
    ("[timeouts]\nready = inf\n", "ready"),
    ("[timeouts]\nready = 1e12\n", "ready"),
    ("[timeouts]\ndrain = 1e300\n", "drain"),
    ("[timeouts]\nidle_grace = nan\n", "idle_grace"),
    ("[timeouts]\nquiesce = 10000001\n", "quiesce"),
])
def test_timeouts_in_the_file_are_bounded_like_every_duration(tmp_path: Path, text: str,
                                                               key: str) -> None:
    """An unbounded timeout was accepted at start, then overflowed every client deadline."""
    path = write(tmp_path, 'command = ["x"]\n' + text)
    with pytest.raises(ConfigError) as info:
        load(path, {}, environ=NO_ENV)
    assert str(info.value) == (f"{path}: timeouts.{key} must be a positive number of seconds "
                               "(at most 10000000)")


def test_the_largest_timeout_is_accepted() -> None:
    cfg = build({**CMD, "timeouts": {"drain": 10**7}}, {}, environ=NO_ENV)
    assert cfg.timeouts.drain == 1e7


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param({"env": {"A": "x\0y"}}, id="env-value"),
        pytest.param({"env": {"A\0": "x"}}, id="env-key"),
        pytest.param({"command": ["python", "a\0b"]}, id="command-arg"),
    ],
)
def test_nul_bytes_are_refused_up_front(flags: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build({**CMD}, flags, environ=NO_ENV)


@pytest.mark.parametrize("name", ["swapd-state-0-0", "swapd-listener-http", "swapd-x"])
def test_listener_names_in_swapds_fd_store_namespace_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}.*reserved"):
        build({**CMD, "bind": {name: "127.0.0.1:0"}}, {}, environ=NO_ENV)


# -- control socket location ------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SWAPD_CONTROL": "/x/c.sock", "RUNTIME_DIRECTORY": "/run/a", "XDG_RUNTIME_DIR": "/u"},
         "/x/c.sock"),
        ({"SWAPD_CONTROL": "", "RUNTIME_DIRECTORY": "/run/a", "XDG_RUNTIME_DIR": "/u"},
         "/run/a/swapd.sock"),
        ({"RUNTIME_DIRECTORY": "/run/a:/run/b", "XDG_RUNTIME_DIR": "/u"}, "/run/a/swapd.sock"),
        ({"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": "/run/user/1000"},
         "/run/user/1000/swapd.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/swapd.sock"),
    ],
    ids=["swapd-control", "runtime-directory", "first-runtime-directory", "xdg", "xdg-only"],
)
def test_default_control_path_order(environ: dict[str, str], expected: str) -> None:
    assert default_control_path(environ) == expected


@pytest.mark.parametrize(("euid", "expected"), [(0, "/run/swapd/swapd.sock"),
                                                 (1000, "/tmp/swapd-1000/swapd.sock")])
def test_default_control_path_without_environment(
    monkeypatch: pytest.MonkeyPatch, euid: int, expected: str
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert default_control_path({}) == expected
    assert default_control_path({"SWAPD_CONTROL": "", "XDG_RUNTIME_DIR": ""}) == expected


def test_build_takes_the_control_default_from_the_given_environment() -> None:
    cfg = build(CMD, {}, environ={"XDG_RUNTIME_DIR": "/run/user/7"})
    assert cfg.control == "/run/user/7/swapd.sock"


# -- to_overrides / from_overrides --------------------------------------------------------

_NAMES = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
_PATHS = st.lists(st.from_regex(r"[a-z0-9._-]{1,8}", fullmatch=True), min_size=1,
                  max_size=4).map(lambda parts: "/" + "/".join(parts))
_ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
).flatmap(lambda host: st.integers(0, 65535).map(lambda port: f"{host}:{port}")) | (
    _PATHS.map(lambda p: f"unix:{p}")
)
_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
                max_size=12)
_SECONDS = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)

OVERRIDES = st.fixed_dictionaries(
    {
        "command": st.lists(_TEXT, min_size=1, max_size=4),
        "bind": st.dictionaries(_NAMES, _ADDRESSES, max_size=3),
        "control": _PATHS,
    },
    optional={
        "workers": st.integers(1, 64),
        "mode": st.sampled_from(["stateless", "stateful"]),
        "readiness": st.sampled_from(["notify", "exec"]),
        "backlog": st.integers(1, 65535),
        "precopy": st.booleans(),
        "fdstore": st.booleans(),
        "cwd": st.none() | _PATHS,
        "env": st.dictionaries(_TEXT.filter(lambda k: k != "" and "=" not in k), _TEXT,
                               max_size=3),
        "timeouts": st.dictionaries(st.sampled_from(sorted(config_mod._TIMEOUT_KEYS)), _SECONDS),
        "watch": st.just(0) | _SECONDS,
        "health_url": st.sampled_from(["/", "/healthz", "admin:/h?x=1"]),
        "health_interval": _SECONDS,
        "health_failures": st.integers(1, 10),
        "worker_output": st.sampled_from(["prefixed", "passthrough"]),
        "state_dir": _PATHS,
        "metrics": st.ip_addresses(v=4).map(str).flatmap(
            lambda h: st.integers(0, 65535).map(lambda p: f"{h}:{p}")),
    },
).filter(lambda d: not (d.get("mode") == "stateful" and d.get("readiness", "notify") != "notify"))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=OVERRIDES, config_file=st.none() | _PATHS)
def test_overrides_round_trip(flags: dict[str, Any], config_file: str | None) -> None:
    cfg = build({}, flags, config_file=config_file, environ=NO_ENV)
    data = to_overrides(cfg)
    assert from_overrides(data, cfg.config_file) == cfg
    assert to_overrides(from_overrides(data, cfg.config_file)) == data


def test_to_overrides_shape() -> None:
    cfg = build({**CMD, "bind": {"http": "[::1]:80", "u": "unix:/run/u.sock"},
                 "env": {"A": "1"}}, {}, environ={"SWAPD_CONTROL": "/c.sock"})
    assert to_overrides(cfg) == {
        "command": ["python", "app.py"],
        "bind": {"http": "[::1]:80", "u": "unix:/run/u.sock"},
        "control": "/c.sock",
        "workers": 1,
        "mode": "stateless",
        "readiness": "notify",
        "probe": None,
        "backlog": 1024,
        "precopy": False,
        "fdstore": True,
        "cwd": None,
        "env": {"A": "1"},
        "timeouts": {"drain": 30.0, "idle_grace": 1.0, "probe": 2.0, "quiesce": 10.0,
                     "ready": 30.0, "restore": 30.0},
        "watch": 0.0,
        "health_url": None,
        "health_interval": 1.0,
        "health_failures": 3,
        "worker_output": "prefixed",
        "state_dir": None,
        "metrics": None,
    }


def test_from_overrides_does_not_depend_on_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A re-exec'd supervisor may run with another environment; the control path travels.
    cfg = build(CMD, {}, environ={"SWAPD_CONTROL": "/first.sock"})
    monkeypatch.setenv("SWAPD_CONTROL", "/other.sock")
    assert from_overrides(to_overrides(cfg), None).control == "/first.sock"


# -- readiness probe ---------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["tcp", "http:/", "http:/healthz?full=1"])
def test_a_probe_goes_with_readiness_probe(probe: str) -> None:
    cfg = build({**CMD, "readiness": "probe", "probe": probe, "timeouts": {"probe": 0.5}}, {},
                environ=NO_ENV)
    assert (cfg.readiness, cfg.probe, cfg.timeouts.probe) == ("probe", probe, 0.5)
    assert from_overrides(to_overrides(cfg), None) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"readiness": "probe"}, "readiness 'probe' needs a probe: 'http:/PATH'"),
        ({"readiness": "probe", "probe": "http:healthz"}, "probe must be 'tcp' or 'http:/PATH'"),
        ({"readiness": "probe", "probe": "http:/a b"}, "probe must be 'tcp' or 'http:/PATH'"),
        ({"readiness": "probe", "probe": "udp"}, "probe must be 'tcp' or 'http:/PATH'"),
        ({"readiness": "probe", "probe": 3}, "probe must be 'tcp' or 'http:/PATH'"),
        ({"readiness": "probe", "probe": "http:/" + "a" * 1024},
         "probe must be 'tcp' or 'http:/PATH'"),
        ({"probe": "tcp"}, "probe 'tcp' is only used with readiness 'probe', not 'notify'"),
        ({"readiness": "probe", "probe": "tcp", "mode": "stateful"},
         "mode stateful needs readiness notify"),
    ],
)
def test_probe_errors(data: dict[str, Any], message: str) -> None:
    assert message in error_of({**CMD, **data}, {})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("watch", -1, "watch must be a number of seconds >= 0"),
    ("watch", "30", "watch must be a number of seconds >= 0"),
    ("health_interval", 0, "health_interval must be a positive number of seconds"),
    ("health_failures", 0, "health_failures must be an integer >= 1"),
    ("health_url", "healthz", "health_url must be [LISTENER:]/PATH"),
    ("health_url", "/a b", "health_url must be [LISTENER:]/PATH"),
    ("health_url", "/a\r\nX: y", "health_url must be [LISTENER:]/PATH"),
    ("worker_output", "raw", "worker_output must be one of prefixed, passthrough"),
    ("metrics", "localhost:9100", "is not an IP address"),
    ("metrics", "unix:/m.sock", "metrics must be a TCP address"),
    ("metrics", "127.0.0.1:99999", "port must be 0-65535"),
])
def test_operations_keys_refused(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build({**CMD, key: value}, {}, environ=NO_ENV)


def test_operations_keys() -> None:
    cfg = build({**CMD, "watch": 30, "health_url": "admin:/healthz", "metrics": 9100,
                 "worker_output": "passthrough"}, {"metrics": "[::1]:9200"}, environ=NO_ENV)
    assert cfg.watch == 30.0 and cfg.health == ("admin", "/healthz")
    assert cfg.metrics == "[::1]:9200"  # the flag wins
    assert build({**CMD, "metrics": 9100}, {}, environ=NO_ENV).metrics == "127.0.0.1:9100"
    assert build({**CMD, "health_url": "/h"}, {}, environ=NO_ENV).health == (None, "/h")
    assert cfg.worker_output == "passthrough"
