"""`swapd patch`: a fix lands in every worker of the running generation, state kept.

The patch is a transaction: all workers commit or none does; refusals and syntax errors
change nothing; a restarted worker replays the journal; a swap clears it; rollback undoes.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from swapd.loadgen import BackgroundLoad, http_get
from tests.integration.supervised import PY, ROOT, Supervised
from tests.integration.supervised import http_get as get

SHOP = [PY, str(ROOT / "examples" / "patching" / "shop.py")]
FIX = str(ROOT / "examples" / "patching" / "fix_rules.py")
RULES = (ROOT / "examples" / "patching" / "rules.py").read_text()
WRONG, RIGHT = "300", "2700"  # the price of 12 items before and after the fix


def stats(s: Supervised) -> dict[int, int]:
    """quotes served per worker pid, asking until both workers answered (bounded)."""
    seen: dict[int, int] = {}
    for _ in range(200):
        body = get(s.address(), "/stats")[1]
        fields = dict(x.split("=") for x in body.split())
        seen[int(fields["pid"])] = int(fields["quotes"])
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only reached workers {sorted(seen)}")


def prices(s: Supervised, count: int = 20) -> set[str]:
    return {get(s.address(), "/quote?qty=12")[1] for _ in range(count)}


@pytest.fixture
def shop(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Supervised(tmp_path, SHOP, args=["--workers", "2"]).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["close", "keepalive"])
def test_patch_under_load_keeps_state_then_rollback(shop: Supervised, mode: str) -> None:
    s = shop
    pids = s.active_pids()
    with BackgroundLoad(s.address(), http_get("/quote?qty=12"), mode=mode, clients=8,
                        duration=60, max_requests=300_000) as load:
        load.wait_for_successes(500, timeout=60)
        before = stats(s)
        with load.window("patch"):
            out = s.cli("patch", FIX, "--module", "rules")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "patch 1 in force on 2 worker(s)" in out.stdout
        assert out.stdout.count("changed: doc rules, function price, function order") == 2
        load.wait_for_successes(500, timeout=60)
        after = stats(s)
        assert prices(s) == {RIGHT}
        with load.window("rollback"):
            out = s.cli("patch", "--rollback")
        assert out.returncode == 0, out.stdout + out.stderr
        load.wait_for_successes(500, timeout=60)
    assert load.report is not None and load.report.failed == 0, load.report.format()
    assert prices(s) == {WRONG}, "rollback restores the old behaviour exactly"
    assert s.active_pids() == pids, "no process was replaced"
    # Keep-alive clients may all sit on one worker, so one counter may not move; none may
    # go back (a reset), and together they must have kept counting.
    final = stats(s)
    for pid in pids:
        assert before[pid] <= after[pid] <= final[pid], "a closure counter was reset"
    assert sum(before.values()) < sum(after.values()) < sum(final.values())


@pytest.mark.slow
def test_journal_replayed_on_restart_and_cleared_by_swap(shop: Supervised) -> None:
    s = shop
    assert s.cli("patch", FIX, "--module", "rules").returncode == 0
    st = s.status()
    assert [p["module"] for p in st["patches"]] == ["rules"]
    assert any("is not in rules.py on disk" in w for w in st["warnings"])
    victim = s.active_pids()[0]
    mark = s.log_mark()
    os.kill(victim, signal.SIGKILL)
    s.wait_log(r"event=worker.ready gen=1 worker=0 pid=(\d+) restarts=1", start=mark)
    assert prices(s, 40) == {RIGHT}, "the restarted worker re-applied the journal"
    listed = s.cli("patch", "--list")
    assert "#1  rules" in listed.stdout and "NOT on disk" in listed.stdout
    res = s.upgrade()  # new code from disk: the patch is gone, and the journal with it
    assert res["ok"]
    assert s.status()["patches"] == []
    assert prices(s) == {WRONG}
    s.wait_log(r"event=patch.journal_cleared gen=2 patches=1")


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ("def price(qty:\n", "SyntaxError"),
        (RULES.replace("UNIT_PRICE = 250", "import no_such_module_xyz\nUNIT_PRICE = 250"),
         "no_such_module_xyz"),
        (RULES + "\n\nclass Cart(dict, list):\n    pass\n", "multiple bases"),
    ],
    ids=["syntax-error", "import-error", "new-class-raises"],
)
def test_bad_patches_change_nothing(shop: Supervised, tmp_path: Path, source: str,
                                    expect: str) -> None:
    s = shop
    patch = tmp_path / "p.py"
    patch.write_text(source)
    out = s.cli("patch", str(patch), "--module", "rules")
    assert out.returncode == 1, out.stdout
    assert expect in out.stderr and "no worker changed" in out.stderr, out.stderr
    assert s.status()["patches"] == []
    assert prices(s) == {WRONG}


def test_refused_change_needs_a_swap(shop: Supervised, tmp_path: Path) -> None:
    s = shop
    base = RULES + "\n\nclass Basket:\n    __slots__ = ('items',)\n"
    # The base must be what runs: patch in the class first, then change its layout.
    first = tmp_path / "first.py"
    first.write_text(base)
    assert s.cli("patch", str(first), "--module", "rules").returncode == 0
    second = tmp_path / "second.py"
    second.write_text(base.replace("('items',)", "('items', 'owner')"))
    out = s.cli("patch", str(second), "--module", "rules")
    assert out.returncode == 1
    assert re.search(r"refused: .*__slots__.*needs a swap", out.stdout), out.stdout
    assert "no worker changed" in out.stderr
    assert [p["id"] for p in s.status()["patches"]] == [1]


def test_patch_usage_errors(shop: Supervised) -> None:
    out = shop.cli("patch", FIX, "--module", "no.such.module")
    assert out.returncode == 1
    assert "module 'no.such.module' is not loaded in this worker" in out.stderr
    out = shop.cli("patch", "--rollback")
    assert out.returncode == 1 and "nothing to roll back" in out.stderr
    out = shop.cli("patch", FIX)
    assert out.returncode == 2 and "give FILE --module NAME" in out.stderr


VAT = ROOT / "examples" / "patching" / "vat"


def totals(s: Supervised, count: int = 20) -> set[str]:
    return {get(s.address(), "/total?qty=12")[1] for _ in range(count)}


@pytest.mark.slow
def test_patch_set_spanning_two_modules(shop: Supervised, tmp_path: Path) -> None:
    """A fix in taxes and rules that neither half can take alone: one patch, committed at
    once in every worker, replayed on restart, rolled back at once, and squashed."""
    s = shop
    set_args = [str(VAT / "taxes.py"), "--module", "taxes", str(VAT / "rules.py"),
                "--module", "rules"]
    assert totals(s) == {"360"}
    dry = s.cli("patch", *set_args, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would commit; nothing changed" in dry.stdout
    assert "plan for taxes (worker(s) 0, 1):" in dry.stdout
    assert "  changed:  constant VAT_PERCENT: 20 -> 10" in dry.stdout
    assert "plan for rules (worker(s) 0, 1):" in dry.stdout
    assert totals(s) == {"360"}
    with BackgroundLoad(s.address(), http_get("/total?qty=12"), mode="keepalive", clients=8,
                        duration=60, max_requests=300_000) as load:
        load.wait_for_successes(300, timeout=60)
        with load.window("patch set"):
            out = s.cli("patch", *set_args)
        assert out.returncode == 0, out.stdout + out.stderr
        load.wait_for_successes(300, timeout=60)
    assert load.report is not None and load.report.failed == 0, load.report.format()
    assert "patch 2 in force on 2 worker(s)" in out.stdout  # the dry run was patch 1
    assert totals(s) == {"330"}
    assert [p["modules"] for p in s.status()["patches"]] == [["taxes", "rules"]]
    # A set whose second half cannot be planned changes neither module, in no worker.
    broken = tmp_path / "rules.py"
    broken.write_text((VAT / "rules.py").read_text() + "\n\nclass Cart(dict, list):\n    pass\n")
    out = s.cli("patch", str(VAT / "taxes.py"), "--module", "taxes", str(broken),
                "--module", "rules")
    assert out.returncode == 1 and "no worker changed" in out.stderr, out.stderr
    assert totals(s) == {"330"} and len(s.status()["patches"]) == 1
    # A restarted worker replays the set before it serves.
    victim = s.active_pids()[0]
    mark = s.log_mark()
    os.kill(victim, signal.SIGKILL)
    s.wait_log(r"event=worker.ready gen=1 worker=0 pid=(\d+) restarts=1", start=mark)
    assert totals(s, 40) == {"330"}
    out = s.cli("patch", "--rollback")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "patch 2 (taxes,rules) rolled back" in out.stdout
    assert totals(s, 40) == {"360"}
    # Squashed, a set stays in force and can no longer be rolled back.
    assert s.cli("patch", *set_args).returncode == 0
    out = s.cli("patch", "--squash")
    assert out.returncode == 0 and "made permanent on 2 worker(s)" in out.stdout, out.stdout
    out = s.cli("patch", "--rollback")
    assert out.returncode == 1 and "squashed" in out.stderr
    assert totals(s, 40) == {"330"} and s.status()["patches"][0]["squashed"]
