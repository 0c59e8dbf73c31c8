"""The command line's own checks: bad flags are one line and exit 2 before anything is
asked of a supervisor (the control path given here does not exist: nothing may reach it)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from swapd import cli


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "message"), [
    (["history", "-n", "-1"], "argument -n: must be an integer 0-10000: '-1'"),
    (["history", "-n", "1000000"], "argument -n: must be an integer 0-10000: '1000000'"),
    (["history", "-n", "x"], "argument -n: not an integer: 'x'"),
    (["upgrade", "--watch", "-1"], "argument --watch: must be a number of seconds >= 0"),
    (["reload", "--watch", "1e8"], "argument --watch: must be a number of seconds >= 0 "
                                   "(at most 10000000): '1e8'"),
    (["upgrade", "--watch", "nan"], "argument --watch: must be a number of seconds >= 0"),
    (["status", "--timeout", "inf"], "argument --timeout: must be a positive number of "
                                     "seconds (at most 10000000): 'inf'"),
    (["run", "--ready-timeout", "inf", "--", "x"],
     "argument --ready-timeout: must be a positive number of seconds (at most 10000000)"),
    (["run", "--drain-timeout", "1e12", "--", "x"], "argument --drain-timeout: must be a "
                                                    "positive number of seconds"),
    (["run", "--idle-grace", "0", "--", "x"], "argument --idle-grace: must be a positive"),
    (["run", "--watch", "-3", "--", "x"], "argument --watch: must be a number of seconds >= 0"),
    (["run", "--health-interval", "inf", "--", "x"], "argument --health-interval: must be"),
])
def test_bad_numbers_are_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      argv: list[str], message: str) -> None:
    """They were sent to the supervisor, which answered "FAILED: malformed request" (exit 1,
    and for a swap a "refused" entry in the history), or (timeouts) accepted as infinite."""
    code, out, err = run_main(capsys, *argv, "--control", str(tmp_path / "none.sock"))
    assert code == 2, err
    assert out == "" and len(err.splitlines()) == 1, err
    assert message in err


def test_one_listener_name_given_twice_is_refused() -> None:
    """The second `--bind http=` replaced the first: `--bind http=127.0.0.1:8000 --bind
    http=[::1]:8000` listened on IPv6 only, without a word."""
    args = cli.build_parser().parse_args(["run", "--bind", "http=127.0.0.1:0", "--bind",
                                          "http=[::1]:0", "--", "x"])
    with pytest.raises(cli.UsageError) as info:
        cli.run_overrides(args)
    assert str(info.value) == ("listener 'http' given twice (--bind http=127.0.0.1:0, --bind "
                               "http=[::1]:0): give each its own name")
    two = cli.build_parser().parse_args(["run", "--bind", "http=127.0.0.1:0", "--bind",
                                         "http6=[::1]:0", "--", "x"])
    assert cli.run_overrides(two)["bind"] == {"http": "127.0.0.1:0", "http6": "[::1]:0"}


def _run_options_table() -> list[tuple[list[str], list[str]]]:
    """README's `swapd run` options: (flags, file keys) of each row."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text[text.index("`swapd run` options"):].split("\n\n")[1]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        flags = [f for t in re.findall(r"`(--[^`]*)`", cells[0]) if (f := t.split()[0]) != "--"]
        keys = []
        for token in re.findall(r"`([^`]+)`", cells[1]):
            token = token.split("=")[0].strip()
            keys.append(token.strip("[]"))
        rows.append((flags, keys))
    return rows


def test_the_readme_gives_each_run_flag_its_file_key(tmp_path: Path) -> None:
    """README said every flag is a key with `_` for `-`; the timeouts are a table, and
    --no-fdstore is `fdstore = false`. Each flag's row names its real key, and that flag's
    name written as a key in a file is either that key or refused naming it."""
    from swapd import config

    rows = _run_options_table()
    parser = cli.build_parser()
    run = next(a for a in parser._actions
               if isinstance(a, argparse._SubParsersAction)).choices["run"]
    flags = {o for a in run._actions for o in a.option_strings if o.startswith("--")}
    listed = {f for row_flags, _ in rows for f in row_flags}
    assert flags - {"--help"} <= listed, flags - listed
    known = config._TOP_KEYS | config._TIMEOUT_KEYS | {"NAME", "KEY"}
    for row_flags, keys in rows:
        assert set(keys) <= known, (row_flags, keys)
        named = [k for k in keys if k not in ("timeouts", "NAME", "KEY")]
        if len(named) != len(row_flags) or row_flags == ["--config"]:
            continue
        for flag, key in zip(row_flags, named, strict=True):
            flat = flag[2:].replace("-", "_")
            if flat in config._TOP_KEYS:
                assert flat == key, (flag, key)
                continue
            path = tmp_path / "c.toml"
            path.write_text(f"{flat} = 1\n")
            with pytest.raises(config.ConfigError,
                               match=rf"did you mean (\[timeouts\] )?{re.escape(key)}\b"):
                config.read_file(str(path))
