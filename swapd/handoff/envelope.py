"""The snapshot envelope and the fixed parts of the memfd layout (format 1).

The layout is drawn in :mod:`swapd.handoff`; this module owns its constants, the
:class:`Envelope` (what travels as JSON beside the fds, and again inside the memfd header) and
the binary header and buffer table.

The envelope has a fixed set of scalar fields, so its JSON stays under ~300 bytes whatever the
state holds: the transport can carry it in one small datagram. The (possibly long) list of
out-of-band buffers therefore lives in the memfd, in a table covered by the checksum, and the
envelope only counts them.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Final

from .errors import CorruptSnapshot, FormatRefused, MalformedEnvelope

FORMAT_VERSION: Final = 1
SUPPORTED_FORMATS: Final = frozenset({FORMAT_VERSION})

MAGIC: Final = b"SWAPDSNP"
# The payload starts one header page in: the header is written last (it carries the checksum
# of what follows), so its room is reserved up front. The envelope JSON is bounded (fixed
# scalar fields, codec name <= 64 chars), so it always fits.
HEADER_SIZE: Final = 4096
HEADER: Final = struct.Struct("<8sII")  # magic, format version, length of envelope JSON
TABLE_ENTRY: Final = struct.Struct("<QQ")  # buffer offset, buffer size (buffers memfd)

SCOPE_PAYLOAD: Final = "payload"  # in-band payload + buffer table
SCOPE_ALL: Final = "all"  # ... + every out-of-band buffer
SCOPES: Final = frozenset({SCOPE_PAYLOAD, SCOPE_ALL})

_CODEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_CHECKSUM = re.compile(r"([a-z0-9_]{1,32}):([0-9a-f]{1,128})")
_MAX_INT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class BufferSpec:
    """Where one out-of-band buffer lies in the buffers memfd (offset is page-aligned)."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a receiver needs to know about a snapshot before touching it.

    ``size`` is the snapshot memfd's exact length, ``payload_size`` the in-band codec output in
    it; ``buffers`` / ``buffers_size`` count the out-of-band buffers and the length of the
    buffers memfd that carries them (0 / 0 when there are none); ``fds`` is how many fds travel
    beside the snapshot memfd (the buffers memfd first, if any, then sockets and shared
    buffers). ``checksum`` is ``"<algo>:<hex>"`` over the ``checksum_scope`` bytes.
    """

    format: int
    app_version: int
    codec: str
    size: int
    payload_size: int
    checksum: str
    checksum_scope: str
    buffers: int
    buffers_size: int
    fds: int

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def checksum_algo(self) -> str:
        return self.checksum.partition(":")[0]

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: object) -> Envelope:
        """Validate ``data`` (e.g. decoded JSON) and build an envelope.

        The format version is checked first, so a newer format is refused as such
        (:class:`FormatRefused`) even though its other fields may differ.
        """
        if not isinstance(data, Mapping):
            raise MalformedEnvelope(f"envelope must be a mapping, not {type(data).__name__}")
        fmt = data.get("format")
        if type(fmt) is not int:
            raise MalformedEnvelope(f"envelope field 'format' must be an int, got {fmt!r}")
        if fmt not in SUPPORTED_FORMATS:
            supported = ", ".join(map(str, sorted(SUPPORTED_FORMATS)))
            raise FormatRefused(f"snapshot format {fmt} not supported (this swapd: {supported})")
        names = {f.name for f in fields(cls)}
        missing, unknown = names - data.keys(), data.keys() - names
        if missing:
            raise MalformedEnvelope(f"envelope lacks field(s) {', '.join(sorted(missing))}")
        if unknown:
            raise MalformedEnvelope(
                f"envelope has unknown field(s) {', '.join(sorted(map(str, unknown)))}"
            )
        return cls(**{name: data[name] for name in names})


def _validate(env: Envelope) -> None:
    for name in ("format", "app_version", "size", "payload_size", "buffers", "buffers_size",
                 "fds"):
        value = getattr(env, name)
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            raise MalformedEnvelope(f"envelope field {name!r} must be an int >= 0, got {value!r}")
    for name in ("codec", "checksum", "checksum_scope"):
        if type(getattr(env, name)) is not str:
            raise MalformedEnvelope(f"envelope field {name!r} must be a string")
    if not _CODEC_NAME.fullmatch(env.codec):
        raise MalformedEnvelope(f"envelope codec name {env.codec!r} is not a valid codec name")
    if not _CHECKSUM.fullmatch(env.checksum):
        raise MalformedEnvelope(f"envelope checksum {env.checksum!r} is not '<algo>:<hex>'")
    if env.checksum_scope not in SCOPES:
        raise MalformedEnvelope(f"envelope checksum_scope {env.checksum_scope!r} is unknown")
    expected = HEADER_SIZE + env.payload_size + env.buffers * TABLE_ENTRY.size
    if env.size != expected:
        raise MalformedEnvelope(f"envelope size {env.size} != layout size {expected}")
    if (env.buffers == 0) != (env.buffers_size == 0):
        raise MalformedEnvelope(
            f"envelope has {env.buffers} buffer(s) in a {env.buffers_size}-byte buffers memfd"
        )
    if env.buffers and env.fds < 1:
        raise MalformedEnvelope("envelope has buffers but no fd for the buffers memfd")


def pack_header(env: Envelope) -> bytes:
    body = env.to_json()
    header = HEADER.pack(MAGIC, env.format, len(body)) + body
    if len(header) > HEADER_SIZE:  # unreachable with the bounded fields; checked, not assumed
        raise MalformedEnvelope(f"envelope JSON of {len(body)} bytes does not fit the header")
    return header


def unpack_header(header: memoryview) -> dict[str, object]:
    """Return the envelope dict stored in a snapshot memfd's header page."""
    if len(header) < HEADER.size:
        raise CorruptSnapshot(f"memfd of {len(header)} bytes has no snapshot header")
    magic, fmt, length = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise CorruptSnapshot(f"memfd does not start with the snapshot magic (got {magic!r})")
    if fmt not in SUPPORTED_FORMATS:
        raise FormatRefused(f"snapshot format {fmt} not supported")
    if HEADER.size + length > min(len(header), HEADER_SIZE):
        raise CorruptSnapshot(f"header envelope length {length} overruns the header")
    try:
        decoded = json.loads(bytes(header[HEADER.size : HEADER.size + length]))
    except ValueError as e:
        raise CorruptSnapshot(f"header envelope is not JSON: {e}") from e
    if not isinstance(decoded, dict):
        raise CorruptSnapshot("header envelope is not a JSON object")
    return decoded


def pack_table(specs: list[BufferSpec]) -> bytes:
    return b"".join(TABLE_ENTRY.pack(s.offset, s.size) for s in specs)


def unpack_table(table: memoryview, buffers_size: int, page: int) -> tuple[BufferSpec, ...]:
    """Parse and check the buffer table: page-aligned, ascending, disjoint, inside the memfd."""
    specs = []
    end = 0
    for offset, size in TABLE_ENTRY.iter_unpack(table):
        if offset % page or offset < end or offset + size > buffers_size:
            raise CorruptSnapshot(
                f"buffer table entry ({offset}, {size}) is misaligned, overlapping or outside "
                f"the {buffers_size}-byte buffers memfd"
            )
        specs.append(BufferSpec(offset, size))
        end = offset + size
    return tuple(specs)
