"""Game server, version 2: adds experience and levels, and migrates version-1 players.

The classic "add_exp" upgrade: `restore()` receives version-1 state and gives every
existing player experience equal to their score (and the level that goes with it),
so nobody starts over. Deployed with a swap while players stay connected.
"""

from __future__ import annotations

from typing import Any

from protocol import serve_player  # the script's directory is on sys.path

from swapd import worker

STATE_VERSION = 2
EXP_PER_LEVEL = 100


def level_for(exp: int) -> int:
    return 1 + exp // EXP_PER_LEVEL


class Game:
    def __init__(self) -> None:
        self.players: dict[str, dict[str, int]] = {}

    def _player(self, name: str) -> dict[str, int]:
        return self.players.setdefault(name, {"score": 0, "exp": 0, "level": 1})

    def login(self, name: str) -> str:
        return self.me(name)

    def score(self, name: str, points: int) -> str:
        player = self._player(name)
        player["score"] += points
        player["exp"] += max(points, 0)
        player["level"] = level_for(player["exp"])
        return self.me(name)

    def me(self, name: str) -> str:
        p = self._player(name)
        return f"score={p['score']} level={p['level']} exp={p['exp']}"

    def top(self) -> str:
        best = sorted(self.players.items(), key=lambda kv: -kv[1]["score"])[:5]
        return " ".join(f"{name}={p['score']}" for name, p in best)

    def snapshot(self) -> dict[str, Any]:
        return {"players": self.players}

    def restore(self, state: dict[str, Any], from_version: int) -> None:
        players = state["players"]
        if from_version == 1:  # add_exp: experience starts at the score earned so far
            for p in players.values():
                p["exp"] = max(p["score"], 0)
                p["level"] = level_for(p["exp"])
        self.players = players


game = Game()


async def main(w: worker.Worker) -> None:
    w.state_version = STATE_VERSION
    w.on_snapshot(game.snapshot)
    w.on_restore(game.restore)
    await w.serve("game", lambda conn: serve_player(conn, game))
    await w.ready()


if __name__ == "__main__":
    worker.run(main, default_binds={"game": "127.0.0.1:7000"})
