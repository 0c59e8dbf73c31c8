"""Atomicity of commit and rollback with respect to other threads.

The guarantee under test (see the `swapd.patch` docstring): every bytecode another thread
executes sees either none or all of a patch's stores.  Three consequences are checked:

* a C-level snapshot of every patched object (function code, class attribute, module
  global), taken by reader threads in a tight loop, is never a mix of old and new;
* a thread calling patched functions sees versions change monotonically: never a newer
  version followed by an older one while patches only move forward (and the reverse
  while they are rolled back);
* on the event-loop thread, where commits run between callbacks, a callback that calls two
  patched functions always sees the same version for both.

Readers loop until told to stop (bounded by an iteration cap); every handshake has a
deadline.  ``sys.setswitchinterval`` is lowered only to make thread switches frequent.
"""

from __future__ import annotations

import asyncio
import functools
import operator
import sys
import threading
from collections.abc import Iterator
from itertools import starmap
from types import ModuleType
from typing import Any

import pytest

from swapd import patch
from swapd.patch.commit import run_atomic
from tests.unit.patch_support import Mods

DEADLINE = 30.0
MAX_SPINS = 50_000_000



@pytest.fixture
def fast_switching() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def versioned_source(version: int, functions: int = 40) -> str:
    lines = [f"VERSION = {version}", ""]
    for i in range(functions):
        lines += [f"def f{i}():", f"    return {version}", ""]
    lines += [
        "class K:",
        f"    V = {version}",
        "",
        "    def m(self):",
        f"        return {version}",
        "",
        "def entry():",
        "    return (f0(), f1(), K().m())",
        f"# version {version}",  # changes nothing but keeps every source distinct
    ]
    return "\n".join(lines) + "\n"


class Snapshot:
    """One C-level read of every patched object (function code objects, a module global, a
    class attribute): it runs no bytecode, so no other thread can run in the middle of it."""

    def __init__(self, m: ModuleType, functions: int) -> None:
        fns = [getattr(m, f"f{i}") for i in range(functions)] + [m.K.m]
        self.reads: list[tuple[Any, ...]] = [(operator.attrgetter("__code__"), f) for f in fns]
        self.reads.append((m.__dict__.get, "VERSION"))
        self.reads.append((m.K.__dict__.get, "V"))

    def take(self) -> tuple[Any, ...]:
        return tuple(starmap(operator.call, self.reads))


def versions(sample: tuple[Any, ...]) -> set[int]:
    """The versions a snapshot shows: one if consistent, more if torn."""
    out = set()
    for item in sample:
        if isinstance(item, int):
            out.add(item)
        else:
            out.add(max(c for c in item.co_consts if type(c) is int))
    return out


def classify(sample: tuple[Any, ...]) -> str:
    seen = versions(sample)
    return "torn" if len(seen) > 1 else f"v{seen.pop()}"


class Readers:
    """Threads that snapshot in a loop, counting what they see."""

    def __init__(self, snap: Snapshot, count: int = 3) -> None:
        self.snap = snap
        self.stop = threading.Event()
        self.seen: list[dict[str, int]] = [{} for _ in range(count)]
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(count)]

    def run(self, i: int) -> None:
        seen = self.seen[i]
        for _ in range(MAX_SPINS):
            if self.stop.is_set():
                return
            what = classify(self.snap.take())
            with self.cond:
                seen[what] = seen.get(what, 0) + 1
                self.cond.notify_all()

    def counts(self, what: str) -> list[int]:
        with self.cond:
            return [s.get(what, 0) for s in self.seen]

    def wait_all_saw(self, what: str, before: list[int]) -> None:
        """Wait until every reader has seen ``what`` more often than ``before``."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: all(s.get(what, 0) > n for s, n in zip(self.seen, before, strict=True)),
                timeout=DEADLINE,
            )
        assert ok, f"readers did not observe {what} in time: {self.seen}"

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(DEADLINE)
        assert not any(t.is_alive() for t in self.threads)


@pytest.mark.slow
def test_no_thread_observes_half_a_commit_or_rollback(mods: Mods, fast_switching: None) -> None:
    n = 40
    m = mods.load(versioned_source(1, n))
    snap = Snapshot(m, n)
    assert classify(snap.take()) == "v1"
    cycles = 60
    with Readers(snap) as readers:
        for _ in range(cycles):
            seen_new = readers.counts("v2")
            handle = patch.prepare(m, versioned_source(2, n), scan_heap=False).commit()
            readers.wait_all_saw("v2", seen_new)  # every reader ran during this patch
            seen_old = readers.counts("v1")
            handle.rollback(scan_heap=False)
            readers.wait_all_saw("v1", seen_old)
    assert readers.counts("torn") == [0, 0, 0], readers.seen
    assert m.entry() == (1, 1, 1)


def test_the_snapshot_check_detects_a_half_applied_batch(mods: Mods) -> None:
    """The same check fails when stores are applied in two steps with a reader between."""
    n = 40
    m = mods.load(versioned_source(1, n))
    snap = Snapshot(m, n)
    old = snap.take()
    plan = patch.prepare(m, versioned_source(2, n), scan_heap=False)
    forward, undo = plan._forward, plan._undo
    half = len(forward) // 2
    seen: list[str] = []
    ready, done = threading.Event(), threading.Event()

    def reader() -> None:
        assert ready.wait(DEADLINE)
        seen.append(classify(snap.take()))
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    try:
        run_atomic(forward[:half])
        ready.set()
        assert done.wait(DEADLINE)
    finally:
        run_atomic(list(reversed(undo[:half])))
        t.join(DEADLINE)
    assert seen == ["torn"]
    assert snap.take() == old


def test_calls_see_versions_move_monotonically(mods: Mods, fast_switching: None) -> None:
    m = mods.load(versioned_source(1))
    entry = m.entry  # held: patched in place
    versions = range(2, 7)
    phase = ["forward"]
    acks = [threading.Event(), threading.Event()]
    stop = threading.Event()
    violations: list[str] = []
    highest = [0, 0]
    cond = threading.Condition()

    def reader(i: int) -> None:
        last = 0
        current = "forward"
        for _ in range(MAX_SPINS):
            if stop.is_set():
                return
            if phase[0] != current:
                current = phase[0]
                last = 10**6 if current == "back" else 0
                acks[i].set()
            values = entry()  # (f0, f1, K().m) observed in this order
            for v in values:
                if (current == "forward" and v < last) or (current == "back" and v > last):
                    violations.append(f"{current}: {v} after {last} in {values}")
                last = v
            if current == "forward":
                with cond:
                    highest[i] = max(highest[i], values[-1])
                    cond.notify_all()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    handles = []
    try:
        for version in versions:
            handles.append(patch.prepare(m, versioned_source(version), scan_heap=False).commit())
            reached = functools.partial(lambda v: min(highest) >= v, version)
            with cond:
                assert cond.wait_for(reached, timeout=DEADLINE)
        phase[0] = "back"
        for ack in acks:
            assert ack.wait(DEADLINE)
        for handle in reversed(handles):
            handle.rollback(scan_heap=False)
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert violations == []
    assert entry() == (1, 1, 1)


def test_loop_callbacks_never_mix_versions(mods: Mods) -> None:
    """Commits and rollbacks scheduled from a control thread run between callbacks, so a
    callback calling two patched functions always sees one version."""
    m = mods.load(versioned_source(1, 4))
    pairs: list[tuple[int, int, int]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running = asyncio.Event()
        finished = asyncio.Event()

        def tick() -> None:
            pairs.append(m.entry())
            running.set()
            if not finished.is_set():
                loop.call_soon(tick)

        def control() -> None:
            for version in range(2, 12):
                source = versioned_source(version, 4)
                plan = patch.prepare(m, source, scan_heap=False)  # off the loop thread
                handle = plan.commit_soon(loop).result(DEADLINE)
                if version % 2:
                    handle.rollback_soon(loop).result(DEADLINE)

        loop.call_soon(tick)
        await running.wait()
        await loop.run_in_executor(None, control)
        finished.set()

    asyncio.run(main())
    assert pairs and all(a == b == c for a, b, c in pairs)
    assert len({p[0] for p in pairs}) > 1  # versions did change under the callbacks


def test_prepare_on_another_thread_touches_nothing(mods: Mods) -> None:
    m = mods.load(versioned_source(1, 5))
    before = {k: v for k, v in vars(m).items()}
    codes = {k: v.__code__ for k, v in before.items() if callable(v) and hasattr(v, "__code__")}
    class_dict = dict(vars(m.K))
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(patch.prepare(m, versioned_source(2, 5))))
    t.start()
    t.join(DEADLINE)
    plan = box[0]
    assert plan.changed and plan.committable
    assert dict(vars(m)) == before and dict(vars(m.K)) == class_dict
    assert all(getattr(m, k).__code__ is c for k, c in codes.items())
    assert m.entry() == (1, 1, 1)
    plan.discard()
    with pytest.raises(patch.PatchError, match="discarded"):
        plan.commit()
