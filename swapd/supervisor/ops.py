"""What the supervisor reports about itself besides its log: the history file and the
metrics endpoint, fed from one place. The orchestration calls one method per event;
this module turns it into a history entry (history.py) and metric updates (metrics.py).

`who` (in every entry) says who asked: {"via": "control", "uid", "pid"} from the control
socket's peer credentials, {"via": "signal", "signal": "SIGHUP"}, {"via": "watch",
"trigger": ...} for an automatic rollback, {"via": "start", "uid", "ppid"}.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from swapd.config import Config
from swapd.control import Peer
from swapd.supervisor.generation import Generation
from swapd.supervisor.history import History, history_path
from swapd.supervisor.metrics import Metrics, Snapshot

log = logging.getLogger("swapd")

Who = dict[str, Any]


def who_control(peer: Peer) -> Who:
    return {"via": "control", "uid": peer.uid, "pid": peer.pid}


def who_signal(name: str) -> Who:
    return {"via": "signal", "signal": name}


def who_start() -> Who:
    return {"via": "start", "uid": os.getuid(), "ppid": os.getppid()}


class Operations:
    def __init__(self, config: Config, environ: Mapping[str, str] = os.environ) -> None:
        self.history = History(history_path(config.state_dir, config.control, environ))
        self.metrics_address = config.metrics
        self.metrics: Metrics | None = None
        self.last_swap: tuple[float, bool] | None = None  # ended (Unix time), committed

    def prepare(self) -> None:
        """Open the history (never fails) and bind the metrics endpoint (OSError, e.g. the
        port is in use, or MetricsUnavailable without prometheus-client)."""
        self.history.open()
        if self.metrics_address is not None:
            metrics = Metrics(self.metrics_address)
            metrics.start()
            self.metrics = metrics
            log.info("event=metrics.listening address=%s", metrics.address)

    def attach(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], Snapshot]) -> None:
        if self.metrics is not None:
            self.metrics.attach(loop, snapshot)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.history.close()

    def describe(self) -> dict[str, Any]:
        return {"history": self.history.path,
                "metrics": self.metrics.address if self.metrics else None}

    def warnings(self) -> list[str]:
        return self.history.warnings()

    # -- events -------------------------------------------------------------------------

    def started(self, gen: Generation, duration_ms: float) -> None:
        self.history.append("start", "ok", who_start(), gen_after=gen.id,
                            release_after=gen.release, workers=len(gen.workers),
                            mode=gen.config.mode, duration_ms=duration_ms)

    def swap_done(self, outcome: dict[str, Any], who: Who, before: Generation | None,
                  after: Generation | None, watch: float) -> None:
        ok = bool(outcome.get("ok"))
        kind = str(outcome.get("kind"))
        self.history.append(
            kind, "ok" if ok else "failed", who, reason=outcome.get("error"),
            gen_before=before.id if before else None,
            gen_after=after.id if after else outcome.get("gen"),
            release_before=before.release if before else None,
            release_after=after.release if after else None,
            duration_ms=outcome.get("duration_ms"), timings_ms=outcome.get("timings_ms"),
            watch=watch or None)
        self.last_swap = (time.time(), ok)
        if self.metrics is not None:
            pause = (outcome.get("timings_ms") or {}).get("pause")
            self.metrics.swap_done(kind, ok, float(outcome.get("duration_ms", 0)) / 1000,
                                   pause)

    def refused(self, kind: str, who: Who, reason: str) -> None:
        """A swap asked for and refused (another change in flight, a watch window...)."""
        self.history.append(kind, "refused", who, reason=reason)

    def patch_done(self, action: str, ok: bool, who: Who, gen: int | None,
                   data: Mapping[str, Any], reason: str | None) -> None:
        if data.get("dry_run"):
            return  # nothing changed
        kind = "patch" if action == "apply" else "patch.rollback"
        self.history.append(kind, "ok" if ok else "failed", who, reason=reason, gen_after=gen,
                            patch=data.get("patch"), module=data.get("module"),
                            name=data.get("name"))
        if self.metrics is not None:
            self.metrics.patches.labels(action, "ok" if ok else "failed").inc()

    def reexec(self, ok: bool, who: Who, reason: str | None, previous: str, version: str,
               duration_ms: float | None = None) -> None:
        self.history.append("reexec", "ok" if ok else "failed", who, reason=reason,
                            version_before=previous, version_after=version,
                            duration_ms=duration_ms)
        if self.metrics is not None:
            self.metrics.reexecs.labels("ok" if ok else "failed").inc()

    def watch_done(self, result: Mapping[str, Any]) -> None:
        outcome = str(result["outcome"])
        fields = {"gen_before": result["gen"], "release_before": result["release"],
                  "held": result["held"], "held_release": result["held_release"],
                  "reason": result.get("reason"), "duration_ms": result.get("duration_ms")}
        if outcome in ("passed", "cancelled"):
            self.history.append("watch", outcome, {"via": "watch"}, **fields)
            return
        rollback = {"rolled-back": "ok"}.get(outcome, outcome)  # refused, failed
        fields.update(gen_after=result["held"] if rollback == "ok" else result["gen"],
                      release_after=(result["held_release"] if rollback == "ok"
                                     else result["release"]),
                      trigger=result.get("trigger"), refused=result.get("refused"),
                      timings_ms=result.get("timings_ms"), lost_slots=result.get("lost_slots"))
        self.history.append("rollback", rollback, result.get("who") or {"via": "watch"},
                            **fields)
        if self.metrics is not None:
            self.metrics.rollbacks.labels(str(result.get("trigger")), rollback).inc()

    def stopped(self, who: Who, fast: bool, gen: Generation | None, duration_ms: float) -> None:
        self.history.append("stop", "ok", who, fast=fast, gen_before=gen.id if gen else None,
                            release_before=gen.release if gen else None,
                            duration_ms=duration_ms)

    def worker_event(self, event: str, gen: Generation, slot: int) -> None:
        if self.metrics is None:
            return
        if event == "restart":
            self.metrics.restarts.inc()
        elif event == "crash_loop":
            self.metrics.crash_loops.inc()
