"""Command line: argument parsing and output; a thin client of the control socket.

Exit codes: 0 success; 1 the operation failed (the service is unchanged); 2 bad
usage or configuration (nothing started or changed); 3 no supervisor reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from swapd import __version__
from swapd.config import ConfigError, default_control_path, load
from swapd.control import Client, ClientError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every other bad input
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="swapd", description="Zero-downtime process-swap supervisor.")
    p.add_argument("--version", action="version", version=f"swapd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="start a supervisor and its first generation",
                         usage="swapd run [options] -- COMMAND [ARGS...]")
    run.add_argument("--config", help="TOML configuration file")
    run.add_argument("--bind", action="append", default=[], metavar="NAME=ADDR",
                     help="listener, e.g. http=127.0.0.1:8000, [::1]:8000, unix:/path (repeatable)")
    run.add_argument("--workers", type=int, help="workers per generation (default 1)")
    run.add_argument("--mode", choices=["stateless", "stateful"], help="swap mode")
    run.add_argument("--control", help="control socket path")
    run.add_argument("--cwd", help="working directory of the workers")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="extra environment for workers (repeatable)")
    run.add_argument("--readiness", choices=["notify", "exec"],
                     help="notify: READY=1 or swapd.worker.ready(); exec: ready once exec'd")
    run.add_argument("--backlog", type=int, help="listen backlog of bound listeners")
    run.add_argument("--precopy", action="store_true", default=None,
                     help="stateful: ship bulk state before the pause")
    run.add_argument("--no-fdstore", dest="fdstore", action="store_false", default=None,
                     help="under systemd, do not keep listeners and state in the fd store")
    for name in ("ready", "drain", "quiesce", "restore"):
        run.add_argument(f"--{name}-timeout", type=float, metavar="SECONDS")
    run.add_argument("--idle-grace", type=float, metavar="SECONDS",
                     help="how long a draining worker keeps an idle keep-alive connection")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("worker_command", nargs=argparse.REMAINDER, help="the worker command")

    for name, text in (("upgrade", "swap to a new generation with the same configuration"),
                       ("reload", "re-read the configuration, then swap"),
                       ("status", "show generations, workers, listeners, last swap"),
                       ("stop", "drain and stop the supervisor")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--control", help="control socket path (default: $SWAPD_CONTROL, ...)")
        c.add_argument("--json", action="store_true", help="print raw JSON lines")
        if name == "upgrade":
            c.add_argument("--self", dest="self_", action="store_true",
                           help="re-exec the supervisor itself (same PID, workers kept)")
        if name == "stop":
            c.add_argument("--fast", action="store_true", help="kill workers instead of draining")

    pt = sub.add_parser("patch", help="apply, roll back or list in-process patches",
                        usage="swapd patch FILE --module NAME [--dry-run] | --rollback | --list")
    pt.add_argument("file", nargs="?", help="the module's new source")
    pt.add_argument("--module", help="the module to patch, e.g. app.rules")
    pt.add_argument("--dry-run", action="store_true",
                    help="prepare on every worker, commit nothing")
    pt.add_argument("--accept-absent", action="store_true",
                    help="allow closure cells without a value (reading them raises NameError)")
    pt.add_argument("--prune", action="store_true", help="delete names the patch removes")
    pt.add_argument("--rollback", action="store_true", help="roll back the last patch")
    pt.add_argument("--list", action="store_true", help="list the patches in force")
    pt.add_argument("--control", help="control socket path")
    pt.add_argument("--json", action="store_true", help="print raw JSON lines")

    demo = sub.add_parser("demo", help="see swapd work: swaps under load, with a report")
    demo.add_argument("--swaps", type=int, default=5)
    demo.add_argument("--clients", type=int, default=16)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--mode", choices=["stateless", "stateful"], default="stateful")
    demo.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_reexec-check"]:
        return _reexec_check(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            from swapd.demo import run_demo

            return run_demo(args)
        return cmd_client(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED


# -- run -----------------------------------------------------------------------------


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as a config dict (same keys as the TOML file); None = not given."""
    command = list(args.worker_command)
    if command and command[0] == "--":
        command = command[1:]
    binds: dict[str, str] = {}
    for spec in args.bind:
        name, sep, addr = spec.partition("=")
        if not sep:
            raise UsageError(f"swapd run: bad --bind {spec!r}: expected NAME=ADDR")
        binds[name] = addr
    env: dict[str, str] = {}
    for spec in args.env:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise UsageError(f"swapd run: bad --env {spec!r}: expected KEY=VALUE")
        env[key] = value
    timeouts = {k: getattr(args, f"{k}_timeout") for k in ("ready", "drain", "quiesce", "restore")}
    timeouts["idle_grace"] = args.idle_grace
    return {
        "command": command or None,
        "workers": args.workers,
        "mode": args.mode,
        "control": args.control,
        "cwd": args.cwd,
        "readiness": args.readiness,
        "backlog": args.backlog,
        "precopy": args.precopy,
        "fdstore": args.fdstore,
        "bind": binds,
        "env": env,
        "timeouts": {k: v for k, v in timeouts.items() if v is not None},
    }


def _reexec_check(argv: list[str]) -> int:
    """Hidden: the pre-flight of `upgrade --self`, run by the *new* code on the state."""
    # Import all of the new code first: an import error anywhere must stop the re-exec.
    import swapd.supervisor.core
    import swapd.worker
    from swapd.supervisor import reexec

    _ = swapd.supervisor.core.Supervisor.from_reexec, swapd.worker.run
    try:
        reexec.check(int(argv[0]))
    except Exception as e:
        print(f"swapd: cannot take over this supervisor state: {type(e).__name__}: {e}",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from swapd.supervisor import reexec
    from swapd.supervisor.core import StartupError, Supervisor

    setup_logging(args.log_level)
    _raise_nofile()
    state_fd = os.environ.pop(reexec.ENV, None)
    if state_fd is not None:
        # We are the new image of `swapd upgrade --self`: adopt, don't start.
        fd = int(state_fd)
        state = reexec.parse(reexec.read_state(fd))  # the pre-flight parsed it already
        os.close(fd)
        return asyncio.run(Supervisor.from_reexec(state).run())
    try:
        overrides = run_overrides(args)
        config = load(args.config, overrides)
        _check_command(config.command, config.cwd, dict(config.env))
        inherited = _inherited_listeners()
        sup = Supervisor(config, overrides, inherited=inherited)
        sup.prepare()
    except (ConfigError, UsageError, StartupError) as e:
        print(f"swapd: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(sup.run())
    except StartupError as e:
        print(f"swapd: {e}", file=sys.stderr)
        if e.tail:
            print(_indent(e.tail), file=sys.stderr)
        return e.code


def _raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (for us and the workers we start).

    A handoff passes every live connection as an fd, through the supervisor: with
    systemd's default soft limit of 1024 a service with a few hundred connections
    would run out halfway.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        logging.getLogger("swapd").info("event=rlimit.nofile soft=%d raised_to=%d", soft, hard)


def _check_command(command: Sequence[str], cwd: str | None, env: dict[str, str]) -> None:
    program = command[0]
    path = env.get("PATH", os.environ.get("PATH", os.defpath))
    if os.sep in program:
        full = program if os.path.isabs(program) else os.path.join(cwd or os.getcwd(), program)
        found = full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    else:
        found = shutil.which(program, path=path)
    if found is None:
        raise UsageError(f"worker command not found or not executable: {program}")


def _inherited_listeners() -> list[tuple[str, int]]:
    from swapd import systemd

    return systemd.listen_fds()


def setup_logging(level: str) -> None:
    # Under systemd the journal adds time and pid itself.
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(message)s"
    else:
        fmt = "%(asctime)s swapd[%(process)d] %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


# -- client commands --------------------------------------------------------------------


def cmd_client(args: argparse.Namespace) -> int:
    path = args.control or default_control_path()
    request: dict[str, Any] = {}
    if args.command == "stop":
        request["fast"] = args.fast
    if args.command == "upgrade" and args.self_:
        request["self"] = True
    if args.command == "patch":
        request = _patch_request(args)
    client = Client(path)
    result: dict[str, Any] | None = None
    shown: set[str] = set()
    try:
        for msg in client.call(args.command, request):
            if args.json:
                print(json.dumps(msg), flush=True)
            elif msg.get("type") == "progress":
                print(f"swapd: {msg.get('message')}", flush=True)
                shown.add(str(msg.get("message")))
            if msg.get("type") == "result":
                result = msg
    except ClientError as e:
        print(f"swapd {args.command}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    assert result is not None
    if not args.json:
        _print_result(args.command, result)
        for warning in (result.get("data") or {}).get("warnings") or []:
            if f"WARNING: {warning}" not in shown:  # one that happened before we joined
                print(f"swapd: WARNING: {warning}", flush=True)
    return EXIT_OK if result.get("ok") else EXIT_FAILED


def _patch_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.rollback or args.list:
        if args.file or args.module or (args.rollback and args.list):
            raise UsageError("swapd patch: --rollback and --list take no file or module")
        return {"action": "rollback" if args.rollback else "list"}
    if not args.file or not args.module:
        raise UsageError("swapd patch: give FILE and --module NAME (or --rollback, --list)")
    try:
        with open(args.file, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"swapd patch: cannot read {args.file}: {e}") from None
    return {"action": "apply", "module": args.module, "source": source,
            "name": os.path.basename(args.file), "dry_run": args.dry_run,
            "accept_absent": args.accept_absent, "prune": args.prune}


def _print_result(command: str, result: dict[str, Any]) -> None:
    data = result.get("data") or {}
    if not result.get("ok"):
        print(f"swapd {command}: FAILED: {result.get('error')}", file=sys.stderr)
        tail = data.get("tail")
        if tail:
            print(f"  output of {data.get('worker')}:", file=sys.stderr)
            print(_indent(tail, "    "), file=sys.stderr)
        return
    if command == "status":
        print(format_status(data))
    elif command == "patch":
        print(_format_patch(data))
    elif data.get("reexec"):
        print(f"swapd upgrade --self: ok: supervisor pid {data['pid']} re-exec'd, "
              f"swapd {data['previous']} -> {data['version']}; workers kept")
    elif command in ("upgrade", "reload"):
        t = data.get("timings_ms", {})
        extra = f", pause {t['pause']:.1f} ms" if "pause" in t else ""
        print(f"swapd {command}: ok: gen={data.get('gen')} active, gen={data.get('previous')} "
              f"draining (ready after {t.get('ready', 0):.0f} ms{extra}, "
              f"total {data.get('duration_ms', 0):.0f} ms)")
    elif command == "stop":
        print("swapd stop: stopped")


def _format_patch(data: dict[str, Any]) -> str:
    if "patches" in data:
        if not data["patches"]:
            return f"swapd patch: no patch in force in gen {data.get('gen')}"
        lines = [f"patches in force in gen {data.get('gen')}:"]
        for p in data["patches"]:
            disk = {True: "on disk", False: "NOT on disk", None: "disk unknown"}[p["on_disk"]]
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["time"]))
            lines.append(f"  #{p['id']}  {p['module']:<20} {p['name']:<16} "
                         f"sha256 {p['sha256'][:12]}  {when}  by {p['who']}  ({disk})")
        return "\n".join(lines)
    if data.get("dry_run"):
        verdict = "would commit" if data.get("committable") else "would be REFUSED"
        return f"swapd patch: dry run: patch {data['patch']} {verdict}; nothing changed"
    if "module" in data:
        return f"swapd patch: patch {data['patch']} ({data['module']}) rolled back"
    return f"swapd patch: patch {data['patch']} in force on {len(data['plans'])} worker(s)"


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def format_status(s: dict[str, Any]) -> str:
    lines = [f"swapd {s['version']}  pid {s['pid']}  up {_dur(s['uptime'])}  mode {s['mode']}  "
             f"control {s['control']}"]
    lines.append("listeners:")
    for lis in s["listeners"]:
        lines.append(f"  {lis['name']:<10} {lis['address']:<28} ({lis['source']})")
    lines.append("generations:")
    for g in s["generations"]:
        lines.append(f"  gen {g['id']:<4} {g['state'].upper():<9} {len(g['workers'])} worker(s)  "
                     f"age {_dur(g['age'])}  command: {' '.join(g['command'])}")
        for w in g["workers"]:
            usage = ""
            if "rss" in w:
                usage = f"  rss {w['rss'] / 2**20:.1f} MiB  cpu {w['cpu_seconds']:.2f}s"
            restarts = g["restarts"][w["slot"]] if w["slot"] < len(g["restarts"]) else 0
            flag = "  CRASH-LOOP" if w.get("crash_loop") else ""
            lines.append(f"    worker {w['slot']}  pid {w['pid']:<7} {w['state']:<9} "
                         f"up {_dur(w['uptime'])}{usage}  restarts {restarts}{flag}")
    if s.get("swap"):
        sw = s["swap"]
        lines.append(f"swap in flight: {sw['kind']} gen={sw['gen']} for {sw['elapsed_ms']:.0f} ms")
    last = s.get("last_swap")
    if last:
        outcome = "ok" if last.get("ok") else f"FAILED ({last.get('error')})"
        t = last.get("timings_ms", {})
        parts = ", ".join(f"{k} {v:.1f} ms" for k, v in t.items())
        lines.append(f"last swap: {last.get('kind')} from {last.get('origin')}: {outcome}; "
                     f"{parts or 'no timings'}; total {last.get('duration_ms', 0):.0f} ms")
    for p in s.get("patches", []):
        disk = {True: "on disk", False: "NOT on disk", None: "disk unknown"}[p["on_disk"]]
        lines.append(f"patch #{p['id']} in force: {p['module']} from {p['name']} "
                     f"(sha256 {p['sha256'][:12]}, {disk})")
    for warning in s.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


if __name__ == "__main__":
    sys.exit(main())
