"""A bare uvloop TCP splice (``python -m benchmarks.splice LISTEN_PORT TARGET_PORT``).

No parsing, no pooling, no tenant context: the ceiling any Python proxy on this machine
can reach, and the "without injection" side of pgtenant's injection ratio.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Half(asyncio.Protocol):
    def __init__(self) -> None:
        self.peer: _Half | None = None
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending += data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Client(_Half):
    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, server = await loop.create_connection(_Half, "127.0.0.1", self.target)
        server.peer, self.peer = self, server
        if self.pending:
            server.transport.write(bytes(self.pending))  # type: ignore[union-attr]
            self.pending.clear()


async def main(listen: int, target: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(target), "127.0.0.1", listen,
                                      backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
