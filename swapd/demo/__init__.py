"""`swapd demo`: a supervised counter, a bounded load, several upgrades, an honest report.

Everything is real: a `swapd run` subprocess on a kernel-chosen loopback port, worker
processes exec'd fresh at every upgrade, and two groups of closed-loop clients (one
reusing keep-alive connections, one opening a connection per request) counting every
failure. At the end the counters of all workers are read back and compared with the
increments the clients saw acknowledged: in stateful mode nothing may be missing; in
stateless mode the loss is what every other supervisor does on reload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

from swapd.control import Client, ClientError
from swapd.loadgen import LoadGenerator, LoadReport, line

READY_TIMEOUT = 60.0
RUN_LIMIT = 120.0  # the whole demo is bounded; each client stops by then at the latest
BETWEEN_SWAPS = 1500  # successes between two upgrades, so each one happens under load
WINDOW_MARGIN = 0.25  # seconds around each upgrade counted as "during" it


class DemoError(Exception):
    pass


def run_demo(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except DemoError as e:
        print(f"swapd demo: {e}", file=sys.stderr)
        return 1


async def _demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="swapd-demo-") as tmp:
        control = os.path.join(tmp, "swapd.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(os.path.join(tmp, "notify.sock"))
        notify.setblocking(False)
        argv = [sys.executable, "-m", "swapd", "run", "--bind", "demo=127.0.0.1:0",
                "--workers", str(args.workers), "--mode", args.mode, "--control", control,
                "--log-level", "warning", "--", sys.executable, "-m", "swapd.demo.service"]
        env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname()}
        say = _printer(args.json)
        say(f"starting swapd: {args.workers} worker(s), {args.mode} mode, "
            f"control socket {control}")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await _wait_ready(notify, proc)
            return await _drive(args, control, say)
        finally:
            notify.close()
            await _stop(proc, control)


def _printer(as_json: bool) -> Any:
    def say(text: str, **fields: Any) -> None:
        if as_json:
            print(json.dumps({"message": text, **fields}), flush=True)
        else:
            print(f"  {text}", flush=True)
    return say


async def _wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise DemoError(f"supervisor not ready within {READY_TIMEOUT:g}s")
        try:
            data = await asyncio.wait_for(loop.sock_recv(notify, 4096), min(remaining, 1.0))
        except TimeoutError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise DemoError(f"supervisor exited ({proc.returncode}):\n{err}") from None
            continue
        if b"READY=1" in data.split(b"\n"):
            return


def _call(control: str, cmd: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for msg in Client(control, timeout=120).call(cmd):
        result = msg
    return result


async def _drive(args: argparse.Namespace, control: str, say: Any) -> int:
    loop = asyncio.get_running_loop()
    status = (await loop.run_in_executor(None, _call, control, "status"))["data"]
    host, _, port = status["listeners"][0]["address"].rpartition(":")
    target = (host, int(port))
    half = max(1, args.clients // 2)
    say(f"service on {host}:{port}; load: {half} keep-alive clients + {half} clients opening "
        "a connection per request, each sending INCR and counting every failure")
    loads = [LoadGenerator(target, line("INCR"), clients=half, mode=mode, duration=RUN_LIMIT,
                           max_requests=5_000_000, window_margin=WINDOW_MARGIN)
             for mode in ("keepalive", "close")]
    for load in loads:
        load.start()
    swaps: list[dict[str, Any]] = []
    try:
        for i in range(1, args.swaps + 1):
            await asyncio.gather(*(g.wait_for_successes(BETWEEN_SWAPS, 60) for g in loads))
            label = f"upgrade {i}"
            for g in loads:
                g.begin(label)
            res = await loop.run_in_executor(None, _call, control, "upgrade")
            for g in loads:
                g.end(label)
            data = res.get("data", {})
            swaps.append({"ok": res.get("ok"), "gen": data.get("gen"),
                          "pause": data.get("timings_ms", {}).get("pause"),
                          "error": res.get("error"), "total": data.get("duration_ms")})
            pause = swaps[-1]["pause"]
            say(f"{label}/{args.swaps}: " + (
                f"ok, generation {data.get('gen')} serving"
                + (f", handoff pause {pause:.1f} ms" if pause is not None else "")
                if res.get("ok") else f"FAILED: {res.get('error')}"))
        await asyncio.gather(*(g.wait_for_successes(BETWEEN_SWAPS, 60) for g in loads))
    finally:
        reports = [await g.stop() for g in loads]
    counts = await loop.run_in_executor(None, _read_counts, target, args.workers)
    _report(args, say, swaps, reports, counts)
    ok = all(s["ok"] for s in swaps) and sum(r.failed for r in reports) == 0
    if args.mode == "stateful":
        ok = ok and sum(counts.values()) == sum(r.acknowledged or 0 for r in reports)
    return 0 if ok else 1


def _read_counts(target: tuple[str, int], workers: int) -> dict[int, int]:
    """Each worker's counter: connect until every slot has been reached (bounded)."""
    counts: dict[int, int] = {}
    for _ in range(50 * workers):
        with socket.create_connection(target, timeout=10) as c, c.makefile("rwb") as f:
            f.write(b"WHO\nGET\n")
            f.flush()
            slot = int(f.readline().split()[1])
            counts[slot] = int(f.readline())
        if len(counts) == workers:
            break
    return counts


def _report(args: argparse.Namespace, say: Any, swaps: list[dict[str, Any]],
            reports: list[LoadReport], counts: dict[int, int]) -> None:
    total = sum(r.attempts for r in reports)
    failed = sum(r.failed for r in reports)
    acked = sum(r.acknowledged or 0 for r in reports)
    final = sum(counts.values())
    if not args.json:
        print()
    say("report")
    say(f"{'':<10} {'failed (keep-alive)':>20} {'failed (new conn)':>18} "
        f"{'longest gap':>12} {'pause':>9}")
    for i, swap in enumerate(swaps):
        windows = [r.windows[i] for r in reports]
        gap = max(w.longest_gap for w in windows) * 1000
        pause = f"{swap['pause']:.1f} ms" if swap["pause"] is not None else "-"
        say(f"upgrade {i + 1:<2} {windows[0].failed:>20} {windows[1].failed:>18} "
            f"{gap:>9.1f} ms {pause:>9}", swap=swap)
    say(f"(longest gap: the longest time no client got an answer, within {WINDOW_MARGIN:g} s "
        "of the upgrade; pause: the time no worker accepted)")
    say(f"requests: {total:,} sent, {total - failed:,} ok, {failed:,} failed "
        f"({sum(r.connections_opened for r in reports):,} connections)")
    state = ", ".join(f"worker {slot}: {n:,}" for slot, n in sorted(counts.items()))
    if args.mode == "stateful":
        verdict = "nothing lost" if final == acked else f"LOST {acked - final:,}"
        say(f"state: {acked:,} increments acknowledged, counters now {final:,} ({state}): "
            f"{verdict}")
    else:
        say(f"state: {acked:,} increments acknowledged, counters now {final:,} ({state}): "
            f"{acked - final:,} lost — stateless swaps start every worker from zero, as "
            "gunicorn, uvicorn or nginx reloads do; run `swapd demo` (stateful) to compare")


async def _stop(proc: subprocess.Popen[bytes], control: str) -> None:
    loop = asyncio.get_running_loop()
    if proc.poll() is None:
        with contextlib.suppress(ClientError, OSError):
            await loop.run_in_executor(None, _call, control, "stop")
    try:
        await loop.run_in_executor(None, proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        await loop.run_in_executor(None, proc.wait, 10)
    if proc.stderr is not None:
        proc.stderr.close()

