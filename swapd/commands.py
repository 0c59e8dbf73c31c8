"""Control commands and their arguments: defined once, built by the CLI, parsed by the supervisor.

Each command's `args` object is a `swapd.messages.Body` with `STRICT = True`: every
argument has one JSON type (the string "no" is not a boolean, 1 is not true), an
argument the command does not know is refused, and `validate()` checks what a type
alone cannot. Any problem is a `MessageError` of one line naming the command and the
argument; the control server answers it as the request's error result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from swapd.messages import Body, MessageError

MAX_SOURCE = 8 * 1024 * 1024  # a patch's source: the control line's own limit bounds it too


@dataclasses.dataclass(frozen=True)
class Args(Body):
    """The arguments of one control command."""

    STRICT = True
    CMD: ClassVar[str] = ""

    @classmethod
    def where(cls, key: str | None) -> str:
        return f"{cls.CMD} argument {key!r}" if key is not None else f"{cls.CMD}: "

    def validate(self) -> None:
        """Raise MessageError for a combination of values the command cannot take."""

    def body(self) -> dict[str, Any]:
        """Only the arguments that differ from their defaults: a request from a newer CLI
        that uses no new option is one an older (strict) supervisor still accepts."""
        full = super().body()
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING and getattr(self, f.name) == f.default:
                full.pop(f.metadata.get("wire", f.name), None)
        return full


@dataclasses.dataclass(frozen=True)
class StatusArgs(Args):
    CMD = "status"


MAX_WATCH = 10**7  # seconds; a watch window longer than four months is a typo


@dataclasses.dataclass(frozen=True)
class SwapArgs(Args):
    """What an upgrade and a reload take: the new generation's release label (checked by the
    supervisor, which owns the label rules), and its watch window."""

    release: str | None = dataclasses.field(default=None, metadata={"max_len": 256})
    watch: float | None = None  # None: the configuration's
    wait_watch: bool = False  # answer once the window is over

    def validate(self) -> None:
        if self.watch is not None and not 0 <= self.watch <= MAX_WATCH:
            raise MessageError(f"{self.CMD}: watch must be a number of seconds >= 0 "
                               f"(at most {MAX_WATCH})")


@dataclasses.dataclass(frozen=True)
class UpgradeArgs(SwapArgs):
    CMD = "upgrade"
    self_: bool = dataclasses.field(default=False, metadata={"wire": "self"})

    def validate(self) -> None:
        super().validate()
        if self.self_ and (self.release is not None or self.watch is not None
                           or self.wait_watch):
            raise MessageError("upgrade --self re-execs the supervisor: it takes no release "
                               "or watch window")


@dataclasses.dataclass(frozen=True)
class ReloadArgs(SwapArgs):
    CMD = "reload"


@dataclasses.dataclass(frozen=True)
class RollbackArgs(Args):
    CMD = "rollback"


HISTORY_MAX = 10_000


@dataclasses.dataclass(frozen=True)
class HistoryArgs(Args):
    CMD = "history"
    n: int = 20

    def validate(self) -> None:
        if not 0 <= self.n <= HISTORY_MAX:
            raise MessageError(f"history: n must be an integer 0-{HISTORY_MAX}")


@dataclasses.dataclass(frozen=True)
class StopArgs(Args):
    CMD = "stop"
    fast: bool = False


PATCH_ACTIONS = ("apply", "rollback", "squash", "list")


@dataclasses.dataclass(frozen=True)
class PatchArgs(Args):
    CMD = "patch"
    action: str = "apply"
    module: str | None = None
    source: str | None = dataclasses.field(default=None, metadata={"max_len": MAX_SOURCE})
    name: str = ""
    # a patch set: [{module, source, name}] for several modules, committed all or none
    # (each part is checked by the supervisor's patching; the line limit bounds their size)
    parts: list[dict[str, Any]] | None = None
    dry_run: bool = False
    accept_absent: bool = False
    prune: bool = False

    def validate(self) -> None:
        if self.action not in PATCH_ACTIONS:
            raise MessageError(f"unknown patch action {self.action[:64]!r} "
                               f"({', '.join(PATCH_ACTIONS)})")
        single = self.module is not None or self.source is not None
        if self.action == "apply" and self.parts is None and (not self.module
                                                               or self.source is None):
            raise MessageError("patch needs 'module' (a name) and 'source' (the new text)")
        if self.parts is not None and single:
            raise MessageError("patch takes 'parts' or 'module' and 'source', not both")


COMMANDS: dict[str, type[Args]] = {
    a.CMD: a for a in (StatusArgs, UpgradeArgs, ReloadArgs, StopArgs, PatchArgs, RollbackArgs,
                       HistoryArgs)
}
