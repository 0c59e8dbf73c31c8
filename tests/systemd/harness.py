"""A real systemd (252 on Debian 12) booted as PID 1 of private namespaces, for integration tests.

The host is never touched: systemd runs on a tmpfs
overlay of ``/`` in its own pid, mount, uts, ipc, net and cgroup namespaces, boots its own target
instead of ``default.target``, knows it is in a container (``container=``) and lacks the
capabilities to load modules, set the clock or reboot::

    host                                          inside (what systemd and the tests' units see)
    ----                                          ------
    <base>/         mkdtemp under /var/tmp        /            overlay: lower = host /,
      units/        staged units + boot target                 upper = tmpfs (thrown away)
      mnt/          tmpfs + overlay, only in the  /etc/systemd/system/   <- units/ copied in,
                    private mount namespace                    host *.wants enablements hidden
      share/        test programs and outputs     <base>/share/  same path, read-write bind
      boot.log      output of unshare + init      /work/main     the checkout (venv, sources),
    <checkout>                                                 same path, read-only bind
    <cgroup2>/swapd-it.<pid>.<n>                  /sys/fs/cgroup (cgroup namespace root)

    pytest ─ unshare --pid --fork --kill-child … ─ sh (init stage, PID 1) ──exec──▶ systemd

Tests drive it with ``nsenter -t <pid1> -a``: ``run()``, ``systemctl()``, ``show()``,
``journal()``. systemd offers no event a process outside can wait on, so the few waits here
poll its state at short intervals, always under a deadline.

Unit files for ``systemd-analyze verify`` need no boot; :func:`analyze_verify` is here too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

CHECKOUT = Path(__file__).resolve().parents[2]
SYSTEMD = Path("/lib/systemd/systemd")
BOOT_TARGET = "swapd-it.target"
CONTAINER = "swapd-it"
# What a test's subprocesses see inside; nsenter passes our environment through, so keep the
# host's (pytest's, the venv's) out of the namespace.
INNER_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_LOG_COLOR": "0",
}

_BOOT_TARGET_TEXT = """\
[Unit]
Description=swapd integration-test boot target
Requires=basic.target
After=basic.target
AllowIsolate=yes
"""

# PID 1 of the new namespaces until it execs systemd. Arguments: $1 instance tmpfs mount point,
# $2 staged units, $3 hostname, $4 boot target, $5 the read-write share, $6.. read-only binds.
_INIT_STAGE = r"""
set -eu
M=$1 STAGE=$2 HOST=$3 TARGET=$4 SHARE=$5
shift 5
R=$M/root
mount -t tmpfs -o mode=755 tmpfs "$M"
mkdir "$M/upper" "$M/work" "$R"
mount -t overlay overlay -o "lowerdir=/,upperdir=$M/upper,workdir=$M/work" "$R"

# Units enabled on the host (databases, timers, gettys) are not ours to start.
find "$R/etc/systemd/system" -mindepth 1 -maxdepth 1 -name '*.wants' -exec rm -rf {} +
cp -a "$STAGE/." "$R/etc/systemd/system/"

mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do
    touch "$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o nosuid,nodev tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"

mkdir -p "$R$SHARE"
mount --bind "$SHARE" "$R$SHARE"
for p in "$@"; do
    mkdir -p "$R$p"
    mount --bind "$p" "$R$p"
    mount -o remount,bind,ro "$R$p"
done
echo "$HOST" > "$R/etc/hostname"

cd "$R"
mkdir .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
cd /
exec env -i container=swapd-it PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    setpriv --bounding-set -sys_module,-sys_time,-sys_boot,-sys_rawio,-syslog,-wake_alarm \
    /lib/systemd/systemd --system --unit="$TARGET" --log-target=journal --show-status=no
"""

_instances = itertools.count(1)
_KILL_AFTER = 2  # seconds between timeout(1)'s SIGTERM and its SIGKILL


class HarnessError(Exception):
    """Base class of the harness's errors."""


class BootError(HarnessError):
    """systemd did not come up; the message carries the boot log and journal tails."""


class CommandError(HarnessError):
    """A command run inside the namespace failed or timed out."""


class WaitTimeout(HarnessError):
    """A condition did not hold before its deadline."""


class VerifyError(HarnessError):
    """``systemd-analyze verify`` failed or printed something not explicitly accepted."""


def cgroup2_mount() -> Path | None:
    """The cgroup2 hierarchy: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid)."""
    for path in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (path / "cgroup.procs").exists() and (path / "cgroup.subtree_control").exists():
            return path
    return None


def cannot_boot_reason() -> str | None:
    """Why this machine cannot run :class:`BootedSystemd`, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (mounts, namespaces, cgroups)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no {SYSTEMD}"
    for tool in ("unshare", "nsenter", "setpriv", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    try:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "true"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare --pid --fork true failed: {e}"
    if probe.returncode != 0:
        return f"unshare --pid --fork true failed: {probe.stderr.strip()}"
    return None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _describe(argv: Sequence[str], done: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{' '.join(argv)!r} exited {done.returncode}\n"
        f"--- stdout ---\n{_tail(done.stdout)}\n--- stderr ---\n{_tail(done.stderr)}"
    )


@dataclass
class Timings:
    """Seconds spent in each phase of the last boot and shutdown."""

    pid1_found: float = 0.0  # launch -> systemd exec'd as PID 1
    booted: float = 0.0  # launch -> is-system-running says running/degraded
    poweroff: float = 0.0  # poweroff request -> namespace gone
    killed: bool = False  # poweroff did not finish in time; the namespace was SIGKILLed


@dataclass
class BootedSystemd:
    """One systemd instance. Use as a context manager, or call :meth:`boot`/:meth:`shutdown`.

    ``units`` (name -> text) are in place before boot; :meth:`install_unit` adds more later.
    ``ro_binds`` are host directories visible at the same path inside, read-only; :attr:`share`
    is the read-write one for test programs and their output.
    """

    units: Mapping[str, str] = field(default_factory=dict)
    ro_binds: Sequence[Path] = (CHECKOUT,)
    boot_timeout: float = 30.0
    poweroff_timeout: float = 10.0
    base_parent: Path = Path("/var/tmp")
    hostname: str = "swapd-it"

    timings: Timings = field(default_factory=Timings, init=False)
    failed_at_boot: list[str] = field(default_factory=list, init=False)
    _base: Path | None = field(default=None, init=False)
    _cgroup: Path | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _pid1: int | None = field(default=None, init=False)
    _started: float = field(default=0.0, init=False)

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> BootedSystemd:
        self.boot()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def boot(self) -> None:
        if self._proc is not None:
            raise HarnessError("already booted")
        reason = cannot_boot_reason()
        if reason is not None:
            raise BootError(f"cannot boot systemd here: {reason}")
        try:
            self._launch()
            self._wait_until_booted()
        except BaseException:
            self.shutdown()
            raise

    def _launch(self) -> None:
        cg2 = cgroup2_mount()
        assert cg2 is not None
        base = self._base = Path(tempfile.mkdtemp(prefix="swapd-it.", dir=self.base_parent))
        for sub in ("units", "mnt", "share"):
            (base / sub).mkdir()
        (base / "units" / BOOT_TARGET).write_text(_BOOT_TARGET_TEXT)
        for name, text in self.units.items():
            (base / "units" / name).write_text(text)
        # The namespace's cgroup root must be a fresh cgroup2 directory of ours: systemd takes
        # over whatever it finds there, and teardown removes it.
        self._cgroup = cg2 / f"swapd-it.{os.getpid()}.{next(_instances)}"
        self._cgroup.mkdir()

        argv = [
            # Join the cgroup first, so that unshare --cgroup makes it the namespace's root.
            "sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "swapd-it-launch",
            str(self._cgroup / "cgroup.procs"),
            # If pytest dies without tearing down, unshare is killed and takes PID 1 with it.
            # (The death signal follows the *thread* that started it: boot from a thread that
            # lives as long as the instance, as pytest's main thread does.)
            "setpriv", "--pdeathsig", "KILL", "--",
            "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount",
            "--propagation", "private", "--uts", "--ipc", "--net", "--cgroup",
            "sh", "-c", _INIT_STAGE, "swapd-it-init",
            str(base / "mnt"), str(base / "units"), self.hostname, BOOT_TARGET,
            str(self.share), *(str(p) for p in self.ro_binds),
        ]  # fmt: skip
        with open(base / "boot.log", "wb") as log:
            self._started = time.monotonic()
            # A session of its own: a ^C meant for pytest must not kill PID 1 before teardown.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def _wait_until_booted(self) -> None:
        self._pid1 = self._poll(self._find_pid1, self.boot_timeout, "systemd to become PID 1", 0.01)
        self.timings.pid1_found = time.monotonic() - self._started
        private_bus = Path(f"/proc/{self._pid1}/root/run/systemd/private")
        self._poll(private_bus.exists, self.boot_timeout, "systemd's private bus socket", 0.01)
        remaining = max(1.0, self.boot_timeout - (time.monotonic() - self._started))
        try:
            done = self.run("systemctl", "is-system-running", "--wait", check=False,
                            timeout=remaining)  # fmt: skip
        except CommandError as e:
            raise BootError(self._boot_report(f"boot did not finish: {e}")) from e
        state = done.stdout.strip()
        if state not in ("running", "degraded"):
            raise BootError(self._boot_report(f"is-system-running says {state!r}"))
        self.timings.booted = time.monotonic() - self._started
        if state == "degraded":
            self.failed_at_boot = self.failed_units()
        # systemd itself brings lo up (loopback-setup) before any unit; tests rely on it.
        lo = self.run("ip", "-o", "-4", "addr", "show", "dev", "lo", check=False).stdout
        if "127.0.0.1" not in lo or "UP" not in self.run("ip", "-o", "link", "show", "lo").stdout:
            raise BootError(self._boot_report(f"loopback is not up in the namespace: {lo!r}"))

    def _find_pid1(self) -> int | None:
        assert self._proc is not None
        unshare = self._proc.pid
        try:
            children = Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
        except FileNotFoundError:
            return None
        for child in children:
            # The init stage is PID 1 too, but still sh: wait for the exec, or nsenter would
            # drive a namespace whose root is not systemd's yet.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                status = Path(f"/proc/{child}/status").read_text()
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                exe = os.readlink(f"/proc/{child}/exe")
                if nspid and nspid.group(1).split()[-1] == "1" and exe == str(SYSTEMD.resolve()):
                    return int(child)
        return None

    def shutdown(self) -> None:
        """Power off (bounded), kill what is left, remove the cgroup and the state directory.

        Idempotent; never leaves a process behind.
        """
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                self._stop(proc)
        finally:
            self._pid1 = None
            if self._cgroup is not None:
                _remove_cgroup(self._cgroup)
                self._cgroup = None
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        started = time.monotonic()
        self.timings.killed = False
        if proc.poll() is None and self._pid1 is not None:
            # --no-block: PID 1 may vanish mid-call ("Connection reset by peer").
            with contextlib.suppress(HarnessError, OSError):
                self._nsenter(["systemctl", "--no-block", "poweroff"], check=False, timeout=5)
        try:
            proc.wait(timeout=self.poweroff_timeout if self._pid1 is not None else 0)
        except subprocess.TimeoutExpired:
            # --kill-child: unshare's death SIGKILLs PID 1, and with it the whole namespace.
            self.timings.killed = True
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        self.timings.poweroff = time.monotonic() - started

    # --- driving it ------------------------------------------------------------------------------

    @property
    def pid1(self) -> int:
        """Host pid of the namespace's PID 1 (systemd)."""
        if self._pid1 is None:
            raise HarnessError("systemd is not running")
        return self._pid1

    @property
    def share(self) -> Path:
        """A host directory visible read-write at the same path inside."""
        if self._base is None:
            raise HarnessError("not booted")
        return self._base / "share"

    @property
    def cgroup(self) -> Path | None:
        """The instance's cgroup2 directory on the host (its namespace's cgroup root)."""
        return self._cgroup

    @property
    def state_dir(self) -> Path | None:
        """The instance's directory under :attr:`base_parent` (units, mount point, share, log)."""
        return self._base

    @property
    def unshare_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def root(self) -> Path:
        """The namespace's / as seen from the host (through /proc/<pid1>/root)."""
        return Path(f"/proc/{self.pid1}/root")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside every namespace of PID 1, with a clean environment."""
        return self._nsenter(list(argv), check=check, timeout=timeout, input=input, env=env)

    def _nsenter(
        self,
        argv: list[str],
        *,
        check: bool,
        timeout: float,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        # The deadline is enforced inside, by timeout(1): the command is then killed and reaped
        # by a parent in the namespace. Killing nsenter instead would orphan it to the host's
        # init, and a pid namespace cannot end until its zombies are reaped, however lazily
        # that init does it. The outer deadline and the pdeathsig are only a backstop.
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "setpriv", "--pdeathsig", "KILL", "--"]
        cmd += ["timeout", f"--kill-after={_KILL_AFTER}", f"{timeout}s", *argv]
        started = time.monotonic()
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout + _KILL_AFTER + 5,
                input=input,
                env={**INNER_ENV, **(env or {})},
            )
        except subprocess.TimeoutExpired as e:
            raise CommandError(f"{' '.join(argv)!r} hung past {timeout}s; nsenter killed") from e
        if done.returncode in (124, 137) and time.monotonic() - started >= timeout:
            raise CommandError(f"{' '.join(argv)!r} timed out after {timeout}s")
        if check and done.returncode != 0:
            raise CommandError(_describe(argv, done))
        return done

    def systemctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        return self.run("systemctl", *args, check=check, timeout=timeout).stdout

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def install_unit(self, name: str, text: str, *, reload: bool = True) -> None:
        """Write ``/etc/systemd/system/<name>`` inside (the overlay's upper layer)."""
        (self.root / "etc/systemd/system" / name).write_text(text)
        if reload:
            self.daemon_reload()

    def write_share(self, name: str, text: str, mode: int = 0o644) -> Path:
        """Write a file into :attr:`share`; returns its path (the same inside and out)."""
        path = self.share / name
        path.write_text(text)
        path.chmod(mode)
        return path

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` as a dict; all properties when none are named."""
        args = ["show", unit]
        if props:
            args.append("--property=" + ",".join(props))
        out = self.systemctl(*args)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def failed_units(self) -> list[str]:
        out = self.systemctl("list-units", "--failed", "--plain", "--no-legend", check=False)
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        """The journal's last ``lines`` lines (one unit's, or everything), for diagnostics."""
        args = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit is not None:
            args += ["-u", unit]
        done = self.run(*args, check=False)
        return done.stdout + done.stderr

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        what: str,
        interval: float = 0.02,
    ) -> T:
        """Poll ``predicate`` until it returns something truthy, and return that.

        Raises :class:`WaitTimeout` naming ``what`` after ``timeout`` seconds, or at once if
        the namespace died meanwhile.
        """
        return self._poll(predicate, timeout, what, interval)

    def wait_for_unit(self, unit: str, timeout: float = 10.0, **expected: str) -> dict[str, str]:
        """Wait until ``show(unit)`` has every ``expected`` property value, e.g.
        ``wait_for_unit("a.service", ActiveState="active")``; the journal tail is in the error.
        """
        last: dict[str, str] = {}

        def matches() -> dict[str, str] | None:
            nonlocal last
            last = self.show(unit, *expected)
            return last if all(last.get(k) == v for k, v in expected.items()) else None

        try:
            return self.wait_for(matches, timeout, f"{unit} to reach {expected}")
        except WaitTimeout as e:
            raise WaitTimeout(f"{e}; last {last}\n{_tail(self.journal(unit))}") from None

    def _poll(
        self, predicate: Callable[[], T | None], timeout: float, what: str, interval: float
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if not self.alive():
                raise BootError(self._boot_report(f"namespace died while waiting for {what}"))
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{what}: not within {timeout}s (last: {value!r})")
            time.sleep(interval)

    def _boot_report(self, headline: str) -> str:
        parts = [headline]
        if self._base is not None and (self._base / "boot.log").exists():
            log = (self._base / "boot.log").read_text(errors="replace")
            parts.append(f"--- boot.log ---\n{_tail(log) or '(empty)'}")
        if self._pid1 is not None and self.alive():
            with contextlib.suppress(HarnessError, OSError):
                parts.append(f"--- journal ---\n{_tail(self.journal(lines=60), 60)}")
                parts.append(f"--- failed units ---\n{self.failed_units()}")
        return "\n".join(parts)


def _remove_cgroup(path: Path, timeout: float = 5.0) -> None:
    """rmdir the cgroup tree depth-first; emptied cgroups can stay busy for a moment while the
    kernel reaps the last tasks, hence the bounded retry."""
    deadline = time.monotonic() + timeout
    while path.exists():
        dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        try:
            for d in [*dirs, path]:
                d.rmdir()
        except OSError as e:
            if time.monotonic() >= deadline:
                raise HarnessError(f"cannot remove cgroup {path}: {e}") from e
            time.sleep(0.02)


# --- systemd-analyze verify ----------------------------------------------------------------------


def analyze_verify(
    units: Iterable[Path], *, accept: Iterable[str] = (), timeout: float = 60.0
) -> list[str]:
    """``systemd-analyze verify`` the unit files; return the stderr lines matched by ``accept``.

    Fails (:class:`VerifyError`) on a non-zero exit or on any stderr line no ``accept`` regex
    matches: verify reports unknown keys and bad values as warnings with exit status 0.
    Generators and man page checks are off, so the result depends on the files only (and on
    the executables they name existing: that is a failure, exit status 1).
    """
    patterns = [re.compile(a) for a in accept]
    argv = ["systemd-analyze", "verify", "--man=no", "--generators=no", *map(str, units)]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**INNER_ENV, "SYSTEMD_LOG_LOCATION": "0"},
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    unexpected = [line for line in lines if not any(p.search(line) for p in patterns)]
    if done.returncode != 0 or unexpected:
        raise VerifyError(_describe(argv, done))
    return lines
