"""A FastAPI app for `swapd patch` tests: a route whose signature FastAPI analysed when it
was registered, and a plain helper it calls."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


def scale(x: float, factor: float = 1.0) -> float:
    return x * factor


@app.get("/slow")
async def slow(t: float = 1.0) -> dict[str, float]:
    return {"slept": scale(t)}
