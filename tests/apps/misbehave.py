"""A test worker whose behaviour each generation reads from a JSON file at start-up.

The file (path in $BEHAVIOR) holds the behaviour of the *next* generation to
start, so a test writes it and then asks for a swap:

    {"import_error": true}           raise while importing (crash on import)
    {"exit_before_ready": 3}         exit with this status before ready()
    {"leave_child": "/path/pidfile"} with exit_before_ready: first start a process in its own
                                     session that keeps our stdout open; its pid goes to the file
    {"never_ready": true}            serve nothing, never call ready()
    {"gate": "/path/fifo"}           block before ready() until a line arrives on the FIFO
                                     "<path>-<slot>" (one FIFO per worker slot)
    {"claim_mainpid": true}          at start, send MAINPID=<own pid> to systemd's well-known
                                     socket, /run/systemd/notify (a unit's NotifyAccess decides)
    {"serve_gate": "/path/fifo"}     the same, before it serves (answers nothing, a readiness
                                     probe included, until then)
    {"crash_after_ready": true}      call ready(), then exit 1 (crash loop material)
    {"version": "v2"}                text served at GET /
    {"say": "text"}                  print this line on stdout at start (output tests)
    {"unhealthy_http": true}         GET /healthz answers 503 (else 200)
  POST /sick makes the worker report itself unhealthy over the channel (report_health)
    {"orphan": true}                 at start, leave a short-lived grandchild (its parent, a
                                     shell, exits at once): it prints "orphan pid=N exiting"
                                     and exits, a zombie of whoever inherited it
    {"serve": false}                 ready, but accept on no listener
    {"shutdown_on_drain": true}      when told to drain, shutdown() every listener (on the
                                     socket the supervisor and every generation share)
  stateful behaviour (POST /incr, GET /count keep a counter handed over by swaps):
    {"state_version": 3}             the state version this code declares (default 1)
    {"restore_raises": true}         restore() raises
    {"restore_gate": "/path/fifo"}   restore() prints "restoring" and blocks on the FIFO
    {"snapshot_sleep": 3.0}          snapshot() blocks the event loop this long
    {"snapshot_hang": true}          snapshot() awaits forever (async)
    {"accept_versions": [1, 2]}      state versions this code restores (default: its own
                                     and older)
    {"snapshot_gate": "/path/fifo"}  snapshot() prints "snapshot gate" and blocks on the FIFO
  hostile behaviour, on the channel to the supervisor:
    {"flood_fds": 10000}             after ready(): that many descriptors in carrier frames no
                                     request asked for, then a status message; prints
                                     "fd flood sent"
    {"flood_body": 268435456}        snapshot() first sends a message whose body (in a sparse
                                     memfd) is that many bytes
    {"snapshot_emfile": true}        snapshot() lowers the soft RLIMIT_NOFILE so that the
                                     snapshot's memfd is the last descriptor this process may
                                     open (sending it then fails: EMFILE); resume restores it
    {"nofile": 256}                  lower RLIMIT_NOFILE (soft and hard) to this at start
    {"no_link": true}                say no "link" in the hello (an older swapd.worker): a
                                     handoff from it sends the connections through the
                                     supervisor, not over the link

HTTP: GET / -> "<version> <pid>", GET /hang -> never answers (holds a busy
connection, to test drain deadlines; the worker's own drain deadline cancels it), GET
/stubborn -> never answers and ignores cancellation (only SIGKILL ends it), GET /slow ->
prints "slow request in flight", answers once the worker starts draining, GET /linger ->
answers at once, then keeps working (Response.after) until the worker drains, GET
/listeners -> listener names.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))

from httpkit import Request, Response, serve_http

from swapd import worker

try:
    with open(os.environ["BEHAVIOR"]) as f:
        BEHAVIOR = json.load(f)
except (KeyError, FileNotFoundError):
    BEHAVIOR = {}

if BEHAVIOR.get("import_error"):
    raise RuntimeError("simulated import failure in the new code")

VERSION = BEHAVIOR.get("version", "v1")
DRAINING = asyncio.Event()
COUNT = 0


async def app(request: Request) -> Response:
    if request.target == "/hang":
        print("hanging request in flight", flush=True)
        await asyncio.Event().wait()
    if request.target == "/stubborn":  # hangs, and swallows the drain deadline's cancellation
        print("stubborn request in flight", flush=True)
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                print("stubborn request ignores its cancellation", flush=True)
    if request.target == "/linger":
        async def linger() -> None:
            print("lingering after the response", flush=True)
            await DRAINING.wait()

        return Response(200, f"lingering {os.getpid()}".encode(), after=linger)
    if request.target == "/slow":
        print("slow request in flight", flush=True)
        await DRAINING.wait()
        return Response(200, b"slow done")
    if request.target == "/incr" and request.method == "POST":
        global COUNT
        COUNT += 1
        return Response(200, str(COUNT).encode())
    if request.target == "/count":
        return Response(200, str(COUNT).encode())
    if request.target == "/healthz":
        if BEHAVIOR.get("unhealthy_http"):
            return Response(503, b"unhealthy, as told")
        return Response(200, b"ok")
    if request.target == "/sick" and request.method == "POST":
        worker.current().report_health(False, f"pid {os.getpid()} told to be sick")
        return Response(200, b"reported")
    if request.target == "/listeners":
        return Response(200, " ".join(sorted(worker.current().listeners)).encode())
    return Response(200, f"{VERSION} {os.getpid()}".encode())


SAVED_NOFILE: list[tuple[int, int]] = []


def _exhaust_fds() -> None:
    """The lowest free descriptor becomes the last one this process may open."""
    probe = os.dup(0)
    os.close(probe)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    SAVED_NOFILE.append(limits)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 1, limits[1]))
    print(f"descriptor limit lowered to {probe + 1}, as told", flush=True)


def _restore_fds() -> None:
    while SAVED_NOFILE:
        resource.setrlimit(resource.RLIMIT_NOFILE, SAVED_NOFILE.pop())


async def snapshot() -> dict[str, int]:
    if BEHAVIOR.get("flood_body"):
        _send_spilled(BEHAVIOR["flood_body"])
        print("oversized message sent", flush=True)
    if BEHAVIOR.get("snapshot_gate"):
        print("snapshot gate", flush=True)
        _wait_gate(BEHAVIOR["snapshot_gate"])
    if BEHAVIOR.get("snapshot_emfile"):
        _exhaust_fds()
    if BEHAVIOR.get("snapshot_sleep"):
        print("snapshot blocking the loop, as told", flush=True)
        time.sleep(BEHAVIOR["snapshot_sleep"])
    if BEHAVIOR.get("snapshot_hang"):
        print("snapshot hanging, as told", flush=True)
        await asyncio.Event().wait()
    return {"count": COUNT}


def restore(state: dict[str, int], from_version: int) -> None:
    global COUNT
    if BEHAVIOR.get("restore_raises"):
        raise ValueError("simulated restore failure")
    if BEHAVIOR.get("restore_gate"):
        print("restoring", flush=True)
        _wait_gate(BEHAVIOR["restore_gate"])
    COUNT = state["count"]


def _shutdown_listeners() -> None:
    import socket

    for sock in worker.current().listeners.values():
        print(f"shutting down listener fd={sock.fileno()}", flush=True)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as e:
            print(f"shutdown failed: {e}", flush=True)


async def main(w: worker.Worker) -> None:
    if BEHAVIOR.get("no_link"):
        w.FEATURES = tuple(f for f in w.FEATURES if f != "link")
    if BEHAVIOR.get("nofile"):
        limit = int(BEHAVIOR["nofile"])
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    w.on_drain(DRAINING.set)
    if BEHAVIOR.get("shutdown_on_drain"):
        w.on_drain(_shutdown_listeners)
    if BEHAVIOR.get("orphan"):
        code = "import os; print(f'orphan pid={os.getpid()} exiting', flush=True)"
        subprocess.run(["sh", "-c", f"{sys.executable} -c \"{code}\" &"], check=True)
    w.on_resume(_restore_fds)
    w.state_version = BEHAVIOR.get("state_version", 1)
    if "accept_versions" in BEHAVIOR:
        w.accept_versions = set(BEHAVIOR["accept_versions"])
    if "say" in BEHAVIOR:
        print(BEHAVIOR["say"], flush=True)
    w.on_snapshot(snapshot)
    w.on_restore(restore)
    if BEHAVIOR.get("claim_mainpid"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
            systemd.sendto(f"MAINPID={os.getpid()}".encode(), "/run/systemd/notify")
        print("sent MAINPID to systemd", flush=True)
    if BEHAVIOR.get("serve_gate"):
        print("waiting at the serve gate", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _wait_gate, f"{BEHAVIOR['serve_gate']}-{w.slot}")
    for name in w.listeners if BEHAVIOR.get("serve", True) else ():
        await w.serve(name, lambda conn: serve_http(conn, app))
    if "exit_before_ready" in BEHAVIOR:
        if BEHAVIOR.get("leave_child"):
            # Outlives us in its own session (no group signal reaches it), holding the
            # output pipe's write end open: the supervisor must not wait for its EOF.
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                     start_new_session=True)
            with open(BEHAVIOR["leave_child"], "w") as f:
                f.write(str(child.pid))
        print("exiting before ready, as told", flush=True)
        os._exit(BEHAVIOR["exit_before_ready"])
    if BEHAVIOR.get("never_ready"):
        print("never getting ready, as told", flush=True)
        await asyncio.Event().wait()
    if BEHAVIOR.get("gate"):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _wait_gate, f"{BEHAVIOR['gate']}-{w.slot}")
    await w.ready()
    if BEHAVIOR.get("flood_fds"):
        _flood_fds(BEHAVIOR["flood_fds"])
        print("fd flood sent", flush=True)
    if BEHAVIOR.get("crash_after_ready"):
        print("crashing after ready, as told", flush=True)
        os._exit(1)


# Raw frames on the worker's channel (the wire format of swapd.channel, drawn there).
_HEADER = struct.Struct(">4sBBHI")


def _channel() -> socket.socket:
    chan = worker.current()._channel  # a hostile worker reaches for its raw channel
    assert chan is not None, "the flood behaviours need swapd's channel"
    return chan.sock


def _send(frame: bytes, fds: list[int]) -> None:
    sock = _channel()
    sock.setblocking(True)  # the supervisor reads it; a full buffer only slows us down
    try:
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                   if fds else [])
    finally:
        sock.setblocking(False)


def _flood_fds(count: int) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    for start in range(0, count, 250):
        n = min(250, count - start)
        _send(_HEADER.pack(b"SWPD", 1, 0x02, n, 0), [devnull] * n)
    body = json.dumps({"t": "status", "text": "flooded"}).encode()
    _send(_HEADER.pack(b"SWPD", 1, 0, 0, len(body)) + body, [])
    os.close(devnull)


def _send_spilled(size: int) -> None:
    memfd = os.memfd_create("flood", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)  # sparse: it costs this process nothing
    _send(_HEADER.pack(b"SWPD", 1, 0x01, 1, size), [memfd])
    os.close(memfd)


def _wait_gate(path: str) -> None:
    with open(path) as fifo:  # blocks until the test opens the FIFO for writing
        fifo.readline()


if __name__ == "__main__":
    worker.run(main)
