"""SharedBuffer: a byte buffer that lives in a memfd from birth and crosses a swap by fd.

A state that keeps its bulk bytes in :class:`SharedBuffer` objects hands them over without a
copy: the snapshot carries a dup of the memfd, the new worker maps the same pages (measured:
~0.1 ms whatever the size, page faults then happen lazily on first touch).

The abort rule. Until the swap commits, the old worker's buffer is live state that it may have
to resume with. So on the receiving side a SharedBuffer is mapped read-only
(``PROT_READ``, and Python exports read-only views), and only :meth:`Restored.commit
<swapd.handoff.Restored.commit>` maps it read-write. A ``restore()`` that writes into it fails
with ``TypeError: cannot modify read-only memory`` - the restore raises, the swap aborts, the
old buffer is intact. A restore that must change the layout allocates a new SharedBuffer and
copies. Views taken before commit stay read-only (they keep seeing every write: the pages are
shared), so take writable views from :attr:`SharedBuffer.buf` after commit. The size is sealed
(``F_SEAL_SHRINK | F_SEAL_GROW``) at creation, so no process can truncate the memfd under a
peer's mapping (which would SIGBUS it).

This guards against bugs, not against a hostile successor: both workers run as the same uid
and either could ptrace the other. Note also that the rule protects the *bytes*; the old worker
must not write to the buffer between quiesce and the swap's outcome (it is not serving then).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import weakref
from types import TracebackType
from typing import NoReturn

from . import memfd


class SharedBuffer:
    """A fixed-size, zero-copy-transferable byte buffer backed by a sealed-size memfd.

    >>> sb = SharedBuffer(1 << 20)
    >>> sb.buf[:5] = b"hello"      # put ``sb`` itself in the state; views travel as copies
    """

    __slots__ = ("__weakref__", "_close_fd", "_fd", "_map", "_size", "_writable")

    def __init__(self, size: int, *, name: str = "swapd-shared") -> None:
        if type(size) is not int or size <= 0:
            raise ValueError(f"SharedBuffer size must be a positive int, got {size!r}")
        fd = memfd.create(name)
        try:
            os.ftruncate(fd, size)
            memfd.add_seals(fd, memfd.SEALS_FIXED_SIZE | fcntl.F_SEAL_SEAL)
            mapping = memfd.map_shared(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._setup(fd, size, mapping, writable=True)

    def _setup(self, fd: int, size: int, mapping: mmap.mmap, *, writable: bool) -> None:
        self._fd = fd
        self._size = size
        self._map: mmap.mmap | None = mapping
        self._writable = writable
        self._close_fd = weakref.finalize(self, os.close, fd)

    @classmethod
    def _adopt(cls, fd: int, size: int) -> SharedBuffer:
        """Receiver side: own ``fd`` (closed on failure), mapped read-only until commit."""
        try:
            actual = memfd.sealed_size(fd, what="shared buffer", seals=memfd.SEALS_FIXED_SIZE)
            memfd.check_size(actual, size, what="shared buffer")
            mapping = memfd.map_readonly(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self = cls.__new__(cls)
        self._setup(fd, size, mapping, writable=False)
        return self

    @property
    def buf(self) -> memoryview:
        """A view of the whole buffer; read-only on a receiver until the swap commits."""
        if self._map is None:
            raise ValueError("SharedBuffer is closed")
        return memoryview(self._map)

    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def closed(self) -> bool:
        return self._map is None

    def __len__(self) -> int:
        return self._size

    def close(self) -> None:
        """Unmap and close. Raises BufferError while views from :attr:`buf` are alive."""
        if self._map is None:
            return
        self._map.close()
        self._map = None
        self._close_fd()

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self._writable else "read-only")
        return f"<SharedBuffer size={self._size} {state}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SharedBuffer travels only inside a swapd snapshot (swapd.handoff.dump)")

    # -- used by the snapshot code --------------------------------------------------------

    def _fileno(self) -> int:
        if self._map is None:
            raise ValueError("cannot hand over a closed SharedBuffer")
        return self._fd

    def _commit(self) -> None:
        """The swap committed: from now on :attr:`buf` is writable."""
        if self._map is None or self._writable:
            return
        # Replace rather than close the read-only mapping: views taken during restore may still
        # reference it; it is unmapped when the last of them goes.
        self._map = memfd.map_shared(self._fd, self._size)
        self._writable = True

    def _discard(self) -> None:
        """Failure path of a load: release what can be released now."""
        mapping, self._map = self._map, None
        self._close_fd()
        if mapping is not None:
            # BufferError: a view made during the failed decode is still referenced (a
            # traceback, a caller's variable); the mapping is unmapped when that reference goes.
            with contextlib.suppress(BufferError):
                mapping.close()
