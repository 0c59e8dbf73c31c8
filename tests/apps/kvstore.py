"""A key-value service whose data lives in a pre-copied TrackedDict (tests of --precopy).

    SET k v -> OK        GET k -> value or NONE        DEL k -> OK
    COUNT  -> number of keys                         PID  -> this worker's pid

$PRELOAD fills a fresh worker with that many keys (k0..kN-1 -> "v<i>"). $KV_VERSION is
the state version; version 2 stores values upper-cased and migrates version-1 entries.
"""

from __future__ import annotations

import os
from typing import Any

from swapd import worker

VERSION = int(os.environ.get("KV_VERSION", "1"))


def migrate(value: Any, from_version: int) -> Any:
    return value.upper() if from_version < 2 and VERSION >= 2 else value


async def main(w: worker.Worker) -> None:
    w.state_version = VERSION
    kv = w.tracked_dict("kv", migrate=migrate)
    if w.role == "fresh":
        for i in range(int(os.environ.get("PRELOAD", "0"))):
            kv[f"k{i}"] = f"v{i}"

    async def handle(conn: worker.Connection) -> None:
        while True:
            line = await conn.readline(idle=True)
            if not line.endswith(b"\n"):
                return
            words = line.decode().split()
            cmd = words[0].upper() if words else ""
            if cmd == "SET" and len(words) == 3:
                kv[words[1]] = words[2].upper() if VERSION >= 2 else words[2]
                reply = "OK"
            elif cmd == "GET" and len(words) == 2:
                reply = kv.get(words[1], "NONE")
            elif cmd == "DEL" and len(words) == 2:
                kv.pop(words[1], None)
                reply = "OK"
            elif cmd == "COUNT":
                reply = str(len(kv))
            elif cmd == "PID":
                reply = str(os.getpid())
            else:
                reply = "ERR"
            await conn.send(reply.encode() + b"\n")

    await w.serve("kv", handle)
    await w.ready()


if __name__ == "__main__":
    worker.run(main)
