"""Third-party servers under swapd: how long a swap waits for readiness, against how long the
app itself takes to import, and what each server's own drain does to clients.

    python bench/bench_servers.py                      # every recipe (~4 minutes)
    python bench/bench_servers.py --quick              # smoke run: 2 swaps, short loads
    python bench/bench_servers.py --only uvicorn aiohttp --markdown out.md --json out.json

For each recipe of docs/servers.md (the exact worker command is printed), one `swapd run`:

    ready      --swaps upgrades with no load to an app that imports in no time ("empty"),
               then --swaps to one that spends --import-sleep s importing (standing for a real
               app); per swap, swapd's `timings_ms.ready` (spawn to every new worker ready)
               and the app's own import time, measured inside each new process by
               tests/apps/servers_app.py and written to $IMPORT_LOG (with 2 workers the swap
               waits for the slower one: the max over the new workers). ready - empty is what
               the import added to the swap (it should equal the import time: the swap waits
               for the app, no longer); ready - import is the rest: interpreter start, the
               server's own imports and boot, and the readiness signal's way to swapd.
    keepalive  16 closed-loop clients on keep-alive connections, 3 swaps (load between swaps
               gated on successes, not time): failed requests per swap, and their kinds
    close      the same with a new connection per request

The load generator (swapd.loadgen, the method of docs/benchmarks.md) runs in this process
and shares the two cores with the servers: error counts and ratios count, absolute rates do not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    ROOT,
    BenchError,
    SwapdProcess,
    machine_info,
    md_table,
    median,
)

from swapd.loadgen import BackgroundLoad, http_get

APPS = ROOT / "tests" / "apps"
BIN = Path(sys.executable).parent


def gunicorn(*extra: str, app: str = "servers_app:make_wsgi()") -> list[str]:
    return [str(BIN / "gunicorn"), "-c", "python:swapd.servers.gunicorn", "--workers", "2",
            "--graceful-timeout", "10", "--no-control-socket", *extra, app]


RECIPES: dict[str, list[str]] = {
    "gunicorn-sync": gunicorn(),
    "gunicorn-sync-preload": gunicorn("--preload"),
    "gunicorn-gthread": gunicorn("-k", "gthread", "--threads", "4"),
    "gunicorn-uvicorn": gunicorn("-k", "uvicorn.workers.UvicornWorker", app="servers_app:asgi"),
    "gunicorn-uvicorn (swapd's worker class)": gunicorn(
        "-k", "swapd.servers.gunicorn_uvicorn.UvicornWorker", app="servers_app:asgi"),
    "uvicorn": [PYTHON, "-m", "swapd.servers.uvicorn", "servers_app:asgi"],
    "hypercorn": [PYTHON, "-m", "swapd.servers.hypercorn", "servers_app:asgi"],
    "aiohttp": [PYTHON, "-m", "swapd.servers.aiohttp", "servers_app:make_aiohttp"],
    "flask (gunicorn sync)": gunicorn(app="flask_app:create_app()"),
    "django (gunicorn sync)": gunicorn(app="django_app:application"),
}


def import_times(log: Path, seen: set[int]) -> list[float]:
    """Import seconds of each process that logged since the last call (a Flask or Django
    module logs its whole import, framework included, after servers_app logged its own:
    the longer one counts)."""
    found: dict[int, float] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            pid_text, _, seconds = line.partition(" imported ")
            pid = int(pid_text)
            if pid not in seen:
                found[pid] = max(found.get(pid, 0.0), float(seconds))
    seen.update(found)
    return list(found.values())


def swaps_under_load(swapd: SwapdProcess, mode: str, swaps: int, between: int,
                     duration: float) -> dict[str, Any]:
    with BackgroundLoad(swapd.address, http_get("/"), mode=mode, clients=16,
                        duration=duration, max_requests=1_000_000) as load:
        for i in range(swaps):
            load.wait_for_successes(between, timeout=60)
            with load.window(f"swap {i + 1}"):
                res = swapd.call("upgrade", 120)
            if swapd.notify is not None:
                swapd.notify.drain()
            if not res.get("ok"):
                raise BenchError(f"upgrade failed: {res}")
        load.wait_for_successes(between, timeout=60)
    report = load.report
    assert report is not None
    return {
        "errors_per_window": [w.failed for w in report.windows],
        "failed": report.failed,
        "failed_in_windows": report.failed_in_windows,
        "on_reused": report.failed_on_reused,
        "kinds": dict(report.failures),
        "worst_gap_ms": round(max(w.longest_gap for w in report.windows) * 1000, 1),
        "ok": report.ok,
    }


def ready_phase(swapd: SwapdProcess, name: str, behavior: Path, import_log: Path,
                seen: set[int], sleep: float, swaps: int) -> tuple[list[float], list[float]]:
    """`swaps` upgrades to releases that spend `sleep` s importing: (ready ms, import ms)."""
    behavior.write_text(json.dumps({"import_sleep": sleep}))
    ready, imports = [], []
    for _ in range(swaps):
        res = swapd.call("upgrade", 120)
        if swapd.notify is not None:
            swapd.notify.drain()
        if not res.get("ok"):
            raise BenchError(f"{name}: upgrade failed: {res}")
        ready.append(float(res["data"]["timings_ms"]["ready"]))
        new = import_times(import_log, seen)
        if not new:
            raise BenchError(f"{name}: no import logged by the new generation")
        imports.append(max(new) * 1000)
    return ready, imports


def run_recipe(name: str, command: list[str], args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    behavior, import_log = work / "behavior.json", work / "imports.log"
    behavior.write_text(json.dumps({"import_sleep": 0}))
    swapd = SwapdProcess(work, [
        "--bind", "http=127.0.0.1:0", "--cwd", str(APPS), "--ready-timeout", "60",
        "--env", f"BEHAVIOR={behavior}", "--env", f"IMPORT_LOG={import_log}",
        "--env", f"HOME={work}", "--env", "PYTHONWARNINGS=ignore::DeprecationWarning",
        "--", *command], ready_timeout=60, stop_timeout=60)
    result: dict[str, Any] = {"recipe": name, "command": command}
    try:
        swapd.start()
        seen: set[int] = set()
        import_times(import_log, seen)  # the first generation's
        floor, _ = ready_phase(swapd, name, behavior, import_log, seen, 0.0, args.swaps)
        ready, imports = ready_phase(swapd, name, behavior, import_log, seen,
                                     args.import_sleep, args.swaps)
        result["floor_ms"] = floor
        result["ready_ms"] = ready
        result["import_ms"] = imports
        result["overhead_ms"] = [r - i for r, i in zip(ready, imports, strict=True)]
        behavior.write_text(json.dumps({}))
        for mode in args.modes:
            result[mode] = swaps_under_load(swapd, mode, args.load_swaps, args.between,
                                            args.duration)
    finally:
        result["notes"] = swapd.log_problems()[-5:] + swapd.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


def tables(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ready_rows = [
        (r["recipe"], f"{median(r['floor_ms']):.0f}", f"{median(r['ready_ms']):.0f}",
         f"{median(r['import_ms']):.0f}",
         f"{median(r['ready_ms']) - median(r['floor_ms']):.0f}",
         f"{median(r['overhead_ms']):.0f}") for r in results]
    out = [f"ready vs import (medians of {args.swaps} swaps each; the app spends 0, then "
           f"{args.import_sleep * 1000:.0f} ms importing)",
           md_table(["recipe", "ready ms, empty app", "ready ms", "app import ms",
                     "ready - empty", "ready - import"], ready_rows)]
    for mode in args.modes:
        rows = []
        for r in results:
            m = r[mode]
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(m["kinds"].items())) or "-"
            rows.append((r["recipe"], f"{m['failed'] / args.load_swaps:.1f}",
                         " ".join(map(str, m["errors_per_window"])), kinds, m["on_reused"],
                         m["failed"] - m["failed_in_windows"], m["worst_gap_ms"]))
        out += ["", f"{mode}: 16 clients, {args.load_swaps} swaps",
                md_table(["recipe", "failed per swap", "per window", "kinds",
                          "on reused conns", "outside windows", "worst gap ms"], rows)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), metavar="RECIPE")
    p.add_argument("--swaps", type=int, default=7)
    p.add_argument("--load-swaps", type=int, default=3)
    p.add_argument("--between", type=int, default=3000,
                   help="successes between two swaps (enough that windows do not overlap)")
    p.add_argument("--duration", type=float, default=60.0, help="bound of one load run (s)")
    p.add_argument("--import-sleep", type=float, default=0.3)
    p.add_argument("--modes", nargs="*", default=["keepalive", "close"],
                   choices=["keepalive", "close"])
    p.add_argument("--markdown")
    p.add_argument("--json")
    args = p.parse_args()
    if args.quick:
        args.swaps, args.load_swaps, args.between = 2, 1, 200
    info = machine_info()
    command = " ".join(["python", "bench/bench_servers.py", *sys.argv[1:]])
    print(f"# bench_servers {time.strftime('%Y-%m-%d %H:%M')} | {command}")
    for k, v in info.items():
        print(f"#   {k}: {v}")
    results = []
    for name in args.only or list(RECIPES):
        print(f"-- {name}: {' '.join(RECIPES[name])}", flush=True)
        r = run_recipe(name, RECIPES[name], args)
        print(f"   ready {r['ready_ms']} ms; import {[round(x, 1) for x in r['import_ms']]} ms",
              flush=True)
        for note in r["notes"]:
            print(f"   note: {note}")
        results.append(r)
    text = tables(results, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(f"{command}\n\n{text}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "command": command,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
