"""Chat rooms, v2: history entries become dicts and carry the version that numbered them.

The state changes shape, so v2 declares state version 2 and migrates what v1 hands over
(`from_version == 1`); members connected to v1 keep their connection and receive v2's
messages. See v1/chat.py for how to run it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

import swapd

VERSION = 2
app = FastAPI(title="chat v2")


class Room:
    def __init__(self) -> None:
        self.seq = 0
        self.history: list[dict[str, Any]] = []
        self.members: dict[str, WebSocket] = {}

    async def post(self, sender: str, text: str) -> None:
        self.seq += 1
        entry = {"seq": self.seq, "from": sender, "text": text, "v": VERSION}
        self.history.append(entry)
        del self.history[:-1000]
        for ws in list(self.members.values()):
            with contextlib.suppress(Exception):  # a member that just left
                await ws.send_json({"type": "msg", **entry})


rooms: dict[str, Room] = {}

swapd.state_version(2, accept={1, 2})


@swapd.on_snapshot
def save() -> dict[str, Any]:
    return {name: {"seq": r.seq, "history": r.history} for name, r in rooms.items()}


@swapd.on_restore
def load(state: dict[str, Any], from_version: int) -> None:
    for name, saved in state.items():
        room = rooms.setdefault(name, Room())
        room.seq = saved["seq"]
        if from_version == 1:  # v1 kept (seq, sender, text) tuples
            room.history = [{"seq": s, "from": f, "text": t, "v": 1}
                            for s, f, t in saved["history"]]
        else:
            room.history = saved["history"]


@app.websocket("/chat/{room}")
async def chat(ws: WebSocket, room: str, name: str) -> None:
    live = swapd.connection(ws.scope)
    await ws.accept()
    r = rooms.setdefault(room, Room())
    if not live.resumed:
        await ws.send_json({"type": "welcome", "name": name, "seq": r.seq, "v": VERSION})
    live.save(lambda: {"name": name})
    r.members[name] = ws
    try:
        while True:
            await r.post(name, await ws.receive_text())
    except WebSocketDisconnect:
        if r.members.get(name) is ws:
            del r.members[name]
        if not live.handed_off:
            await r.post("*", f"{name} left")


@app.get("/rooms/{room}")
def history(room: str) -> dict[str, Any]:
    r = rooms.get(room) or Room()
    return {"seq": r.seq, "members": sorted(r.members), "version": VERSION,
            "history": r.history}
