"""The shipped unit files (``systemd/``): ``systemd-analyze verify`` clean of any warning, and the
swapd@ pair driven by a real systemd 252 with a stand-in for the swapd binary.

verify fails when an ``ExecStart=`` binary does not exist, and the units name the system-wide
install path, ``/usr/local/bin/swapd``. The tests verify a copy in which that path is rewritten
to the venv's ``swapd`` entry point (still a real executable, so the check keeps its teeth) and,
on the booted systemd, to a stand-in that speaks swapd's side of the unit contract.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.systemd.harness import CHECKOUT, BootedSystemd, CommandError, analyze_verify

UNITS_DIR = CHECKOUT / "systemd"
SHIPPED_EXE = "/usr/local/bin/swapd"
UNIT_FILES = sorted(p.name for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".socket"))

# systemd 252 does not know these (253 does): the only warnings the 253+ variant may draw.
PRE_253_WARNINGS = [
    r":\d+: Failed to parse service type, ignoring: notify-reload$",
    r":\d+: Unknown key 'ReloadSignal' in section \[Service\], ignoring\.$",
]


def systemd_version() -> int:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=True)
    match = re.match(r"systemd (\d+)", out.stdout)
    assert match, out.stdout
    return int(match.group(1))


def stage_units(directory: Path, exe: str) -> Path:
    """Copy the shipped units into ``directory`` with the swapd path replaced by ``exe``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in UNIT_FILES:
        text = (UNITS_DIR / name).read_text()
        if name.endswith(".service"):
            # Guard the rewrite: it must hit ExecStart (and ExecReload where there is one).
            assert re.search(rf"^ExecStart={re.escape(SHIPPED_EXE)} run ", text, re.M), name
        (directory / name).write_text(text.replace(SHIPPED_EXE, exe))
    return directory


def venv_swapd() -> str:
    script = Path(sys.executable).with_name("swapd")
    return str(script) if script.exists() else "/bin/true"


def instance(template: str) -> str:
    """``swapd@.service`` -> ``swapd@demo.service``: verify loads the template for it."""
    return template.replace("@.", "@demo.")


def test_the_unit_files_are_there() -> None:
    assert set(UNIT_FILES) >= {
        "swapd@.service",
        "swapd@.socket",
        "swapd-notify-reload@.service",
    }


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_verifies_without_warnings(name: str, tmp_path: Path) -> None:
    staged = stage_units(tmp_path, venv_swapd())
    accept = PRE_253_WARNINGS if "notify-reload" in name and systemd_version() < 253 else []
    warnings = analyze_verify([staged / instance(name)], accept=accept)
    if accept:
        # Exactly one of each: the 253-only lines, and nothing else.
        assert len(warnings) == len(accept), warnings
        for pattern in accept:
            assert sum(bool(re.search(pattern, w)) for w in warnings) == 1, (pattern, warnings)
    else:
        assert warnings == []


def test_socket_and_service_verify_together(tmp_path: Path) -> None:
    staged = stage_units(tmp_path, venv_swapd())
    assert analyze_verify([staged / "swapd@demo.socket", staged / "swapd@demo.service"]) == []


# --- on a real systemd ----------------------------------------------------------------------------

# Speaks swapd's side of the unit contract, nothing more: `run` binds the control socket where
# ExecStart says, takes the "http" listener from socket activation (or binds one), sends READY=1;
# `reload` asks it for a swap over the control socket and exits with the outcome.
STAND_IN = textwrap.dedent(
    """
    import argparse, os, socket, sys, threading
    sys.path.insert(0, {checkout!r})
    from swapd.systemd import Notifier, fds_by_name, listen_fds

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run", "reload"])
    parser.add_argument("--config")
    parser.add_argument("--control", required=True)
    args = parser.parse_args()

    if args.command == "reload":
        with socket.socket(socket.AF_UNIX) as ctl:
            ctl.connect(args.control)
            ctl.sendall(b"reload\\n")
            answer = ctl.makefile().readline().strip()
        print(answer)
        sys.exit(0 if answer == "committed" else 1)

    notifier = Notifier.from_env()
    generation = 1
    inherited = fds_by_name(listen_fds())
    if "http" in inherited:
        http = socket.socket(fileno=inherited["http"][0])
    else:
        http = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            conn, _ = http.accept()
            with conn:
                conn.sendall(f"generation {{generation}}\\n".encode())

    threading.Thread(target=serve, daemon=True).start()
    control = socket.socket(socket.AF_UNIX)
    control.bind(args.control)
    control.listen()
    notifier.ready(f"generation {{generation}} config={{args.config}}")
    while True:
        conn, _ = control.accept()
        with conn:
            conn.makefile().readline()
            notifier.reloading(f"swapping to generation {{generation + 1}}")
            if os.path.exists(os.path.join(os.path.dirname(__file__), "fail-next-swap")):
                notifier.ready(f"generation {{generation}} (swap failed)")
                conn.sendall(b"failed\\n")
                continue
            generation += 1
            notifier.ready(f"generation {{generation}}")
            conn.sendall(b"committed\\n")
    """
)

HTTP_PORT = 8080  # swapd@.socket's example address; the namespace's network is private


def ask(sd: BootedSystemd, port: int) -> str:
    code = (
        "import socket, sys\n"
        "with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10) as c:\n"
        "    print(c.makefile().readline().strip())\n"
    )
    return sd.run(sys.executable, "-c", code, str(port), timeout=15).stdout.strip()


@pytest.mark.systemd
def test_shipped_units_on_real_systemd(booted_systemd: BootedSystemd) -> None:
    sd = booted_systemd
    stand_in = sd.write_share("swapd", f"#!{sys.executable}\n" + STAND_IN.format(
        checkout=str(CHECKOUT)), mode=0o755)  # fmt: skip
    staged = stage_units(sd.share / "units", str(stand_in))
    for name in ("swapd@.service", "swapd@.socket"):
        sd.install_unit(name, (staged / name).read_text(), reload=False)
    sd.daemon_reload()

    # a: socket-activated; b: binds its own listener. Both from the same template.
    sd.systemctl("start", "swapd@a.socket", "swapd@b.service")
    assert ask(sd, HTTP_PORT) == "generation 1"
    sd.wait_for_unit("swapd@a.service", ActiveState="active")
    props = sd.show(
        "swapd@a.service",
        "Type", "NotifyAccess", "KillMode", "TimeoutStopUSec", "FileDescriptorStoreMax",
        "RuntimeDirectory", "Restart", "StatusText",
    )  # fmt: skip
    assert props == {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "mixed",
        "TimeoutStopUSec": "1min",
        "FileDescriptorStoreMax": "256",
        "RuntimeDirectory": "swapd/a",
        "Restart": "on-failure",
        "StatusText": "generation 1 config=/etc/swapd/a.toml",
    }

    # ExecReload is synchronous: when `systemctl reload` returns, the swap is done...
    sd.systemctl("reload", "swapd@a.service")
    assert sd.show("swapd@a.service", "StatusText") == {"StatusText": "generation 2"}
    assert ask(sd, HTTP_PORT) == "generation 2"
    # ...and a failed swap fails the reload, with the service still serving.
    (sd.share / "fail-next-swap").touch()
    with pytest.raises(CommandError, match=r"Job for swapd@a\.service failed"):
        sd.systemctl("reload", "swapd@a.service")
    (sd.share / "fail-next-swap").unlink()
    assert sd.show("swapd@a.service", "ActiveState", "StatusText") == {
        "ActiveState": "active",
        "StatusText": "generation 2 (swap failed)",
    }
    assert ask(sd, HTTP_PORT) == "generation 2"

    # Each instance has its own runtime directory: stopping b leaves a's control socket alone.
    assert sd.run("test", "-S", "/run/swapd/a/swapd.sock", check=False).returncode == 0
    assert sd.run("test", "-S", "/run/swapd/b/swapd.sock", check=False).returncode == 0
    sd.systemctl("stop", "swapd@b.service")
    assert sd.run("test", "-e", "/run/swapd/b", check=False).returncode != 0
    assert sd.run("test", "-S", "/run/swapd/a/swapd.sock", check=False).returncode == 0
    sd.systemctl("reload", "swapd@a.service")
    assert sd.show("swapd@a.service", "StatusText") == {"StatusText": "generation 3"}

    sd.systemctl("stop", "swapd@a.socket", "swapd@a.service")
    assert sd.show("swapd@a.service", "ActiveState", "Result") == {
        "ActiveState": "inactive",
        "Result": "success",
    }
