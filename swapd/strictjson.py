"""JSON from a peer, read strictly: an object with a key twice is refused.

`json.loads` keeps the last of duplicate keys, so `{"cmd": "status", "cmd": "stop"}` is a
`stop` to us and may be a `status` to anything that reads the same bytes another way (a
proxy, a filter, a log): what was asked would depend on who reads it. Used for control
requests. (Channel messages are typed by their receiver and come from a worker that could
send anything anyway; their hot path keeps the C decoder.)
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    """An object with the same key twice."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(f"key {key[:64]!r} given twice")
        obj[key] = value
    return obj


def loads(data: str | bytes) -> Any:
    """`json.loads`, refusing duplicate keys (DuplicateKey, a ValueError) at any depth."""
    return json.loads(data, object_pairs_hook=_unique)
