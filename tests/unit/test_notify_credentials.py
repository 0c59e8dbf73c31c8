"""Who may speak on a worker's notify socket: the kernel's credentials, the process tree."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from swapd.supervisor.notify import in_process_tree, notify_socket, sender

# A worker (leading its own group, as swapd starts it) whose child leaves the group for a
# session of its own, like a daemonising helper; the child prints its pid and waits.
WRAPPER = [sys.executable, "-c",
           "import os, subprocess, sys; subprocess.run([sys.executable, '-c', "
           "'import os, sys; os.setsid(); print(os.getpid(), flush=True); sys.stdin.read()'])"]


def test_the_worker_its_group_and_its_descendants_are_in_its_tree() -> None:
    worker = subprocess.Popen(WRAPPER, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              process_group=0, text=True)
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        assert os.getpgid(child) == child != worker.pid  # not in the worker's group
        assert in_process_tree(worker.pid, worker.pid)
        assert in_process_tree(child, worker.pid), "a descendant outside the group"
        assert not in_process_tree(os.getpid(), worker.pid), "its parent is not its tree"
        assert not in_process_tree(1, worker.pid)
    finally:
        worker.kill()
        worker.wait()
    with open(f"/proc/{child}/stat", "rb") as f:
        parent = int(f.read().rsplit(b")", 1)[1].split()[1])
    assert not in_process_tree(child, worker.pid), "orphaned: no longer below the worker"
    os.kill(child, signal.SIGKILL)
    assert parent != worker.pid


def test_datagrams_carry_the_senders_real_credentials() -> None:
    sock, address = notify_socket(1, 0)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.sendto(b"READY=1", "\0" + address[1:])
        _, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        assert sender(anc) == (os.getpid(), os.geteuid())
    finally:
        sock.close()
