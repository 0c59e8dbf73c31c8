"""Patches as transactions over every worker of the active generation (`swapd patch`).

    apply:    prepare on all ──all committable──▶ commit on all ──▶ journal += patch
                  │                                   │
                  └─any error / refusal──▶ abort all  └─a commit fails or times out──▶
                                                        roll back on all
    rollback: roll back the journal's last patch on all, then pop it
    squash:   make every patch in the journal permanent on all (the workers drop what they
              kept to roll them back); the journal keeps their sources for restarts

A patch may span several modules (a patch set): each module is prepared on every worker in
the order given (one prepare each, same patch id), and the commit applies them all at once
in each worker.

A worker's rollback succeeds when the patch is not in force there (never committed, or
rolled back already). So a commit that timed out is rolled back too (the worker may have
committed after all, and a plan it has not committed yet is discarded), and a rollback that
failed on some workers can simply be retried.

The journal (module, source, sha256, time, who, in order) belongs to the active
generation: a worker restarted after a crash re-applies it before it is ready
(`Fleet.journal_for`), and a swap to new code clears it. A patch and a swap
never run at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from swapd.channel import Message
from swapd.commands import PatchArgs
from swapd.control import ControlError, Emit, Peer
from swapd.patch.source import sha256_text
from swapd.supervisor.generation import Generation, RequestFailed, WorkerProcess
from swapd.supervisor.journal import Journal, PatchRecord
from swapd.supervisor.lifecycle import SlotState

log = logging.getLogger("swapd")

PREPARE_TIMEOUT = 60.0  # planning may scan a large heap
COMMIT_TIMEOUT = 30.0
MAX_PARTS = 64  # modules in one patch


def bound(parts: int) -> float:
    """The longest a patch request can take: each module prepared in turn, then a commit
    and perhaps a rollback."""
    return PREPARE_TIMEOUT * max(1, parts) + 2 * COMMIT_TIMEOUT + 5.0


def _targets(gen: Generation | None) -> list[WorkerProcess]:
    if gen is None:
        raise ControlError("no active generation")
    workers = [w for w in gen.workers if w is not None]
    if len(workers) != len(gen.workers) or any(w.state != SlotState.READY for w in workers):
        raise ControlError(f"gen={gen.id} is not fully ready (a worker is restarting); retry")
    for w in workers:
        if "patch" not in w.features():
            raise ControlError(f"{w.tag} does not use swapd.worker: it cannot take patches")
    return workers


async def _each(workers: list[WorkerProcess], body: dict[str, Any], timeout: float, what: str
                ) -> list[Message | BaseException]:
    """Ask every worker; a failure is returned (with its reason), never raised."""
    async def one(w: WorkerProcess) -> Message:
        try:
            reply = await w.ask_raw(body, timeout, what)
        except RequestFailed as e:
            raise ControlError(e.reason) from e
        if reply.body.get("ok") is not True:
            reply.close_fds()
            raise ControlError(f"{w.tag} {what} failed: "
                               f"{reply.body.get('error', 'no reason given')}")
        return reply
    return await asyncio.gather(*(one(w) for w in workers), return_exceptions=True)


def _report(w: WorkerProcess, result: Message | BaseException, key: str) -> dict[str, Any]:
    if isinstance(result, Message):
        return {"worker": w.slot, "pid": w.pid, "ok": True, key: result.body.get(key)}
    return {"worker": w.slot, "pid": w.pid, "ok": False, "error": str(result)}


def parts_of(args: PatchArgs) -> list[dict[str, Any]]:
    """The modules of the patch, in order: ``parts`` ([{module, source, name}]) or the
    ``module``/``source``/``name`` of a patch of one module."""
    raw: Any = args.parts
    if raw is None:
        raw = [{"module": args.module, "source": args.source, "name": args.name}]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_PARTS:
        raise ControlError(f"patch needs 1 to {MAX_PARTS} modules")
    parts = []
    for item in raw:
        module = item.get("module") if isinstance(item, dict) else None
        source = item.get("source") if isinstance(item, dict) else None
        if not isinstance(module, str) or not module or not isinstance(source, str):
            raise ControlError("patch needs 'module' (a name) and 'source' (the new text)")
        parts.append({"module": module, "source": source, "name": str(item.get("name") or "")})
    modules = [p["module"] for p in parts]
    if len(set(modules)) != len(modules):
        raise ControlError(f"a module appears twice in the patch: {', '.join(modules)}")
    return parts


async def apply(gen: Generation | None, journal: Journal, args: PatchArgs, emit: Emit,
                peer: Peer) -> dict[str, Any]:
    parts = parts_of(args)
    workers = _targets(gen)
    pid = journal.next_id()
    for part in parts:
        part["name"] = part["name"] or f"patch {pid}"
        part["sha256"] = sha256_text(part["source"])
    accept_absent, prune = args.accept_absent, args.prune
    what = ", ".join(f"{p['module']} from {p['name']} (sha256 {p['sha256'][:12]})"
                     for p in parts)
    emit("prepare", f"patch {pid}: {what} to {len(workers)} worker(s)", None)
    plans: list[dict[str, Any]] = []
    answered: set[int] = set()  # slots of the workers holding a plan of this patch
    failed: list[dict[str, Any]] = []
    for part in parts:  # in order: a module's plan sees what the earlier ones add
        body = {"pid": pid, "module": part["module"], "source": part["source"],
                "name": part["name"], "accept_absent": accept_absent, "prune": prune}
        prepared = await _prepare(workers, body)
        for w, r in zip(workers, prepared, strict=True):
            if isinstance(r, Message):
                answered.add(w.slot)
            report = _plan_report(w, r, part["module"])
            emit("plan", _plan_line(report), {"plan": report})
            plans.append(report)
            if not report["ok"]:
                failed.append(report)
        if failed:
            break
    dry = args.dry_run
    if failed or dry:
        await _each([w for w in workers if w.slot in answered],
                    {"t": "patch.abort", "pid": pid}, COMMIT_TIMEOUT, "patch abort")
        if dry:
            return {"patch": pid, "dry_run": True, "plans": plans, "committable": not failed}
        raise ControlError(f"patch {pid} not applied: {failed[0]['error']} (worker "
                           f"{failed[0]['worker']}); no worker changed", {"plans": plans})
    committed = await _each(workers, {"t": "patch.commit", "pid": pid}, COMMIT_TIMEOUT,
                            "patch commit")
    bad = [(w, r) for w, r in zip(workers, committed, strict=True) if not isinstance(r, Message)]
    if bad:
        # Every worker, not only those that replied ok: one whose commit timed out may still
        # commit, and the rollback discards its plan or undoes it.
        undone = await _each(workers, {"t": "patch.rollback", "pid": pid}, COMMIT_TIMEOUT,
                             "patch rollback")
        stuck = [w.tag for w, r in zip(workers, undone, strict=True)
                 if not isinstance(r, Message) and not w.exited.done()]  # the dead restart clean
        message = f"patch {pid} failed to commit on {bad[0][0].tag}: {bad[0][1]}; " + (
            "rolled back on every worker" if not stuck else
            f"ROLLBACK FAILED on {', '.join(stuck)}: workers may now run different code")
        log.error("event=patch.failed patch=%d reason=%r", pid, message)
        raise ControlError(message, {"plans": plans})
    for part in parts:
        part["path"] = next((p["plan"].get("path") for p in plans
                             if p.get("plan") and p["module"] == part["module"]), None)
    first = parts[0]
    record = PatchRecord(pid, first["module"], first["source"], first["sha256"], first["name"],
                         time.time(), str(peer), accept_absent, prune, first["path"],
                         parts=parts if len(parts) > 1 else [])
    journal.append(record)
    modules = ",".join(p["module"] for p in parts)
    log.info("event=patch.applied patch=%d module=%s sha256=%s workers=%d who=%r", pid, modules,
             first["sha256"][:12], len(workers), str(peer))
    emit("committed", f"patch {pid} committed on {len(workers)} worker(s)", None)
    return {"patch": pid, "plans": plans, "committed": [_report(w, r, "applied")
                                                         for w, r in zip(workers, committed,
                                                                         strict=True)]}


async def _prepare(workers: list[WorkerProcess], body: dict[str, Any]
                   ) -> list[Message | BaseException]:
    async def one(w: WorkerProcess) -> Message:
        if w.channel is None or w.channel.closed:
            raise ControlError(f"{w.tag} has no channel")
        return await w.channel.request({"t": "patch.prepare", **body}, timeout=PREPARE_TIMEOUT)
    return await asyncio.gather(*(one(w) for w in workers), return_exceptions=True)


def _plan_report(w: WorkerProcess, result: Message | BaseException, module: str
                 ) -> dict[str, Any]:
    if isinstance(result, BaseException):
        return {"worker": w.slot, "pid": w.pid, "module": module, "ok": False,
                "error": str(result)}
    ok = bool(result.body.get("ok"))
    report = {"worker": w.slot, "pid": w.pid, "module": module, "ok": ok,
              "plan": result.body.get("plan")}
    if not ok:
        report["error"] = result.body.get("error", "refused")
    return report


def _plan_line(p: dict[str, Any]) -> str:
    head = f"worker {p['worker']} pid {p['pid']} {p['module']}: "
    plan = p.get("plan")
    if plan is None:
        return head + f"FAILED: {p.get('error')}"
    parts = []
    for key in ("changed", "added", "absent", "removed", "refused"):
        items = plan.get(key) or []
        if items:
            names = ", ".join(_item(key, i) for i in items[:6])
            more = f" (+{len(items) - 6})" if len(items) > 6 else ""
            parts.append(f"{key}: {names}{more}")
    notes = plan.get("notes") or []
    if notes:
        parts.append(f"{len(notes)} note(s)")
    text = "; ".join(parts) or "no change"
    if not p["ok"]:
        text += f" -> {p.get('error')}"
    return head + text


def _item(key: str, item: dict[str, Any]) -> str:
    if key == "absent":
        return f"{item.get('function')}.{item.get('name')} ({item.get('source')})"
    if key == "refused":
        return f"{item.get('what')}: {item.get('reason')} ({item.get('remedy')})"
    if key == "removed":
        return f"{item.get('kind')} {item.get('where', '')}{'.' if item.get('where') else ''}" \
               f"{item.get('name')}"
    return f"{item.get('kind')} {item.get('name')}"


async def rollback(gen: Generation | None, journal: Journal, emit: Emit, peer: Peer
                   ) -> dict[str, Any]:
    record = journal.last
    if record is None:
        raise ControlError("no patch in force: nothing to roll back")
    if record.squashed:
        raise ControlError(f"patch {record.id} was squashed (made permanent): it can no longer "
                           "be rolled back; swap to new code instead (swapd upgrade)")
    workers = _targets(gen)
    results = await _each(workers, {"t": "patch.rollback", "pid": record.id}, COMMIT_TIMEOUT,
                          "patch rollback")
    reports = [_report(w, r, "notes") for w, r in zip(workers, results, strict=True)]
    failed = [r for r in reports if not r["ok"]]
    if failed and len(failed) < len(workers):
        log.error("event=patch.rollback_partial patch=%d failed=%d", record.id, len(failed))
    if failed:
        raise ControlError(f"rollback of patch {record.id} failed on worker "
                           f"{failed[0]['worker']}: {failed[0]['error']}; it stays in the "
                           "journal: retry (workers that rolled it back already agree)",
                           {"workers": reports})
    journal.pop()
    modules = ",".join(p["module"] for p in record.each_part())
    log.info("event=patch.rolled_back patch=%d module=%s who=%r", record.id, modules,
             str(peer))
    emit("rolled_back", f"patch {record.id} ({modules}) rolled back on "
         f"{len(workers)} worker(s)", None)
    return {"patch": record.id, "module": modules, "workers": reports}


async def squash(gen: Generation | None, journal: Journal, emit: Emit, peer: Peer
                 ) -> dict[str, Any]:
    """Make the whole journal permanent in every worker.  The workers drop the undo logs,
    replaced code and sources they kept (what a patch costs in a worker's memory); the
    journal keeps each patch's source, so a restarted worker can replay it, and marks it
    squashed: it can no longer be rolled back."""
    todo = [r for r in journal.records if not r.squashed]
    last = journal.last
    if not todo or last is None:
        raise ControlError("nothing to squash: no patch in force"
                           + (" that is not squashed already" if journal else ""))
    workers = _targets(gen)
    upto = last.id
    results = await _each(workers, {"t": "patch.squash", "pid": upto}, COMMIT_TIMEOUT,
                          "patch squash")
    reports = [_report(w, r, "folded") for w, r in zip(workers, results, strict=True)]
    failed = [r for r in reports if not r["ok"]]
    if len(failed) < len(workers):
        # Some worker folded them: none of these patches can be rolled back everywhere now.
        for record in todo:
            record.squashed = True
    log.info("event=patch.squashed upto=%d patches=%d failed=%d who=%r", upto, len(todo),
             len(failed), str(peer))
    if failed:
        raise ControlError(f"squash failed on worker {failed[0]['worker']}: "
                           f"{failed[0]['error']}; retry (squashing again is harmless)",
                           {"workers": reports})
    emit("squashed", f"patches {', '.join(str(r.id) for r in todo)} made permanent on "
         f"{len(workers)} worker(s)", None)
    return {"squashed": [r.id for r in todo], "workers": reports}
