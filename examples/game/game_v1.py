"""Game server, version 1: players with a score, kept in memory, handed over on every swap.

    swapd run --mode stateful --config examples/game/swapd.toml
    nc 127.0.0.1 7000   ->  NAME alice / SCORE 10 / ME
"""

from __future__ import annotations

from typing import Any

from protocol import serve_player  # the script's directory is on sys.path

from swapd import worker

STATE_VERSION = 1


class Game:
    def __init__(self) -> None:
        self.players: dict[str, dict[str, int]] = {}

    def login(self, name: str) -> str:
        return self.me(name)

    def score(self, name: str, points: int) -> str:
        player = self.players.setdefault(name, {"score": 0})
        player["score"] += points
        return self.me(name)

    def me(self, name: str) -> str:
        return f"score={self.players.setdefault(name, {'score': 0})['score']}"

    def top(self) -> str:
        best = sorted(self.players.items(), key=lambda kv: -kv[1]["score"])[:5]
        return " ".join(f"{name}={p['score']}" for name, p in best)

    def snapshot(self) -> dict[str, Any]:
        return {"players": self.players}

    def restore(self, state: dict[str, Any], from_version: int) -> None:
        self.players = state["players"]


game = Game()


async def main(w: worker.Worker) -> None:
    w.state_version = STATE_VERSION
    w.on_snapshot(game.snapshot)
    w.on_restore(game.restore)
    await w.serve("game", lambda conn: serve_player(conn, game))
    await w.ready()


if __name__ == "__main__":
    worker.run(main, default_binds={"game": "127.0.0.1:7000"})
