"""A loopback TCP path between the gateway and a coordinator that can hide a restart.

On loopback the kernel tells the gateway at once when the coordinator's process
goes away (FIN on every pooled socket). In production it often does not: the
coordinator restarts in another pod behind a Service address, or a NAT or
conntrack entry expires, and the gateway's pooled sockets look alive until the
next write is answered with a reset. `HidingRelay` reproduces that on
loopback: it never passes the coordinator's close on to the gateway, and
answers the gateway's next bytes on such a connection with a TCP reset.

    relay = HidingRelay(coordinator_port)
    url = await relay.start()          # point the gateway here
    ...                                # restart the coordinator on the same port
    relay.connections                  # TCP connections the gateway opened through it
"""

from __future__ import annotations

import asyncio
import socket
import struct


def reset(writer: asyncio.StreamWriter) -> None:
    """Closes with RST instead of FIN (SO_LINGER 0), as a peer with no state for the connection does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class HidingRelay:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.connections = 0
        self.resets = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            reset(down_w)
            return
        upstream_gone = asyncio.Event()

        async def down_to_up() -> None:
            while data := await down_r.read(65536):
                if upstream_gone.is_set():
                    # The gateway writes into a connection the other end no longer knows.
                    self.resets += 1
                    reset(down_w)
                    return
                up_w.write(data)
                await up_w.drain()

        async def up_to_down() -> None:
            try:
                while data := await up_r.read(65536):
                    down_w.write(data)
                    await down_w.drain()
            except ConnectionError:
                pass
            upstream_gone.set()  # and, on purpose, no FIN towards the gateway

        pump = asyncio.create_task(up_to_down())
        self._tasks.add(pump)
        pump.add_done_callback(self._tasks.discard)
        try:
            await down_to_up()
        except ConnectionError:
            pass
        finally:
            up_w.close()
            pump.cancel()
            if not down_w.transport.is_closing():
                down_w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
