"""Import `MODULE:APP` and tell which interface it speaks: ASGI 3, ASGI 2 or WSGI.

Detection (`--interface auto`), as uvicorn does for ASGI and extended to WSGI:

    async def app(scope, receive, send)          ASGI 3 (a coroutine function, or an object
    class App: async def __call__(self, ...)      whose __call__ is one: Starlette, FastAPI,
                                                  Django's ASGIHandler)
    def app(scope) -> async callable(receive, send)   ASGI 2 (one positional parameter)
    def app(environ, start_response)              WSGI (anything else callable: Flask,
                                                  Django's WSGIHandler)
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LoadError(Exception):
    """The app cannot be imported or is not an app; one line for the operator."""


def load(spec: str, *, factory: bool = False, app_dir: str = ".") -> Any:
    module_name, _, attrs = spec.partition(":")
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name and not module_name.startswith(f"{e.name}."):
            raise  # a missing import inside the app: its own traceback says more
        raise LoadError(f"cannot import module {module_name!r} (from {path})") from None
    app: Any = module
    for attr in attrs.split("."):
        try:
            app = getattr(app, attr)
        except AttributeError:
            raise LoadError(f"module {module_name!r} has no attribute {attrs!r}") from None
    if factory:
        if not callable(app):
            raise LoadError(f"{spec} is not callable, so it cannot be a --factory")
        app = app()
    if not callable(app):
        raise LoadError(f"{spec} is not an application: {type(app).__name__} is not callable")
    return app


def detect(app: Any, interface: str = "auto") -> str:
    """'asgi3', 'asgi2' or 'wsgi'."""
    if interface == "asgi":
        return "asgi3" if _is_coroutine_callable(app) else "asgi2"
    if interface != "auto":
        return interface
    if _is_coroutine_callable(app):
        return "asgi3"
    try:
        params = [p for p in inspect.signature(app).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return "wsgi"
    return "asgi2" if len(params) == 1 else "wsgi"


def _is_coroutine_callable(app: Any) -> bool:
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004  (the method itself is inspected)
    return inspect.iscoroutinefunction(call)


def asgi2_to_3(app: Any) -> ASGIApp:
    async def asgi3(scope: Scope, receive: Receive, send: Send) -> None:
        instance = app(scope)
        await instance(receive, send)

    return asgi3
