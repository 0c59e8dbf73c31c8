r"""Bounded closed-loop load generator: the instrument that measures a swap.

It implements the method of docs/benchmarks.md ("Method") so that swapd's figures sit next to the
peers': N closed-loop clients (each sends its next request only when the previous one has
finished), one of two connection modes, every attempt timed and classified, and swap windows
in which failures, the longest no-success gap, p99 and throughput are reported.

    mode       close      a new connection per request (HTTP sends ``Connection: close``)
               keepalive  one connection per client, reused until the server ends it
    outcome    ok | refused | reset | eof | timeout | bad-response | other
    window     [begin - 1 s, end + 1 s], clipped to the run (one per swap: "swap 3")
    gap        longest interval in which no client completed a successful response

Percentiles of closed-loop clients hide outages (coordinated omission: a stalled client stops
sending), which is why failures per window and the no-success gap are the headline figures.

Keep-alive rules. A connection is reused until the server sends ``Connection: close``, frames
its body by EOF, or closes it while it is idle; each of those is a reconnect, not an error. A
request sent on a reused connection that then gets EOF or a reset is a failure (``eof`` or
``reset`` with ``reused=True``) and is never retried: that is the stale keep-alive race the
peers lose requests to, and a POST must not be silently replayed. Before reusing a connection
the client polls it, as urllib3 does, so a close that already arrived is not counted; a close
still in flight when the request leaves is indistinguishable from the race and counts as one.

Use ``LoadGenerator`` inside an event loop, ``BackgroundLoad`` from synchronous code (pytest),
``fetch`` to read one value (e.g. the final count), or the CLI:

    python -m swapd.loadgen --connect 127.0.0.1:8000 --kind http-get --mode keepalive \
        --clients 32 --duration 10

The names below are the package's interface; its modules, from the wire up:

    outcomes    the errors, the outcomes and classify()
    wire        the HTTP/1.1 and line-protocol codecs (the wire formats are drawn there)
    target      Endpoint, parse_target()
    request     Mode, Request and its builders (http_get, http_post, http_get_int, line)
    client      a client's connection and its idle poll, one exchange, fetch()
    records     the attempt log and the timeline of marks and windows
    analysis    pure statistics: gaps, window spans, percentiles
    report      LoadReport, WindowReport and the report's text
    summary     summarise(): the attempt log and timeline in, a LoadReport out
    generator   LoadGenerator: the closed-loop clients and the run's bounds
    background  BackgroundLoad: a LoadGenerator on its own thread, for synchronous callers
    cli         the command line (``python -m swapd.loadgen``)
"""

from __future__ import annotations

from swapd.loadgen.analysis import Gap, longest_gap, percentile, window_span
from swapd.loadgen.background import BackgroundLoad
from swapd.loadgen.cli import main
from swapd.loadgen.client import fetch, fetch_sync
from swapd.loadgen.generator import DEFAULT_MAX_REQUESTS, LoadGenerator, Progress
from swapd.loadgen.outcomes import (
    ConnectionClosed,
    LoadConfigError,
    LoadError,
    Outcome,
    RequestFailed,
    ResponseError,
    classify,
)
from swapd.loadgen.records import Attempt, AttemptLog, Timeline, Window
from swapd.loadgen.report import LoadReport, RunInfo, WindowReport
from swapd.loadgen.request import Mode, Request, http_get, http_get_int, http_post, line
from swapd.loadgen.summary import summarise
from swapd.loadgen.target import Endpoint, Target, parse_target
from swapd.loadgen.wire import (
    HttpResponse,
    parse_int,
    read_http_response,
    read_line_reply,
)

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "Attempt",
    "AttemptLog",
    "BackgroundLoad",
    "ConnectionClosed",
    "Endpoint",
    "Gap",
    "HttpResponse",
    "LoadConfigError",
    "LoadError",
    "LoadGenerator",
    "LoadReport",
    "Mode",
    "Outcome",
    "Progress",
    "Request",
    "RequestFailed",
    "ResponseError",
    "RunInfo",
    "Target",
    "Timeline",
    "Window",
    "WindowReport",
    "classify",
    "fetch",
    "fetch_sync",
    "http_get",
    "http_get_int",
    "http_post",
    "line",
    "longest_gap",
    "main",
    "parse_int",
    "parse_target",
    "percentile",
    "read_http_response",
    "read_line_reply",
    "summarise",
    "window_span",
]
