"""`swapd patch` on the command line: several FILE --module NAME pairs, and human output
that shows the plan's notes (and the full plan on --dry-run and on failure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swapd import cli


def request(*argv: str) -> dict[str, Any]:
    args = cli.build_parser().parse_args(cli._patch_argv(["patch", *argv]))
    return cli._patch_request(args)


def test_several_file_module_pairs_make_one_patch(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "b.py").write_text("B = 1\n")
    a, b = str(tmp_path / "a.py"), str(tmp_path / "b.py")
    req = request(a, "--module", "app.a", b, "--module", "app.b", "--dry-run")
    assert [(p["module"], p["source"], p["name"]) for p in req["parts"]] == [
        ("app.a", "A = 1\n", "a.py"), ("app.b", "B = 1\n", "b.py")]
    assert req["dry_run"] and req.get("action", "apply") == "apply"  # the default is not sent
    same = request(a, b, "--module=app.a", "--module", "app.b", "--control", "/x.sock")
    assert [p["module"] for p in same["parts"]] == ["app.a", "app.b"]


@pytest.mark.parametrize("argv", [
    ["a.py", "--module", "x", "b.py"],
    ["a.py"],
    ["--rollback", "a.py", "--module", "x"],
    ["--rollback", "--squash"],
])
def test_bad_patch_usage_is_one_line(argv: list[str]) -> None:
    with pytest.raises(cli.UsageError) as err:
        request(*argv)
    assert "\n" not in str(err.value) and str(err.value).startswith("swapd patch:")


def test_squash_request() -> None:
    assert request("--squash") == {"action": "squash"}


def plan(module: str, notes: list[str], **items: Any) -> dict[str, Any]:
    base = {"module": module, "changed": [], "added": [], "absent": [], "removed": [],
            "refused": [], "notes": notes, "state": "prepared"}
    base.update(items)
    return base


def test_human_output_prints_notes_once_per_group_of_workers() -> None:
    note = "rules.py:3: LIMIT keeps its live value 15: ..."
    thread = "rules.py: thread 7 is inside price (it finishes on the old code)"
    data = {"patch": 4, "plans": [
        {"worker": 0, "pid": 10, "module": "rules", "ok": True, "plan": plan("rules", [note])},
        {"worker": 1, "pid": 11, "module": "rules", "ok": True,
         "plan": plan("rules", [note, thread])},
    ]}
    text = cli._format_patch(data)
    assert text.splitlines()[0] == "swapd patch: patch 4 in force on 2 worker(s)"
    assert text.count(note) == 2 and text.count(thread) == 1
    assert "plan for rules (worker(s) 1):" in text and f"  note:     {thread}" in text


def test_dry_run_shows_the_full_plan() -> None:
    changed = [{"kind": "function", "name": "price", "detail": "code; 1 object(s)"}]
    absent = [{"function": "make.<locals>.g", "name": "b", "source": "constexpr",
               "value": "10"}]
    refused = [{"where": "rules.py:9", "what": "class P", "reason": "dataclass fields changed",
                "remedy": "needs a swap"}]
    p = plan("rules", ["a note"], changed=changed, absent=absent, refused=refused)
    data = {"patch": 2, "dry_run": True, "committable": False, "plans": [
        {"worker": w, "pid": 10 + w, "module": "rules", "ok": False, "plan": p}
        for w in (0, 1)]}
    text = cli._format_patch(data)
    assert "dry run: patch 2 would be REFUSED; nothing changed" in text
    assert "plan for rules (worker(s) 0, 1):" in text
    assert "  changed:  function price: code; 1 object(s)" in text
    assert "  absent:   make.<locals>.g: b (constexpr = 10)" in text
    assert ("  refused:  rules.py:9: class P: dataclass fields changed (needs a swap)"
            in text)
    assert "  note:     a note" in text


def test_a_failed_patch_prints_its_plans(capsys: pytest.CaptureFixture[str]) -> None:
    refused = [{"where": "rules.py:9", "what": "def handler", "reason": "was a function and "
                "becomes a class", "remedy": "needs a swap"}]
    result = {"ok": False, "error": "patch 3 not applied: ...; no worker changed", "data": {
        "plans": [{"worker": 0, "pid": 10, "module": "rules", "ok": False,
                   "plan": plan("rules", [], refused=refused)},
                  {"worker": 1, "pid": 11, "module": "rules", "ok": False,
                   "error": "module 'rules' is not loaded in this worker"}]}}
    cli._print_result("patch", result)
    err = capsys.readouterr().err
    assert "was a function and becomes a class (needs a swap)" in err
    assert "rules (worker 1): FAILED: module 'rules' is not loaded" in err


def test_rollback_output_lists_what_the_migration_left() -> None:
    left = "rules: SESSIONS['a'] was changed since __swapd_migrate__ set it; kept"
    text = cli._format_patch({"patch": 3, "module": "rules", "workers": [
        {"worker": 0, "ok": True, "notes": [left]}, {"worker": 1, "ok": True, "notes": [left]}]})
    assert text.splitlines() == ["swapd patch: patch 3 (rules) rolled back",
                                 f"  note (worker(s) 0, 1): {left}"]
