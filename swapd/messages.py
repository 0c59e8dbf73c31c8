"""Channel messages: every type, in both directions, defined once for both ends.

The frame around a body is `swapd.channel`'s; the table of types and who sends them is in
docs/architecture.md. Here each type is a frozen dataclass: the sender builds it and calls
`body()`, the receiver calls `parse(body)`, which checks every field's JSON type strictly
(an int is not a bool, a bool is not the string "false") and raises `MessageError` with
one line saying which field is wrong. Unknown keys are ignored, so a newer peer may add
fields (a type with `STRICT = True` refuses them instead); a missing field takes its
default, or is an error if it has none. A field's metadata may name its key on the wire
(`wire`, for a key that is no Python identifier) and raise the string limit (`max_len`).
The control commands' arguments (`swapd.commands`) are Bodies too.

A request's reply is `ok: true` plus the fields of the request's `Reply` type, or
`ok: false` plus `error` (see `parse_reply`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union

MAX_TEXT = 64 * 1024  # any one string field from a peer; larger ones are refused

M = TypeVar("M", bound="Body")


class MessageError(ValueError):
    """A body that does not match its message type."""


class Body:
    """Base of every message and reply type (all are frozen dataclasses)."""

    T: ClassVar[str] = ""  # the wire type `t`; empty for replies (they carry `re`)
    # A reply that may carry descriptors (a snapshot's memfds and connections); any other
    # reply carrying one is refused by the receiver.
    REPLY_FDS: ClassVar[bool] = False
    STRICT: ClassVar[bool] = False  # refuse keys this type does not know

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.T} if self.T else {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[_wire(f)] = getattr(self, f.name)
        return out

    @classmethod
    def parse(cls: type[M], body: Mapping[str, Any]) -> M:
        hints = _hints(cls)
        values: dict[str, Any] = {}
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        for f in fields:
            key = _wire(f)
            if key not in body:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise MessageError(f"{cls.where(None)}missing field {key!r}")
                continue
            values[f.name] = _check(cls.where(key), hints[f.name], body[key],
                                    f.metadata.get("max_len", MAX_TEXT))
        if cls.STRICT:
            known = {_wire(f) for f in fields} | ({"t"} if cls.T else set())
            unknown = sorted(str(k)[:64] for k in body if k not in known)
            if unknown:
                raise MessageError(f"{cls.where(None)}unknown field {unknown[0]!r} (known: "
                                   f"{', '.join(sorted(known)) or 'none'})")
        return cls(**values)

    @classmethod
    def where(cls, key: str | None) -> str:
        """How an error names a field (`key`), or the type itself (None), as a prefix."""
        return f"{cls.__name__}.{key}" if key is not None else f"{cls.__name__}: "


def _wire(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("wire", f.name))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _check(where: str, hint: Any, value: Any, max_len: int = MAX_TEXT) -> Any:
    """`value` if it is a JSON value of type `hint`, else MessageError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check(where, option, value, max_len)
            except MessageError:
                continue
        raise MessageError(f"{where}: {_kind(value)} is not {_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if type(value) is bool:
            return value
    elif hint is int:
        if type(value) is int:
            return value
    elif hint is float:
        if type(value) in (int, float):
            try:
                number = float(value)  # an int of 400 digits does not fit: OverflowError
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
    elif hint is str:
        if type(value) is str:
            if len(value) > max_len:
                raise MessageError(f"{where}: string of {len(value)} characters (limit "
                                   f"{max_len})")
            return value
    elif origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if type(value) is list:
            checked = [_check(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
            return tuple(checked) if origin is tuple else checked
    elif origin is dict or hint is dict:
        if type(value) is dict and all(type(k) is str for k in value):
            return value
    else:
        raise TypeError(f"{where}: no check for {hint!r}")  # a bug in this module
    raise MessageError(f"{where}: {_kind(value)} is not {_name(hint)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# -- worker → supervisor ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hello(Body):
    """A swapd.worker process introduces itself (request; the reply carries the journal)."""

    T = "hello"
    proto: int
    pid: int
    lib: str = ""
    features: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class HelloReply(Body):
    journal: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Ready(Body):
    """Ready; `standby`: a successor that waits for state and commit before it accepts."""

    T = "ready"
    standby: bool = False


@dataclasses.dataclass(frozen=True)
class Status(Body):
    T = "status"
    text: str = ""


@dataclasses.dataclass(frozen=True)
class Health(Body):
    """The application's own verdict on its health (unsolicited, no reply). `ok: false`
    during a watch window rolls the swap back; outside one it is logged and shown."""

    T = "health"
    ok: bool
    reason: str = ""


# -- supervisor → worker ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Drain(Body):
    """Stop accepting, finish, exit within `deadline` seconds."""

    T = "drain"
    deadline: float


@dataclasses.dataclass(frozen=True)
class Quiesce(Body):
    """Stop accepting, reach request boundaries, snapshot (the reply carries the fds).

    `precopied`: a pre-copy of this round was just loaded by the successor, so tracked
    dicts send only what changed since. `conns`: False for a snapshot for systemd's fd store
    (connections stay and drain here).
    """

    T = "quiesce"
    REPLY_FDS = True
    deadline: float
    precopied: bool = False
    conns: bool = True
    link: bool = False  # connections travel on the handoff link (a delta of the pre-send)


@dataclasses.dataclass(frozen=True)
class QuiesceReply(Body):
    envelope: dict[str, Any]
    size: int = 0
    t_stop: float = 0.0  # CLOCK_MONOTONIC when it stopped accepting
    conns: int = 0  # connections handed over (in the snapshot, or on the link)
    replayed: int = 0  # of those, handed over mid-request (their bytes so far travel)
    cpu: float = 0.0  # seconds of CPU this process used from the request to the reply


@dataclasses.dataclass(frozen=True)
class Resume(Body):
    """The handoff aborted: serve again; to a worker not quiesced, end the pre-copy round."""

    T = "resume"


@dataclasses.dataclass(frozen=True)
class PrecopyOut(Body):
    """To the old worker, still serving: ship the bulk of tracked state (reply with fds).

    `delta`: another round instead (live-migration style): what changed since the previous
    part, if at least `min_keys` entries did; otherwise the reply carries no part.
    """

    T = "precopy"
    REPLY_FDS = True
    delta: bool = False
    min_keys: int = 0


@dataclasses.dataclass(frozen=True)
class PrecopyOutReply(Body):
    names: list[str] = dataclasses.field(default_factory=list)
    size: int = 0
    keys: int = 0  # entries shipped (a delta round: set or deleted)


@dataclasses.dataclass(frozen=True)
class PrecopyIn(Body):
    """To the new worker: load these bulk parts (the fds, in the order of `names`)."""

    T = "precopy"
    names: list[str]


@dataclasses.dataclass(frozen=True)
class Restore(Body):
    """Restore the snapshot in the fds; `envelope` is the main part's (None: fd store)."""

    T = "restore"
    envelope: dict[str, Any] | None
    from_gen: int | str
    conns: int = 0  # connections handed over (with `link`: what the link must deliver)
    link: bool = False


@dataclasses.dataclass(frozen=True)
class Commit(Body):
    """The swap committed: start accepting, adopt the handed-over connections."""

    T = "commit"


@dataclasses.dataclass(frozen=True)
class RestoreReply(Body):
    cpu: float = 0.0  # seconds of CPU this process used from the request to the reply


@dataclasses.dataclass(frozen=True)
class CommitReply(Body):
    t_start: float = 0.0  # CLOCK_MONOTONIC when it started accepting
    cpu: float = 0.0  # seconds of CPU from the request to t_start


@dataclasses.dataclass(frozen=True)
class LinkOut(Body):
    """To the old worker, still serving, with one end of a socketpair whose other end its
    successor holds (the handoff link): pre-send every connection on it (docs/state-handoff.md).
    The reply comes once the successor has taken them all."""

    T = "link.out"


@dataclasses.dataclass(frozen=True)
class LinkIn(Body):
    """To the new worker, with the other end of the link: receive the pre-send. The reply
    comes once it has every pre-sent connection (or refuses: descriptor budget)."""

    T = "link.in"


@dataclasses.dataclass(frozen=True)
class LinkReply(Body):
    conns: int = 0  # connections pre-sent / pre-received


@dataclasses.dataclass(frozen=True)
class Hold(Body):
    """The successor committed under a watch window: stop accepting, let connections go at
    their next request boundary (close our copies of those handed over), keep the process
    and its state: a rollback may revive it. No reply; a `drain` ends it."""

    T = "hold"


@dataclasses.dataclass(frozen=True)
class Revive(Body):
    """Rollback: a held worker serves again, with the state of the `restore` that came
    before (the watched generation's, stateful) or its own. Replied with `CommitReply`."""

    T = "revive"


@dataclasses.dataclass(frozen=True)
class Empty(Body):
    """A reply with nothing but `ok`."""


# Requests the worker handles, by wire type; `precopy` is told apart by its `names`.
WORKER_REQUESTS: dict[str, type[Body]] = {
    m.T: m for m in (Drain, Quiesce, Resume, Restore, Commit, Hold, Revive, LinkOut,
                     LinkIn)
}


# -- worker → worker: the handoff link -------------------------------------------------
#
# A SOCK_SEQPACKET socketpair the supervisor creates per slot and hands out (`link.out`,
# `link.in`); the connections' descriptors never pass through the supervisor. Framed as the
# channel (swapd.channel); every message carries at most LINK_BATCH descriptors, in a single
# frame, and says how many: `count` sockets, after one snapshot memfd if `state`.
#
#   old worker                                      new worker
#   conns.begin {total}                      ──▶    budget check  ──▶ ok | error (figures)
#   conns.batch {ids, listeners, count, state} ──▶  sockets kept, not served ──▶ ok (flow)
#   ...                                       ...
#   conns.end {total}                        ──▶    ──▶ ok            (link.in/out replies)
#   ── the pause ──
#   conns.batch ... (connections accepted since, no reply)
#   conns.delta {gone, conns, state}         ──▶    applied by `restore`
#
# The state memfd (swapd.handoff, pickle5) holds {"meta": {id: dict}, "bytes": {id: bytes}}:
# per connection its meta (only if set or changed) and the bytes its successor's handler
# reads first.

LINK_BATCH = 200  # descriptors per link message, memfd included (< swapd.channel.MAX_FDS)
# How a new worker's failed `link.in` reply begins when the link only closed under it (its
# sender failed): the supervisor then reports the sender's reason, not this echo of it.
LINK_CLOSED = "handoff link from the predecessor closed"


@dataclasses.dataclass(frozen=True)
class ConnsBegin(Body):
    T = "conns.begin"
    total: int


@dataclasses.dataclass(frozen=True)
class ConnsBatch(Body):
    T = "conns.batch"
    ids: list[int]
    listeners: list[str]
    count: int  # sockets in this message's fds (after the state memfd, if any)
    state: bool = False
    ack: bool = True  # pre-send: the receiver replies (flow control); in the pause: not


@dataclasses.dataclass(frozen=True)
class ConnsEnd(Body):
    T = "conns.end"
    total: int


@dataclasses.dataclass(frozen=True)
class ConnsDelta(Body):
    """The pause: what changed since the pre-send. `conns`: how many the successor must now
    hold; `gone`: pre-sent ids to drop (closed, or staying here)."""

    T = "conns.delta"
    gone: list[int]
    conns: int
    state: bool = False


LINK_MESSAGES: dict[str, type[Body]] = {
    m.T: m for m in (ConnsBegin, ConnsBatch, ConnsEnd, ConnsDelta)
}


def precopy_request(body: Mapping[str, Any]) -> PrecopyOut | PrecopyIn:
    return PrecopyIn.parse(body) if "names" in body else PrecopyOut.parse(body)


@dataclasses.dataclass(frozen=True)
class Failure:
    """A reply with `ok: false`: the peer's reason, one line."""

    error: str


def parse_reply(cls: type[M], body: Mapping[str, Any]) -> M | Failure:
    """The typed reply, or the peer's Failure; MessageError if it is neither."""
    ok = body.get("ok")
    if ok is True:
        return cls.parse(body)
    if ok is False:
        error = body.get("error", "no reason given")
        return Failure(error[:MAX_TEXT] if isinstance(error, str) else repr(error)[:200])
    raise MessageError(f"reply without a boolean 'ok' (got {_kind(ok)})")


def ok(reply: Body | None = None) -> dict[str, Any]:
    """The body of a successful reply."""
    return {"ok": True, **(reply.body() if reply is not None else {})}


def failed(error: str, **extra: Any) -> dict[str, Any]:
    """The body of a failed reply."""
    return {"ok": False, "error": error, **extra}
