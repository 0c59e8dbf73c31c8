"""Connections and accept loops for `swapd.worker`: the parts that make drain and handoff exact.

Why the library owns accept and receive instead of leaving them to asyncio
streams: a swap must stop accepting at a precise instant and must know, for
every open connection, whether it sits at a request boundary. Both are only
exact when the accept and the `recv` happen synchronously inside our own reader
callbacks: nothing is ever accepted and then dropped, and no received byte ever
sits in a buffer we cannot account for.

Request boundaries. A handler marks one by receiving with `idle=True` ("I hold no
partial request; the next bytes start a new one") or by calling `boundary()` once a
response is complete (work after the response, such as Django's `request_finished`,
then runs without holding a swap up). A connection is *busy* from the first byte
the handler consumes after a boundary until its next boundary.

Quiesce (stateful swap), without touching idle connections one by one:

    stop accepting ─▶ wait until no connection is busy ─▶ hand over ─▶ commit / resume
                      (busy ones blocked on their client
                       mid-request for `boundary_wait`:
                       handed over with the request's
                       bytes so far, replayed)

A *pinned* connection (`conn.pinned = True`: a streaming response, a WebSocket that cannot
move) stays with this worker: the quiesce does not wait for it, the pre-send and the
handover leave it out, its handler keeps serving it, and it ends in the drain.
Full-duplex protocols whose reader always waits (WebSocket) say where their boundaries
are with `set_boundary()`.

Handlers parked at a boundary are not woken: their reader callback, when input
arrives while quiescing, leaves the bytes in the kernel for the successor (and
re-arms on resume). Only after the commit, in the old worker that is going away,
does each parked handler get `HandedOff`; on resume (abort) it never notices. A
handler that touches a handed-over connection (post-response work calling `send`
or `recv`) gets `HandedOff` at once.

While a worker drains, an idle wait lasts at most `idle_grace` seconds and then
reads as EOF, so only connections that stayed silent that long are closed under a
client; at the drain deadline every remaining connection is closed.

Pre-send bookkeeping (`Tracking`): while a swap's pre-send is open, the hub records
which connections changed in a way the successor must hear about (accepted,
closed, meta changed, bytes buffered), so the pause sends only that delta.

Where the code is (this module is the public import path of every name below; all of it
runs in the application's process):

    swapd.worker.client   Connection, HandedOff, ConnMeta, Tracking: one connection as its
                          handler sees it, and its request state (boundary, busy, replay)
    swapd.worker.hub      ConnectionHub, Handover: the accept loops and the connections as
                          a set (adopt, drain, quiesce, hand over, resume, release)
    swapd.worker.link     the pre-send to the successor over the handoff link
"""

from swapd.worker.client import MAX_REPLAY, Connection, ConnMeta, HandedOff, Handler, Tracking
from swapd.worker.hub import (
    ACCEPT_BACKOFF_MAX,
    ACCEPT_BACKOFF_MIN,
    ACCEPT_LOG_INTERVAL,
    ADOPT_BATCH,
    ConnectionHub,
    Handover,
)

__all__ = [
    "ACCEPT_BACKOFF_MAX",
    "ACCEPT_BACKOFF_MIN",
    "ACCEPT_LOG_INTERVAL",
    "ADOPT_BATCH",
    "MAX_REPLAY",
    "ConnMeta",
    "Connection",
    "ConnectionHub",
    "HandedOff",
    "Handler",
    "Handover",
    "Tracking",
]
