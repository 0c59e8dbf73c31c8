"""The real swapd under the shipped units (``systemd/swapd@.service``, ``swapd@.socket``) on a
real systemd 252 booted as PID 1: socket activation, reload, failed reload, watchdog, restart and
crash with the fd store, stateful restart, ``upgrade --self``, and the unit's own settings.

What is installed is the shipped units byte for byte (see swapd_units.py); each test runs its
own instance of the template with a configuration file of its own. The only unit settings the
tests add are these drop-ins, and ``test_the_units_tested_are_the_units_shipped`` checks that
nothing else differs:

    swapd@wd.service.d/test.conf      WatchdogSec=2       (shipped as a comment: #WatchdogSec=30s)
    swapd@wdswap.service.d/test.conf  WatchdogSec=6       (likewise)

Loads run inside the namespace (swapd_units.InnerLoad) while the test drives systemd; each
waits for successes after the operation, so it measures across it, never beside it. Ports are
fixed numbers: the namespace has a network of its own, and systemd refuses port 0.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.systemd.harness import BootedSystemd
from tests.systemd.swapd_units import (
    COUNTER,
    HELLO,
    MISBEHAVE,
    PYTHON,
    SHIPPED_DIR,
    SHIPPED_EXE,
    InnerLoad,
    InnerProcess,
    Swapd,
    exec_argv,
    install_shipped_units,
    toml,
)

pytestmark = pytest.mark.systemd

SOCKET_PORT = 8080  # swapd@.socket's shipped ListenStream=127.0.0.1:8080, used as shipped

TEST_DROP_INS = {
    "wd": "[Service]\nWatchdogSec=2\n",
    "wdswap": "[Service]\nWatchdogSec=6\n",
}


@dataclass
class Instance:
    """One test's instance of the template: its port and configuration."""

    name: str
    port: int
    config: Callable[[Path], str]  # share directory -> TOML text


def _hello(port: int, workers: int = 2) -> Callable[[Path], str]:
    return lambda share: toml([PYTHON, HELLO], workers=workers,
                              bind={"http": f"127.0.0.1:{port}"})  # fmt: skip


def _misbehave(name: str, port: int, workers: int) -> Callable[[Path], str]:
    return lambda share: toml([PYTHON, MISBEHAVE], workers=workers,
                              bind={"http": f"127.0.0.1:{port}"},
                              env={"BEHAVIOR": str(share / f"{name}-behavior.json")})  # fmt: skip


INSTANCES = {
    i.name: i
    for i in [
        # Socket-activated: no [bind], the listener comes from swapd@act.socket.
        Instance("act", SOCKET_PORT, lambda share: toml([PYTHON, HELLO], workers=2)),
        Instance("reload", 18110, _hello(18110)),
        Instance("gate", 18115, _misbehave("gate", 18115, workers=1)),
        Instance("bad", 18120, _misbehave("bad", 18120, workers=2)),
        Instance("wd", 18130, _hello(18130)),
        Instance("wdswap", 18135, _hello(18135)),
        Instance("rst", 18140, _hello(18140)),
        Instance("crash", 18145, _hello(18145)),
        Instance(
            "state",
            18150,
            lambda share: toml(
                [PYTHON, COUNTER], workers=1, mode="stateful", bind={"http": "127.0.0.1:18150"}
            ),
        ),
        Instance("self", 18160, _hello(18160)),
        Instance("main", 18170, _misbehave("main", 18170, workers=2)),
    ]
}


@pytest.fixture(scope="module")
def units(booted_systemd: BootedSystemd) -> BootedSystemd:
    """The shipped units, every instance's configuration and the declared drop-ins, installed."""
    sd = booted_systemd
    install_shipped_units(sd)
    for inst in INSTANCES.values():
        s = Swapd(sd, inst.name)
        s.configure(inst.config(sd.share))
        if inst.name in TEST_DROP_INS:
            s.drop_in("test.conf", TEST_DROP_INS[inst.name])
    sd.daemon_reload()
    return sd


@pytest.fixture
def swapd(units: BootedSystemd) -> Iterator[Callable[[str], Swapd]]:
    """``swapd(name)`` -> that instance; every instance a test touched is stopped afterwards."""
    used: list[Swapd] = []

    def get(name: str) -> Swapd:
        s = Swapd(units, name)
        used.append(s)
        return s

    yield get
    for s in used:
        s.stop()


def behave(sd: BootedSystemd, name: str, **behavior: Any) -> None:
    """What misbehave.py does in the next generation of instance ``name``."""
    sd.write_share(f"{name}-behavior.json", json.dumps(behavior))


def start(s: Swapd) -> int:
    """Start the service (returns once READY=1 made it active); its MainPID."""
    s.systemctl("start")
    s.wait_for(ActiveState="active", SubState="running")
    return s.main_pid()


def status_line(gen: int, workers: int) -> str:
    """The StatusText swapd sends with READY=1 (supervisor._status_line)."""
    return f"gen {gen} active, {workers} worker(s)"


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a load report worth a look; printed (pytest shows them on failure)."""
    keys = ("attempts", "ok", "failed", "failures", "longest_gap", "connections_opened")
    figures = {k: report[k] for k in keys}
    figures["windows"] = {w["label"]: w["failed"] for w in report["windows"]}
    print(json.dumps(figures))
    return figures


def assert_no_failures(report: dict[str, Any]) -> None:
    summary(report)
    assert report["failed"] == 0, (report["failures"], report["details"])
    assert report["ok"] > 0 and report["stop_reason"] == "stopped", report


# --- 1. socket activation -------------------------------------------------------------------------


def test_socket_activation_starts_swapd_which_adopts_the_fd_by_name(
    swapd: Callable[[str], Swapd],
) -> None:
    s = swapd("act")
    sd = s.sd
    sd.systemctl("start", s.socket_unit)
    assert sd.show(s.socket_unit, "ActiveState", "FileDescriptorName", "Listen") == {
        "ActiveState": "active",
        "FileDescriptorName": "http",
        "Listen": f"127.0.0.1:{SOCKET_PORT} (Stream)",
    }
    assert s.show("ActiveState")["ActiveState"] == "inactive"

    # The first connection starts the service; it is answered by one of swapd's workers.
    [(code, body)] = s.http(SOCKET_PORT)
    served_by = re.fullmatch(r"hello from pid (\d+) \(v1\)\n", body)
    assert code == 200 and served_by, (code, body)

    props = s.wait_for(ActiveState="active", SubState="running")
    main_pid = s.main_pid()
    status = s.status()
    assert status["pid"] == main_pid
    assert int(served_by.group(1)) in s.worker_pids()
    # The configuration binds nothing: the one listener is the socket unit's, found by its
    # FileDescriptorName= in LISTEN_FDNAMES.
    assert {k: v for k, v in s.environ(main_pid).items() if k.startswith("LISTEN_")} == {
        "LISTEN_PID": str(main_pid),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "http",
    }
    assert status["listeners"] == [
        {"name": "http", "address": f"127.0.0.1:{SOCKET_PORT}",
         "configured": f"127.0.0.1:{SOCKET_PORT}", "fd": 3, "source": "systemd",
         "listening": True},
    ], props  # fmt: skip
    # ...and it is the very socket PID 1 listens on, not one of swapd's own.
    pid1_sockets = set(sd.run("sh", "-c", "readlink /proc/1/fd/*").stdout.split())
    assert s.socket_inode(main_pid, 3) in pid1_sockets
    assert s.show("StatusText", "TriggeredBy") == {
        "StatusText": status_line(status["active"], 2),
        "TriggeredBy": s.socket_unit,
    }
    assert status["active"] == 1


# --- 2. systemctl reload --------------------------------------------------------------------------


def test_reload_returns_only_once_the_swap_is_done(swapd: Callable[[str], Swapd]) -> None:
    """The next generation is held before ready: `systemctl reload` must still be waiting."""
    s = swapd("gate")
    sd = s.sd
    behave(sd, "gate")
    start(s)
    fifo = sd.share / "gate-fifo"
    os.mkfifo(f"{fifo}-0")  # one per worker slot; misbehave.py reads "<gate>-<slot>"
    behave(sd, "gate", gate=str(fifo), version="v2")

    reload = InnerProcess(sd, ["systemctl", "reload", s.unit], bound=60)
    try:
        swapping = sd.wait_for(lambda: s.status()["swap"], 15, "the swap to be in flight")
        assert swapping["kind"] == "reload" and swapping["gen"] == 2, swapping
        assert s.show("SubState")["SubState"] == "reload"
        assert reload.proc.poll() is None, "systemctl reload returned while the swap was held"
        assert s.status()["active"] == 1

        with open(f"{fifo}-0", "w") as gate:  # blocks until the held worker reads it
            gate.write("go\n")
        assert reload.proc.wait(timeout=30) == 0, reload.stderr()
        status = s.status()
        assert status["active"] == 2 and status["swap"] is None
        assert s.show("SubState", "StatusText") == {
            "SubState": "running",
            "StatusText": status_line(2, 1),
        }
        [(code, body)] = s.http(INSTANCES["gate"].port)
        assert body.startswith("v2 "), (code, body)
    finally:
        reload.close()


def test_reload_under_load_keeps_the_main_pid_and_fails_no_request(
    swapd: Callable[[str], Swapd],
) -> None:
    s = swapd("reload")
    main_pid = start(s)
    load = InnerLoad(s.sd, INSTANCES["reload"].port, mode="keepalive", clients=8)
    try:
        for i in (1, 2, 3):
            before = s.worker_pids()
            with load.window(f"reload {i}"):
                s.systemctl("reload")
            # Right after `systemctl reload` returned: the swap has committed.
            status = s.status()
            assert status["active"] == 1 + i and status["swap"] is None, status
            assert status["last_swap"]["ok"] and status["last_swap"]["gen"] == 1 + i
            assert set(s.worker_pids()).isdisjoint(before)
            assert s.show("ActiveState", "SubState", "StatusText", "MainPID") == {
                "ActiveState": "active",
                "SubState": "running",
                "StatusText": status_line(1 + i, 2),
                "MainPID": str(main_pid),
            }
            load.wait_successes(200)  # the new generation serves the load
        report = load.stop()
    finally:
        load.close()
    assert_no_failures(report)
    assert [w["label"] for w in report["windows"]] == ["reload 1", "reload 2", "reload 3"]
    assert s.main_pid() == main_pid
    assert s.status()["swaps"] == {"ok": 3, "failed": 0}


# --- 3. a failing reload --------------------------------------------------------------------------


def test_failing_reload_fails_systemctl_and_leaves_the_service_as_it_was(
    swapd: Callable[[str], Swapd],
) -> None:
    s = swapd("bad")
    sd = s.sd
    port = INSTANCES["bad"].port
    behave(sd, "bad", version="v1")
    main_pid = start(s)
    workers = s.worker_pids()

    behave(sd, "bad", import_error=True)
    done = s.systemctl("reload", check=False)
    assert done.returncode != 0
    assert f"Job for {s.unit} failed" in done.stderr, done.stderr
    props = s.show("ActiveState", "SubState", "MainPID", "StatusText", "ReloadResult")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["MainPID"] == str(main_pid)
    assert props["ReloadResult"] == "exit-code"
    assert props["StatusText"].startswith(f"{status_line(1, 2)}; last reload FAILED: "), props
    status = s.status()
    assert status["active"] == 1 and not status["last_swap"]["ok"]
    assert s.worker_pids() == workers
    # The old workers still serve.
    answers = s.http(port, times=6)
    assert {code for code, _ in answers} == {200}
    assert {int(body.split()[1]) for _, body in answers} <= set(workers)
    assert {body.split()[0] for _, body in answers} == {"v1"}
    # The reason is in the journal, with the failed worker's output.
    s.journal_shows("simulated import failure in the new code")

    # The next good reload works and clears the failure from the status.
    behave(sd, "bad", version="v2")
    s.systemctl("reload")
    assert s.show("StatusText", "MainPID", "ReloadResult") == {
        "StatusText": status_line(3, 2),
        "MainPID": str(main_pid),
        "ReloadResult": "success",
    }
    assert {body.split()[0] for _, body in s.http(port, times=2)} == {"v2"}


# --- 4. watchdog ----------------------------------------------------------------------------------

WATCHDOG_SEC = 2


def test_watchdog_survives_swaps_and_kills_a_stuck_supervisor(
    swapd: Callable[[str], Swapd],
) -> None:
    s = swapd("wd")
    main_pid = start(s)
    assert s.show("WatchdogUSec", "Restart") == {"WatchdogUSec": f"{WATCHDOG_SEC}s",
                                                 "Restart": "on-failure"}  # fmt: skip
    s.journal_shows("event=watchdog.enabled interval=1.000s")

    # Swaps back to back for longer than three watchdog periods: the pings keep coming.
    swaps, began = 0, time.monotonic()
    while time.monotonic() - began < 3 * WATCHDOG_SEC + 0.5:
        s.systemctl("reload")
        swaps += 1
    assert swaps >= 3
    assert s.show("ActiveState", "SubState", "Result", "NRestarts", "MainPID") == {
        "ActiveState": "active",
        "SubState": "running",
        "Result": "success",
        "NRestarts": "0",
        "MainPID": str(main_pid),
    }
    assert s.status()["swaps"] == {"ok": swaps, "failed": 0}
    assert "Watchdog timeout" not in s.journal()

    # The watchdog is live: a supervisor whose loop cannot run is killed and restarted. (Stop
    # it only after a ping that followed the last swap: see the next test for why.)
    wait_for_ping_after(s, monotonic_usec())
    s.sd.run("kill", "-STOP", str(main_pid))
    props = s.wait_for(timeout=6 * WATCHDOG_SEC + 10, NRestarts="1", ActiveState="active",
                       SubState="running")  # fmt: skip
    assert s.main_pid() != main_pid, props
    s.journal_shows(f"{s.unit}: Watchdog timeout (limit {WATCHDOG_SEC}s)!",
                    f"{s.unit}: Failed with result 'watchdog'.")


# Half of it must cover one reload (the stop comes before the next ping), also on a loaded CI.
WATCHDOG_MID_SWAP_SEC = 6


def test_watchdog_kills_a_supervisor_stuck_right_after_a_swap_began(
    swapd: Callable[[str], Swapd],
) -> None:
    """A loop that blocks mid-swap must be caught within WatchdogSec, like any other time.

    swapd sends EXTEND_TIMEOUT_USEC=<its swap bound, 85 s by default> with RELOADING=1, and
    systemd (service_extend_timeout) extends the *watchdog* timer by it as well, until the next
    WATCHDOG=1 resets it. A supervisor that blocks between a swap's start and its next ping
    (up to WatchdogSec/2 later) is then left alone for the whole swap bound. A WATCHDOG=1
    sent right after the EXTEND_TIMEOUT_USEC puts the deadline back to WatchdogSec while the
    reload's own timeout stays extended (checked by hand on 252).
    """
    s = swapd("wdswap")
    main_pid = start(s)
    assert s.show("WatchdogUSec")["WatchdogUSec"] == f"{WATCHDOG_MID_SWAP_SEC}s"
    # Right after a ping, so that the reload and the stop both happen before the next one.
    last_ping = wait_for_ping_after(s, monotonic_usec())
    s.systemctl("reload")
    s.sd.run("kill", "-STOP", str(main_pid))
    stopped_at = monotonic_usec()
    pinged = int(s.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    # The only pings after `last_ping` are the ones swapd sends with its swap's timeout
    # extension (the fix); the stop comes before the next regular one.
    assert last_ping <= pinged <= stopped_at
    assert stopped_at - last_ping < WATCHDOG_MID_SWAP_SEC * 1_000_000 // 2

    # Due WatchdogSec after the last ping, i.e. less than that from now; 3 s for systemd to act.
    timeout_line = f"{s.unit}: Watchdog timeout (limit {WATCHDOG_MID_SWAP_SEC}s)!"
    s.sd.wait_for(
        lambda: timeout_line in s.journal(),
        WATCHDOG_MID_SWAP_SEC + 3,
        "the watchdog to kill the stuck supervisor",
        interval=0.1,
    )
    s.wait_for(timeout=15, NRestarts="1", ActiveState="active", SubState="running")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: the clock of systemd's *TimestampMonotonic properties (the
    namespace has no time namespace of its own)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def wait_for_ping_after(s: Swapd, usec: int) -> int:
    """Wait for a WATCHDOG=1 received after ``usec``; return its timestamp."""

    def pinged() -> int | None:
        at = int(s.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
        return at if at > usec else None

    return s.sd.wait_for(pinged, 10, "a watchdog ping", interval=0.01)


# --- 5. restart and crash: the fd store refuses no connection -------------------------------------


def test_restart_under_load_refuses_no_connection(swapd: Callable[[str], Swapd]) -> None:
    s = swapd("rst")
    old_pid = start(s)
    old = s.status()
    old_inode = s.socket_inode(old_pid, s.http_listener(old)["fd"])
    assert s.http_listener(old)["source"] == "bound"  # swapd bound it and stored it
    assert s.show("NFileDescriptorStore")["NFileDescriptorStore"] == "1"

    # A new connection per request, so that connections arrive while no process accepts.
    load = InnerLoad(s.sd, INSTANCES["rst"].port, mode="close", clients=8, timeout=15)
    try:
        with load.window("restart"):
            s.systemctl("restart")
        new_pid = s.main_pid()
        load.wait_successes(300)
        report = load.stop()
    finally:
        load.close()
    # A graceful stop drains: in-flight requests finish, new connections wait in the kernel
    # queue of the stored listener until the next swapd's workers accept them. Nothing fails.
    assert_no_failures(report)
    assert new_pid != old_pid
    assert s.show("ActiveState", "NFileDescriptorStore", "NRestarts") == {
        "ActiveState": "active",
        "NFileDescriptorStore": "1",
        "NRestarts": "0",  # a manual restart is not counted
    }
    new = s.status()
    assert s.http_listener(new)["source"] == "stored"  # from the fd store, via LISTEN_FDS
    assert s.socket_inode(new_pid, s.http_listener(new)["fd"]) == old_inode  # the same socket


def test_crash_under_load_refuses_no_connection(swapd: Callable[[str], Swapd]) -> None:
    s = swapd("crash")
    old_pid = start(s)
    old_inode = s.socket_inode(old_pid, s.http_listener(s.status())["fd"])
    old_workers = s.worker_pids()
    clients = 8
    # RestartSec=1 (shipped): connections wait that long, and the start, in the queue.
    load = InnerLoad(s.sd, INSTANCES["crash"].port, mode="close", clients=clients, timeout=15)
    try:
        with load.window("crash"):
            s.sd.run("kill", "-KILL", str(old_pid))
            s.wait_for(timeout=20, NRestarts="1", ActiveState="active", SubState="running")
        new_pid = s.main_pid()
        load.wait_successes(300)
        report = load.stop()
    finally:
        load.close()
    # No connection is refused: the listener lives on in the fd store. What a crash does
    # lose is the requests the killed workers had accepted (KillMode=mixed: once the main
    # process is gone systemd SIGKILLs the rest of the cgroup): at most one per client, each a
    # reset or an EOF.
    failures = summary(report)["failures"]
    assert "refused" not in failures, report["details"]
    assert set(failures) <= {"reset", "eof"}, report["details"]
    assert report["failed"] <= clients, report["details"]
    assert report["ok"] > 0
    assert new_pid != old_pid
    s.journal_shows(f"{s.unit}: Main process exited, code=killed, status=9/KILL")
    # Every old worker is gone before the restart: SIGKILLed by systemd with the rest of the
    # cgroup, or already exited on the SIGTERM its parent's death sent it (PR_SET_PDEATHSIG),
    # whichever came first; an idle worker can exit before systemd gets round to it.
    in_unit = s.unit_pids()
    assert new_pid in in_unit and set(s.worker_pids()) <= in_unit
    assert not set(old_workers) & in_unit
    assert s.show("NFileDescriptorStore")["NFileDescriptorStore"] == "1"
    new = s.status()
    assert s.http_listener(new)["source"] == "stored"
    assert s.socket_inode(new_pid, s.http_listener(new)["fd"]) == old_inode


# --- 6. stateful restart --------------------------------------------------------------------------


def test_stateful_restart_keeps_the_state_once(swapd: Callable[[str], Swapd]) -> None:
    s = swapd("state")
    port = INSTANCES["state"].port
    count = 25
    first_pid = start(s)
    answers = s.http(port, "POST", "/incr", times=count)
    assert [body for _, body in answers] == [str(n) for n in range(1, count + 1)]

    s.systemctl("restart")
    second_pid = s.main_pid()
    assert second_pid != first_pid
    assert s.http(port, "GET", "/count") == [(200, str(count))]
    s.journal_shows(f"swapd[{first_pid}]: INFO event=fdstore.state slot=0",
                    f"swapd[{second_pid}]: INFO event=state.restored source=fdstore slots=0")
    # Used once, then removed: only the listener is left in the store.
    assert s.show("NFileDescriptorStore")["NFileDescriptorStore"] == "1"

    # A crash stores nothing; the next start must not find the restart's snapshot either.
    assert s.http(port, "POST", "/incr", times=3)[-1] == (200, str(count + 3))
    s.sd.run("kill", "-KILL", str(second_pid))
    s.wait_for(timeout=20, NRestarts="1", ActiveState="active", SubState="running")
    third_pid = s.main_pid()
    assert third_pid != second_pid
    assert s.http(port, "GET", "/count") == [(200, "0")]
    assert f"swapd[{third_pid}]: INFO event=state.restored" not in s.journal()
    assert s.show("NFileDescriptorStore")["NFileDescriptorStore"] == "1"


# --- 7. swapd upgrade --self ----------------------------------------------------------------------


def test_upgrade_self_keeps_main_pid_and_workers_under_load(
    swapd: Callable[[str], Swapd],
) -> None:
    s = swapd("self")
    main_pid = start(s)
    workers = s.worker_pids()
    assert "SWAPD_REEXEC_STATE" not in s.environ(main_pid)
    load = InnerLoad(s.sd, INSTANCES["self"].port, mode="keepalive", clients=8)
    try:
        with load.window("upgrade --self"):
            answer = s.swapd("upgrade", "--self", "--json")
        load.wait_successes(300)
        report = load.stop()
    finally:
        load.close()
    assert_no_failures(report)
    lines = [json.loads(line) for line in answer.stdout.splitlines()]
    assert lines[-1]["ok"] and lines[-1]["data"]["reexec"] is True, lines
    assert lines[-1]["data"]["pid"] == main_pid
    # Same PID, but a new image: its exec-time environment carries the re-exec state.
    assert "SWAPD_REEXEC_STATE" in s.environ(main_pid)
    assert s.show("MainPID", "ActiveState", "SubState", "NRestarts") == {
        "MainPID": str(main_pid),
        "ActiveState": "active",
        "SubState": "running",
        "NRestarts": "0",
    }
    assert s.show("StatusText")["StatusText"].startswith("re-exec'd swapd ")
    assert s.worker_pids() == workers
    # The new image still speaks for the unit: a reload goes through it.
    s.systemctl("reload")
    assert s.show("StatusText", "MainPID") == {"StatusText": status_line(2, 2),
                                               "MainPID": str(main_pid)}  # fmt: skip


# --- 8. the units tested are the units shipped ----------------------------------------------------

# Properties that come from the shipped [Service] section, compared across every instance.
# (WatchdogUSec is not among them: systemd 252 shows it only once the service has started; the
# watchdog tests check it on the running instances, and the drop-ins' text is checked here.)
SERVICE_PROPS = (
    "Type", "NotifyAccess", "KillMode", "TimeoutStopUSec", "TimeoutStartUSec",
    "FileDescriptorStoreMax", "RuntimeDirectoryMode", "Restart", "RestartUSec",
    "LimitNOFILE", "LimitNOFILESoft",
)  # fmt: skip


def test_the_units_tested_are_the_units_shipped(units: BootedSystemd) -> None:
    sd = units
    etc = sd.root / "etc/systemd/system"
    for name in ("swapd@.service", "swapd@.socket"):
        assert (etc / name).read_bytes() == (SHIPPED_DIR / name).read_bytes(), name
    assert os.readlink(sd.root / SHIPPED_EXE.lstrip("/")) == str(Path(PYTHON).with_name("swapd"))

    # A pristine instance: what users get.
    shipped = sd.show("swapd@users.service", *SERVICE_PROPS, "DropInPaths")
    assert shipped == {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "mixed",
        "TimeoutStopUSec": "1min",
        "TimeoutStartUSec": "1min 30s",
        "FileDescriptorStoreMax": "256",
        "RuntimeDirectoryMode": "0750",
        "Restart": "on-failure",
        "RestartUSec": "1s",
        "LimitNOFILE": shipped["LimitNOFILE"],  # the manager's default: not set by the unit
        "LimitNOFILESoft": shipped["LimitNOFILESoft"],
        "DropInPaths": "",
    }
    overridden: dict[str, dict[str, str]] = {
        "wd": {},
        "wdswap": {},
    }
    assert set(overridden) == set(TEST_DROP_INS)
    for name in INSTANCES:
        s = Swapd(sd, name)
        props = s.show(*SERVICE_PROPS, "DropInPaths", "ExecStart", "ExecReload",
                       "RuntimeDirectory", "FragmentPath")  # fmt: skip
        assert props["FragmentPath"] == "/etc/systemd/system/swapd@.service"
        expected = {**shipped, **overridden.get(name, {})}
        if name in TEST_DROP_INS:
            drop_in = f"/etc/systemd/system/{s.unit}.d/test.conf"
            expected["DropInPaths"] = drop_in
            assert (sd.root / drop_in.lstrip("/")).read_text() == TEST_DROP_INS[name]
        assert {k: props[k] for k in expected} == expected, name
        assert exec_argv(props["ExecStart"]) == (
            f"{SHIPPED_EXE} run --config /etc/swapd/{name}.toml --control {s.control}"
        )
        assert exec_argv(props["ExecReload"]) == f"{SHIPPED_EXE} reload --control {s.control}"
        assert props["RuntimeDirectory"] == f"swapd/{name}"
    socket = sd.show("swapd@act.socket", "Listen", "FileDescriptorName", "Accept", "Triggers",
                     "DropInPaths")  # fmt: skip
    assert socket == {
        "Listen": f"127.0.0.1:{SOCKET_PORT} (Stream)",
        "FileDescriptorName": "http",
        "Accept": "no",
        "Triggers": "swapd@act.service",
        "DropInPaths": "",
    }


def test_only_swapd_itself_speaks_to_systemd(swapd: Callable[[str], Swapd]) -> None:
    """NotifyAccess=main (shipped): swapd needs no more, and a worker cannot speak for the
    service. A MAINPID= it sends to systemd's well-known socket is refused; under "all"
    systemd took that worker for the main process and, once a swap drained it, ended the
    whole service ("Deactivated successfully": no restart either)."""
    s = swapd("main")
    assert s.show("NotifyAccess")["NotifyAccess"] == "main"
    # At debug level PID 1 logs every notification it refuses, with the sender's PID.
    s.sd.run("systemd-analyze", "log-level", "debug")
    try:
        main_pid = _exercise_under_notify_access_main(s)
        behave(s.sd, "main", version="v2", claim_mainpid=True)
        s.systemctl("reload")
        claimers = s.worker_pids()
        journal = s.journal_shows(*(f"Got notification message from PID {pid}, but reception "
                                    f"only permitted for main PID {main_pid}"
                                    for pid in claimers), timeout=15)
    finally:
        s.sd.run("systemd-analyze", "log-level", "info")
    # swapd's own messages, through reloads and a re-exec, were never refused: only the claims.
    refused = re.findall(r"Got notification message from PID (\d+), but reception only "
                         r"permitted for main PID", journal)
    assert set(map(int, refused)) == set(claimers), refused
    behave(s.sd, "main", version="v3")
    s.systemctl("reload")  # the next swap drains the claimers: the service lives on
    assert s.show("MainPID", "ActiveState", "SubState", "StatusText") == {
        "MainPID": str(main_pid),
        "ActiveState": "active",
        "SubState": "running",
        "StatusText": status_line(5, 2),
    }
    s.systemctl("stop")  # STOPPING=1, drain, exit 0
    assert s.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}


def _exercise_under_notify_access_main(s: Swapd) -> int:
    main_pid = start(s)
    # Workers get a notify socket of swapd's, never systemd's.
    systemd_notify = s.environ(main_pid)["NOTIFY_SOCKET"]
    for pid in s.worker_pids():
        assert s.environ(pid).get("NOTIFY_SOCKET") != systemd_notify
    s.systemctl("reload")
    assert s.show("StatusText")["StatusText"] == status_line(2, 2)
    s.swapd("upgrade", "--self")
    s.systemctl("reload")
    assert s.show("StatusText", "MainPID", "SubState") == {
        "StatusText": status_line(3, 2),
        "MainPID": str(main_pid),
        "SubState": "running",
    }
    return main_pid
