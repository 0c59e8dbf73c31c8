"""The command line of operations: release labels, watch windows, rollback, history,
metrics and log formats (the flags, the requests, and how their answers print).
`cli.py` calls in here; the commands are clients of the control socket like the rest."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from swapd.commands import HISTORY_MAX, MAX_WATCH
from swapd.config import MAX_SECONDS, default_control_path

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3


def seconds_type(*, zero: bool = False, limit: float = MAX_SECONDS) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds > 0 (>= 0 with `zero`), at most `limit`;
    the same bounds as the configuration file's, so that a flag and a key fail alike."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not ((value >= 0 if zero else value > 0) and value <= limit):
            kind = "a number of seconds >= 0" if zero else "a positive number of seconds"
            raise argparse.ArgumentTypeError(f"must be {kind} (at most {limit:.0f}): {text!r}")
        return value
    return parse


def count_type(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer {low}-{high}: {text!r}")
        return value
    return parse


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--release", metavar="LABEL",
                     help="the first generation's release label (default: $SWAPD_RELEASE, "
                          "else derived from the code)")
    run.add_argument("--watch", type=seconds_type(zero=True, limit=MAX_WATCH),
                     metavar="SECONDS",
                     help="after each swap, hold the old generation this long for a rollback")
    run.add_argument("--health-url", metavar="[LISTENER:]PATH",
                     help="probed over the listener during a watch window (HTTP 2xx = healthy)")
    run.add_argument("--health-interval", type=seconds_type(), metavar="SECONDS",
                     help="seconds between health probes (default 1)")
    run.add_argument("--health-failures", type=int, metavar="N",
                     help="failed probes in a row that roll back (default 3)")
    run.add_argument("--metrics", metavar="[HOST:]PORT",
                     help="serve Prometheus metrics here (e.g. 127.0.0.1:9100); off by default")
    run.add_argument("--worker-output", choices=["prefixed", "passthrough"],
                     help="prefixed (default): each line through swapd's log; passthrough: "
                          "the workers write to swapd's stdout/stderr directly")
    run.add_argument("--state-dir", metavar="DIR", help="where the history file lives")
    run.add_argument("--log-format", choices=["text", "json"], default="text",
                     help="the supervisor's own log lines: key=value text or JSON objects")


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"watch": args.watch, "health_url": args.health_url,
            "health_interval": args.health_interval, "health_failures": args.health_failures,
            "metrics": args.metrics, "worker_output": args.worker_output,
            "state_dir": args.state_dir}


def release_arg(args: argparse.Namespace) -> str | None:
    """--release, else $SWAPD_RELEASE; ValueError (one line) if it is not a usable label."""
    from swapd.supervisor.release import check_label

    label = args.release or os.environ.get("SWAPD_RELEASE") or None
    return check_label(label) if label is not None else None


def add_swap_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--release", metavar="LABEL",
                   help="the new generation's release label (default: $SWAPD_RELEASE, else "
                        "derived from the code)")
    c.add_argument("--watch", type=seconds_type(zero=True, limit=MAX_WATCH), metavar="SECONDS",
                   help="hold the old generation this long for a rollback (0: drain it now)")
    c.add_argument("--wait-watch", action="store_true",
                   help="answer when the watch window is over: exit 1 if it rolled back")


def add_parsers(sub: Any) -> list[argparse.ArgumentParser]:
    """`rollback` and `history`; returned so that the caller adds the common client flags."""
    rb = sub.add_parser("rollback", help="roll back to the generation held by a watch window")
    h = sub.add_parser("history", help="what was done to the service: swaps, patches, ...")
    h.add_argument("-n", type=count_type(0, HISTORY_MAX), default=20, metavar="N",
                   help="the last N entries (20)")
    h.add_argument("--state-dir", metavar="DIR",
                   help="read the file there when no supervisor answers")
    for c in (rb, h):
        c.add_argument("--control", help="control socket path (default: $SWAPD_CONTROL, ...)")
        c.add_argument("--json", action="store_true", help="print raw JSON lines")
    return [rb, h]


def swap_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {}
    release = release_arg(args)
    if release is not None:
        request["release"] = release
    if args.watch is not None:
        request["watch"] = args.watch
    if args.wait_watch:
        request["wait_watch"] = True
    return request


def history_fallback(args: argparse.Namespace, error: str) -> int:
    """`swapd history` with no supervisor to ask: read its file directly, if it and its
    directory are the caller's or root's (not entries another user made up)."""
    from swapd.supervisor.history import history_path, read, untrusted

    control = args.control or default_control_path()
    path = history_path(args.state_dir, control)
    if not os.path.exists(path):
        print(f"swapd history: {error}; and no history file at {path}", file=sys.stderr)
        return EXIT_UNREACHABLE
    why = untrusted(path)
    if why is not None:
        print(f"swapd history: {error}; and refusing to read {path}: {why}", file=sys.stderr)
        return EXIT_UNREACHABLE
    entries, bad = read(path, max(0, args.n))
    data = {"path": path, "entries": entries, "unreadable_lines": bad}
    if args.json:
        print(json.dumps({"type": "result", "ok": True, "data": data}))
    else:
        print(f"(no supervisor answers: {error}; read {path})", file=sys.stderr)
        print(format_history(data))
    return EXIT_OK


def format_history(data: dict[str, Any]) -> str:
    entries = data.get("entries", [])
    lines = [] if entries else [f"no history yet ({data.get('path')})"]
    for e in entries:
        lines.append(format_entry(e))
    if data.get("unreadable_lines"):
        lines.append(f"({data['unreadable_lines']} unreadable line(s) skipped)")
    return "\n".join(lines)


def format_entry(e: dict[str, Any]) -> str:
    who = e.get("who") or {}
    via = who.get("via")
    if via == "control":
        by = f"uid {who.get('uid')} pid {who.get('pid')}"
    elif via == "signal":
        by = str(who.get("signal"))
    elif via == "watch":
        by = f"watch ({who.get('trigger', 'window')})"
    else:
        by = str(via or "?")
    gens = ""
    if e.get("gen_before") is not None or e.get("gen_after") is not None:
        before = _gen(e.get("gen_before"), e.get("release_before"))
        after = _gen(e.get("gen_after"), e.get("release_after"))
        gens = f"  {before} -> {after}" if before and after else f"  {before or after}"
    extra = ""
    if e.get("duration_ms") is not None:
        extra += f"  {e['duration_ms']:.0f} ms"
    if e.get("watch"):
        extra += f"  watch {e['watch']:g}s"
    if e.get("patch") is not None:
        extra += f"  patch {e['patch']} {e.get('module') or ''}".rstrip()
    reason = e.get("refused") or e.get("reason")
    tail = f"  ({reason})" if reason else ""
    when = str(e.get("time", "")).replace("T", " ")[:19] + "Z"
    return (f"{when}  {e.get('kind', '?'):<14} {e.get('outcome', '?'):<11} by {by}"
            f"{gens}{extra}{tail}")


def _gen(gen: Any, release: Any) -> str:
    if gen is None:
        return ""
    return f"gen {gen}" + (f" ({release})" if release else "")


def format_watch(s: dict[str, Any]) -> list[str]:
    """Lines `swapd status` adds about releases, the watch window and the last rollback."""
    lines = []
    w = s.get("watch")
    if w:
        lines.append(f"watch window: gen {w['gen']} ({w['release']}) watched, "
                     f"{w['remaining']:.0f}s of {w['seconds']:g}s left; "
                     f"gen {w['held']} ({w['held_release']}) held; "
                     f"`swapd rollback` to go back"
                     + (f"; health {w['health_url']}, {w['probe_failures']} failed probe(s)"
                        if w.get("health_url") else ""))
    last = s.get("last_rollback")
    if last:
        what = {"rolled-back": f"rolled back from gen {last['gen']} to gen {last['held']}",
                "refused": f"rollback of gen {last['gen']} REFUSED ({last.get('refused')})",
                "failed": f"rollback of gen {last['gen']} FAILED ({last.get('refused')})"}
        lines.append(f"last rollback: {what.get(last['outcome'], last['outcome'])}, "
                     f"trigger {last.get('trigger')}: {last.get('reason')}")
    if s.get("history"):
        lines.append(f"history: {s['history']}" + (f"  metrics: http://{s['metrics']}/metrics"
                                                   if s.get("metrics") else ""))
    return lines


def format_result(command: str, data: dict[str, Any]) -> str | None:
    """The one-line answer of an operations command (None: not one of ours)."""
    if command == "history":
        return format_history(data)
    if command == "rollback":
        t = data.get("timings_ms") or {}
        pause = f", pause {t['pause']:.1f} ms" if "pause" in t else ""
        lost = (f"; slots {data['lost_slots']} restarted from their state at the commit"
                if data.get("lost_slots") else "")
        return (f"swapd rollback: ok: gen={data['held']} ({data['held_release']}) active again, "
                f"gen={data['gen']} ({data['release']}) draining (in "
                f"{data.get('duration_ms', 0):.0f} ms{pause}){lost}")
    return None


def describe_watch(data: dict[str, Any]) -> str:
    """The tail of `swapd upgrade`'s ok line when a window was opened or waited for."""
    w = data.get("watch")
    if not w:
        return ""
    if "outcome" in w:
        return f"; watch window passed, gen={w['held']} drained"
    return f"; gen={w['held']} held for a {w['seconds']:g}s watch window"
