"""The patch journal: the patches in force in the active generation, in order.

A worker restarted after a crash re-applies it before it is ready (the `hello` reply
carries it), a swap to new code clears it, and `upgrade --self` carries it across the
exec. `patching` adds and removes entries; nothing else changes it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from swapd.patch.source import sha256_text

log = logging.getLogger("swapd")


@dataclass
class PatchRecord:
    id: int
    module: str
    source: str
    sha256: str
    name: str
    time: float  # wall clock, for operators
    who: str
    accept_absent: bool = False
    prune: bool = False
    path: str | None = None  # the module's file in the workers
    # A patch set: every module's {module, source, sha256, name, path}, in order (the
    # fields above then describe the first); empty for a patch of one module.
    parts: list[dict[str, Any]] = field(default_factory=list)
    squashed: bool = False  # made permanent: the workers can no longer roll it back

    def each_part(self) -> list[dict[str, Any]]:
        if self.parts:
            return self.parts
        return [{"module": self.module, "source": self.source, "sha256": self.sha256,
                 "name": self.name, "path": self.path}]

    def summary(self) -> dict[str, Any]:
        info = {k: v for k, v in asdict(self).items() if k not in ("source", "parts")}
        info["on_disk"] = self.on_disk()
        info["modules"] = [p["module"] for p in self.each_part()]
        return info

    def on_disk(self) -> bool | None:
        """Does each module's file now hold exactly this fix? (None: cannot tell.)"""
        found = [_on_disk(p.get("path"), p["sha256"]) for p in self.each_part()]
        return False if False in found else None if None in found else True


def _on_disk(path: str | None, sha: str) -> bool | None:
    if not path:
        return None
    try:
        # Read as `swapd patch` reads the fix (UTF-8 text, universal newlines), hashed
        # with the same helper: a CRLF file holding the fix matches.
        with open(path, encoding="utf-8") as f:
            return sha256_text(f.read()) == sha
    except UnicodeDecodeError:
        return False  # the fix is UTF-8 text
    except OSError:
        return None


class Journal:
    """The ordered records and the serial that numbers patches (never reused in a run)."""

    def __init__(self, records: list[PatchRecord] | None = None) -> None:
        self.records: list[PatchRecord] = list(records or [])
        self.serial = max((r.id for r in self.records), default=0)

    def __bool__(self) -> bool:
        return bool(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def next_id(self) -> int:
        self.serial += 1
        return self.serial

    @property
    def last(self) -> PatchRecord | None:
        return self.records[-1] if self.records else None

    def append(self, record: PatchRecord) -> None:
        self.records.append(record)

    def pop(self) -> PatchRecord:
        return self.records.pop()

    def clear_for(self, gen: int) -> None:
        """A generation of new code from disk committed: the old patches do not apply."""
        if self.records:
            log.warning("event=patch.journal_cleared gen=%d patches=%s", gen,
                        ",".join(str(r.id) for r in self.records))
            self.records.clear()

    def state(self) -> list[dict[str, Any]]:
        """What a (re)started worker re-applies, and what a re-exec carries."""
        return [asdict(r) for r in self.records]

    def summaries(self) -> list[dict[str, Any]]:
        return [r.summary() for r in self.records]

    def warnings(self) -> list[str]:
        out = []
        for r in self.records:
            for part in r.each_part():
                if _on_disk(part.get("path"), part["sha256"]) is False:
                    out.append(f"patch {r.id} to {part['module']} is not in "
                               f"{os.path.basename(part.get('path') or '')} on disk: the next "
                               "swap will run the file without it")
        return out
