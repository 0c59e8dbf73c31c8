"""The supervisor's log lines: logfmt in text, JSON objects with `--log-format json`.

swapd logs one line per event as `key=value` fields. In the code a value may be written
as a Python literal (`reason=%r` of a string, a dict of timings); the text formatter
(`LogfmtFormatter`) writes every value as logfmt: bare when it holds no space, quote,
`=` or control character, else double-quoted with backslash escapes; a dict becomes
`"k=v k=v"`, a list `a,b`. A message is one line: a newline in free text is written
`\\n`. The JSON formatter keeps the same fields with their types and adds the time,
level, logger and the supervisor's pid (`swapd_pid`):

    event=swap.commit kind=upgrade gen=4 timings_ms="spawned=1.2 ready=640.3"
    {"time": "2024-05-29T12:00:00.123Z", "level": "info", "logger": "swapd", "swapd_pid": 81,
     "event": "swap.commit", "kind": "upgrade", "gen": 4,
     "timings_ms": {"spawned": 1.2, "ready": 640.3}}

Values that read as integers, numbers, booleans, string literals, or dict/list literals
become those JSON types; anything else stays a string. Text that is not `key=value`
(a traceback) goes to "msg" / "exc". A worker's output line in `prefixed` mode
(`gen=4 worker=0 pid=812| text`) is the app's text, untouched in text mode, and in JSON
{"gen": 4, "worker": 0, "pid": 812, "line": "text"}: the app's own text, JSON or not, in
one string field.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import time
from typing import Any

_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)=")
_OUTPUT = re.compile(r"((?:[a-z]+=\S+ )*[a-z]+=\S+)\| ?(.*)", re.S)
_CLOSE = {"{": "}", "[": "]", "(": ")"}
_RESERVED = ("time", "level", "logger", "swapd_pid", "msg", "exc", "line")


def tokens(text: str) -> list[tuple[str | None, str]]:
    """The message in order: (key, raw value) for each field, (None, text) for free text."""
    out: list[tuple[str | None, str]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == " ":
            i += 1
            continue
        found = _KEY.match(text, i)
        if found is None:  # free text: up to the next " key=" or the end
            nxt = re.search(r" [A-Za-z_][A-Za-z0-9_.]*=", text[i:])
            end = n if nxt is None else i + nxt.start()
            out.append((None, text[i:end]))
            i = end
            continue
        i = found.end()
        end = _value_end(text, i)
        out.append((found.group(1), text[i:end]))
        i = end
    return out


def parse_fields(text: str) -> tuple[dict[str, Any], str]:
    """`key=value` fields of a message, and whatever text was not a field."""
    fields: dict[str, Any] = {}
    rest: list[str] = []
    for key, raw in tokens(text):
        if key is None:
            rest.append(raw)
        else:
            fields[key] = _value(raw)
    return fields, " ".join(rest)


_BARE = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')


def quote(value: str) -> str:
    """A logfmt value: bare if it can be, else double-quoted with JSON's escapes (which
    are Python's too: the JSON formatter reads it back)."""
    return value if _BARE.fullmatch(value) else json.dumps(value, ensure_ascii=False)


def _plain(value: Any) -> str:
    """A parsed value as logfmt text, before quoting."""
    if isinstance(value, dict):
        return " ".join(f"{k}={quote(_plain(v))}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(quote(_plain(v)) for v in value)
    return str(value)


def to_logfmt(message: str) -> str:
    """A message with every value in logfmt (see the module docstring), on one line."""
    parts: list[str] = []
    for key, raw in tokens(message):
        if key is None:
            parts.append(raw.replace("\n", "\\n").replace("\r", "\\r"))
        elif raw[:1] in ("'", '"', "{", "[", "("):
            value = _value(raw)
            parts.append(f"{key}={quote(raw if value is raw else _plain(value))}")
        else:
            parts.append(f"{key}={quote(raw)}")
    return " ".join(parts)


class LogfmtFormatter(logging.Formatter):
    """Text lines, every swapd field in logfmt (a worker's output line as it came)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not record.name.startswith("swapd") or record.name == "swapd.output":
            return super().formatMessage(record)
        message = record.message
        record.message = to_logfmt(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


def _value_end(text: str, i: int) -> int:
    n = len(text)
    if i >= n:
        return i
    opener = text[i]
    if opener in "'\"":
        j = i + 1
        while j < n:
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == opener:
                return j + 1
            j += 1
        return n
    if opener in _CLOSE:
        depth, j, quote = 0, i, ""
        while j < n:
            c = text[j]
            if quote:
                if c == "\\":
                    j += 1
                elif c == quote:
                    quote = ""
            elif c in "'\"":
                quote = c
            elif c in _CLOSE:
                depth += 1
            elif c in _CLOSE.values():
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return n
    j = text.find(" ", i)
    return n if j < 0 else j


def _value(raw: str) -> Any:
    if raw[:1] in ("'", '"', "{", "[", "("):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return raw
        return list(value) if isinstance(value, tuple) else value
    if raw in ("True", "False"):
        return raw == "True"
    if raw == "None":
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        number = float(raw.removesuffix("s")) if raw.endswith("s") else float(raw)
    except ValueError:
        return raw
    return raw if raw.lower() in ("nan", "inf", "-inf", "infinity") else number


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
            + f".{int(t % 1 * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "swapd_pid": record.process,  # `pid` is a field of the events (a worker's)
        }
        message = record.getMessage()
        if record.name == "swapd.output":
            found = _OUTPUT.fullmatch(message)
            if found is not None:
                fields, _ = parse_fields(found.group(1))
                obj.update(_safe(fields))
                obj["line"] = found.group(2)
                return json.dumps(obj, ensure_ascii=False)
        head, sep, tail = message.partition("\n")
        fields, rest = parse_fields(head)
        obj.update(_safe(fields))
        text = (rest + sep + tail).strip()
        if text:
            obj["msg"] = text
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # made into text already, before it crossed the log queue
            obj["exc"] = record.exc_text
        return json.dumps(obj, ensure_ascii=False, default=str)


def _safe(fields: dict[str, Any]) -> dict[str, Any]:
    """A field named like one of ours keeps its value under `field_<name>`."""
    return {(f"field_{k}" if k in _RESERVED else k): v for k, v in fields.items()}
