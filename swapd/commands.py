"""Control commands and their arguments: defined once, built by the CLI, parsed by the supervisor.

Each command's `args` object is a `swapd.messages.Body` with `STRICT = True`: every
argument has one JSON type (the string "no" is not a boolean, 1 is not true), an
argument the command does not know is refused, and `validate()` checks what a type
alone cannot. Any problem is a `MessageError` of one line naming the command and the
argument; the control server answers it as the request's error result.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

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


@dataclasses.dataclass(frozen=True)
class StatusArgs(Args):
    CMD = "status"


@dataclasses.dataclass(frozen=True)
class UpgradeArgs(Args):
    CMD = "upgrade"
    self_: bool = dataclasses.field(default=False, metadata={"wire": "self"})


@dataclasses.dataclass(frozen=True)
class ReloadArgs(Args):
    CMD = "reload"


@dataclasses.dataclass(frozen=True)
class StopArgs(Args):
    CMD = "stop"
    fast: bool = False


PATCH_ACTIONS = ("apply", "rollback", "list")


@dataclasses.dataclass(frozen=True)
class PatchArgs(Args):
    CMD = "patch"
    action: str = "apply"
    module: str | None = None
    source: str | None = dataclasses.field(default=None, metadata={"max_len": MAX_SOURCE})
    name: str = ""
    dry_run: bool = False
    accept_absent: bool = False
    prune: bool = False

    def validate(self) -> None:
        if self.action not in PATCH_ACTIONS:
            raise MessageError(f"unknown patch action {self.action[:64]!r} "
                               f"({', '.join(PATCH_ACTIONS)})")
        if self.action == "apply" and (not self.module or self.source is None):
            raise MessageError("patch needs 'module' (a name) and 'source' (the new text)")


COMMANDS: dict[str, type[Args]] = {
    a.CMD: a for a in (StatusArgs, UpgradeArgs, ReloadArgs, StopArgs, PatchArgs)
}
