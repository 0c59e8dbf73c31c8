"""`swapd status` for a human: the supervisor's report (swapd.supervisor.status), one fact
per line, nothing shown that is no longer true (a dead worker's pid and growing uptime, a
listener that stopped listening shown as if it listened)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from swapd import cli_ops

ENDED_SHOWN = 5  # of the generations that ended (the report keeps 16: --json has them all)


def format_status(s: dict[str, Any]) -> str:
    lines = [f"swapd {s['version']}  pid {s['pid']}  up {_dur(s['uptime'])}  mode {s['mode']}  "
             f"control {s['control']}"]
    lines.append("listeners:")
    for lis in s["listeners"]:
        dead = "  listening: no" if lis.get("listening") is False else ""
        lines.append(f"  {lis['name']:<10} {lis['address']:<28} ({lis['source']}){dead}")
    lines.append("generations:")
    for g in s["generations"]:
        lines.append(f"  gen {g['id']:<4} {g['state'].upper():<9} {len(g['workers'])} worker(s)  "
                     f"release {g.get('release') or '?'}  age {_dur(g['age'])}  "
                     f"command: {' '.join(g['command'])}")
        for w in g["workers"]:
            restarts = g["restarts"][w["slot"]] if w["slot"] < len(g["restarts"]) else 0
            flag = "  CRASH-LOOP" if w.get("crash_loop") else ""
            if "exit" in w:  # its process is gone (a crash-loop backoff): no pid, no uptime
                lines.append(f"    worker {w['slot']}  pid {'-':<7} {w['state']:<9} "
                             f"(pid {w['pid']} {w['exit']})  restarts {restarts}{flag}")
                continue
            usage = ""
            if "rss" in w:
                usage = f"  rss {w['rss'] / 2**20:.1f} MiB  cpu {w['cpu_seconds']:.2f}s"
            lines.append(f"    worker {w['slot']}  pid {w['pid']:<7} {w['state']:<9} "
                         f"up {_dur(w['uptime'])}{usage}  restarts {restarts}{flag}")
    lines += _ended(s.get("ended") or [])
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
        modules = ",".join(p.get("modules") or [p["module"]])
        squashed = ", squashed" if p.get("squashed") else ""
        lines.append(f"patch #{p['id']} in force: {modules} from {p['name']} "
                     f"(sha256 {p['sha256'][:12]}, {disk}{squashed})")
    lines += cli_ops.format_watch(s)
    for warning in s.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def _ended(ended: list[dict[str, Any]]) -> list[str]:
    """The last generations that ended, oldest first, with how their workers went."""
    if not ended:
        return []
    shown = ended[-ENDED_SHOWN:]
    earlier = len(ended) - len(shown)
    lines = ["ended:" + (f" ({earlier} earlier: swapd status --json)" if earlier else "")]
    for g in shown:
        exits = Counter(str(w.get("exit")) for w in g.get("workers") or [])
        how = ", ".join(f"{n} {text}" for text, n in exits.items()) or "no worker"
        lines.append(f"  gen {g['id']:<4} {str(g.get('state', '?')).upper():<9} "
                     f"lived {_dur(g.get('lived', 0))}  restarts {g.get('restarts', 0)}  "
                     f"worker(s): {how}")
    return lines


def _dur(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
