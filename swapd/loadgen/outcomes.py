"""What an attempt can end as: the errors the load generator raises, the outcomes it records
(and their one-byte codes in the attempt log), and the mapping from an exception to its outcome."""

from __future__ import annotations

import asyncio
import enum
import errno


class LoadError(Exception):
    """Base class of the errors the load generator raises."""


class LoadConfigError(LoadError, ValueError):
    """An invalid target, request or option."""


class ResponseError(LoadError):
    """The reply breaks the protocol or the request's expectation (outcome ``bad-response``)."""


class ConnectionClosed(LoadError):
    """The server closed the connection before a complete response (outcome ``eof``)."""


class Outcome(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"
    RESET = "reset"
    EOF = "eof"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad-response"
    OTHER = "other"


OUTCOMES = tuple(Outcome)  # position = the code stored in the log
CODE = {outcome: code for code, outcome in enumerate(OUTCOMES)}
OK_CODE = CODE[Outcome.OK]
NO_VALUE = -(2**63)  # "no value" in the log's int64 value column; no reply may carry it


class RequestFailed(LoadError):
    """A one-shot request (``fetch``) did not succeed."""

    def __init__(self, outcome: Outcome, detail: str | None) -> None:
        super().__init__(f"{outcome}: {detail}" if detail else str(outcome))
        self.outcome = outcome
        self.detail = detail


_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def classify(exc: BaseException) -> tuple[Outcome, str | None]:
    """Map an attempt's exception to its outcome and a diagnostic text (None if obvious)."""
    # TimeoutError is an OSError: test it first (asyncio.timeout and kernel ETIMEDOUT alike).
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT, None
    if isinstance(exc, ConnectionClosed):
        return Outcome.EOF, str(exc)
    if isinstance(exc, asyncio.IncompleteReadError):
        return Outcome.EOF, "closed mid-response"
    if isinstance(exc, ResponseError):
        return Outcome.BAD_RESPONSE, str(exc)
    if isinstance(exc, asyncio.LimitOverrunError):
        return Outcome.BAD_RESPONSE, "line longer than the limit"
    if isinstance(exc, OSError):
        if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
            return Outcome.REFUSED, None
        if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return Outcome.RESET, errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        if exc.errno in _RESET_ERRNOS:
            return Outcome.RESET, errno.errorcode[exc.errno]
    return Outcome.OTHER, f"{type(exc).__name__}: {exc}"
