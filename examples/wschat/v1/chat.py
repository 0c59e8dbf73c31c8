"""Chat rooms over WebSockets whose members stay connected across `swapd upgrade` (v1).

    cd examples/wschat && ln -sfn v1 current
    swapd run --mode stateful --bind http=127.0.0.1:8000 --cwd current --app chat:app
    # clients: ws://127.0.0.1:8000/chat/lobby?name=alice  (send text, receive JSON)
    ln -sfn v2 current && swapd upgrade      # v2 runs; nobody was disconnected

Every text a member sends is numbered in its room and broadcast to all members (the sender
included: that is its acknowledgement). The rooms' history and numbering are the app's state
(`@swapd.on_snapshot`); each connection opts in to moving with `swapd.connection(scope).save`,
so at a stateful swap it is handed to the new version between two messages: no close frame,
no new handshake, no lost message. The new version's handler is called again for it, with
`resumed` true and what `save` returned.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

import swapd

VERSION = 1
app = FastAPI(title="chat v1")


class Room:
    def __init__(self) -> None:
        self.seq = 0
        self.history: list[tuple[int, str, str]] = []  # (seq, sender, text)
        self.members: dict[str, WebSocket] = {}  # this process's connections, not state

    async def post(self, sender: str, text: str) -> None:
        self.seq += 1
        self.history.append((self.seq, sender, text))
        del self.history[:-1000]
        msg = {"type": "msg", "seq": self.seq, "from": sender, "text": text, "v": VERSION}
        for ws in list(self.members.values()):
            # A member that just left fails here; its own handler cleans up.
            with contextlib.suppress(Exception):
                await ws.send_json(msg)


rooms: dict[str, Room] = {}

swapd.state_version(1)


@swapd.on_snapshot
def save() -> dict[str, Any]:
    return {name: {"seq": r.seq, "history": r.history} for name, r in rooms.items()}


@swapd.on_restore
def load(state: dict[str, Any], from_version: int) -> None:
    for name, saved in state.items():
        room = rooms.setdefault(name, Room())
        room.seq, room.history = saved["seq"], saved["history"]


@app.websocket("/chat/{room}")
async def chat(ws: WebSocket, room: str, name: str) -> None:
    live = swapd.connection(ws.scope)
    await ws.accept()  # a no-op when the connection was handed over (no new handshake)
    r = rooms.setdefault(room, Room())
    if not live.resumed:
        await ws.send_json({"type": "welcome", "name": name, "seq": r.seq, "v": VERSION})
    live.save(lambda: {"name": name})  # opt in: move with the swap
    r.members[name] = ws
    try:
        while True:
            await r.post(name, await ws.receive_text())
    except WebSocketDisconnect:
        if r.members.get(name) is ws:
            del r.members[name]  # a handoff (live.handed_off) is not a leave: no announcement
        if not live.handed_off:
            await r.post("*", f"{name} left")


@app.get("/rooms/{room}")
def history(room: str) -> dict[str, Any]:
    r = rooms.get(room) or Room()
    return {"seq": r.seq, "members": sorted(r.members), "version": VERSION,
            "history": [{"seq": s, "from": f, "text": t} for s, f, t in r.history]}
