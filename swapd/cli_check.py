"""What `swapd run` checks before it binds anything, and `swapd check` (like `nginx -t`):
the configuration, the worker command and its directory, and what the supervisor would
refuse at start that can be known without starting it. Nothing here binds, creates or
starts anything."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
from collections.abc import Sequence

from swapd.config import Config, ConfigError


def preflight(config: Config) -> None:
    """What `swapd run` refuses before it binds: ConfigError (one line) if anything is wrong."""
    _check_cwd(config.cwd)
    check_command(config.command, config.cwd, dict(config.env))


def check(config: Config) -> str:
    """Everything `swapd run` would refuse at start, short of binding and starting: the
    summary line of a configuration that passes, else ConfigError (one line)."""
    preflight(config)
    names = {name for name, _ in config.binds}
    health = config.health
    if health is not None and health[0] is not None and names and health[0] not in names:
        raise ConfigError(f"health_url {config.health_url}: no listener named {health[0]!r}")
    if config.metrics is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ConfigError("--metrics needs prometheus-client: pip install "
                              "'swapd[metrics]'") from None
    _check_control(config.control)
    listeners = (", ".join(f"{name}={address}" for name, address in config.binds)
                 or "none configured (only socket activation can give them)")
    return (f"{config.config_file or 'flags only'}: {config.workers} worker(s), {config.mode}, "
            f"listeners {listeners}, command {shlex.join(config.command)}")


def check_command(command: Sequence[str], cwd: str | None, env: dict[str, str]) -> None:
    program = command[0]
    path = env.get("PATH", os.environ.get("PATH", os.defpath))
    if os.sep in program:
        full = program if os.path.isabs(program) else os.path.join(cwd or os.getcwd(), program)
        found = full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    else:
        found = shutil.which(program, path=path)
    if found is None:
        raise ConfigError(f"worker command not found or not executable: {program}")


def _check_cwd(cwd: str | None) -> None:
    if cwd is None:
        return
    if not os.path.exists(cwd):
        raise ConfigError(f"cwd {cwd}: no such directory")
    if not os.path.isdir(cwd):
        raise ConfigError(f"cwd {cwd}: not a directory")


def _check_control(path: str) -> None:
    """What binding the control socket would refuse, known without binding it. A live
    socket of ours there is fine: it is the supervisor a `reload` will ask."""
    from swapd.control import _check_directory

    directory = os.path.dirname(path) or "."
    try:
        _check_directory(directory)
    except FileNotFoundError:
        return  # `swapd run` creates it (0700)
    except OSError as e:
        text = e.strerror or str(e)
        raise ConfigError(text if text.startswith("control socket") else
                          f"control socket directory {directory}: {text}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"control path {path} exists and is not a socket")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"control socket {path} belongs to uid {st.st_uid}, not to us")
