"""The patch half of `swapd.worker`: prepare, commit, abort, roll back, squash, replay.

The supervisor runs each patch as a transaction over every worker of the active
generation (`swapd/supervisor/patching.py`); this is one worker's side of it:

    patch.prepare {pid, module, source, name, accept_absent, prune}
        -> plan on a thread (planning may scan the heap; the loop keeps serving)
        <- {ok: committable, plan: Plan.to_dict(), error?}
       A patch of several modules is one prepare per module with the same pid, in order:
       each later plan sees what the earlier ones add (`patch.prepare(peers=...)`).
    patch.commit {pid}    -> commit every plan of that pid as one step, on the event-loop
                             thread between callbacks
    patch.abort {pid}     -> discard its plans
    patch.rollback {pid}  -> roll back that patch (the most recent one); also ok when it is
                             not in force here (never committed, or rolled back already), so
                             the supervisor can send it to every worker and retry it; a plan
                             prepared for it is discarded (a late commit cannot apply it)
    patch.squash {pid}    -> make every patch committed here permanent (up to pid): they stay,
                             the engine drops what it kept to roll them back

Patches committed here form a stack per worker, mirroring the supervisor's journal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any

from swapd import patch

log = logging.getLogger("swapd.worker")


@dataclass
class Committed:
    pid: int
    modules: list[str]
    handles: list[patch.Applied]


class PatchHost:
    def __init__(self) -> None:
        self.plans: dict[int, list[patch.Plan]] = {}  # prepared, by patch id, in order
        self.stack: list[Committed] = []
        self.squashed: set[int] = set()

    async def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = int(body["pid"])
        module = str(body["module"])
        accept_absent = bool(body.get("accept_absent"))
        if module not in sys.modules:
            return {"ok": False, "error": f"module {module!r} is not loaded in this worker"}
        peers = self.plans.get(pid, [])
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(None, functools.partial(
                patch.prepare, module, str(body["source"]), accept_absent=accept_absent,
                prune=bool(body.get("prune")), source_name=body.get("name"), peers=peers))
        except patch.PatchError as e:
            return {"ok": False, "error": str(e)}
        self.plans.setdefault(pid, []).append(plan)  # remembers accept_absent itself
        report = plan.to_dict()
        report["path"] = getattr(sys.modules[module], "__file__", None)
        reply: dict[str, Any] = {"ok": plan.committable, "plan": report}
        if plan.refused:
            reply["error"] = f"{len(plan.refused)} change(s) refused: needs a swap"
        elif not plan.committable:
            reply["error"] = "closure cells without a value: use --accept-absent"
        return reply

    def commit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Runs on the event-loop thread: no other callback runs during the commit."""
        pid = int(body["pid"])
        plans = self.plans.pop(pid, None)
        if not plans:
            return {"ok": False, "error": f"no prepared plan for patch {pid}"}
        try:
            handles = patch.commit_all(plans)
        except patch.PatchError as e:
            return {"ok": False, "error": str(e)}
        done = Committed(pid, [h.module_name for h in handles], handles)
        self.stack.append(done)
        log.info("event=patch.committed patch=%d module=%s", pid, ",".join(done.modules))
        applied = [h.to_dict() for h in handles]
        return {"ok": True, "applied": applied[0] if len(applied) == 1 else applied}

    def abort(self, body: dict[str, Any]) -> dict[str, Any]:
        for plan in self.plans.pop(int(body["pid"]), []):
            plan.discard()
        return {"ok": True}

    def rollback(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = int(body["pid"])
        for plan in self.plans.pop(pid, []):
            plan.discard()
        if pid in self.squashed:
            return {"ok": False, "error": f"patch {pid} was squashed: it can no longer be "
                                          "rolled back"}
        if all(c.pid != pid for c in self.stack):
            return {"ok": True, "notes": [f"patch {pid} is not in force in this worker "
                                          "(never committed, or rolled back already)"]}
        top = self.stack[-1]
        if top.pid != pid:
            return {"ok": False, "error": f"patch {pid} is not the last one here (last: "
                                          f"{top.pid})"}
        try:
            notes = top.handles[0].rollback()  # the whole set
        except patch.PatchError as e:
            if not top.handles[0].active:  # the code was rolled back; the error says what is left
                self.stack.pop()
            return {"ok": False, "error": str(e)}
        done = self.stack.pop()
        log.info("event=patch.rolled_back patch=%d module=%s", pid, ",".join(done.modules))
        return {"ok": True, "notes": notes}

    async def squash(self, body: dict[str, Any]) -> dict[str, Any]:
        """Make every patch committed here permanent.  Off the loop: dropping the undo logs
        frees many objects, and the event loop keeps serving meanwhile."""
        pid = int(body["pid"])
        loop = asyncio.get_running_loop()
        folded = await loop.run_in_executor(None, patch.make_permanent)
        self.squashed.update(c.pid for c in self.stack)
        self.stack.clear()
        log.info("event=patch.squashed upto=%d patches_folded=%d", pid, folded)
        return {"ok": True, "folded": folded}

    def replay(self, journal: list[dict[str, Any]]) -> None:
        """A restarted worker: apply the generation's patches, in order, before ready.  The
        entries the journal says were squashed are made permanent here too."""
        last_squashed = max((i for i, e in enumerate(journal) if e.get("squashed")), default=-1)
        for i, entry in enumerate(journal):
            parts = entry.get("parts") or [entry]
            plans: list[patch.Plan] = []
            try:
                for part in parts:
                    plans.append(patch.prepare(
                        part["module"], part["source"],
                        accept_absent=bool(entry.get("accept_absent")),
                        prune=bool(entry.get("prune")), source_name=part.get("name"),
                        peers=plans))
                handles = patch.commit_all(plans)
            except patch.PatchError as e:
                modules = ",".join(p["module"] for p in parts)
                raise RuntimeError(f"cannot re-apply patch {entry['id']} to {modules}: {e}") from e
            self.stack.append(Committed(int(entry["id"]), [h.module_name for h in handles],
                                        handles))
            log.info("event=patch.replayed patch=%s module=%s", entry["id"],
                     ",".join(h.module_name for h in handles))
            if i == last_squashed:
                patch.make_permanent()
                self.squashed.update(c.pid for c in self.stack)
                self.stack.clear()
