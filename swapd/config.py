"""Configuration: a TOML file and command-line flags merged into one frozen Config.

Flags win over the file. `reload` re-reads the file and re-applies the flags the
supervisor was started with, so a flag given at start keeps winning.

    # swapd.toml
    command = ["python", "app.py"]
    workers = 2
    mode = "stateless"          # or "stateful": every swap hands state over
    control = "/run/swapd/app.sock"
    cwd = "/srv/app"
    readiness = "notify"        # or "exec": ready once exec succeeded
    backlog = 1024
    precopy = false             # stateful: ship bulk state before the pause
    fdstore = true              # under systemd: keep listeners (and state) in the fd store

    [bind]
    http = "127.0.0.1:8000"

    [timeouts]                  # seconds
    ready = 30
    drain = 30
    quiesce = 10
    restore = 30
    idle_grace = 1.0            # idle keep-alive connections a draining worker may close

    [env]
    APP_ENV = "prod"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from swapd.sockets import RESERVED_PREFIX, Address, AddressError, check_name, parse_address

Mode = Literal["stateless", "stateful"]
Readiness = Literal["notify", "exec"]
MODES: tuple[Mode, ...] = ("stateless", "stateful")
READINESS: tuple[Readiness, ...] = ("notify", "exec")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line for the operator."""


@dataclass(frozen=True)
class Timeouts:
    ready: float = 30.0
    drain: float = 30.0
    quiesce: float = 10.0
    restore: float = 30.0
    idle_grace: float = 1.0


@dataclass(frozen=True)
class Config:
    command: tuple[str, ...]
    binds: tuple[tuple[str, Address], ...]
    control: str
    workers: int = 1
    mode: Mode = "stateless"
    readiness: Readiness = "notify"
    backlog: int = 1024
    precopy: bool = False
    fdstore: bool = True
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    config_file: str | None = None


_TOP_KEYS = {
    "command", "workers", "mode", "control", "cwd", "readiness", "backlog", "precopy",
    "fdstore", "bind", "timeouts", "env",
}
_TIMEOUT_KEYS = {"ready", "drain", "quiesce", "restore", "idle_grace"}


def default_control_path(environ: Mapping[str, str] = os.environ) -> str:
    """Where the control socket lives when neither --control nor the file says.

    $SWAPD_CONTROL, else systemd's $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR, else
    /run/swapd for root, else /tmp/swapd-UID: the same order the CLI client uses,
    so `swapd status` finds a `swapd run` started the same way.
    """
    if environ.get("SWAPD_CONTROL"):
        return environ["SWAPD_CONTROL"]
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        base = environ.get(var, "").split(":")[0]
        if base:
            return os.path.join(base, "swapd.sock")
    if os.geteuid() == 0:
        return "/run/swapd/swapd.sock"
    return f"/tmp/swapd-{os.geteuid()}/swapd.sock"


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    _check_keys(path, data, _TOP_KEYS, "")
    for table in ("bind", "timeouts", "env"):
        if table in data and not isinstance(data[table], dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
    if "timeouts" in data:
        _check_keys(path, data["timeouts"], _TIMEOUT_KEYS, "timeouts.")
    return data


def _check_keys(path: str, data: Mapping[str, Any], known: set[str], prefix: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{path}: unknown key '{prefix}{key}' (known: {', '.join(sorted(known))})"
            )


def build(
    file_data: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Merge file settings and flag overrides into a validated Config.

    `overrides` uses the same keys as the file; `bind`, `timeouts` and `env` are
    merged key by key (a flag `--bind http=...` replaces only `http`).
    """
    where = config_file or "command line"
    merged: dict[str, Any] = {k: v for k, v in file_data.items() if k not in _TABLES}
    merged.update({k: v for k, v in overrides.items() if k not in _TABLES and v is not None})
    tables = {t: {**dict(file_data.get(t, {})), **dict(overrides.get(t) or {})} for t in _TABLES}

    command = merged.get("command")
    if command is None or command == [] or command == ():
        raise ConfigError(
            f"{where}: no worker command (give it after `--`, or `command = [...]` in the file)"
        )
    if not isinstance(command, list | tuple) or not all(isinstance(a, str) for a in command):
        raise ConfigError(f"{where}: command must be a list of strings")
    if any("\0" in a for a in command):
        raise ConfigError(f"{where}: command arguments cannot contain NUL characters")

    binds: list[tuple[str, Address]] = []
    for name, addr in tables["bind"].items():
        if not isinstance(addr, str):
            raise ConfigError(f"{where}: bind.{name} must be a string address")
        if name.startswith(RESERVED_PREFIX):
            raise ConfigError(f"{where}: listener name {name!r} is reserved ({RESERVED_PREFIX}*: "
                              "what swapd keeps in systemd's fd store)")
        try:
            binds.append((check_name(name), parse_address(addr)))
        except AddressError as e:
            raise ConfigError(f"{where}: {e}") from None

    workers = _int(where, "workers", merged.get("workers", 1), minimum=1)
    backlog = _int(where, "backlog", merged.get("backlog", 1024), minimum=1)
    mode = merged.get("mode", "stateless")
    if mode not in MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}, not {mode!r}")
    readiness = merged.get("readiness", "notify")
    if readiness not in READINESS:
        raise ConfigError(
            f"{where}: readiness must be one of {', '.join(READINESS)}, not {readiness!r}"
        )
    if mode == "stateful" and readiness == "exec":
        raise ConfigError(f"{where}: mode stateful needs readiness notify (a successor says "
                          "over swapd's channel when it stands by for state)")
    precopy = merged.get("precopy", False)
    fdstore = merged.get("fdstore", True)
    for key, flag in (("precopy", precopy), ("fdstore", fdstore)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{where}: {key} must be true or false")

    timeouts = Timeouts()
    for key, value in tables["timeouts"].items():
        if key not in _TIMEOUT_KEYS:
            raise ConfigError(f"{where}: unknown timeout {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{where}: timeouts.{key} must be a positive number of seconds")
        timeouts = replace(timeouts, **{key: float(value)})

    env: list[tuple[str, str]] = []
    for key, value in tables["env"].items():
        if not isinstance(value, str) or "=" in key or not key:
            raise ConfigError(f"{where}: env.{key} must be a string")
        if "\0" in key or "\0" in value:
            raise ConfigError(f"{where}: env.{key!r} cannot contain NUL characters")
        env.append((key, value))

    cwd = merged.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ConfigError(f"{where}: cwd must be a path")
    control = merged.get("control") or default_control_path(environ)
    if not isinstance(control, str):
        raise ConfigError(f"{where}: control must be a path")

    return Config(
        command=tuple(command),
        binds=tuple(binds),
        control=os.path.abspath(control),
        workers=workers,
        mode=mode,
        readiness=readiness,
        backlog=backlog,
        precopy=precopy,
        fdstore=fdstore,
        cwd=os.path.abspath(cwd) if cwd else None,
        env=tuple(env),
        timeouts=timeouts,
        config_file=os.path.abspath(config_file) if config_file else None,
    )


_TABLES = ("bind", "timeouts", "env")


def _int(where: str, key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {key} must be an integer >= {minimum}")
    return value


def load(
    config_file: str | None,
    overrides: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Read the file (if any) and merge the flags: what `run` and `reload` call."""
    data = read_file(config_file) if config_file else {}
    return build(data, overrides, config_file=config_file, environ=environ)


def to_overrides(config: Config) -> dict[str, Any]:
    """A Config as the flag dict `build()` takes: how a re-exec'd supervisor gets it back."""
    return {
        "command": list(config.command),
        "bind": {name: str(address) for name, address in config.binds},
        "control": config.control,
        "workers": config.workers,
        "mode": config.mode,
        "readiness": config.readiness,
        "backlog": config.backlog,
        "precopy": config.precopy,
        "fdstore": config.fdstore,
        "cwd": config.cwd,
        "env": dict(config.env),
        "timeouts": {k: getattr(config.timeouts, k) for k in sorted(_TIMEOUT_KEYS)},
    }


def from_overrides(data: Mapping[str, Any], config_file: str | None) -> Config:
    return build({}, data, config_file=config_file)
