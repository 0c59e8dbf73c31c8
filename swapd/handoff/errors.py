"""Errors of the state handoff (re-exported by :mod:`swapd.handoff`).

Every error that makes a snapshot unusable derives from :class:`SnapshotError`; the swap machinery
aborts the swap on any of them (the old worker resumes with its state untouched). Messages are
one line and name the offending value, so they can go straight into the failed swap's report.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class: this snapshot cannot be produced or consumed; the swap must abort."""


class MalformedEnvelope(SnapshotError):
    """The envelope is not a well-formed, self-consistent envelope dict."""


class FormatRefused(SnapshotError):
    """The snapshot uses a format version (or checksum algorithm) this swapd does not speak."""


class VersionRefused(SnapshotError):
    """The application state version is not one the new code accepts."""


class UnknownCodec(SnapshotError):
    """No codec of that name is registered in this process."""


class Truncated(SnapshotError):
    """A memfd is shorter than its envelope or buffer table says."""


class ChecksumMismatch(SnapshotError):
    """The bytes covered by the checksum do not match it."""


class CorruptSnapshot(SnapshotError):
    """The memfd is not a sealed snapshot consistent with its envelope (header, table, seals)."""


class FdMismatch(SnapshotError):
    """The file descriptors that came with the snapshot are not the ones it references."""


class EncodeError(SnapshotError):
    """The state cannot be encoded (an unsupported object, or the codec itself failed)."""


class DecodeError(SnapshotError):
    """A valid snapshot that the codec could not decode here (e.g. a class the new code lacks)."""


class PrecopyError(SnapshotError):
    """A pre-copy part is out of order, belongs to another round, or the round is unfinished."""
