"""``python -m swapd.loadgen``: one bounded run against one endpoint, then its report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from swapd.loadgen.client import loop_factory
from swapd.loadgen.generator import DEFAULT_MAX_REQUESTS, LoadGenerator
from swapd.loadgen.outcomes import LoadConfigError
from swapd.loadgen.report import LoadReport
from swapd.loadgen.request import Mode, Request, http_get, http_get_int, http_post, line
from swapd.loadgen.target import parse_target

_KINDS: dict[str, Callable[[argparse.Namespace], Request]] = {
    "http-get": lambda a: http_get(a.path or "/"),
    "http-post": lambda a: http_post(a.path or "/incr"),
    "http-get-int": lambda a: http_get_int(a.path or "/count"),
    "line": lambda a: line(a.command),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m swapd.loadgen",
        description=("Closed-loop load against one endpoint; prints a report (the method of "
                     "docs/benchmarks.md)."),
    )
    p.add_argument("--connect", required=True, help="HOST:PORT, [V6]:PORT, unix:PATH or /PATH")
    p.add_argument("--kind", choices=sorted(_KINDS), default="http-get")
    p.add_argument("--path", help="HTTP path (default: / for GET, /incr, /count)")
    p.add_argument("--command", default="INCR", help="line-protocol command (default INCR)")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.KEEPALIVE.value)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    p.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    p.add_argument("--failure-pause", type=float, default=0.010, help="seconds after a failure")
    p.add_argument("--progress", action="store_true", help="a progress line per second")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    return p


async def _cli_run(gen: LoadGenerator, show_progress: bool) -> LoadReport:
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C ends the run early but still prints the report of what was measured.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, gen.request_stop)
    gen.start()
    if show_progress:
        while gen.progress().running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await gen._stop_event.wait()
            p = gen.progress()
            print(
                f"+{p.elapsed:6.1f} s  attempts {p.attempts:,}  ok {p.ok:,}  failed {p.failed:,}",
                file=sys.stderr,
            )
            if gen._stop_event.is_set():
                break
    return await gen.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        gen = LoadGenerator(
            parse_target(args.connect),
            _KINDS[args.kind](args),
            clients=args.clients,
            mode=args.mode,
            duration=args.duration,
            max_requests=args.max_requests,
            timeout=args.timeout,
            failure_pause=args.failure_pause,
        )
    except LoadConfigError as exc:
        print(f"swapd.loadgen: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory(not args.no_uvloop)) as runner:
        report = runner.run(_cli_run(gen, args.progress))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 1 if args.fail_on_error and report.failed else 0
