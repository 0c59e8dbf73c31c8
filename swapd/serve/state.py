"""The app's state hooks (`@swapd.on_snapshot`, ...) wired to `swapd.worker`'s handoff.

At a stateful swap the worker library quiesces (every connection but the pinned ones
reaches a boundary and is handed over, its handler left parked), then calls the snapshot
function installed here, which:

1. waits until no WebSocket frame is half sent (the socket is about to change hands);
2. calls the app's `@swapd.on_snapshot`;
3. asks each handed WebSocket's app for its per-connection state (`Handoff.save`) and puts
   it, with the scope and any partial frame, into the connection's meta (it travels with the
   socket: the worker sends the handover after this snapshot);
4. if WebSockets were handed: encodes all that once, into nothing (the worker encodes it
   for real after this returns, too late to leave their apps alone);
5. ends those WebSocket readers (`conn.detach()`) and apps (websocket.disconnect 1012,
   `handed_off` true).

So a `save()` that raises or returns what cannot be encoded fails before step 5: the swap
aborts and the sessions simply go on (their apps never noticed, their meta is as it was).
After step 5, an abort resumes them here as the successor would (a fresh handler call finds
the exported state in conn.meta).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import swapd
from swapd import handoff
from swapd.serve.context import Context, Session
from swapd.serve.h1 import QUIESCE_STALL
from swapd.serve.ws import META, OPEN
from swapd.worker import Worker

log = logging.getLogger("swapd.serve")

FLUSH_TIMEOUT = 5.0  # a half-sent frame must leave within this, or the handoff fails
APP_END_TIMEOUT = 5.0  # handed-off WebSocket apps get this long to return


def install(ctx: Context, w: Worker) -> None:
    """Read what the app registered (after import and lifespan startup) into the worker."""
    hooks = swapd._hooks
    w.state_version = hooks.version
    if hooks.accept is not None:
        w.accept_versions = set(hooks.accept)
    w.on_snapshot(lambda: snapshot(ctx))
    w.on_restore(restore)
    w.on_quiesce(lambda: _quiesce(ctx))
    w.on_quiesce(lambda: _call_all(hooks.quiesce))
    w.on_resume(lambda: _call_all(hooks.resume))


def _quiesce(ctx: Context) -> None:
    """A stateful swap waits for every connection to reach a boundary: slow clients may not
    hold it up. Request bodies in progress may stall QUIESCE_STALL more (then 408); a
    WebSocket still receiving a message after that long stays here (pinned)."""
    for h in list(ctx.body_readers):
        h.hurry()
    ctx.loop.call_later(QUIESCE_STALL, _pin_stuck, list(ctx.ws_sessions))


def _pin_stuck(sessions: list[Session]) -> None:
    for session in sessions:
        session.pin_if_stuck()


async def _call_all(fns: list[Callable[[], Any]]) -> None:
    for fn in list(fns):
        result = fn()
        if inspect.isawaitable(result):
            await result


async def snapshot(ctx: Context) -> Any:
    # Handed WebSockets: their readers are parked in a wait (or ended, in ws_handed).
    sessions = [s for s in ctx.ws_sessions if s.conn.handed and s.state == OPEN]
    for s in sessions:
        async with asyncio.timeout(FLUSH_TIMEOUT):
            await s.flushed()
    state = None
    fn = swapd._hooks.snapshot
    if fn is not None:
        state = fn()
        if inspect.isawaitable(state):
            state = await state
    batch = (os.urandom(8).hex(), len(sessions))
    exported: list[Session] = []
    try:
        for s in sessions:
            s.export(batch)
            exported.append(s)
        if sessions:
            _check_encodes(ctx.worker, state, [s.conn.meta[META] for s in sessions])
    except BaseException:
        for s in exported:
            s.unexport()
        raise
    for s in sessions:
        s.hand_off()
        s.conn.detach()  # its reader ends: an abort gives it a handler that resumes it
        ctx.ws_handed.pop(s.conn, None)
        ctx.ws_sessions.discard(s)
    tasks = [s.app_task for s in sessions if s.app_task is not None and not s.app_task.done()]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=APP_END_TIMEOUT)
        for task in pending:
            log.warning("event=ws.app_slow_to_end action=cancel")
            task.cancel()
    if sessions:
        log.info("event=ws.handed_off connections=%d", len(sessions))
    return state


class _Nowhere:
    """An EncodeSink that keeps nothing (and dups no fd): for a trial encode."""

    def write(self, data: Any, /) -> int:
        return len(data)

    def add_buffer(self, buf: memoryview, /) -> None:
        pass

    def add_fd(self, fd: int, /) -> int:
        return 0


def _check_encodes(w: Worker, state: Any, metas: list[Any]) -> None:
    """The app's state and the handed WebSockets' meta encode, as the worker will encode
    them once the snapshot returns; else the same EncodeError, now."""
    for codec, obj in ((w.state_codec, state), (handoff.DEFAULT_CODEC, metas)):
        try:
            handoff.get_codec(codec).encode(obj, _Nowhere())
        except handoff.SnapshotError:
            raise
        except Exception as e:
            raise handoff.EncodeError(
                f"{codec} cannot encode the state: {type(e).__name__}: {e}") from e


async def restore(state: Any, from_version: int) -> None:
    fn = swapd._hooks.restore
    if fn is None:
        if state is not None:
            log.warning("event=restore.skipped reason='the predecessor handed over state but "
                        "this code registers no @swapd.on_restore'")
        return
    result = fn(state, from_version)
    if inspect.isawaitable(result):
        await result
