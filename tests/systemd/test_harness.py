"""The harness against real units (not swapd yet): socket activation, Type=notify, the fd store
across ``systemctl restart``, and the verify helper. Also proves swapd.systemd against a real
systemd 252."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from tests.systemd.harness import (
    CHECKOUT,
    BootedSystemd,
    BootError,
    CommandError,
    VerifyError,
    WaitTimeout,
    analyze_verify,
)

pytestmark = pytest.mark.systemd

# systemd refuses ListenStream=...:0, so the kernel cannot pick this port. The namespace has a
# network stack of its own with nothing else in it: a fixed port cannot collide with anything.
SOCKET_PORT = 18001

CLIENT = textwrap.dedent(
    """
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
        print(conn.makefile().readline().strip())
    """
)

ACTIVATED = textwrap.dedent(
    """
    import os, socket
    from swapd.systemd import Notifier, fds_by_name, listen_fds

    pairs = listen_fds()
    names = ",".join(name for name, _ in pairs)
    listener = socket.socket(fileno=fds_by_name(pairs)["http"][0])
    Notifier.from_env().ready(f"names={names}")
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(f"pid={os.getpid()} names={names}\\n".encode())
    """
)

STORING = textwrap.dedent(
    """
    import os, signal, socket
    from swapd.systemd import Notifier, fds_by_name, listen_fds

    notifier = Notifier.from_env()
    inherited = fds_by_name(listen_fds())
    if "http" in inherited:
        listener, origin = socket.socket(fileno=inherited["http"][0]), "stored"
    else:
        listener, origin = socket.create_server(("127.0.0.1", 0)), "fresh"
        assert notifier.fdstore([listener.fileno()], "http")
    port = listener.getsockname()[1]

    def forget(signum, frame):
        notifier.fdstore_remove("http")
        notifier.status(f"forgot port={port}")

    signal.signal(signal.SIGUSR1, forget)
    fdnames = os.environ.get("LISTEN_FDNAMES", "")
    notifier.ready(f"origin={origin} port={port} fdnames={fdnames}")
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(f"pid={os.getpid()} origin={origin}\\n".encode())
    """
)


def service(program: Path, **extra: str) -> str:
    lines = [
        "[Service]",
        "Type=notify",
        f"Environment=PYTHONPATH={CHECKOUT}",
        f"ExecStart={sys.executable} {program}",
        *(f"{k}={v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def ask(sd: BootedSystemd, port: int) -> str:
    client = sd.share / "client.py"
    if not client.exists():
        sd.write_share("client.py", CLIENT)
    return sd.run(sys.executable, str(client), "127.0.0.1", str(port), timeout=15).stdout.strip()


def status_field(text: str, key: str) -> str:
    return dict(item.split("=", 1) for item in text.split())[key]


def test_booted_as_pid1_in_its_own_namespaces(booted_systemd: BootedSystemd) -> None:
    sd = booted_systemd
    assert sd.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert sd.run("systemctl", "is-system-running").stdout.strip() == "running"
    assert sd.show("swapd-it.target", "ActiveState") == {"ActiveState": "active"}
    assert sd.run("hostname").stdout.strip() == "swapd-it"
    # systemd knows it is in a container (so it leaves clock, hostname and modules alone).
    assert b"container=swapd-it\0" in Path(f"/proc/{sd.pid1}/environ").read_bytes()
    assert sd.run("systemd-detect-virt", "--container").stdout.strip() == "container-other"
    for ns in ("pid", "mnt", "net", "uts", "ipc", "cgroup"):
        assert os.readlink(f"/proc/{sd.pid1}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert "127.0.0.1" in sd.run("ip", "-o", "addr", "show", "dev", "lo").stdout
    # The checkout is there (read-only), and so is the shared directory (read-write).
    assert sd.run("test", "-f", str(CHECKOUT / "swapd" / "systemd.py"), check=False).returncode == 0
    assert sd.run("touch", str(CHECKOUT / "swapd-it-probe"), check=False).returncode != 0
    sd.run("sh", "-c", f"echo inside > {sd.share}/probe")
    assert (sd.share / "probe").read_text() == "inside\n"
    # /tmp is a fresh tmpfs: the host's is untouched and invisible.
    assert sd.run("findmnt", "-n", "-o", "FSTYPE", "/tmp").stdout.strip() == "tmpfs"


def test_socket_activated_notify_service(booted_systemd: BootedSystemd) -> None:
    sd = booted_systemd
    program = sd.write_share("activated.py", ACTIVATED)
    sd.install_unit(
        "it-act.socket",
        f"[Socket]\nListenStream=127.0.0.1:{SOCKET_PORT}\nFileDescriptorName=http\n",
        reload=False,
    )
    sd.install_unit("it-act.service", service(program))
    sd.systemctl("start", "it-act.socket")
    assert sd.show("it-act.socket", "ActiveState", "FileDescriptorName") == {
        "ActiveState": "active",
        "FileDescriptorName": "http",
    }
    assert sd.show("it-act.service", "ActiveState")["ActiveState"] == "inactive"

    answer = ask(sd, SOCKET_PORT)  # the first connection starts the service

    state = sd.wait_for_unit("it-act.service", ActiveState="active", SubState="running")
    main_pid = sd.show("it-act.service", "MainPID")["MainPID"]
    status = sd.show("it-act.service", "StatusText")["StatusText"]
    assert status == "names=http", state
    # MainPID is a pid of the namespace; the program reports its own, seen from inside too.
    assert answer == f"pid={main_pid} names=http"
    assert ask(sd, SOCKET_PORT) == answer
    sd.systemctl("stop", "it-act.socket", "it-act.service")


def test_fd_store_keeps_the_listener_across_restart(booted_systemd: BootedSystemd) -> None:
    sd = booted_systemd
    program = sd.write_share("storing.py", STORING)
    sd.install_unit("it-store.service", service(program, FileDescriptorStoreMax="4"))
    sd.systemctl("start", "it-store.service")
    first = sd.wait_for_unit("it-store.service", ActiveState="active", NFileDescriptorStore="1")
    status = sd.show("it-store.service", "StatusText", "MainPID")
    assert status_field(status["StatusText"], "origin") == "fresh", first
    port = int(status_field(status["StatusText"], "port"))
    assert ask(sd, port) == f"pid={status['MainPID']} origin=fresh"

    sd.systemctl("restart", "it-store.service")
    sd.wait_for_unit("it-store.service", ActiveState="active", NFileDescriptorStore="1")
    again = sd.show("it-store.service", "StatusText", "MainPID")
    assert again["MainPID"] != status["MainPID"]
    assert again["StatusText"] == f"origin=stored port={port} fdnames=http"
    assert ask(sd, port) == f"pid={again['MainPID']} origin=stored"

    # FDSTOREREMOVE from the running service empties the store.
    sd.systemctl("kill", "--kill-who=main", "--signal=SIGUSR1", "it-store.service")
    sd.wait_for_unit("it-store.service", NFileDescriptorStore="0", StatusText=f"forgot port={port}")
    sd.systemctl("restart", "it-store.service")
    sd.wait_for_unit("it-store.service", ActiveState="active")
    assert status_field(sd.show("it-store.service", "StatusText")["StatusText"], "origin") == (
        "fresh"
    )
    sd.systemctl("stop", "it-store.service")
    # A stop releases the store.
    assert sd.show("it-store.service", "NFileDescriptorStore") == {"NFileDescriptorStore": "0"}


def test_run_failures_and_timeouts_are_reported(booted_systemd: BootedSystemd) -> None:
    sd = booted_systemd
    with pytest.raises(CommandError, match="exited 3"):
        sd.run("sh", "-c", "echo to-stderr >&2; exit 3")
    assert sd.run("sh", "-c", "exit 3", check=False).returncode == 3

    pid_file = sd.share / "sleeper.pid"
    with pytest.raises(CommandError, match="timed out"):
        sd.run("sh", "-c", f"echo $$ > {pid_file}; exec sleep 60", timeout=0.5)
    # The command was killed and reaped inside: nothing is left to hold the namespace up.
    inner_pid = pid_file.read_text().strip()
    assert sd.run("ps", "-o", "stat=", "-p", inner_pid, check=False).stdout.strip() == ""

    with pytest.raises(WaitTimeout, match=r"never true: not within 0\.05s"):
        sd.wait_for(lambda: False, timeout=0.05, what="never true")


def test_journal_and_unit_errors_are_diagnosable(booted_systemd: BootedSystemd) -> None:
    sd = booted_systemd
    unit = "[Service]\nType=notify\nExecStart=/bin/sh -c 'echo dying loudly; exit 7'\n"
    sd.install_unit("it-fail.service", unit)
    with pytest.raises(CommandError, match=r"Job for it-fail\.service failed"):
        sd.systemctl("start", "it-fail.service")
    assert sd.show("it-fail.service", "Result", "ExecMainStatus") == {
        "Result": "exit-code",
        "ExecMainStatus": "7",
    }
    assert "dying loudly" in sd.journal("it-fail.service")
    with pytest.raises(WaitTimeout, match="dying loudly"):
        sd.wait_for_unit("it-fail.service", timeout=0.1, ActiveState="active")
    sd.systemctl("reset-failed", "it-fail.service")


def test_second_instance_side_by_side_and_clean_teardown(booted_systemd: BootedSystemd) -> None:
    other = BootedSystemd()
    with other:
        assert other.pid1 != booted_systemd.pid1
        assert other.run("systemctl", "is-system-running").stdout.strip() == "running"
        cgroup, state_dir, unshare = other.cgroup, other.state_dir, other.unshare_pid
        assert cgroup is not None and cgroup.is_dir()
        assert state_dir is not None and state_dir.is_dir()
        assert unshare is not None
    assert not other.alive()
    assert not Path(f"/proc/{unshare}").exists()  # exited and reaped
    assert not cgroup.exists()
    assert not state_dir.exists()
    assert not other.timings.killed, "poweroff did not finish within poweroff_timeout"
    # The module's instance is unaffected.
    assert booted_systemd.alive() and booted_systemd.cgroup is not None
    assert booted_systemd.cgroup.is_dir()
    assert booted_systemd.show("swapd-it.target", "ActiveState") == {"ActiveState": "active"}


def test_slow_poweroff_is_cut_short_by_a_kill(systemd_bootable: None) -> None:
    instance = BootedSystemd(poweroff_timeout=0)
    with instance:
        cgroup, state_dir = instance.cgroup, instance.state_dir
    assert instance.timings.killed
    assert not instance.alive()
    assert cgroup is not None and not cgroup.exists()
    assert state_dir is not None and not state_dir.exists()


def test_boot_failure_says_why_and_leaves_nothing(systemd_bootable: None, tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    instance = BootedSystemd(ro_binds=[missing])
    with pytest.raises(BootError) as info:
        instance.boot()
    message = str(info.value)
    assert "namespace died while waiting for systemd to become PID 1" in message
    assert "--- boot.log ---" in message and str(missing) in message
    assert not instance.alive()
    assert instance.cgroup is None and instance.state_dir is None


def test_analyze_verify_fails_on_any_warning(tmp_path: Path) -> None:
    good = tmp_path / "it-good.service"
    good.write_text("[Service]\nType=notify\nExecStart=/bin/true\n")
    assert analyze_verify([good]) == []

    bad = tmp_path / "it-bad.service"
    bad.write_text("[Service]\nType=notify\nExecStart=/bin/true\nNoSuchKey=1\n")
    with pytest.raises(VerifyError, match="Unknown key 'NoSuchKey'"):
        analyze_verify([bad])
    assert analyze_verify([bad], accept=[r"Unknown key 'NoSuchKey'"]) == [
        f"{bad}:4: Unknown key 'NoSuchKey' in section [Service], ignoring."
    ]

    missing = tmp_path / "it-missing.service"
    missing.write_text("[Service]\nExecStart=/nonexistent/swapd run\n")
    with pytest.raises(VerifyError, match="is not executable"):
        analyze_verify([missing], accept=[".*"])  # exit status 1 fails even when accepted
