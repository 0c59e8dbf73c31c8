"""dump() and load(): a state object to sealed memfds plus an envelope, and back.

The layout is drawn in :mod:`swapd.handoff`. This module never does socket I/O: the caller
sends ``snapshot.envelope.to_dict()`` and ``snapshot.send_fds`` however it likes and hands
what arrives to :func:`load`.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import socket
import traceback
import weakref
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from . import memfd as mfd
from .codecs import DEFAULT_CODEC, get_codec
from .envelope import (
    FORMAT_VERSION,
    HEADER_SIZE,
    SCOPE_ALL,
    SCOPE_PAYLOAD,
    BufferSpec,
    Envelope,
    pack_header,
    pack_table,
    unpack_header,
    unpack_table,
)
from .errors import (
    ChecksumMismatch,
    CorruptSnapshot,
    DecodeError,
    EncodeError,
    FdMismatch,
    SnapshotError,
    Truncated,
    VersionRefused,
)
from .memfd import BytesLike
from .shared import SharedBuffer

# Out-of-band buffers are checksummed while that costs < ~1 ms per side (crc32: 5.9 GB/s);
# above, their integrity rests on the seals and size checks (see docs/state-handoff.md).
CHECKSUM_BUFFERS_LIMIT: Final = 4 * 1024 * 1024


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


class Snapshot:
    """A sealed snapshot memfd, the extra fds that travel with it, and its envelope.

    Send ``envelope.to_dict()`` and :attr:`send_fds` (in that order), then :meth:`close`: the
    receiver holds its own copies of the fds. Nothing here refers to the state, which was
    neither changed nor consumed.
    """

    __slots__ = ("__weakref__", "_closer", "buffers", "envelope", "fds", "memfd")

    def __init__(
        self, envelope: Envelope, memfd: int, fds: tuple[int, ...], buffers: tuple[BufferSpec, ...]
    ) -> None:
        self.envelope = envelope
        self.memfd = memfd
        self.fds = fds  # the buffers memfd first (if envelope.buffers), then objects' fds
        self.buffers = buffers
        self._closer = weakref.finalize(self, _close_fds, (memfd, *fds))

    @property
    def send_fds(self) -> list[int]:
        return [self.memfd, *self.fds]

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        env = self.envelope
        return (
            f"<Snapshot {env.codec} app_version={env.app_version} payload={env.payload_size} "
            f"buffers={env.buffers}/{env.buffers_size}B fds={env.fds}"
            f"{' closed' if self.closed else ''}>"
        )


class _Writer:
    """The codec's sink: in-band bytes straight into the memfd, checksummed on the way."""

    def __init__(self, fd: int, hasher: mfd.Hasher) -> None:
        self.fd = fd
        self.offset = HEADER_SIZE
        self.hasher = hasher
        self.buffers: list[memoryview] = []
        self.fds: list[int] = []

    def write(self, data: BytesLike, /) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)  # while the chunk is still hot in the cache
        mfd.pwrite_all(self.fd, view, self.offset)
        self.offset += view.nbytes
        return view.nbytes

    def add_buffer(self, buf: memoryview, /) -> None:
        self.buffers.append(buf)

    def add_fd(self, fd: int, /) -> int:
        self.fds.append(os.dup(fd))
        return len(self.fds) - 1


def dump(
    state: Any,
    *,
    app_version: int,
    codec: str = DEFAULT_CODEC,
    checksum: str = mfd.DEFAULT_CHECKSUM,
    checksum_buffers: bool | None = None,
) -> Snapshot:
    """Encode ``state`` into sealed memfds. The state is only read.

    ``checksum_buffers``: also checksum the out-of-band buffers (default: when they total at
    most :data:`CHECKSUM_BUFFERS_LIMIT` bytes). Raises :class:`EncodeError` (unsupported object,
    codec failure) or :class:`UnknownCodec`.
    """
    if type(app_version) is not int or app_version < 0:
        raise ValueError(f"app_version must be an int >= 0, got {app_version!r}")
    if checksum not in mfd.CHECKSUMS:
        raise ValueError(f"unknown checksum algorithm {checksum!r}")
    impl = get_codec(codec)
    fd = mfd.create("swapd-snapshot")
    writer = _Writer(fd, mfd.new_hasher(checksum))
    bufd: int | None = None
    try:
        try:
            impl.encode(state, writer)
        except SnapshotError:
            raise
        except Exception as e:
            raise EncodeError(f"{codec} cannot encode the state: {type(e).__name__}: {e}") from e
        payload_size = writer.offset - HEADER_SIZE
        specs, buffers_size = _layout(writer.buffers)
        writer.write(pack_table(specs))
        if checksum_buffers is None:
            checksum_buffers = sum(s.size for s in specs) <= CHECKSUM_BUFFERS_LIMIT
        if specs:
            bufd = mfd.create("swapd-snapshot-buffers")
            os.ftruncate(bufd, buffers_size)  # padding stays a hole: it costs no memory
            for spec, buf in zip(specs, writer.buffers, strict=True):
                mfd.pwrite_all(bufd, buf, spec.offset)
                if checksum_buffers:
                    writer.hasher.update(buf)
            mfd.add_seals(bufd, mfd.SEALS_IMMUTABLE)
        extra = ([] if bufd is None else [bufd]) + writer.fds
        envelope = Envelope(
            format=FORMAT_VERSION,
            app_version=app_version,
            codec=codec,
            size=writer.offset,
            payload_size=payload_size,
            checksum=f"{checksum}:{writer.hasher.hexdigest()}",
            checksum_scope=SCOPE_ALL if checksum_buffers else SCOPE_PAYLOAD,
            buffers=len(specs),
            buffers_size=buffers_size,
            fds=len(extra),
        )
        mfd.pwrite_all(fd, pack_header(envelope), 0)  # last: a half-written memfd has no magic
        mfd.add_seals(fd, mfd.SEALS_IMMUTABLE)
    except BaseException:
        _close_fds([fd, *([] if bufd is None else [bufd]), *writer.fds])
        raise
    finally:
        # These views export the state's own buffers (a bytearray with exports cannot be
        # resized): drop them now, not whenever a traceback that references the writer goes.
        writer.buffers.clear()
    return Snapshot(envelope, fd, tuple(extra), tuple(specs))


def _layout(buffers: Sequence[memoryview]) -> tuple[list[BufferSpec], int]:
    specs, end = [], 0
    for buf in buffers:
        offset = mfd.align(end)
        specs.append(BufferSpec(offset, buf.nbytes))
        end = offset + buf.nbytes
    return specs, end


@dataclass(frozen=True, eq=False)
class Restored:
    """A loaded snapshot. Call :meth:`commit` once the swap has committed."""

    state: Any
    app_version: int
    envelope: Envelope
    buffers: tuple[BufferSpec, ...]
    shared: tuple[SharedBuffer, ...]

    def commit(self) -> None:
        """The swap committed: SharedBuffers of this state become writable (see SharedBuffer)."""
        for sb in self.shared:
            sb._commit()


def read_envelope(fd: int) -> Envelope:
    """The envelope stored in a sealed snapshot memfd's header (``fd`` stays open)."""
    size = mfd.sealed_size(fd, what="snapshot", seals=mfd.SEALS_IMMUTABLE)
    if size < HEADER_SIZE:
        raise CorruptSnapshot(f"snapshot memfd has {size} bytes: no room for the header")
    mapping = mfd.map_readonly(fd, HEADER_SIZE)
    try:
        with memoryview(mapping) as header:
            return Envelope.from_dict(unpack_header(header))
    finally:
        mapping.close()


def load(
    envelope: Mapping[str, object] | Envelope | None,
    memfd: int,
    fds: Sequence[int] = (),
    *,
    accept_versions: Container[int] | None = None,
    pause_gc: bool = True,
) -> Restored:
    """Check and decode a snapshot; takes ownership of ``memfd`` and ``fds`` in every case.

    ``envelope`` is the dict that travelled beside the fds (``None``: read it from the memfd
    header). ``accept_versions`` refuses other application state versions before decoding
    anything. ``pause_gc`` keeps the cyclic GC off while the decoder allocates (a large
    decode would otherwise trigger repeated full collections). On any error every fd is
    closed and everything built so far is released; the error is a :class:`SnapshotError`.
    """
    loader = _Loader(memfd, fds)
    try:
        return loader.run(envelope, accept_versions, pause_gc)
    except BaseException as e:
        loader.fail(e)
        raise


class _Loader:
    """One load in progress; implements the codecs' DecodeSource."""

    def __init__(self, fd: int, fds: Sequence[int]) -> None:
        self._fd: int | None = fd
        self._extra: list[int | None] = list(fds)
        self._first_object_fd = 0
        self._maps: list[mmap.mmap] = []  # closed explicitly on failure
        self._views: list[memoryview] = []
        self._adopted: list[socket.socket | SharedBuffer] = []

    # -- DecodeSource ----------------------------------------------------------------------

    @property
    def buffers(self) -> Sequence[memoryview]:
        return self._views

    def take_fd(self, index: int, /) -> int:
        slot = self._first_object_fd + index
        fd = self._extra[slot] if self._first_object_fd <= slot < len(self._extra) else None
        if fd is None:
            raise FdMismatch(f"snapshot references fd {index}, which is missing or already used")
        self._extra[slot] = None
        return fd

    def adopt(self, obj: socket.socket | SharedBuffer, /) -> None:
        self._adopted.append(obj)

    # -- the load --------------------------------------------------------------------------

    def run(
        self,
        given: Mapping[str, object] | Envelope | None,
        accept_versions: Container[int] | None,
        pause_gc: bool,
    ) -> Restored:
        assert self._fd is not None
        env = None if given is None else (
            given if isinstance(given, Envelope) else Envelope.from_dict(given)
        )
        if env is not None:  # refuse what we can before touching the memfd
            self._precheck(env, accept_versions)
        size = mfd.sealed_size(self._fd, what="snapshot", seals=mfd.SEALS_IMMUTABLE)
        if size < HEADER_SIZE:
            raise Truncated(f"snapshot memfd has {size} bytes: no room for the header")
        mapping = mfd.map_readonly(self._fd, size)
        self._maps.append(mapping)
        whole = memoryview(mapping)
        stored = Envelope.from_dict(unpack_header(whole[:HEADER_SIZE]))
        if env is None:
            env = stored
            self._precheck(env, accept_versions)
        elif stored != env:
            raise CorruptSnapshot("the envelope differs from the one in the memfd header")
        mfd.check_size(size, env.size, what="snapshot")
        self._first_object_fd = 1 if env.buffers else 0
        payload_end = HEADER_SIZE + env.payload_size
        specs = unpack_table(whole[payload_end : env.size], env.buffers_size, mfd.PAGE)
        hasher = mfd.new_hasher(env.checksum_algo)
        hasher.update(whole[HEADER_SIZE : env.size])
        if env.buffers:
            self._map_buffers(env, specs)
            if env.checksum_scope == SCOPE_ALL:
                for view in self._views:
                    hasher.update(view)
        if f"{env.checksum_algo}:{hasher.hexdigest()}" != env.checksum:
            raise ChecksumMismatch(
                f"snapshot checksum {env.checksum_algo}:{hasher.hexdigest()} != {env.checksum}"
                f" (scope: {env.checksum_scope})"
            )
        state = self._decode(env, whole[HEADER_SIZE:payload_end], pause_gc)
        unused = [i for i, fd in enumerate(self._extra) if fd is not None]
        if unused:
            raise FdMismatch(f"snapshot fd(s) {unused} were sent but not referenced by the state")
        os.close(self._fd)
        self._fd = None
        shared = tuple(o for o in self._adopted if isinstance(o, SharedBuffer))
        return Restored(state, env.app_version, env, specs, shared)

    def _precheck(self, env: Envelope, accept_versions: Container[int] | None) -> None:
        if accept_versions is not None and env.app_version not in accept_versions:
            raise VersionRefused(f"application state version {env.app_version} is not accepted")
        get_codec(env.codec)
        mfd.new_hasher(env.checksum_algo)
        if len(self._extra) != env.fds:
            raise FdMismatch(f"snapshot came with {len(self._extra)} fd(s), expected {env.fds}")

    def _map_buffers(self, env: Envelope, specs: tuple[BufferSpec, ...]) -> None:
        bufd = self._extra[0]
        assert bufd is not None
        self._extra[0] = None
        try:
            size = mfd.sealed_size(bufd, what="buffers", seals=mfd.SEALS_IMMUTABLE)
            mfd.check_size(size, env.buffers_size, what="buffers")
            mapping = mfd.map_private(bufd, size)  # holds its own dup of the fd
        finally:
            os.close(bufd)
        self._maps.append(mapping)
        whole = memoryview(mapping)
        self._views = [whole[s.offset : s.offset + s.size] for s in specs]

    def _decode(self, env: Envelope, payload: memoryview, pause_gc: bool) -> Any:
        codec = get_codec(env.codec)
        gc_was_enabled = gc.isenabled()
        if pause_gc:
            gc.disable()
        try:
            return codec.decode(payload, self)
        except SnapshotError:
            raise
        except Exception as e:
            raise DecodeError(
                f"cannot decode the {env.codec} snapshot: {type(e).__name__}: {e}"
            ) from e
        finally:
            if gc_was_enabled:
                gc.enable()

    def fail(self, error: BaseException) -> None:
        """Release everything: fds, objects built around them, mappings (deterministically)."""
        # Frames of the failed decode may hold views of the mappings in their locals; the
        # traceback keeps those frames alive as long as the error is referenced. Only our own
        # error and what we chained it from: a __context__ may be the caller's, not ours.
        exc: BaseException | None = error
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)
            exc = exc.__cause__
        for obj in self._adopted:
            if isinstance(obj, SharedBuffer):
                obj._discard()
            else:
                obj.close()
        _close_fds([fd for fd in (self._fd, *self._extra) if fd is not None])
        self._fd, self._extra, self._adopted = None, [], []
        releases = [v.release for v in self._views] + [m.close for m in self._maps]
        self._views, self._maps = [], []
        for release in releases:
            # BufferError: still exported by an object referenced elsewhere; freed with it.
            with contextlib.suppress(BufferError):
                release()
