"""Each worker's notify socket (NOTIFY_SOCKET), and who may speak on it.

A datagram socket in the abstract namespace, one per worker, so a datagram is only ever
about one worker. Anyone can send to an abstract socket (its name is listed in the
world-readable /proc/net/unix, and in the worker's environment), so the kernel's
credentials of every datagram are checked (SO_PASSCRED, set before the name is given
out): only the worker's own process tree counts, as systemd counts a unit's cgroup. A
datagram's descriptors are never installed (no room for them in the ancillary buffer:
the kernel drops them), and a wakeup reads at most `PER_WAKEUP` datagrams, so a flood
costs bounded work and no memory beyond the socket's own queue.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct

PER_WAKEUP = 32  # datagrams read per wakeup: a flood cannot hold the loop
_UCRED = struct.Struct("3i")
ANCILLARY = socket.CMSG_SPACE(_UCRED.size)  # room for credentials, none for descriptors


def notify_socket(gen: int, slot: int) -> tuple[socket.socket, str]:
    """A new worker's socket, credentials on, and its NOTIFY_SOCKET address."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    name = f"swapd/{os.getpid()}/{gen}/{slot}/{secrets.token_hex(4)}"
    sock.bind("\0" + name)
    return sock, "@" + name


def sender(anc: list[tuple[int, int, bytes]]) -> tuple[int, int] | None:
    """(pid, uid) from a datagram's SCM_CREDENTIALS (the kernel's, not the sender's word)."""
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and \
                len(data) >= _UCRED.size:
            pid, uid, _gid = _UCRED.unpack_from(data)
            return pid, uid
    return None


def in_process_tree(pid: int, root: int, max_depth: int = 64) -> bool:
    """True if `pid` is `root`, in root's process group (a worker leads its own: setpgid
    in the child), or a descendant of root (a shell wrapper's child that left the group).

    A sender that is gone before we look cannot be placed, and is refused: sd_notify
    senders that exit at once (systemd-notify) wait on a BARRIER first, so they are
    still there."""
    for _ in range(max_depth):
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        try:
            ppid, pgrp = int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            return False
        if pgrp == root:
            return True
        if ppid <= 1:
            return False
        pid = ppid
    return False
