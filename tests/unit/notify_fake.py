"""A fake sd_notify receiver, shared by the unit tests of the service-manager side."""

from __future__ import annotations

import array
import socket
import uuid

from swapd.supervisor.manager import ServiceManager
from swapd.systemd import Notifier

DEADLINE = 10.0  # seconds; only reached when something is broken


class FakeNotifySocket:
    """The receiving end of sd_notify, on an abstract address (no file to clean up)."""

    def __init__(self) -> None:
        self.address = f"@swapd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + self.address[1:])

    def recv(self) -> tuple[bytes, list[int]]:
        self.sock.settimeout(DEADLINE)
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        return data, fds

    def payload(self) -> bytes:
        data, fds = self.recv()
        assert fds == [], "unexpected fds"
        return data

    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.payload().decode().split("\n"))

    def pending(self) -> list[bytes]:
        """Whatever arrived and was not read yet, without waiting."""
        out: list[bytes] = []
        self.sock.setblocking(False)  # a timeout would make Python wait despite MSG_DONTWAIT
        while True:
            try:
                data, _ = self.sock.recvfrom(4096)
            except BlockingIOError:
                return out
            out.append(data)

    def close(self) -> None:
        self.sock.close()


def manager(fake: FakeNotifySocket, *, fdstore: bool = True) -> ServiceManager:
    return ServiceManager(Notifier(fake.address), fdstore=fdstore)
