"""ConnectionHub and Connection on a real loop and real sockets: quiesce, resume, drain."""

from __future__ import annotations

import asyncio
import socket

from swapd.connection import Connection, ConnectionHub, HandedOff


async def echo_server(hub: ConnectionHub, cleanup: float = 0.0) -> socket.socket:
    """A line echo handler; after HandedOff it spends `cleanup` seconds before returning."""
    async def handler(conn: Connection) -> None:
        try:
            while True:
                line = await conn.readline(idle=True)
                if not line:
                    return
                await conn.send(line)
        except HandedOff:
            await asyncio.sleep(cleanup)
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
        lsock = await echo_server(hub, cleanup=0.05)
        reader, writer = await asyncio.open_connection(*lsock.getsockname())
        assert await ask(reader, writer, b"a\n") == b"a\n"
        hub.stop_accepting()
        assert len(await hub.quiesce(5)) == 1
        hub.resume()  # a new handler call starts while the first one is still cleaning up
        hub.start_accepting()
        await asyncio.sleep(0.2)  # the first call has ended
        assert await ask(reader, writer, b"b\n") == b"b\n"
        assert len(hub.conns) == 1
        writer.close()
        hub.begin_drain()
        await asyncio.wait_for(hub.wait_empty(), 5)
        lsock.close()

    asyncio.run(main())
