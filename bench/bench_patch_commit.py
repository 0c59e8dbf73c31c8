"""How long a patch commit blocks a worker's event loop (swapd.patch).

For generated modules of 10, 100 and 1,000 functions (70 % module functions, 20 % methods
in classes of ten, 10 % closures made by factories and held in a list), the benchmark runs an
asyncio loop (uvloop when installed) the way a worker does: each trial prepares a patch on a
thread of the default executor, then commits it on the loop thread, then prepares the
rollback off the loop and commits it on the loop.  It reports:

  blocked      wall time of ``plan.commit()`` on the loop thread: what the loop cannot run
  store batch  the indivisible C-level step inside it (all code/default/class/global stores)
  rollback     wall time of the rollback commit on the loop thread
  prepare      wall time of ``prepare()`` on the executor thread (it competes for the GIL),
               and the longest gap between two loop ticks while it ran (parsing and
               compiling the new source, and listing the gc heap, are single C calls that
               hold the GIL; each trial's source is new, the base was parsed before)

Scenarios: *all* changes every function body (worst case), *one* changes one function (the
usual fix), *freevars* adds a free variable to every closure (each live closure gets code
compiled for its own closure, the new variable read through a cell held in a constant).
Then the per-call cost of such a closure against a plain one, and the memory the engine
keeps per committed patch, before and after `make_permanent` (`swapd patch --squash`).

    .venv/bin/python bench/bench_patch_commit.py            # full run
    .venv/bin/python bench/bench_patch_commit.py --quick    # smoke run
    .venv/bin/python bench/bench_patch_commit.py --heap 1000000   # also a 1M-object heap
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import importlib.util
import statistics
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, md_table

import swapd.patch as patch
import swapd.patch.transaction as patch_api  # commit() calls its apply_or_undo: timed below

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a runtime dependency of swapd
    uvloop = None


def module_source(n: int, version: int, scenario: str) -> str:
    """A module with ``n`` functions; ``version`` changes bodies as ``scenario`` says."""
    n_methods = n * 2 // 10
    n_closures = max(1, n // 10)
    n_plain = n - n_methods - n_closures
    every = scenario == "all"

    def ret(i: int) -> str:
        changed = every or (scenario == "one" and i == 0)
        return f"return x + {version if changed else 0}"

    out = ["STATE = {'hits': 0}", ""]
    for i in range(n_plain):
        out += [f"def f{i}(x=1):", "    STATE['hits'] += 1", f"    {ret(i)}", ""]
    for c in range((n_methods + 9) // 10):
        out += [f"class K{c}:"]
        for j in range(min(10, n_methods - c * 10)):
            out += [f"    def m{j}(self, x=1):", f"        {ret(n_plain + c * 10 + j)}", ""]
    extra = scenario == "freevars" and version > 0
    for k in range(n_closures):
        out += [f"def make{k}():", "    count = 0"]
        out += ["    step = 1"] if extra else []
        out += [f"    def inc{k}():", "        nonlocal count"]
        out += ["        count += step" if extra else "        count += 1"]
        out += [f"        return count + {version if every else 0}", f"    return inc{k}", ""]
    out += ["HELD = [" + ", ".join(f"make{k}()" for k in range(n_closures)) + "]", ""]
    return "\n".join(out)


def load(tmp: Path, source: str) -> ModuleType:
    name = f"bench_patch_{uuid.uuid4().hex[:10]}"
    path = tmp / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Ticker:
    """Measures the longest gap between two turns of the loop."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.running = True

    async def run(self) -> None:
        last = time.perf_counter()
        while self.running:
            await asyncio.sleep(0)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            last = now


class BatchTimer:
    """Times the indivisible store batch inside commit()."""

    def __init__(self) -> None:
        self.inner = patch_api.apply_or_undo
        self.last = 0.0

    def __call__(self, forward: list[Any], undo: list[Any]) -> None:
        t0 = time.perf_counter()
        self.inner(forward, undo)
        self.last = time.perf_counter() - t0

    def __enter__(self) -> BatchTimer:
        patch_api.apply_or_undo = self  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        patch_api.apply_or_undo = self.inner  # type: ignore[assignment]


async def trial_set(module: ModuleType, n: int, scenario: str, trials: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    base = patch.source_of(module)[0]
    blocked, batch, rollback, prepare, gaps = [], [], [], [], []
    stores = 0
    with BatchTimer() as timer:
        for trial in range(trials):
            # A source never seen before, as in real use.
            new = module_source(n, 1, scenario) + f"# trial {trial}\n"
            ticker = Ticker()
            tick = asyncio.create_task(ticker.run())
            t0 = time.perf_counter()
            plan = await loop.run_in_executor(None, patch.prepare, module, new)
            prepare.append(time.perf_counter() - t0)
            ticker.running = False
            await tick
            gaps.append(ticker.max_gap)
            stores = plan.to_dict()["stores"]
            t0 = time.perf_counter()
            handle = plan.commit()  # on the loop thread, between two callbacks
            blocked.append(time.perf_counter() - t0)
            batch.append(timer.last)
            undo = await loop.run_in_executor(None, handle.prepare_rollback)
            t0 = time.perf_counter()
            undo.commit()
            rollback.append(time.perf_counter() - t0)
            assert patch.source_of(module)[0] == base
    return {
        "stores": stores,
        "blocked": blocked,
        "batch": batch,
        "rollback": rollback,
        "prepare": prepare,
        "gaps": gaps,
    }


def us(values: list[float], q: float | None = None) -> str:
    if q is None:
        return f"{statistics.median(values) * 1e6:.0f}"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6:.0f}"


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f}"


def call_costs() -> list[list[str]]:
    src = (
        "def make():\n    a = 1\n    def g(x):\n        return x + a\n    return g\nheld = make()\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        m = load(Path(tmp), src)
        new = src.replace("    a = 1\n", "    a = 1\n    b = 0\n").replace("x + a", "x + a + b")
        patch.apply(m, new)
        adapted = m.held  # made before the patch: its free variables changed
        direct = m.make()  # made by the patched code: a plain closure
        assert adapted.__code__.co_freevars == ("a",) and direct.__code__.co_freevars == ("a", "b")
        rows = []
        for label, fn in (("plain closure (made by the new code)", direct),
                          ("closure that gained a variable (made before)", adapted)):
            number = 2_000_000
            best = min(timeit.repeat(lambda f=fn: f(1), number=number, repeat=5))
            rows.append([label, f"{best / number * 1e9:.0f}"])
        patch.forget(m)
        sys.modules.pop(m.__name__, None)
        return rows


def memory_costs(patches: int = 50) -> list[list[str]]:
    """What the engine keeps per committed patch (tracemalloc, after a full collection): a
    generated module of ~100 lines, one function changed per patch; then after
    `make_permanent` (what `swapd patch --squash` does in each worker)."""
    import tracemalloc

    with tempfile.TemporaryDirectory() as tmp:
        module = load(Path(tmp), module_source(20, 0, "one"))
        lines = module_source(20, 0, "one").count("\n")
        patch.apply(module, module_source(20, 1, "one"))  # warm: first-use allocations
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for version in range(2, 2 + patches):
                patch.apply(module, module_source(20, version, "one"))
            gc.collect()
            kept = tracemalloc.take_snapshot()
            patch.make_permanent(module)
            gc.collect()
            folded = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        patch.forget(module)
        sys.modules.pop(module.__name__, None)

    def per_patch(snapshot: Any) -> str:
        grown = sum(s.size_diff for s in snapshot.compare_to(before, "filename"))
        return f"{grown / patches / 1024:.1f}"

    return [[f"{lines} lines, {patches} patches", per_patch(kept), per_patch(folded)]]


def ballast(count: int) -> Iterator[list[Any]]:
    """Keep ``count`` extra gc-tracked objects alive (a bigger heap to scan)."""
    yield [[i] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--trials", type=int, default=0, help="trials per row")
    parser.add_argument(
        "--heap", type=int, default=0, help="also measure with this many extra objects"
    )
    args = parser.parse_args()
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    trials = args.trials or (3 if args.quick else 30)
    scenarios = ("all", "one") if args.quick else ("all", "one", "freevars")
    if uvloop is not None:
        uvloop.install()  # type: ignore[attr-defined]

    info = machine_info()
    print(f"# swapd.patch commit benchmark ({datetime.date.today()})")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- loop: {'uvloop' if uvloop is not None else 'asyncio'}; trials per row: {trials}")
    print(f"- command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print()

    rows = []
    heaps = [0] + ([args.heap] if args.heap else [])
    with tempfile.TemporaryDirectory() as tmp:
        for heap in heaps:
            keep = next(ballast(heap))
            objects = len(gc.get_objects())
            for n in sizes if not heap else (100,):
                for scenario in scenarios if not heap else ("one",):
                    module = load(Path(tmp), module_source(n, 0, scenario))
                    stats = asyncio.run(trial_set(module, n, scenario, trials))
                    rows.append(
                        [
                            n,
                            scenario,
                            f"{objects / 1e6:.2f}M",
                            stats["stores"],
                            us(stats["blocked"]),
                            us(stats["blocked"], 0.9),
                            us(stats["blocked"], 1.0),
                            us(stats["batch"]),
                            us(stats["rollback"]),
                            ms(stats["prepare"]),
                            ms(stats["gaps"]),
                        ]
                    )
                    print(md_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
                    patch.forget(module)
                    sys.modules.pop(module.__name__, None)
            del keep
    print()
    print(md_table(HEADERS, rows))
    print()
    print(md_table(["function", "ns per call (best of 5)"], call_costs()))
    print()
    print(md_table(["module", "KiB kept per patch", "after make_permanent (--squash)"],
                   memory_costs()))


HEADERS = [
    "functions",
    "changed",
    "heap objects",
    "stores",
    "blocked us median",
    "p90",
    "max",
    "store batch us",
    "rollback us",
    "prepare ms",
    "max loop gap during prepare ms",
]

if __name__ == "__main__":
    main()
