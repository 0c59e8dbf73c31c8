"""The command line's own checks: bad flags are one line and exit 2 before anything is
asked of a supervisor (the control path given here does not exist: nothing may reach it)."""

from __future__ import annotations

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
