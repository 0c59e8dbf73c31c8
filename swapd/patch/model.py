"""Errors and report records of the patch engine; `swapd.patch` re-exports all of them.

Every error message is one line, prefixed by where the problem is when that is known
(``app/rules.py:12: SyntaxError: invalid syntax``), so a worker can forward it verbatim to
the operator.  Report records are named tuples: they compare equal to plain tuples in tests
and turn into JSON lists without help.
"""

from __future__ import annotations

from typing import NamedTuple

NEEDS_SWAP = "needs a swap"


def one_line(text: str) -> str:
    """Collapse whitespace so a message never spans lines."""
    return " ".join(text.split())


def short(value: object, limit: int = 40) -> str:
    """A one-line repr of a value for a report, cut at ``limit`` characters."""
    try:
        text = repr(value)
    except Exception as e:  # a broken __repr__ must not break planning
        text = f"<{type(value).__name__}: repr failed: {type(e).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PatchError(Exception):
    """Base of every error raised by `swapd.patch`."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class PatchSyntaxError(PatchError):
    """The patch source (or the base source) does not parse or compile."""


class PatchExecError(PatchError):
    """A statement the patch adds raised while being prepared (a new import, a new
    definition, a changed default value, a hook)."""


class PatchImportError(PatchExecError):
    """A new import of the patch failed while being prepared."""


class SourceUnavailable(PatchError):
    """The engine cannot find the source the live module was loaded from."""


class BaseSourceMismatch(PatchError):
    """The base source does not describe the code the module runs (or is not the base the
    patch was written against)."""


class PlanStale(PatchError):
    """The module changed between prepare and commit (another patch, a rollback, a reload,
    or a value the plan replaces); nothing was changed."""


class CommitFailed(PatchError):
    """A store failed during commit; everything already applied was undone."""


class MigrationFailed(PatchError):
    """``__swapd_migrate__`` raised; the whole commit was rolled back."""


class RollbackError(PatchError):
    """A rollback could not be performed; nothing was changed."""


class PatchInconsistent(PatchError):
    """A commit or rollback failed, and undoing what it had already changed failed too.  The
    module may run a mix of old and new code, or data the migration changed only in part; the
    message says which.  Fix forward with a new patch, or swap the workers."""


class Refusal(NamedTuple):
    """A change that cannot be made in place."""

    where: str
    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: {self.reason} ({NEEDS_SWAP})"


class AbsentCell(NamedTuple):
    """A closure cell that exists only in the new code, and where its value comes from:
    ``hook`` (``__swapd_cells__``), ``constexpr`` (the literal initializer in the enclosing
    function), ``__class__`` (the owning class, for ``super()``) or ``EMPTY`` (no value:
    reading it raises ``NameError``)."""

    function: str
    name: str
    source: str
    value: str


class Removed(NamedTuple):
    """Something that exists in the live module but not in the new source: a free variable
    (``kind="freevar"``, ``where`` = the function), a ``function``, a class ``member``, a
    module ``name`` or a ``statement``.  Removed names are kept unless ``prune=True``."""

    kind: str
    where: str
    name: str


class Change(NamedTuple):
    """Something the commit changes in place."""

    kind: str
    name: str
    detail: str


class Added(NamedTuple):
    """Something the commit adds to the module or to a class."""

    kind: str
    name: str
    detail: str


class PatchRefused(PatchError):
    """The plan contains changes that cannot be made in place; ``refusals`` lists them."""

    def __init__(self, module: str, refusals: list[Refusal]) -> None:
        self.refusals = list(refusals)
        count = len(self.refusals)
        first = str(self.refusals[0]) if self.refusals else "refused"
        more = f" (and {count - 1} more)" if count > 1 else ""
        super().__init__(f"{module}: patch refused: {first}{more}")


class AbsentCells(PatchError):
    """The plan creates closure cells without a value; commit needs ``accept_absent=True``."""

    def __init__(self, module: str, cells: list[AbsentCell]) -> None:
        self.cells = list(cells)
        names = ", ".join(f"{c.function}: {c.name}" for c in self.cells)
        super().__init__(
            f"{module}: {len(self.cells)} closure cell(s) exist only in the new code and have "
            f"no value ({names}); reading one raises NameError. Give them a value with "
            "__swapd_cells__ or commit with accept_absent=True"
        )
