"""The line protocol shared by both versions of the game server.

One command per line, one reply line per command:

    NAME <name>      log in (a new player starts at 0)  -> WELCOME <name> <player state>
    SCORE <points>   add points                         -> SCORE <player state>
    ME               your state                         -> ME <name> <player state>
    TOP              the five best players              -> TOP name=score ...
    QUIT             -> BYE, then the server closes

Which player a connection is logged in as lives in `conn.meta`, so it travels
with the connection when a swap hands it to the next generation: a player
stays logged in, on the same TCP connection, across an upgrade.
"""

from __future__ import annotations

from typing import Protocol

from swapd.worker import Connection


class Game(Protocol):
    def login(self, name: str) -> str: ...
    def score(self, name: str, points: int) -> str: ...
    def me(self, name: str) -> str: ...
    def top(self) -> str: ...


async def serve_player(conn: Connection, game: Game) -> None:
    while True:
        # A read that starts a new command is a request boundary: the connection can
        # be handed over here (stateful swap) or closed after a quiet grace (drain).
        line = await conn.readline(idle=True)
        if not line.endswith(b"\n"):
            return  # EOF (possibly mid-line): the player left
        reply, close = dispatch(conn, game, line.decode(errors="replace").split())
        await conn.send(reply.encode() + b"\n")
        if close:
            return


def dispatch(conn: Connection, game: Game, words: list[str]) -> tuple[str, bool]:
    if not words:
        return "ERR empty command", False
    cmd, args = words[0].upper(), words[1:]
    player = conn.meta.get("player")
    if cmd == "QUIT":
        return "BYE", True
    if cmd == "NAME" and len(args) == 1:
        conn.meta["player"] = args[0]
        return f"WELCOME {args[0]} {game.login(args[0])}", False
    if cmd == "TOP":
        return f"TOP {game.top()}", False
    if player is None:
        return "ERR log in first: NAME <name>", False
    if cmd == "SCORE" and len(args) == 1 and args[0].lstrip("-").isdigit():
        return f"SCORE {game.score(player, int(args[0]))}", False
    if cmd == "ME":
        return f"ME {player} {game.me(player)}", False
    return f"ERR unknown command {words[0]!r}", False
