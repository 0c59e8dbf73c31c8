"""The patch half of `swapd.worker`: prepare, commit, abort, roll back, replay a journal.

The supervisor runs each patch as a transaction over every worker of the active
generation (`swapd/supervisor/patching.py`); this is one worker's side of it:

    patch.prepare {pid, module, source, name, accept_absent, prune}
        -> plan on a thread (planning may scan the heap; the loop keeps serving)
        <- {ok: committable, plan: Plan.to_dict(), error?}
    patch.commit {pid}    -> commit on the event-loop thread, between callbacks
    patch.abort {pid}     -> discard the plan
    patch.rollback {pid}  -> roll back that patch (the most recent one); also ok when it is
                             not in force here (never committed, or rolled back already), so
                             the supervisor can send it to every worker and retry it; a plan
                             prepared for it is discarded (a late commit cannot apply it)

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
    module: str
    applied: patch.Applied


class PatchHost:
    def __init__(self) -> None:
        self.plans: dict[int, patch.Plan] = {}  # prepared, by patch id
        self.stack: list[Committed] = []

    async def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = int(body["pid"])
        module = str(body["module"])
        accept_absent = bool(body.get("accept_absent"))
        if module not in sys.modules:
            return {"ok": False, "error": f"module {module!r} is not loaded in this worker"}
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(None, functools.partial(
                patch.prepare, module, str(body["source"]), accept_absent=accept_absent,
                prune=bool(body.get("prune")), source_name=body.get("name")))
        except patch.PatchError as e:
            return {"ok": False, "error": str(e)}
        self.plans[pid] = plan  # remembers accept_absent itself
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
        plan = self.plans.pop(pid, None)
        if plan is None:
            return {"ok": False, "error": f"no prepared plan for patch {pid}"}
        try:
            applied = plan.commit()
        except patch.PatchError as e:
            return {"ok": False, "error": str(e)}
        self.stack.append(Committed(pid, plan.module_name, applied))
        log.info("event=patch.committed patch=%d module=%s", pid, self.stack[-1].module)
        return {"ok": True, "applied": applied.to_dict()}

    def abort(self, body: dict[str, Any]) -> dict[str, Any]:
        plan = self.plans.pop(int(body["pid"]), None)
        if plan is not None:
            plan.discard()
        return {"ok": True}

    def rollback(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = int(body["pid"])
        plan = self.plans.pop(pid, None)
        if plan is not None:
            plan.discard()
        if all(c.pid != pid for c in self.stack):
            return {"ok": True, "notes": [f"patch {pid} is not in force in this worker "
                                          "(never committed, or rolled back already)"]}
        top = self.stack[-1]
        if top.pid != pid:
            return {"ok": False, "error": f"patch {pid} is not the last one here (last: "
                                          f"{top.pid})"}
        try:
            notes = top.applied.rollback()
        except patch.PatchError as e:
            if not top.applied.active:  # the code was rolled back; the error says what is left
                self.stack.pop()
            return {"ok": False, "error": str(e)}
        done = self.stack.pop()
        log.info("event=patch.rolled_back patch=%d module=%s", pid, done.module)
        return {"ok": True, "notes": notes}

    def replay(self, journal: list[dict[str, Any]]) -> None:
        """A restarted worker: apply the generation's patches, in order, before ready."""
        for entry in journal:
            try:
                applied = patch.apply(entry["module"], entry["source"],
                                      accept_absent=bool(entry.get("accept_absent")),
                                      prune=bool(entry.get("prune")),
                                      source_name=entry.get("name"))
            except patch.PatchError as e:
                raise RuntimeError(f"cannot re-apply patch {entry['id']} to "
                                   f"{entry['module']}: {e}") from e
            self.stack.append(Committed(int(entry["id"]), entry["module"], applied))
            log.info("event=patch.replayed patch=%s module=%s", entry["id"], entry["module"])
