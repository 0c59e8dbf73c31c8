"""Starting one worker: its channel, notify socket, output pipe, environment, and the exec.

The supervisor process's half of swapd's worker protocol at start (LISTEN_FDS,
NOTIFY_SOCKET, SWAPD_*: docs/worker.md); the fork and exec themselves are
`process.OsProcesses`, the one seam for side effects on processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass

from swapd.channel import socketpair
from swapd.config import Config
from swapd.supervisor import notify, readiness
from swapd.supervisor.generation import WorkerProcess
from swapd.supervisor.process import OsProcesses, SpawnSpec


@dataclass
class WorkerSpec:
    """Everything needed to start one worker process."""

    gen: int
    slot: int
    config: Config
    listener_fds: list[int]
    listener_names: list[str]
    role: str  # "fresh" or "successor" (expects state from the previous generation)
    base_env: dict[str, str]


def spawn_worker(
    spec: WorkerSpec, processes: OsProcesses, loop: asyncio.AbstractEventLoop
) -> WorkerProcess:
    """Start one worker with its channel, notify socket and output pipe."""
    cfg = spec.config
    # Each descriptor opened here is closed if a later step fails (EMFILE half way must
    # leak nothing: the supervisor retries the spawn when descriptors return).
    with contextlib.ExitStack() as undo:
        probe = readiness.open_probe(cfg)  # readiness=probe: a listener only this worker serves
        fds, names = list(spec.listener_fds), list(spec.listener_names)
        if probe is not None:
            undo.callback(probe.close)
            fds.append(probe.fileno())
            names.append(readiness.PROBE_LISTENER)
        parent_end, child_end = socketpair()
        undo.callback(parent_end.close)
        undo.callback(child_end.close)  # closing a socket twice is harmless
        notify_sock, notify_addr = notify.notify_socket(spec.gen, spec.slot)
        undo.callback(notify_sock.close)
        out_r: int | None = None
        out_w: int | None = None  # None: the worker inherits our stdout and stderr
        # passthrough: the worker's bytes go where ours go, untouched and without a hop
        # through us (no per-line cost; and no tail for failure reports).
        try:
            if cfg.worker_output != "passthrough":
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                undo.callback(os.close, out_r)
            child = processes.spawn(SpawnSpec(
                argv=cfg.command,
                env=_worker_env(spec, probe, len(fds), notify_addr),
                pass_fds=[*fds, child_end.fileno()],
                cwd=cfg.cwd,
                output_fd=out_w,
            ))
        finally:  # the child's ends: it has its own copies, or it does not exist
            child_end.close()
            if out_w is not None:
                os.close(out_w)
        undo.pop_all()  # spawned: what remains open is the worker's, from here on
    worker = WorkerProcess(spec.gen, spec.slot, spec.role, child, loop)
    worker.attach(parent_end, notify_sock, out_r)
    if probe is not None:
        readiness.start_probe(worker, cfg, probe)
    return worker


def _worker_env(spec: WorkerSpec, probe: socket.socket | None, n: int, notify_addr: str
                ) -> dict[str, str]:
    """A worker's environment: ours (cleaned), its configuration's, and swapd's protocol."""
    cfg = spec.config
    env = dict(spec.base_env)
    env.update(cfg.env)
    if probe is not None:
        env.update(readiness.probe_env(probe, 3 + n - 1))
    names = [*spec.listener_names] + ([readiness.PROBE_LISTENER] if probe is not None else [])
    env.update({
        "LISTEN_FDS": str(n),
        "LISTEN_FDNAMES": ":".join(names),
        "NOTIFY_SOCKET": notify_addr,
        "SWAPD_CHANNEL_FD": str(3 + n),
        "SWAPD_GENERATION": str(spec.gen),
        "SWAPD_SLOT": str(spec.slot),
        "SWAPD_WORKERS": str(cfg.workers),
        "SWAPD_MODE": cfg.mode,
        "SWAPD_ROLE": spec.role,
        "SWAPD_IDLE_GRACE": f"{cfg.timeouts.idle_grace:g}",
        "SWAPD_DRAIN_TIMEOUT": f"{cfg.timeouts.drain:g}",
    })
    return env
