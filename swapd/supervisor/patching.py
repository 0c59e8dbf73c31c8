"""Patches as transactions over every worker of the active generation (`swapd patch`).

    apply:    prepare on all ──all committable──▶ commit on all ──▶ journal += patch
                  │                                   │
                  └─any error / refusal──▶ abort all  └─a commit fails or times out──▶
                                                        roll back on all
    rollback: roll back the journal's last patch on all, then pop it

A worker's rollback succeeds when the patch is not in force there (never committed, or
rolled back already). So a commit that timed out is rolled back too (the worker may have
committed after all, and a plan it has not committed yet is discarded), and a rollback that
failed on some workers can simply be retried.

The journal (module, source, sha256, time, who, in order) belongs to the active
generation: a worker restarted after a crash re-applies it before it is ready
(`Supervisor.journal_for`), and a swap to new code clears it. A patch and a swap
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
BOUND = PREPARE_TIMEOUT + 2 * COMMIT_TIMEOUT + 5.0  # prepare, then commit and roll back


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


async def apply(gen: Generation | None, journal: Journal, args: PatchArgs, emit: Emit,
                peer: Peer) -> dict[str, Any]:
    module, source = args.module, args.source
    if not module or source is None:
        raise ControlError("patch needs 'module' (a name) and 'source' (the new text)")
    workers = _targets(gen)
    sha = sha256_text(source)
    pid = journal.next_id()
    name = args.name or f"patch {pid}"
    accept_absent, prune = args.accept_absent, args.prune
    body = {"pid": pid, "module": module, "source": source, "name": name,
            "accept_absent": accept_absent, "prune": prune}
    emit("prepare", f"patch {pid}: {module} from {name} (sha256 {sha[:12]}) to "
         f"{len(workers)} worker(s)", None)
    prepared = await _prepare(workers, body)
    plans = [_plan_report(w, r) for w, r in zip(workers, prepared, strict=True)]
    for p in plans:
        emit("plan", _plan_line(p), {"plan": p})
    failed = [p for p in plans if not p["ok"]]
    dry = args.dry_run
    if failed or dry:
        await _each([w for w, r in zip(workers, prepared, strict=True) if isinstance(r, Message)],
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
    path = next((p["plan"].get("path") for p in plans if p.get("plan")), None)
    record = PatchRecord(pid, module, source, sha, name, time.time(), str(peer),
                         accept_absent, prune, path)
    journal.append(record)
    log.info("event=patch.applied patch=%d module=%s sha256=%s workers=%d who=%r", pid, module,
             sha[:12], len(workers), str(peer))
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


def _plan_report(w: WorkerProcess, result: Message | BaseException) -> dict[str, Any]:
    if isinstance(result, BaseException):
        return {"worker": w.slot, "pid": w.pid, "ok": False, "error": str(result)}
    ok = bool(result.body.get("ok"))
    report = {"worker": w.slot, "pid": w.pid, "ok": ok, "plan": result.body.get("plan")}
    if not ok:
        report["error"] = result.body.get("error", "refused")
    return report


def _plan_line(p: dict[str, Any]) -> str:
    head = f"worker {p['worker']} pid {p['pid']}: "
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
    log.info("event=patch.rolled_back patch=%d module=%s who=%r", record.id, record.module,
             str(peer))
    emit("rolled_back", f"patch {record.id} ({record.module}) rolled back on "
         f"{len(workers)} worker(s)", None)
    return {"patch": record.id, "module": record.module, "workers": reports}
