"""What the supervisor does about deploys beyond the swap itself: the watch window it
opens after a commit, `swapd rollback`, `swapd history`, `upgrade --wait-watch`, and the
live values the metrics endpoint reads. The orchestration (core.py) calls in here at a
few points; the window itself is watch.py, the rollback rollback.py, the record ops.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from swapd.commands import HistoryArgs, PatchArgs, SwapArgs
from swapd.control import DEADLINE, ControlError, Emit, Peer
from swapd.supervisor import history as histories
from swapd.supervisor.fleet import Fleet
from swapd.supervisor.generation import Generation
from swapd.supervisor.journal import PatchRecord
from swapd.supervisor.listeners import Listeners
from swapd.supervisor.manager import ServiceManager
from swapd.supervisor.metrics import Snapshot, listen_queue
from swapd.supervisor.ops import Operations, Who, who_control
from swapd.supervisor.release import RELEASES_DIR, ReleaseError, check_label
from swapd.supervisor.watch import SwapOptions, Watch, unholdable

log = logging.getLogger("swapd")



class Deploys:
    def __init__(self, fleet: Fleet, listeners: Listeners, manager: ServiceManager,
                 ops: Operations, stopping: Callable[[], bool],
                 status_line: Callable[[], str], reload_bound: Callable[[], float]) -> None:
        self.fleet = fleet
        self.listeners = listeners
        self.manager = manager
        self.ops = ops
        self._stopping = stopping
        self._status_line = status_line
        self._reload_bound = reload_bound
        self.watch: Watch | None = None  # the open window
        self.last_watch: Watch | None = None
        self.last_rollback: dict[str, Any] | None = None

    # -- around a swap ------------------------------------------------------------------

    def busy(self) -> str | None:
        """Why no other change may start now (an open window), or None."""
        return self.watch.busy_message() if self.watch is not None else None

    def why_not(self, old: Generation | None, watch: float) -> str | None:
        """Why a swap with this window cannot hold `old`, or None."""
        return unholdable(old) if watch > 0 and old is not None else None

    def open_watch(self, seconds: float, held: Generation, journal: list[PatchRecord]
                   ) -> dict[str, Any]:
        """Right after a commit that held `held`: watch the new active generation."""
        watched = self.fleet.active
        assert watched is not None
        watch = Watch(self.fleet, watched, held, seconds, journal, self.listeners,
                      self._rollback_started)
        self.watch = self.last_watch = watch
        watch.start()
        watch.done.add_done_callback(lambda _: self._watch_ended(watch))
        return watch.describe()

    def _rollback_started(self, watch: Watch) -> None:
        self.manager.reloading(f"rolling back gen {watch.watched.id} to gen {watch.held.id}",
                               self._reload_bound())

    def _watch_ended(self, watch: Watch) -> None:
        result = watch.done.result()
        if self.watch is watch:
            self.watch = None
        self.ops.watch_done(result)
        if result["outcome"] in ("rolled-back", "refused", "failed"):
            self.last_rollback = result
            if not self._stopping():
                note = {"rolled-back": f"rolled back from gen {result['gen']}",
                        "refused": "rollback REFUSED", "failed": "rollback FAILED"}
                self.manager.ready(f"{self._status_line()}; {note[result['outcome']]}")

    async def stop(self) -> None:
        """The supervisor stops: end an open window without a rollback."""
        if self.watch is not None:
            await self.watch.cancel()

    # -- control requests ---------------------------------------------------------------

    async def wait_watch(self, outcome: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`upgrade --wait-watch`: the answer once the window is over."""
        watch = self.last_watch
        assert watch is not None and watch.watched.id == outcome["gen"]
        # The client waits the window out, then perhaps a rollback (a handoff back, bounded
        # like the pause of a swap).
        t = watch.watched.config.timeouts
        emit(DEADLINE, "", {"seconds": watch.remaining + t.quiesce + 2 * t.restore + 5})
        emit("watching", f"gen={watch.watched.id} watched for {watch.seconds:g}s; "
             f"gen={watch.held.id} held for a rollback", None)
        result = await asyncio.shield(watch.done)
        outcome = {**outcome, "watch": result}
        if result["outcome"] == "passed":
            return outcome
        if result["outcome"] == "rolled-back":
            error = (f"rolled back to gen={result['held']} ({result['held_release']}): "
                     f"{result['reason']}")
        elif result["outcome"] == "refused":
            error = (f"{result['reason']}; rollback refused: {result['refused']}; "
                     f"gen={result['gen']} keeps serving")
        else:
            error = f"watch window ended: {result['outcome']} ({result.get('reason')})"
        raise ControlError(error, data=outcome)

    async def rollback(self, peer: Peer) -> dict[str, Any]:
        watch = self.watch
        if watch is None:
            active, previous = self.fleet.active, None
            if active is not None and _in_releases(active.root):
                loop = asyncio.get_running_loop()
                entries, _ = await loop.run_in_executor(None, histories.read,
                                                        self.ops.history.path, None)
                previous = previous_release(entries, active.release)
            raise ControlError(_no_watch(active, self.last_watch, previous))
        result = await watch.request_rollback(who_control(peer))
        if result["outcome"] == "rolled-back":
            return result
        why = result.get("refused") or result["outcome"]
        raise ControlError(f"rollback {result['outcome']}: {why}; gen={result['gen']} keeps "
                           "serving", data=result)

    async def history(self, args: HistoryArgs) -> dict[str, Any]:
        n = args.n
        path = self.ops.history.path
        loop = asyncio.get_running_loop()
        entries, bad = await loop.run_in_executor(None, histories.read, path, n)
        return {"path": path, "entries": entries, "unreadable_lines": bad}

    # -- what status and the metrics show ----------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {"watch": self.watch.describe() if self.watch else None,
                "last_rollback": self.last_rollback, **self.ops.describe()}

    def snapshot(self, swap_in_progress: bool) -> Snapshot:
        """For a scrape: built on the loop (metrics.py), plain data only."""
        fleet = self.fleet
        snap = Snapshot(crash_loop_slots=len(fleet.crash_loop),
                        watch_remaining=self.watch.remaining if self.watch else 0.0,
                        swap_in_progress=swap_in_progress, last_swap=self.ops.last_swap)
        for g in fleet.live_generations():
            snap.generations.append((g.id, g.state.value, g.release))
            snap.workers += [(w.state.value, g.state.value) for w in g.live()]
        for lis in self.listeners:
            queue = listen_queue(lis.sock)
            if queue is not None:
                snap.listeners.append((lis.name, *queue))
        return snap


def swap_options(args: SwapArgs, who: Who) -> SwapOptions:
    """The options of an `upgrade`/`reload` request (types already checked by
    swapd.commands); ControlError names a release label the rules refuse."""
    if args.release is not None:
        try:
            check_label(args.release)
        except ReleaseError as e:
            raise ControlError(str(e)) from None
    return SwapOptions(release=args.release, watch=args.watch, wait_watch=args.wait_watch,
                       who=who)


def patch_fields(args: PatchArgs) -> dict[str, Any]:
    """What the history keeps of a patch request."""
    parts = args.parts or [{"module": args.module, "name": args.name}]
    return {"module": ",".join(str(p.get("module")) for p in parts),
            "name": ",".join(str(p.get("name") or "") for p in parts), "dry_run": args.dry_run}


def previous_release(entries: list[dict[str, Any]], release: str) -> str | None:
    """The release served before `release` came: `release_before` of the newest swap that
    brought it (the history survives restarts; a watch window's held generation does not)."""
    for e in reversed(entries):
        if (e.get("kind") in ("upgrade", "reload") and e.get("outcome") == "ok"
                and e.get("release_after") == release and e.get("release_before") != release
                and isinstance(e.get("release_before"), str)):
            return str(e["release_before"])
    return None


def _in_releases(root: str | None) -> bool:
    return root is not None and os.path.basename(os.path.dirname(root)) == RELEASES_DIR


_SEE_DOCS = (". Roll back by upgrading to the previous release's code: see "
             "docs/operations.md (release directories)")


def _no_watch(active: Generation | None, last: Watch | None, previous: str | None) -> str:
    """What `swapd rollback` says when no generation is held: how to go back anyway. With the
    release-directory layout, the directory of the previous release: the one the last
    window held, if that window was the active generation's, else the one of `previous`
    (from the history) beside the active one."""
    text = "no watch window is open: no generation is held to go back to"
    if active is None:
        return text + _SEE_DOCS
    held = last.held if last is not None and last.watched.id == active.id else None
    if held is not None and last is not None:
        text += (f" (gen={held.id}, release {held.release}, was let go when the window of "
                 f"gen={active.id} ended: {last.phase})")
    root, target = active.root, None
    if root is not None and _in_releases(root):
        if held is not None and held.root and held.root != root:
            target = held.root
        elif previous is not None and previous not in (".", "..") and "/" not in previous:
            candidate = os.path.join(os.path.dirname(root), previous)
            target = candidate if candidate != root and os.path.isdir(candidate) else None
    if target is not None:
        return text + (f". Roll back by upgrading to the previous release: point the "
                       f"`current` symlink at {target} and run `swapd upgrade`")
    return text + _SEE_DOCS
