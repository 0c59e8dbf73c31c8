"""`wsgi.file_wrapper` (PEP 3333 "Optional Platform-Specific File Handling") and the
os.sendfile loop behind it.

An app (Werkzeug's send_file, Django's FileResponse) returns `FileWrapper(file)`; when the
server gets that very object back and the file is a regular file, the bytes go from the page
cache to the socket with os.sendfile, from the file's current position; anything else (a
pipe, BytesIO, a text file, a wrapper wrapped again by middleware) is iterated like any
iterable, read() by read(). Either way the server calls close(), which closes the file.
"""

from __future__ import annotations

import io
import os
import select
import socket
import stat
from typing import Any

BLOCK = 8192  # read() size when iterated (PEP 3333's example and gunicorn's default)
SENDFILE_CHUNK = 1 << 30  # os.sendfile count per call (Linux sends at most ~2 GiB anyway)


class FileWrapper:
    """An iterable over `filelike.read(blksize)`; `close()` closes the file."""

    def __init__(self, filelike: Any, blksize: int = BLOCK) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return bytes(data)
        raise StopIteration

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()

    # Werkzeug's range requests seek instead of reading up to the first byte asked for.
    def seekable(self) -> bool:
        seekable = getattr(self.filelike, "seekable", None)
        return bool(seekable()) if seekable is not None else False

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return int(self.filelike.seek(offset, whence))

    def tell(self) -> int:
        return int(self.filelike.tell())


def regular_file(wrapper: FileWrapper) -> tuple[int, int, int] | None:
    """(fd, offset, bytes from there to the end) if the wrapped object is a regular file
    os.sendfile can send, else None (then it is iterated)."""
    f = wrapper.filelike
    if isinstance(f, io.TextIOBase):
        return None  # str chunks: an error either way, and read() says which
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        # The file object's position (a buffered reader may have read ahead of the fd's).
        tell = getattr(f, "tell", None)
        offset = int(tell()) if tell is not None else os.lseek(fd, 0, os.SEEK_CUR)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    if not isinstance(fd, int) or offset < 0:
        return None
    return fd, offset, max(0, st.st_size - offset)


def sendfile_all(sock: socket.socket, fd: int, offset: int, count: int,
                 timeout: float) -> int:
    """Send `count` bytes of `fd` from `offset` on the non-blocking `sock`, blocking this
    (pool) thread; returns the bytes sent (fewer if the file shrank). OSError if the client
    goes or reads nothing for `timeout` seconds."""
    sent = 0
    out = sock.fileno()
    while sent < count:
        try:
            n = os.sendfile(out, fd, offset + sent, min(count - sent, SENDFILE_CHUNK))
        except (BlockingIOError, InterruptedError):
            poller = select.poll()
            poller.register(out, select.POLLOUT)
            if not poller.poll(timeout * 1000):
                raise OSError("the client stopped reading the response") from None
            continue
        if n == 0:
            break  # end of file: it is shorter than it was
        sent += n
    return sent
