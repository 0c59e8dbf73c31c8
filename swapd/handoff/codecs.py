"""Snapshot codecs: the registry, ``pickle5`` (default) and ``marshal``.

A codec turns the state into an in-band byte stream plus, optionally, out-of-band buffers and
fds (through an :class:`EncodeSink`), and back (from a :class:`DecodeSource`). The snapshot code
owns the memfds, the checksum and every fd; codecs never touch them directly.

``pickle5`` is pickle protocol 5 with two extensions, both hooked in ``reducer_override`` (which
the C pickler calls only for non-builtin types, so a dict of small records pays nothing; a
``persistent_id`` hook is called for *every* object and measured 2.4-3.3x slower here):

* out-of-band buffers: ``PickleBuffer`` objects (numpy arrays, ...) and ``memoryview`` objects
  of at least ``oob_threshold`` bytes go to the buffers memfd, page-aligned; the receiver passes
  views of its (copy-on-write) mapping as ``buffers=``, so they are restored without a copy.
  ``bytes`` and ``bytearray`` stay in-band (the C pickler never offers them to a hook); they
  still cost one copy on each side, and restoring them needs a copy anyway.
* fd-carrying objects: ``socket.socket`` and :class:`SharedBuffer` are reduced to a call of
  ``swapd.handoff._rebuild_socket`` / ``_rebuild_shared_buffer`` with an index into the fds that
  travel beside the snapshot. These two names (and ``_rebuild_memoryview``) are part of the
  snapshot format: they stay importable from ``swapd.handoff``.
"""

from __future__ import annotations

import abc
import contextvars
import marshal
import os
import pickle
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from .errors import DecodeError, EncodeError, FdMismatch, UnknownCodec
from .memfd import BytesLike
from .shared import SharedBuffer

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
# memoryview.cast() accepts only native single-character formats.
_CASTABLE = frozenset("bBhHiIlLqQnNfdc?P") | {"@" + c for c in "bBhHiIlLqQnNfdc?P"}


class EncodeSink(Protocol):
    def write(self, data: BytesLike, /) -> int:
        """Append in-band bytes."""

    def add_buffer(self, buf: memoryview, /) -> None:
        """Append an out-of-band buffer (C-contiguous, format 'B'); decoded in the same order."""

    def add_fd(self, fd: int, /) -> int:
        """Ship a dup of ``fd``; returns its index for :meth:`DecodeSource.take_fd`."""


class DecodeSource(Protocol):
    @property
    def buffers(self) -> Sequence[memoryview]: ...

    def take_fd(self, index: int, /) -> int:
        """Take ownership of fd ``index``; the caller closes it or hands it to :meth:`adopt`."""

    def adopt(self, obj: socket.socket | SharedBuffer, /) -> None:
        """Register an object built around a taken fd (closed if the load fails later)."""


class Codec(abc.ABC):
    """A named state encoding. Subclass it, or wrap two functions in :class:`SimpleCodec`."""

    name: str

    @abc.abstractmethod
    def encode(self, obj: Any, sink: EncodeSink) -> None: ...

    @abc.abstractmethod
    def decode(self, payload: memoryview, source: DecodeSource) -> Any: ...


class SimpleCodec(Codec):
    """A codec from ``dumps(obj) -> bytes-like`` and ``loads(memoryview) -> obj`` (no fds)."""

    def __init__(
        self, name: str, dumps: Callable[[Any], BytesLike], loads: Callable[[memoryview], Any]
    ) -> None:
        self.name, self._dumps, self._loads = name, dumps, loads

    def encode(self, obj: Any, sink: EncodeSink) -> None:
        sink.write(self._dumps(obj))

    def decode(self, payload: memoryview, source: DecodeSource) -> Any:
        return self._loads(payload)


class MarshalCodec(Codec):
    """Plain data only (dict, list, str, int, ...): the fastest codec for dicts of records."""

    name = "marshal"

    def encode(self, obj: Any, sink: EncodeSink) -> None:
        try:
            data = marshal.dumps(obj, 4)  # version pinned: the successor may run another Python
        except ValueError as e:
            raise EncodeError(
                f"marshal cannot encode the state: {e} (marshal takes only None, bool, int, "
                "float, complex, str, bytes, bytearray, tuple, list, set, frozenset and dict; "
                "use pickle5 for anything else)"
            ) from e
        sink.write(data)

    def decode(self, payload: memoryview, source: DecodeSource) -> Any:
        return marshal.loads(payload)


class Pickle5Codec(Codec):
    """Pickle protocol 5 with out-of-band buffers, sockets and SharedBuffers (the default)."""

    name = "pickle5"

    def __init__(self, oob_threshold: int = 64 * 1024) -> None:
        self.oob_threshold = oob_threshold

    def encode(self, obj: Any, sink: EncodeSink) -> None:
        pickler = _Pickler(sink, self.oob_threshold)
        try:
            pickler.dump(obj)
        finally:
            pickler.clear_memo()  # release the memo's references (and buffer exports) now

    def decode(self, payload: memoryview, source: DecodeSource) -> Any:
        # The rebuild functions are plain module globals (that is what a pickle stream can
        # name), so they find the fds of the load in progress through a context variable.
        token = _SOURCE.set(source)
        try:
            return pickle.loads(payload, buffers=source.buffers)
        finally:
            _SOURCE.reset(token)


class _Pickler(pickle.Pickler):
    def __init__(self, sink: EncodeSink, oob_threshold: int) -> None:
        # The callback must not refer to the pickler: a pickler <-> bound-method cycle would
        # leave the memo (and the PickleBuffers exporting the state's memoryviews) to the
        # cyclic GC, which cannot clear a memoryview that still has exports.
        super().__init__(sink, protocol=5, buffer_callback=_buffer_callback(sink, oob_threshold))
        self._sink = sink

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is memoryview:
            return _reduce_memoryview(obj)
        if type(obj) is SharedBuffer:
            return _rebuild_shared_buffer, (self._sink.add_fd(obj._fileno()), obj.size)
        if isinstance(obj, socket.socket):
            return _reduce_socket(obj, self._sink)
        return NotImplemented


def _buffer_callback(sink: EncodeSink, threshold: int) -> Callable[[pickle.PickleBuffer], bool]:
    def callback(pb: pickle.PickleBuffer) -> bool:
        """True keeps the buffer in-band: small ones (page padding) and non-contiguous ones."""
        try:
            raw = pb.raw()
        except BufferError:
            return True
        if raw.nbytes < threshold:
            return True
        sink.add_buffer(raw)
        return False

    return callback


def _reduce_memoryview(view: memoryview) -> tuple[Any, ...]:
    if view.format not in _CASTABLE:
        raise EncodeError(f"memoryview of format {view.format!r} cannot be restored")
    if view.nbytes == 0 and view.ndim > 1:
        raise EncodeError(f"empty memoryview of shape {view.shape} cannot be restored")
    if view.c_contiguous:
        data: Any = pickle.PickleBuffer(view)  # out-of-band when large enough: zero copy
    else:
        data = view.tobytes() if view.readonly else bytearray(view.tobytes())
    return _rebuild_memoryview, (data, view.format, view.shape)


def _reduce_socket(sock: socket.socket, sink: EncodeSink) -> tuple[Any, ...]:
    if type(sock) is not socket.socket:
        # TLS state lives in this process's OpenSSL memory; other subclasses would silently
        # come back as plain sockets.
        raise EncodeError(f"cannot hand over a {type(sock).__qualname__}: only socket.socket")
    if sock.fileno() < 0:
        raise EncodeError("cannot hand over a closed socket")
    index = sink.add_fd(sock.fileno())
    return _rebuild_socket, (index, int(sock.family), int(sock.type), sock.gettimeout())


_SOURCE: contextvars.ContextVar[DecodeSource] = contextvars.ContextVar("swapd_handoff_source")


def _source() -> DecodeSource:
    try:
        return _SOURCE.get()
    except LookupError as e:
        raise DecodeError("swapd fd objects can only be unpickled by swapd.handoff.load") from e


def _rebuild_socket(
    index: int, family: int, type_: int, timeout: float | None
) -> socket.socket:
    source = _source()
    fd = source.take_fd(index)
    try:
        sock = socket.socket(fileno=fd)  # family/type read back from the fd: checks what we got
    except OSError as e:
        os.close(fd)
        raise FdMismatch(f"fd {index} of the snapshot is not a socket: {e.strerror}") from e
    source.adopt(sock)
    if (int(sock.family), int(sock.type)) != (family, type_):
        raise FdMismatch(
            f"fd {index} is a {sock.family.name}/{sock.type.name} socket, expected "
            f"{socket.AddressFamily(family).name}/{socket.SocketKind(type_).name}"
        )
    # Same timeout as the sender's object, hence the same O_NONBLOCK: that flag belongs to
    # the open file description both workers share, so changing it here would change it
    # under the old worker too.
    sock.settimeout(timeout)
    return sock


def _rebuild_shared_buffer(index: int, size: int) -> SharedBuffer:
    source = _source()
    sb = SharedBuffer._adopt(source.take_fd(index), size)
    source.adopt(sb)
    return sb


def _rebuild_memoryview(data: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(data)
    if fmt == "B" and len(shape) == 1 and view.format == "B":
        return view
    flat: Any = view.cast("B")  # Any: typeshed types cast() by literal format
    result: memoryview = flat.cast(fmt) if flat.nbytes == 0 else flat.cast(fmt, shape)
    return result


for _f in (_rebuild_socket, _rebuild_shared_buffer, _rebuild_memoryview):
    _f.__module__ = "swapd.handoff"  # the stable name the pickle stream records


_CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec, *, replace: bool = False) -> None:
    """Make ``codec`` available by ``codec.name`` in this process (sender and receiver)."""
    if not isinstance(codec, Codec):
        raise TypeError(f"expected a Codec, got {type(codec).__name__}")
    if not isinstance(codec.name, str) or not _NAME.fullmatch(codec.name):
        raise ValueError(f"invalid codec name {codec.name!r}")
    if codec.name in _CODECS and not replace:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _CODECS[codec.name] = codec


def get_codec(name: str) -> Codec:
    try:
        return _CODECS[name]
    except KeyError as e:
        raise UnknownCodec(
            f"unknown codec {name!r} (registered: {', '.join(sorted(_CODECS))})"
        ) from e


def available_codecs() -> list[str]:
    return sorted(_CODECS)


DEFAULT_CODEC: Final = "pickle5"
register_codec(Pickle5Codec())
register_codec(MarshalCodec())
