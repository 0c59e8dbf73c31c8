"""Command line: argument parsing and output; a thin client of the control socket.

Exit codes: 0 success; 1 the operation failed (the service is unchanged); 2 bad
usage or configuration (nothing started or changed); 3 no supervisor reachable (or one
of another uid, refused); 4 outcome unknown: the supervisor took the request on, then
the client stopped waiting (its timeout, or the connection broke), and the operation may
go on; 130 interrupted (Ctrl-C). A reader of stdout that goes away (`| head`) changes
nothing: the command goes on and its exit code says how it went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from swapd import __version__, cli_check, cli_ops, cli_status
from swapd.commands import HistoryArgs, PatchArgs, StopArgs, UpgradeArgs
from swapd.config import ConfigError, default_control_path, load
from swapd.control import CLIENT_WAIT, DEADLINE_GRACE, Client, ClientError, ClientTimeout

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_UNKNOWN = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 128 + 2  # SIGINT, as a shell reports a command it interrupted


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
                         usage="swapd run [options] -- COMMAND [ARGS...]\n"
                               "       swapd run [options] --app MODULE:APP [-- SERVE-OPTIONS]")
    _run_arguments(run)
    check = sub.add_parser("check", help="check what `swapd run` with these options would "
                                         "start (like nginx -t): binds and starts nothing",
                           usage="swapd check [run options] [-- COMMAND [ARGS...]]")
    _run_arguments(check)

    for name, text in (("upgrade", "swap to a new generation with the same configuration"),
                       ("reload", "re-read the configuration, then swap"),
                       ("status", "show generations, workers, listeners, last swap"),
                       ("stop", "drain and stop the supervisor")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--control", help="control socket path (default: $SWAPD_CONTROL, ...)")
        c.add_argument("--json", action="store_true", help="print raw JSON lines")
        _timeout_flag(c)
        if name == "upgrade":
            c.add_argument("--self", dest="self_", action="store_true",
                           help="re-exec the supervisor itself (same PID, workers kept)")
        if name in ("upgrade", "reload"):
            cli_ops.add_swap_options(c)
        if name == "stop":
            c.add_argument("--fast", action="store_true", help="kill workers instead of draining")

    pt = sub.add_parser("patch", help="apply, roll back, squash or list in-process patches",
                        usage="swapd patch FILE --module NAME [FILE --module NAME ...] "
                              "[--dry-run] | --rollback | --squash | --list")
    pt.add_argument("file", nargs="*",
                    help="a module's whole new source; several FILE --module NAME pairs "
                         "make one patch, committed in every worker all or none")
    pt.add_argument("--module", action="append", default=[],
                    help="the module the FILE before it replaces, e.g. app.rules")
    pt.add_argument("--dry-run", action="store_true",
                    help="prepare on every worker and show the full plan; commit nothing")
    pt.add_argument("--accept-absent", action="store_true",
                    help="allow closure cells without a value (reading them raises NameError)")
    pt.add_argument("--prune", action="store_true", help="delete names the patch removes")
    pt.add_argument("--rollback", action="store_true", help="roll back the last patch")
    pt.add_argument("--squash", action="store_true",
                    help="make the patches in force permanent: workers drop what they keep "
                         "to roll them back (memory); they can no longer be rolled back")
    pt.add_argument("--list", action="store_true", help="list the patches in force")
    pt.add_argument("--control", help="control socket path")
    pt.add_argument("--json", action="store_true", help="print raw JSON lines")
    _timeout_flag(pt)

    for ops_parser in cli_ops.add_parsers(sub):
        _timeout_flag(ops_parser)

    # Parsed by swapd.serve itself (main() hands it the arguments); listed here for --help.
    sub.add_parser("serve", help="run an ASGI or WSGI app as a worker: swapd serve MODULE:APP "
                   "(see swapd serve --help)", add_help=False)

    demo = sub.add_parser("demo", help="see swapd work: swaps under load, with a report")
    demo.add_argument("--swaps", type=int, default=5)
    demo.add_argument("--clients", type=int, default=16)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--mode", choices=["stateless", "stateful"], default="stateful")
    demo.add_argument("--json", action="store_true")
    return p


def _run_arguments(run: argparse.ArgumentParser) -> None:
    """The options of `swapd run` (and of `swapd check`, which takes the same)."""
    run.add_argument("--config", help="TOML configuration file")
    run.add_argument("--app", metavar="MODULE:APP",
                     help="run this ASGI/WSGI app with `swapd serve` (same interpreter); "
                          "what follows -- are swapd serve options")
    run.add_argument("--bind", action="append", default=[], metavar="NAME=ADDR",
                     help="listener, e.g. http=127.0.0.1:8000, [::1]:8000, unix:/path (repeatable)")
    run.add_argument("--workers", type=int, help="workers per generation (default 1)")
    run.add_argument("--mode", choices=["stateless", "stateful"], help="swap mode")
    run.add_argument("--control", help="control socket path")
    run.add_argument("--cwd", help="working directory of the workers")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="extra environment for workers (repeatable)")
    run.add_argument("--readiness", choices=["notify", "exec", "probe"],
                     help="notify: READY=1 or swapd.worker.ready(); exec: ready once exec'd; "
                          "probe: once --probe passes on the worker's private probe socket")
    run.add_argument("--probe", metavar="http:/PATH|tcp",
                     help="with --readiness probe: a 2xx/3xx answer to GET PATH, or (tcp) "
                          "the worker accepting, on a socket only this worker serves")
    run.add_argument("--backlog", type=int, help="listen backlog of bound listeners")
    run.add_argument("--precopy", action="store_true", default=None,
                     help="stateful: ship bulk state before the pause")
    run.add_argument("--no-fdstore", dest="fdstore", action="store_false", default=None,
                     help="under systemd, do not keep listeners and state in the fd store")
    for name in ("ready", "drain", "quiesce", "restore", "probe"):
        run.add_argument(f"--{name}-timeout", type=cli_ops.seconds_type(), metavar="SECONDS")
    run.add_argument("--idle-grace", type=cli_ops.seconds_type(), metavar="SECONDS",
                     help="how long a draining worker keeps an idle keep-alive connection")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cli_ops.add_run_options(run)
    run.add_argument("worker_command", nargs=argparse.REMAINDER, help="the worker command")


def _timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=cli_ops.seconds_type(), metavar="SECONDS",
        help=f"give up after this long (default: {CLIENT_WAIT:g}s for an answer; a long "
             "command waits as long as the supervisor says it may take, plus "
             f"{DEADLINE_GRACE:g}s)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_reexec-check"]:
        return _reexec_check(argv[1:])
    if argv[:1] == ["serve"]:
        from swapd.serve import main as serve_main

        return serve_main(argv[1:])
    try:
        args = build_parser().parse_args(_patch_argv(argv))
        if args.command == "run":
            code = cmd_run(args)
        elif args.command == "check":
            code = cmd_check(args)
        elif args.command == "demo":
            from swapd.demo import run_demo

            code = run_demo(args)
        else:
            code = cmd_client(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would make a traceback
        return code
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # whoever read stdout went away: nothing to say, no traceback
        _stdout_gone()
        return EXIT_FAILED


def _stdout_gone() -> None:
    """Point stdout at /dev/null: what is still buffered, and whatever comes, goes nowhere
    (the recipe of the `signal` module's documentation, note on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _out(text: str) -> None:
    """A line on stdout; a reader that went away does not stop the command."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_gone()


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
            raise UsageError(f"bad --bind {spec!r}: expected NAME=ADDR")
        if name in binds:  # the second would silently replace the first
            raise UsageError(f"listener {name!r} given twice (--bind "
                             f"{name}={binds[name]}, --bind {spec}): give each its own name")
        binds[name] = addr
    env: dict[str, str] = {}
    for spec in args.env:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --env {spec!r}: expected KEY=VALUE")
        env[key] = value
    timeouts = {k: getattr(args, f"{k}_timeout")
                for k in ("ready", "drain", "quiesce", "restore", "probe")}
    timeouts["idle_grace"] = args.idle_grace
    app = {"app": args.app, "command": command} if args.app else {"command": command or None}
    return {
        **app,
        "workers": args.workers,
        "mode": args.mode,
        "control": args.control,
        "cwd": args.cwd,
        "readiness": args.readiness,
        "probe": args.probe,
        "backlog": args.backlog,
        "precopy": args.precopy,
        "fdstore": args.fdstore,
        "bind": binds,
        "env": env,
        "timeouts": {k: v for k, v in timeouts.items() if v is not None},
        **cli_ops.run_overrides(args),
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
    from swapd.supervisor.core import Supervisor
    from swapd.supervisor.startup import StartupError

    setup_logging(args.log_level, args.log_format)
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
        cli_check.preflight(config)
        release = cli_ops.release_arg(args)
        inherited = _inherited_listeners()
        sup = Supervisor(config, overrides, inherited=inherited, release=release)
        sup.prepare()
    except (ConfigError, UsageError, StartupError, ValueError) as e:
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


def cmd_check(args: argparse.Namespace) -> int:
    """`swapd check`: what `swapd run` with the same options would refuse at start, short of
    binding and starting (exit 2, one line), or one line that says what it would start."""
    try:
        config = load(args.config, run_overrides(args))
        summary = cli_check.check(config)
        cli_ops.release_arg(args)
    except (ConfigError, UsageError, ValueError) as e:
        print(f"swapd check: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"swapd check: ok: {summary}")
    return EXIT_OK


def _inherited_listeners() -> list[tuple[str, int]]:
    from swapd import systemd

    return systemd.listen_fds()


def setup_logging(level: str, style: str = "text") -> None:
    from swapd import logsink  # one write per line to stderr; queued while the loop runs

    logsink.setup(level, style)


# -- client commands --------------------------------------------------------------------


def cmd_client(args: argparse.Namespace) -> int:
    path = args.control or default_control_path()
    request: dict[str, Any] = {}
    if args.command == "stop":
        request = StopArgs(fast=args.fast).body()
    if args.command == "upgrade" and args.self_:
        request = UpgradeArgs(self_=True).body()
    elif args.command in ("upgrade", "reload"):
        try:
            request = cli_ops.swap_request(args)
        except ValueError as e:
            raise UsageError(f"swapd {args.command}: {e}") from None
    if args.command == "history":
        request = HistoryArgs(n=args.n).body()
    if args.command == "patch":
        request = _patch_request(args)
    client = Client(path, timeout=args.timeout)
    result: dict[str, Any] | None = None
    shown: set[str] = set()
    gen: str | None = None  # the generation a swap started (or joined), for "see status"
    try:
        for msg in client.call(args.command, request):
            if msg.get("event") in ("spawned", "joined") and gen is None:
                found = re.search(r"\bgen=(\d+)", str(msg.get("message")))
                gen = found.group(1) if found else None
            if args.json:
                _out(json.dumps(msg))
            elif msg.get("type") == "progress":
                _out(f"swapd: {msg.get('message')}")
                shown.add(str(msg.get("message")))
            if msg.get("type") == "result":
                result = msg
    except KeyboardInterrupt:
        if client.sent and _changes(args):
            _left(args.command, gen, "stopped waiting (interrupted)",
                  "continues" if client.answered else "may go on")
        return EXIT_INTERRUPTED
    except ClientError as e:
        if args.command == "history" and result is None:
            return cli_ops.history_fallback(args, str(e))
        if client.answered:  # it took the request on: not "unreachable", and maybe not over
            _left(args.command, gen, f"{e}; stopped waiting",
                  "continues" if isinstance(e, ClientTimeout) else "unknown")
            return EXIT_UNKNOWN
        print(f"swapd {args.command}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    assert result is not None
    if not args.json:
        try:
            _print_result(args.command, result)
            if args.command != "status":  # status prints its warnings itself
                for warning in (result.get("data") or {}).get("warnings") or []:
                    if f"WARNING: {warning}" not in shown:  # one from before we joined
                        print(f"swapd: WARNING: {warning}")
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_gone()
    return EXIT_OK if result.get("ok") else EXIT_FAILED


def _changes(args: argparse.Namespace) -> bool:
    """Whether the command changes the service (so that it may go on without us)."""
    if args.command in ("status", "history"):
        return False
    return not (args.command == "patch" and (args.list or args.dry_run))


def _left(command: str, gen: str | None, why: str, fate: str) -> None:
    """The one line of a client that stops waiting for an operation that may go on."""
    what = f"the {command}" + (f" (gen={gen})" if gen else "")
    said = {"continues": f"{what} continues in the supervisor",
            "may go on": f"the supervisor may still carry out {what}",
            "unknown": f"the outcome of {what} is unknown"}[fate]
    print(f"swapd {command}: {why}; {said}: see `swapd status`", file=sys.stderr)


def _patch_argv(argv: list[str]) -> list[str]:
    """``swapd patch a.py --module a b.py --module b``: argparse takes positionals only in
    one run, so the FILEs move to the front (their order, and that of the --module
    options, is kept: the n-th FILE goes with the n-th --module)."""
    if argv[:1] != ["patch"]:
        return argv
    files: list[str] = []
    rest: list[str] = []
    tokens = iter(argv[1:])
    for token in tokens:
        if token in ("--module", "--control"):
            rest += [token, next(tokens, "")]
        elif token.startswith("-") and token != "-":
            rest.append(token)
        else:
            files.append(token)
    return ["patch", *files, *rest]


def _patch_request(args: argparse.Namespace) -> dict[str, Any]:
    actions = [a for a in ("rollback", "squash", "list") if getattr(args, a)]
    if actions:
        if args.file or args.module or len(actions) > 1:
            raise UsageError("swapd patch: --rollback, --squash and --list take no file or "
                             "module, and one at a time")
        return PatchArgs(action=actions[0]).body()
    if not args.file or len(args.file) != len(args.module):
        raise UsageError("swapd patch: give FILE --module NAME (one --module per FILE), or "
                         "--rollback, --squash, --list")
    parts = []
    for path, module in zip(args.file, args.module, strict=True):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"swapd patch: cannot read {path}: {e}") from None
        parts.append({"module": module, "source": source, "name": os.path.basename(path)})
    options = {"dry_run": args.dry_run, "accept_absent": args.accept_absent,
               "prune": args.prune}
    if len(parts) == 1:  # the request of one module, as every supervisor version takes it
        return PatchArgs(action="apply", **parts[0], **options).body()
    return PatchArgs(action="apply", parts=parts, **options).body()


def _print_result(command: str, result: dict[str, Any]) -> None:
    data = result.get("data") or {}
    if not result.get("ok"):
        print(f"swapd {command}: FAILED: {result.get('error')}", file=sys.stderr)
        if command == "patch" and data.get("plans"):
            print(_format_plans(data["plans"]), file=sys.stderr)
        tail = data.get("tail")
        if tail:
            print(f"  output of {data.get('worker')}:", file=sys.stderr)
            print(_indent(tail, "    "), file=sys.stderr)
        return
    ops_text = cli_ops.format_result(command, data)
    if ops_text is not None:
        print(ops_text)
    elif command == "status":
        print(cli_status.format_status(data))
    elif command == "patch":
        print(_format_patch(data))
    elif data.get("reexec"):
        print(f"swapd upgrade --self: ok: supervisor pid {data['pid']} re-exec'd, "
              f"swapd {data['previous']} -> {data['version']}; workers kept")
    elif command in ("upgrade", "reload"):
        t = data.get("timings_ms", {})
        extra = f", pause {t['pause']:.1f} ms" if "pause" in t else ""
        held = "held" if data.get("watch") and "outcome" not in data["watch"] else "draining"
        print(f"swapd {command}: ok: gen={data.get('gen')} active, gen={data.get('previous')} "
              f"{held} (ready after {t.get('ready', 0):.0f} ms{extra}, "
              f"total {data.get('duration_ms', 0):.0f} ms){cli_ops.describe_watch(data)}")
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
            modules = ",".join(p.get("modules") or [p["module"]])
            squashed = ", squashed" if p.get("squashed") else ""
            lines.append(f"  #{p['id']}  {modules:<20} {p['name']:<16} "
                         f"sha256 {p['sha256'][:12]}  {when}  by {p['who']}  ({disk}{squashed})")
        return "\n".join(lines)
    if "squashed" in data:
        ids = ", ".join(str(i) for i in data["squashed"])
        return (f"swapd patch: patch(es) {ids} made permanent on {len(data['workers'])} "
                "worker(s); they can no longer be rolled back")
    if data.get("dry_run"):
        verdict = "would commit" if data.get("committable") else "would be REFUSED"
        return (f"swapd patch: dry run: patch {data['patch']} {verdict}; nothing changed\n"
                + _format_plans(data["plans"], full=True))
    if "module" in data:
        head = f"swapd patch: patch {data['patch']} ({data['module']}) rolled back"
        return "\n".join([head, *_grouped("notes", [
            (r["worker"], r.get("notes") or []) for r in data.get("workers", [])])])
    workers = len({p["worker"] for p in data["plans"]})
    return "\n".join([f"swapd patch: patch {data['patch']} in force on {workers} worker(s)",
                      _format_plans(data["plans"], full=False)]).rstrip()


_PLAN_KEYS = ("changed", "added", "absent", "removed", "refused")


def _format_plans(plans: list[dict[str, Any]], full: bool = True) -> str:
    """Each module's plan, once for the workers whose plans agree: every item when
    ``full`` (a dry run, a failure), else only the notes, which say what the patch could
    not do (a constant kept at its runtime value, code still running the old version...)."""
    lines: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in plans:
        plan = p.get("plan")
        key = json.dumps([p["module"], plan and {k: v for k, v in plan.items()
                                                 if k not in ("state", "path")},
                          p.get("error")], sort_keys=True)
        groups.setdefault(key, []).append(p)
    for members in groups.values():
        first = members[0]
        who = ", ".join(str(m["worker"]) for m in members)
        plan = first.get("plan")
        if plan is None:
            lines.append(f"{first['module']} (worker {who}): FAILED: {first.get('error')}")
            continue
        items = [(key, _plan_item(key, i)) for key in _PLAN_KEYS if full
                 for i in plan.get(key) or []]
        notes = plan.get("notes") or []
        if not items and not notes:
            continue
        lines.append(f"plan for {first['module']} (worker(s) {who}):")
        for key, text in items:
            lines.append(f"  {key + ':':<9} {text}")
        lines += [f"  note:     {n}" for n in notes]
    return "\n".join(lines)


def _plan_item(key: str, item: dict[str, Any]) -> str:
    if key == "absent":
        value = f" = {item['value']}" if item.get("value") else ""
        return f"{item.get('function')}: {item.get('name')} ({item.get('source')}{value})"
    if key == "refused":
        return f"{item.get('where')}: {item.get('what')}: {item.get('reason')} " \
               f"({item.get('remedy')})"
    if key == "removed":
        return f"{item.get('kind')} {item.get('where')}: {item.get('name')}"
    return f"{item.get('kind')} {item.get('name')}: {item.get('detail')}"


def _grouped(label: str, entries: list[tuple[int, list[str]]]) -> list[str]:
    """Lines said by several workers, once each, with the workers that said them."""
    seen: dict[str, list[int]] = {}
    for worker, lines in entries:
        for line in lines:
            seen.setdefault(line, []).append(worker)
    return [f"  {label[:-1]} (worker(s) {', '.join(map(str, ws))}): {line}"
            for line, ws in seen.items()]


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
