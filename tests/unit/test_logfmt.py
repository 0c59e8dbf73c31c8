"""--log-format json: the supervisor's key=value log lines as JSON objects, same fields."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from swapd.logfmt import JsonFormatter, LogfmtFormatter, parse_fields


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("swapd.test_logfmt")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_events_keep_their_fields_with_json_types(
        captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = captured
    # lines as core.py, swap.py and fleet.py write them
    log.info("event=swap.commit kind=%s gen=%d timings_ms=%s", "upgrade", 4,
             {"spawned": 1.2, "ready": 640.3})
    log.warning("event=swap.abort gen=%d reason=%r", 5, "gen=5 worker=0 pid=9 exited: it's 'bad'")
    log.info("event=worker.respawn_scheduled gen=%d worker=%d delay=%gs", 3, 1, 0.4)
    log.info("event=supervisor.start pid=%d version=%s listeners=%s", 77, "0.1.0",
             "http=127.0.0.1:8000,admin=unix:/run/a.sock")
    log.info("event=rollback.done lost_slots=%s ok=%s none=%s", [1, 2], True, None)
    first, second, third, fourth, fifth = lines(stream)
    assert first["event"] == "swap.commit" and first["kind"] == "upgrade" and first["gen"] == 4
    assert first["timings_ms"] == {"spawned": 1.2, "ready": 640.3}
    assert first["level"] == "info" and first["logger"] == "swapd.test_logfmt"
    assert isinstance(first["swapd_pid"], int) and str(first["time"]).endswith("Z")
    assert second["reason"] == "gen=5 worker=0 pid=9 exited: it's 'bad'"
    assert second["level"] == "warning" and "msg" not in second
    assert third["delay"] == 0.4
    assert fourth["pid"] == 77
    assert fourth["listeners"] == "http=127.0.0.1:8000,admin=unix:/run/a.sock"
    assert fifth["lost_slots"] == [1, 2] and fifth["ok"] is True and fifth["none"] is None


def test_free_text_tracebacks_and_worker_output(
        captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = captured
    log.error("event=swap.failed output tail of %s:\n%s", "gen=2 worker=0 pid=5",
              "Traceback (most recent call last):\n  ValueError: x")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("event=swap.crashed")
    out = logging.getLogger("swapd.output")
    handler = logging.getLogger("swapd.test_logfmt").handlers[0]
    out.addHandler(handler)
    out.propagate, level = False, out.level
    out.setLevel(logging.INFO)
    try:
        out.info("%s| %s", "gen=2 worker=1 pid=812", '{"app": "json", "n": 1}')
    finally:
        out.removeHandler(handler)
        out.propagate = True
        out.setLevel(level)
    tail, crashed, output = lines(stream)
    assert tail["event"] == "swap.failed"
    assert "ValueError: x" in str(tail["msg"]) and "output tail of" in str(tail["msg"])
    assert "RuntimeError: boom" in str(crashed["exc"])
    assert output["gen"] == 2 and output["worker"] == 1 and output["pid"] == 812
    assert output["line"] == '{"app": "json", "n": 1}'  # the app's text, untouched
    assert json.loads(str(output["line"])) == {"app": "json", "n": 1}


def test_parse_fields_edge_cases() -> None:
    assert parse_fields("event=x a='b c' d=\"e f\" g={'h': [1, 2]} i=nan") == (
        {"event": "x", "a": "b c", "d": "e f", "g": {"h": [1, 2]}, "i": "nan"}, "")
    assert parse_fields("event=x unterminated='abc") == ({"event": "x",
                                                          "unterminated": "'abc"}, "")
    assert parse_fields("no fields here") == ({}, "no fields here")
    # a field named like one the formatter sets does not overwrite it
    assert parse_fields("time=3")[0] == {"time": 3}


LOGFMT = re.compile(r'(?:[A-Za-z_][\w.]*=(?:[^\s"=]+|"(?:[^"\\]|\\.)*")(?: |$))+')


def test_text_lines_are_logfmt_whatever_the_call_site_wrote() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter("%(message)s"))
    log = logging.getLogger("swapd.test_logfmt_text")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        log.info("event=swap.commit kind=%s gen=%d timings_ms=%s", "upgrade", 4,
                 {"spawned": 1.2, "ready": 640.3})
        log.info("event=worker.exit gen=1 worker=0 pid=5 status=%r", "exited with status 0")
        log.warning("event=reload.ignored key=control reason='needs a restart'")
        log.warning("event=swap.abort gen=5 reason=%r", 'it\'s "bad"\nreally')
        log.info("event=supervisor.start pid=77 listeners=%s empty=%s slots=%s",
                 "http=127.0.0.1:8000,admin=unix:/run/a.sock", "", [1, 2])
        log.error("event=swap.failed.output gen=2 worker=0 pid=5 text=%r",
                  "RuntimeError: db url 'missing'")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue().splitlines()
    assert len(out) == 6  # one line each, the newline in a value escaped
    for line in out:
        assert LOGFMT.fullmatch(line), line
    assert out[0] == 'event=swap.commit kind=upgrade gen=4 timings_ms="spawned=1.2 ready=640.3"'
    assert out[1] == 'event=worker.exit gen=1 worker=0 pid=5 status="exited with status 0"'
    assert out[2] == 'event=reload.ignored key=control reason="needs a restart"'
    assert out[3] == r'event=swap.abort gen=5 reason="it' + "'" + r's \"bad\"\nreally"'
    assert out[4] == ('event=supervisor.start pid=77 listeners="http=127.0.0.1:8000,'
                      'admin=unix:/run/a.sock" empty="" slots=1,2')
    # what the text says, the JSON formatter reads back (one parser for both)
    assert parse_fields(out[3])[0]["reason"] == 'it\'s "bad"\nreally'
    assert parse_fields(out[5])[0]["text"] == "RuntimeError: db url 'missing'"


def test_a_worker_output_line_is_written_as_it_came() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter("%(message)s"))
    out = logging.getLogger("swapd.output")
    out.addHandler(handler)
    out.propagate, level = False, out.level
    out.setLevel(logging.INFO)
    try:
        out.info("%s| %s", "gen=2 worker=1 pid=812", "a='b c' {\"x\": 1}")
    finally:
        out.removeHandler(handler)
        out.propagate = True
        out.setLevel(level)
    assert stream.getvalue() == "gen=2 worker=1 pid=812| a='b c' {\"x\": 1}\n"


def test_a_failed_swap_logs_its_output_tail_one_line_per_line(
        caplog: pytest.LogCaptureFixture) -> None:
    from swapd.supervisor.swapjob import SwapFailed

    failed = SwapFailed("gen=2 worker=0 pid=5 exited with status 1 before it was ready")
    failed.worker, failed.tail = "gen=2 worker=0 pid=5", "Traceback (most recent call last):\n" \
        "  File \"app.py\", line 1\nRuntimeError: db url missing"
    with caplog.at_level(logging.ERROR, logger="swapd"):
        failed.report("event=swap.failed")
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m for m in messages)
    assert messages[0].startswith("event=swap.failed reason=")
    assert messages[1:] == [
        "event=swap.failed.output gen=2 worker=0 pid=5 text='Traceback (most recent call last):'",
        "event=swap.failed.output gen=2 worker=0 pid=5 text='  File \"app.py\", line 1'",
        "event=swap.failed.output gen=2 worker=0 pid=5 text='RuntimeError: db url missing'"]
