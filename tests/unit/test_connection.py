"""ConnectionHub and Connection on a real loop and real sockets: quiesce, resume, drain."""

from __future__ import annotations

import asyncio
import socket

from swapd.worker.connection import Connection, ConnectionHub, HandedOff


class Cleanup:
    """Holds a handler in its HandedOff cleanup until the test lets it go."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.done = asyncio.Event()


async def echo_server(hub: ConnectionHub, cleanup: Cleanup) -> socket.socket:
    """A line echo handler that, after HandedOff, awaits `cleanup.release` before returning."""
    async def handler(conn: Connection) -> None:
        try:
            while True:
                line = await conn.readline(idle=True)
                if not line:
                    return
                await conn.send(line)
        except HandedOff:
            await cleanup.release.wait()
            cleanup.done.set()
            raise

    lsock = socket.create_server(("127.0.0.1", 0))
    hub.register("echo", lsock, handler)
    hub.start_accepting()
    return lsock


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5)


def test_a_handler_still_cleaning_up_after_resume_does_not_close_the_connection() -> None:
    async def main() -> None:
        hub = ConnectionHub(asyncio.get_running_loop(), idle_grace=1.0)
        cleanup = Cleanup()
        lsock = await echo_server(hub, cleanup)
        reader, writer = await asyncio.open_connection(*lsock.getsockname())
        assert await ask(reader, writer, b"a\n") == b"a\n"
        hub.stop_accepting()
        assert len(await hub.quiesce(5)) == 1
        hub.resume()  # a new handler call starts while the first one is still cleaning up
        hub.start_accepting()
        cleanup.release.set()  # now the first call ends, after the second one began
        # `done` is set in the same task step in which that call raises and its _serve
        # finishes (no await in between): once we wake up, the first call is over.
        await asyncio.wait_for(cleanup.done.wait(), 5)
        assert await ask(reader, writer, b"b\n") == b"b\n"
        assert len(hub.conns) == 1
        writer.close()
        hub.begin_drain()
        await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())
