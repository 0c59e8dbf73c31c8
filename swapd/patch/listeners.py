"""Callbacks run after every patch committed or rolled back in this process (`on_change`):
where an application drops its own memo caches."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class PatchEvent(NamedTuple):
    """Passed to `on_change` callbacks."""

    module: str
    action: str  # "commit" or "rollback"
    serial: int  # the patch's place in the module's stack (1 = the first)
    changed: tuple[str, ...]  # what changed: functions, constants, members, caches


listeners: list[Callable[[PatchEvent], object]] = []


def on_change(callback: Callable[[PatchEvent], object]) -> Callable[[], None]:
    """Call ``callback(event)`` after every patch committed or rolled back in this process,
    on the thread that commits it (a worker's event-loop thread), once the new code, the
    migration and the engine's own cache clears are in place.  The place to drop an
    application's own memo caches (a dict of computed results, a cache in another module
    that calls the patched code).  Keep it short: it runs inside the commit's pause.  An
    exception it raises does not undo the patch; it is added to the patch's notes.
    Returns a function that removes the callback."""
    listeners.append(callback)

    def remove() -> None:
        if callback in listeners:
            listeners.remove(callback)

    return remove


def notify(event: PatchEvent) -> list[str]:
    notes = []
    for callback in list(listeners):
        try:
            callback(event)
        except Exception as e:
            name = getattr(callback, "__qualname__", repr(callback))
            notes.append(f"{event.module}: on_change callback {name} raised "
                         f"{type(e).__name__}: {e}")
    return notes
