"""swapd: a zero-downtime process-swap supervisor for Python services.

The application side of `swapd serve`, by convention: an app module registers its in-memory
state at import time, and a stateful swap hands it to the next version of the code.

    import swapd

    @swapd.on_snapshot
    def save() -> object:                       # called in the old worker, inside the pause
        return {"items": items}

    @swapd.on_restore
    def load(state: object, from_version: int) -> None:   # in the new worker, before it serves
        items.update(state["items"])

    swapd.state_version(2, accept={1, 2})       # this code's version; what restore can take

WebSocket connections move too: `swapd.connection(scope)` (see `ConnectionHandoff`,
docs/serve.md).

Outside `swapd serve` (uvicorn, gunicorn, a test) these only record the functions and nothing
calls them. Importing swapd stays cheap: this module imports nothing at all.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, MutableMapping
    from typing import Any, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["ConnectionHandoff", "connection", "on_quiesce", "on_restore", "on_resume",
           "on_snapshot", "state_version"]


class _Hooks:
    """What the app registered; `swapd serve` reads it (one per process)."""

    __slots__ = ("accept", "quiesce", "restore", "resume", "snapshot", "version")

    def __init__(self) -> None:
        self.snapshot: Callable[[], Any] | None = None
        self.restore: Callable[[Any, int], Any] | None = None
        self.version = 1
        self.accept: frozenset[int] | None = None  # None: 0 .. version
        self.quiesce: list[Callable[[], Any]] = []
        self.resume: list[Callable[[], Any]] = []


_hooks = _Hooks()


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _single(kind: str, old: Callable[..., Any] | None, fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise TypeError(f"swapd.{kind} takes a function, not {fn!r}")
    # The same function again (its module imported twice) replaces it; another one is a bug.
    if old is not None and _name(old) != _name(fn):
        raise ValueError(f"swapd.{kind}: {_name(old)} is already registered (one per process), "
                         f"cannot also register {_name(fn)}")


def on_snapshot(fn: F) -> F:
    """Register `fn() -> state`: the state handed to the next version at a stateful swap.

    It runs in the old worker once every request in flight has finished (may be async).
    The state must be picklable (pickle protocol 5)."""
    _single("on_snapshot", _hooks.snapshot, fn)
    _hooks.snapshot = fn
    return fn


def on_restore(fn: F) -> F:
    """Register `fn(state, from_version)`: load the predecessor's state (may be async).

    Called in the new worker before it serves; never for a fresh start. If it raises, the
    swap aborts and the old version keeps serving with its state untouched."""
    _single("on_restore", _hooks.restore, fn)
    _hooks.restore = fn
    return fn


def state_version(version: int, *, accept: Iterable[int] | None = None) -> None:
    """Declare this code's state version (default 1) and the versions `on_restore` can take
    (default: 0 .. version). State of a version not accepted makes the swap abort."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"swapd.state_version: version must be an integer >= 0, not {version!r}")
    accepted = None if accept is None else frozenset(accept)
    if accepted is not None and not all(isinstance(v, int) and v >= 0 for v in accepted):
        raise ValueError(f"swapd.state_version: accept must hold integers >= 0, not {accept!r}")
    _hooks.version = version
    _hooks.accept = accepted


def on_quiesce(fn: F) -> F:
    """Register `fn()` (may be async), called before a snapshot: pause background tasks that
    change state or send on WebSockets outside requests."""
    if not callable(fn):
        raise TypeError(f"swapd.on_quiesce takes a function, not {fn!r}")
    _hooks.quiesce.append(fn)
    return fn


def on_resume(fn: F) -> F:
    """Register `fn()` (may be async), called when a swap aborted after `on_quiesce` and this
    worker serves on with its state: restart what `on_quiesce` paused."""
    if not callable(fn):
        raise TypeError(f"swapd.on_resume takes a function, not {fn!r}")
    _hooks.resume.append(fn)
    return fn


class ConnectionHandoff:
    """One WebSocket connection's side of a stateful swap: `swapd.connection(scope)`.

    Under `swapd serve` the scope carries the ASGI extension "swapd.handoff"; anywhere else
    (uvicorn, a test client) this view is inert: not resumed, no state, `save` a no-op.

        h = swapd.connection(ws.scope)
        await ws.accept()              # on a handed-over connection: no handshake, a no-op
        name = h.state["name"] if h.resumed else await ws.receive_text()
        h.save(lambda: {"name": name}) # opt in: at a swap this connection moves, with this
        ...                            # except WebSocketDisconnect: if h.handed_off, it moved
    """

    __slots__ = ("_ext",)

    def __init__(self, ext: MutableMapping[str, Any] | None) -> None:
        self._ext = ext

    @property
    def supported(self) -> bool:
        """True under `swapd serve`: the connection can move at a stateful swap."""
        return self._ext is not None

    @property
    def resumed(self) -> bool:
        """This connection was handed over by the previous worker: no new handshake."""
        return bool(self._ext and self._ext.get("resumed"))

    @property
    def state(self) -> Any:
        """What the previous worker's `save` function returned (None for a new connection)."""
        return self._ext.get("state") if self._ext else None

    @property
    def handed_off(self) -> bool:
        """The disconnect the app just received is a handoff (code 1012): the client is still
        connected, to the next worker. Do not treat it as the client leaving."""
        return bool(self._ext and self._ext.get("handed_off"))

    def save(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Opt this connection in: at a stateful swap it moves to the next worker, which calls
        the app again with `resumed` true and `state` = fn() (picklable). Without it the
        connection stays with the old worker and is closed (1012) at its drain deadline."""
        if not callable(fn):
            raise TypeError(f"ConnectionHandoff.save takes a function, not {fn!r}")
        if self._ext is not None:
            self._ext["save"] = fn
        return fn


def connection(scope: MutableMapping[str, Any]) -> ConnectionHandoff:
    """The handoff view of an ASGI WebSocket scope (inert outside `swapd serve`).

    (Not named `handoff`: that is the snapshot-format package, swapd.handoff.)"""
    extensions = scope.get("extensions") or {}
    ext = extensions.get("swapd.handoff")
    return ConnectionHandoff(ext if isinstance(ext, dict) else None)
