"""Configuration: a TOML file and command-line flags merged into one frozen Config.

Flags win over the file. `reload` re-reads the file and re-applies the flags the
supervisor was started with, so a flag given at start keeps winning.

    # swapd.toml
    command = ["python", "app.py"]
    # or, for an ASGI/WSGI app: app = "main:app" (the worker command becomes
    # `<this python> -m swapd serve main:app <app_args>`), app_args = ["--root-path", "/api"]
    workers = 2
    mode = "stateless"          # or "stateful": every swap hands state over
    control = "/run/swapd/app.sock"
    cwd = "/srv/app"
    readiness = "notify"        # or "exec": ready once exec succeeded; or "probe":
    probe = "http:/healthz"     #   ready once this probe passes ("tcp": once it accepts)
    backlog = 1024
    precopy = false             # stateful: ship bulk state before the pause
    fdstore = true              # under systemd: keep listeners (and state) in the fd store
    watch = 0                   # seconds the old generation is held after a swap (rollback)
    health_url = "/healthz"     # [LISTENER:]PATH probed over the listener during a watch
    health_interval = 1.0       # seconds between probes
    health_failures = 3         # consecutive failed probes that roll back
    worker_output = "prefixed"  # or "passthrough": the workers write to our stdout/stderr
    state_dir = "/var/lib/swapd/app"   # the history (default: see swapd.supervisor.history)
    metrics = "127.0.0.1:9100"  # Prometheus endpoint (off unless given)

    [bind]
    http = "127.0.0.1:8000"

    [timeouts]                  # seconds
    ready = 30
    drain = 30
    quiesce = 10
    restore = 30
    idle_grace = 1.0            # idle keep-alive connections a draining worker may close
    probe = 2.0                 # one probe attempt (readiness = "probe")

    [env]
    APP_ENV = "prod"
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from swapd.sockets import RESERVED_PREFIX, Address, AddressError, check_name, parse_address

Mode = Literal["stateless", "stateful"]
Readiness = Literal["notify", "exec", "probe"]
WorkerOutput = Literal["prefixed", "passthrough"]
MODES: tuple[Mode, ...] = ("stateless", "stateful")
READINESS: tuple[Readiness, ...] = ("notify", "exec", "probe")
WORKER_OUTPUT: tuple[WorkerOutput, ...] = ("prefixed", "passthrough")
_PROBE_PATH_MAX = 1024
MAX_SECONDS = 10**7  # any duration in seconds, file or flag: four months is already a typo
_HEALTH_URL = re.compile(r"(?:([A-Za-z0-9_.-]{1,64}):)?(/[\x21-\x7e]{0,1000})")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line for the operator."""


@dataclass(frozen=True)
class Timeouts:
    ready: float = 30.0
    drain: float = 30.0
    quiesce: float = 10.0
    restore: float = 30.0
    idle_grace: float = 1.0
    probe: float = 2.0


@dataclass(frozen=True)
class Config:
    command: tuple[str, ...]
    binds: tuple[tuple[str, Address], ...]
    control: str
    workers: int = 1
    mode: Mode = "stateless"
    readiness: Readiness = "notify"
    probe: str | None = None  # "tcp" or "http:/path", with readiness = "probe"
    backlog: int = 1024
    precopy: bool = False
    fdstore: bool = True
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    config_file: str | None = None
    watch: float = 0.0  # seconds the old generation is held after a commit; 0 = drained at once
    health_url: str | None = None  # "[LISTENER:]/path", probed during a watch window
    health_interval: float = 1.0
    health_failures: int = 3
    worker_output: WorkerOutput = "prefixed"
    state_dir: str | None = None
    metrics: str | None = None  # "HOST:PORT" of the Prometheus endpoint

    @property
    def health(self) -> tuple[str | None, str] | None:
        """(listener name or None for the first, path) of `health_url`, if set."""
        if self.health_url is None:
            return None
        found = _HEALTH_URL.fullmatch(self.health_url)
        assert found is not None  # checked by build()
        return found.group(1), found.group(2)
    app: str | None = None  # `swapd serve` this app (then `command` is derived from it)
    app_args: tuple[str, ...] = ()


_TOP_KEYS = {
    "command", "workers", "mode", "control", "cwd", "readiness", "backlog", "precopy",
    "fdstore", "bind", "timeouts", "env", "probe", "watch", "health_url", "health_interval",
    "health_failures", "worker_output", "state_dir", "metrics", "app", "app_args",
}
_TIMEOUT_KEYS = {"ready", "drain", "quiesce", "restore", "idle_grace", "probe"}


def serve_command(app: str, args: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The worker command of `--app`: swapd serve, with the interpreter running swapd."""
    return (sys.executable, "-m", "swapd", "serve", app, *args)


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
            hint = _suggest(key, known, prefix)
            raise ConfigError(f"{path}: unknown key '{prefix}{key}'"
                              + (f": {hint}" if hint else
                                 f" (known: {', '.join(sorted(known))})"))


# Flags whose file key is not the flag's name with `_` for `-` (README, "swapd run options").
_FLAG_KEYS = {**{f"{k}_timeout": f"[timeouts] {k}"
                 for k in ("ready", "drain", "quiesce", "restore", "probe")},
              "no_fdstore": "fdstore = false", "listen": "[bind] NAME = ADDR"}
_FLAG_ONLY = {"release": "--release (or $SWAPD_RELEASE)", "log_level": "--log-level",
              "log_format": "--log-format", "config": "--config"}


def _suggest(key: str, known: set[str], prefix: str) -> str | None:
    """What an unknown key probably meant: a flag's name, a key of another table, a typo."""
    name = key.replace("-", "_")
    if prefix == "timeouts.":
        if name in _TOP_KEYS:
            return f"{key} is a top-level key: move it above [timeouts]"
        name = name.removesuffix("_timeout")
        if name in known:
            return f"did you mean {name}?"
    else:
        if name in _FLAG_KEYS:
            return f"did you mean {_FLAG_KEYS[name]}?"
        if name in _TIMEOUT_KEYS:
            return f"did you mean [timeouts] {name}?"
        if name in _FLAG_ONLY:
            return f"{key} is not a file key: give {_FLAG_ONLY[name]}"
        if name in known:
            return f"did you mean {name}?"
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {close[0]}?" if close else None


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

    def misplaced(table: str, key: str) -> str:
        return _misplaced(file_data, overrides, table, key)

    merged: dict[str, Any] = {k: v for k, v in file_data.items() if k not in _TABLES}
    merged.update({k: v for k, v in overrides.items() if k not in _TABLES and v is not None})
    tables = {t: {**dict(file_data.get(t, {})), **dict(overrides.get(t) or {})} for t in _TABLES}

    command = merged.get("command")
    app = merged.get("app")
    app_args: tuple[str, ...] = ()
    if app is not None:
        if not isinstance(app, str) or ":" not in app or not all(app.partition(":")[::2]):
            raise ConfigError(f"{where}: app must be MODULE:ATTRIBUTE (e.g. main:app), "
                              f"not {app!r}")
        if "app" not in overrides and "command" in file_data:
            raise ConfigError(f"{where}: give either command or app (with app_args), not both")
        # With an app, what follows `--` on the command line are `swapd serve` options.
        extra = overrides.get("command")
        if extra is None:
            extra = merged.get("app_args", [])
        if not isinstance(extra, list | tuple) or not all(isinstance(a, str) for a in extra):
            raise ConfigError(f"{where}: app_args must be a list of strings")
        app_args = tuple(extra)
        command = list(serve_command(app, app_args))
    if command is None or command == [] or command == ():
        raise ConfigError(
            f"{where}: no worker command (give it after `--`, or `command = [...]` in the file)"
            + (misplaced("bind", "command") or misplaced("env", "command"))
        )
    if not isinstance(command, list | tuple) or not all(isinstance(a, str) for a in command):
        raise ConfigError(f"{where}: command must be a list of strings")
    if any("\0" in a for a in command):
        raise ConfigError(f"{where}: command arguments cannot contain NUL characters")

    binds: list[tuple[str, Address]] = []
    for name, addr in tables["bind"].items():
        if not isinstance(addr, str):
            raise ConfigError(f"{where}: bind.{name} must be a string address"
                              + misplaced("bind", name))
        if name.startswith(RESERVED_PREFIX):
            raise ConfigError(f"{where}: listener name {name!r} is reserved ({RESERVED_PREFIX}*: "
                              "what swapd keeps in systemd's fd store)")
        try:
            check_name(name)
        except AddressError as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            binds.append((name, parse_address(addr)))
        except AddressError as e:
            raise ConfigError(f"{where}: bind.{name}: {e}{misplaced('bind', name)}") from None

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
    probe = _probe(where, merged.get("probe"), readiness)
    if mode == "stateful" and readiness != "notify":
        raise ConfigError(f"{where}: mode stateful needs readiness notify (a successor says "
                          f"over swapd's channel when it stands by for state), not {readiness!r}")
    precopy = merged.get("precopy", False)
    fdstore = merged.get("fdstore", True)
    for key, flag in (("precopy", precopy), ("fdstore", fdstore)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{where}: {key} must be true or false")

    timeouts = Timeouts()
    for key, value in tables["timeouts"].items():
        if key not in _TIMEOUT_KEYS:
            raise ConfigError(f"{where}: unknown timeout {key!r}")
        # bounded like every other duration: an infinite one would overflow every deadline
        # computed from it (the client's wait, systemd's EXTEND_TIMEOUT_USEC)
        timeouts = replace(timeouts, **{key: _seconds(where, f"timeouts.{key}", value)})

    env: list[tuple[str, str]] = []
    for key, value in tables["env"].items():
        if not isinstance(value, str) or "=" in key or not key:
            raise ConfigError(f"{where}: env.{key} must be a string" + misplaced("env", key))
        if "\0" in key or "\0" in value:
            raise ConfigError(f"{where}: env.{key!r} cannot contain NUL characters")
        env.append((key, value))

    cwd = merged.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ConfigError(f"{where}: cwd must be a path")
    watch = _seconds(where, "watch", merged.get("watch", 0.0), zero=True)
    health_interval = _seconds(where, "health_interval", merged.get("health_interval", 1.0))
    health_failures = _int(where, "health_failures", merged.get("health_failures", 3),
                           minimum=1)
    health_url = merged.get("health_url")
    if health_url is not None and (not isinstance(health_url, str)
                                   or not _HEALTH_URL.fullmatch(health_url)):
        raise ConfigError(f"{where}: health_url must be [LISTENER:]/PATH (printable ASCII, no "
                          f"spaces), not {health_url!r}")
    worker_output = merged.get("worker_output", "prefixed")
    if worker_output not in WORKER_OUTPUT:
        raise ConfigError(f"{where}: worker_output must be one of {', '.join(WORKER_OUTPUT)}, "
                          f"not {worker_output!r}")
    state_dir = merged.get("state_dir")
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir):
        raise ConfigError(f"{where}: state_dir must be a path")
    metrics = merged.get("metrics")
    if metrics is not None:
        metrics = metrics_address(where, metrics)
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
        probe=probe,
        backlog=backlog,
        precopy=precopy,
        fdstore=fdstore,
        cwd=os.path.abspath(cwd) if cwd else None,
        env=tuple(env),
        timeouts=timeouts,
        config_file=os.path.abspath(config_file) if config_file else None,
        watch=watch,
        health_url=health_url,
        health_interval=health_interval,
        health_failures=health_failures,
        worker_output=worker_output,
        state_dir=os.path.abspath(state_dir) if state_dir else None,
        metrics=metrics,
        app=app,
        app_args=app_args,
    )


def _misplaced(file_data: Mapping[str, Any], overrides: Mapping[str, Any], table: str,
               key: str) -> str:
    """A hint for a top-level key written below a table's header in the file (a classic TOML
    slip: every key after `[bind]`, up to the next header, is in that table)."""
    if (key in _TOP_KEYS and key in dict(file_data.get(table) or {})
            and key not in dict(overrides.get(table) or {})):
        return f" ({key} is a top-level key: in the file, put it above [{table}])"
    return ""


def metrics_address(where: str, value: Any) -> str:
    """`HOST:PORT`, `[V6]:PORT` or a bare `PORT` (then on 127.0.0.1), normalised."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: metrics must be HOST:PORT")
    text = f"127.0.0.1:{value}" if value.isascii() and value.isdigit() else value
    try:
        address = parse_address(text)
    except AddressError as e:
        raise ConfigError(f"{where}: metrics: {e}") from None
    if address.is_unix:
        raise ConfigError(f"{where}: metrics must be a TCP address (HOST:PORT), not {value!r}")
    return str(address)


def _seconds(where: str, key: str, value: Any, *, zero: bool = False) -> float:
    """A finite number of seconds, > 0 (>= 0 with `zero`), at most MAX_SECONDS."""
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not (value >= 0 if zero else value > 0) or not value <= MAX_SECONDS):
        kind = "a number of seconds >= 0" if zero else "a positive number of seconds"
        raise ConfigError(f"{where}: {key} must be {kind} (at most {MAX_SECONDS})")
    return float(value)


_TABLES = ("bind", "timeouts", "env")


def _probe(where: str, value: Any, readiness: str) -> str | None:
    """`tcp` or `http:/path`, given exactly when readiness is "probe"."""
    if value is None:
        if readiness == "probe":
            raise ConfigError(f"{where}: readiness 'probe' needs a probe: 'http:/PATH' (ready on "
                              "a 2xx or 3xx answer) or 'tcp' (ready once the worker accepts)")
        return None
    if readiness != "probe":
        raise ConfigError(f"{where}: probe {value!r} is only used with readiness 'probe', "
                          f"not {readiness!r}")
    if value == "tcp":
        return "tcp"
    path = value[len("http:"):] if isinstance(value, str) and value.startswith("http:") else None
    if (path is None or not path.startswith("/") or len(path) > _PROBE_PATH_MAX
            or not all("!" <= c <= "~" for c in path)):
        raise ConfigError(f"{where}: probe must be 'tcp' or 'http:/PATH' (a path of printable "
                          f"ASCII, no spaces), not {value!r}")
    return str(value)


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
    data: dict[str, Any] = {
        "command": list(config.command),
        "bind": {name: str(address) for name, address in config.binds},
        "control": config.control,
        "workers": config.workers,
        "mode": config.mode,
        "readiness": config.readiness,
        "probe": config.probe,
        "backlog": config.backlog,
        "precopy": config.precopy,
        "fdstore": config.fdstore,
        "cwd": config.cwd,
        "env": dict(config.env),
        "timeouts": {k: getattr(config.timeouts, k) for k in sorted(_TIMEOUT_KEYS)},
        "watch": config.watch,
        "health_url": config.health_url,
        "health_interval": config.health_interval,
        "health_failures": config.health_failures,
        "worker_output": config.worker_output,
        "state_dir": config.state_dir,
        "metrics": config.metrics,
    }
    if config.app is not None:  # the command is derived again (with the new interpreter)
        data.update(command=None, app=config.app, app_args=list(config.app_args))
    return data


def from_overrides(data: Mapping[str, Any], config_file: str | None) -> Config:
    return build({}, data, config_file=config_file)
