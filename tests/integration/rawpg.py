"""A small raw-protocol client for attack tests: every frame is the test's choice.

``RawPg.login`` opens a socket to the proxy, sends the startup message and answers the
cleartext password request with a tenant token. After that a test sends any frames (all
pipelined in ONE write by ``send``), and reads parsed replies until N ReadyForQuery, every
read bounded by a timeout. ``RawPg.cancel`` sends a CancelRequest on a separate socket with
the BackendKeyData the proxy gave this client.

Frame builders not in ``pgtenant.protocol.codec`` (Describe, Flush, Close, the copy messages)
live here too, so a test reads as the list of messages it sends.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from pgtenant.protocol import codec

__all__ = [
    "Msg",
    "RawPg",
    "bind",
    "close_portal",
    "close_statement",
    "copy_data",
    "copy_done",
    "copy_fail",
    "describe_portal",
    "describe_statement",
    "execute",
    "ext",
    "flush",
    "parse",
    "query",
    "sync",
    "terminate",
]

TIMEOUT = 10.0

# Re-exported builders (all text-format parameters and results).
query = codec.query
parse = codec.parse
bind = codec.bind
execute = codec.execute
sync = codec.sync
terminate = codec.terminate


def flush() -> bytes:
    return codec.frame(ord("H"), b"")


def describe_statement(name: str = "") -> bytes:
    return codec.frame(ord("D"), b"S" + name.encode() + b"\x00")


def describe_portal(name: str = "") -> bytes:
    return codec.frame(ord("D"), b"P" + name.encode() + b"\x00")


def close_statement(name: str = "") -> bytes:
    return codec.frame(ord("C"), b"S" + name.encode() + b"\x00")


def close_portal(name: str = "") -> bytes:
    return codec.frame(ord("C"), b"P" + name.encode() + b"\x00")


def copy_data(data: bytes) -> bytes:
    return codec.frame(ord("d"), data)


def copy_done() -> bytes:
    return codec.frame(ord("c"), b"")


def copy_fail(message: str = "stop") -> bytes:
    return codec.frame(ord("f"), message.encode() + b"\x00")


def ext(sql: str, name: str = "", params: tuple[bytes | None, ...] = ()) -> bytes:
    """Parse/Bind/Execute of ``sql`` (no Sync)."""
    return codec.parse(name, sql) + codec.bind("", name, list(params)) + codec.execute()


@dataclass
class Msg:
    """One server message: its type letter and decoded parts."""

    type: str
    body: bytes
    fields: dict[str, str] = field(default_factory=dict)  # ErrorResponse / NoticeResponse
    values: list[str | None] = field(default_factory=list)  # DataRow, text format

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def tag(self) -> str:  # CommandComplete
        return self.body.rstrip(b"\x00").decode(errors="replace")

    def __repr__(self) -> str:
        if self.type == "D":
            return f"D{self.values}"
        if self.type in "EN":
            return f"{self.type}({self.fields.get('C')}: {self.fields.get('M')})"
        if self.type == "C":
            return f"C({self.tag})"
        if self.type == "Z":
            return f"Z({self.body.decode()})"
        return f"{self.type}"


def decode(msg_type: str, body: bytes) -> Msg:
    msg = Msg(msg_type, body)
    if msg_type in "EN":
        msg.fields = {chr(k): v.decode(errors="replace")
                      for k, v in codec.parse_error_fields(body)}
    elif msg_type == "D":
        (count,) = struct.unpack_from("!h", body, 0)
        pos = 2
        for _ in range(count):
            (size,) = struct.unpack_from("!i", body, pos)
            pos += 4
            if size < 0:
                msg.values.append(None)
            else:
                msg.values.append(body[pos:pos + size].decode(errors="replace"))
                pos += size
    return msg


def rows(msgs: list[Msg]) -> list[list[str | None]]:
    return [m.values for m in msgs if m.type == "D"]


def errors(msgs: list[Msg]) -> list[Msg]:
    return [m for m in msgs if m.type == "E"]


def sqlstates(msgs: list[Msg]) -> list[str | None]:
    return [m.sqlstate for m in msgs if m.type == "E"]


class LoginFailed(Exception):
    def __init__(self, msg: Msg):
        super().__init__(repr(msg))
        self.msg = msg


class RawPg:
    """A raw protocol client; every read times out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str, port: int):
        self.reader, self.writer = reader, writer
        self.host, self.port = host, port
        self.backend_key: tuple[int, int] | None = None
        self.parameters: dict[str, str] = {}

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = TIMEOUT) -> RawPg:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer, host, port)

    @classmethod
    async def login(cls, port: int, user: str, token: str, *, database: str = "app",
                    host: str = "127.0.0.1", timeout: float = TIMEOUT) -> RawPg:
        """Startup + cleartext password. Raises: LoginFailed with the server's error."""
        raw = await cls.open(host, port, timeout)
        try:
            raw.send(codec.startup_message([("user", user), ("database", database)]))
            first = await raw.read(timeout)
            if first.type == "E":
                raise LoginFailed(first)
            assert (first.type, first.body) == ("R", struct.pack("!i", 3)), first
            raw.send(codec.password_message(token.encode()))
            while True:
                msg = await raw.read(timeout)
                if msg.type == "E":
                    raise LoginFailed(msg)
                if msg.type == "K":
                    raw.backend_key = struct.unpack("!ii", msg.body)
                elif msg.type == "S":
                    name, value = codec.parse_parameter_status(msg.body)
                    raw.parameters[name] = value
                elif msg.type == "Z":
                    return raw
        except BaseException:
            raw.abort()
            raise

    @classmethod
    async def tenant(cls, proxy: object, slug: str, timeout: float = TIMEOUT) -> RawPg:
        """Log in as demo tenant ``slug`` through a ``ProxyProcess``."""
        env = proxy.env  # type: ignore[attr-defined]
        return await cls.login(proxy.port, slug, env.tenants[slug].token,  # type: ignore
                               timeout=timeout)

    # ------------------------------------------------------------------ I/O

    def send(self, *frames: bytes) -> None:
        """All ``frames`` in one write."""
        self.writer.write(b"".join(frames))

    async def read(self, timeout: float = TIMEOUT) -> Msg:
        header = await asyncio.wait_for(self.reader.readexactly(5), timeout)
        msg_type, length = codec.HEADER.unpack(header)
        body = (await asyncio.wait_for(self.reader.readexactly(length - 4), timeout)
                if length > 4 else b"")
        return decode(chr(msg_type), body)

    async def until_ready(self, n: int = 1, timeout: float = TIMEOUT) -> list[Msg]:
        """Messages up to and including the ``n``-th ReadyForQuery (each read bounded)."""
        seen: list[Msg] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while n > 0:
            msg = await self.read(max(0.01, deadline - loop.time()))
            seen.append(msg)
            if msg.type == "Z":
                n -= 1
        return seen

    async def until(self, types: str, timeout: float = TIMEOUT) -> list[Msg]:
        """Messages up to and including the first of one of ``types``."""
        seen: list[Msg] = []
        while True:
            seen.append(await self.read(timeout))
            if seen[-1].type in types:
                return seen

    async def request(self, *frames: bytes, n: int = 1, timeout: float = TIMEOUT) -> list[Msg]:
        self.send(*frames)
        await self.writer.drain()
        return await self.until_ready(n, timeout)

    async def collect(self, n: int = 1, timeout: float = TIMEOUT) -> tuple[list[Msg], str]:
        """Like ``until_ready`` but never raises: returns (what arrived, how it ended:
        "ready", "closed" or "timeout"). For a victim that must be checked even when the
        proxy drops it half way."""
        seen: list[Msg] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while n > 0:
                msg = await self.read(max(0.01, deadline - loop.time()))
                seen.append(msg)
                if msg.type == "Z":
                    n -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return seen, "closed"
        except TimeoutError:
            return seen, "timeout"
        return seen, "ready"

    async def drain_quietly(self, timeout: float = 0.5) -> list[Msg]:
        """Whatever arrives within ``timeout`` (no error when nothing does)."""
        seen: list[Msg] = []
        try:
            while True:
                seen.append(await self.read(timeout))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return seen

    async def cancel(self, timeout: float = TIMEOUT) -> None:
        """CancelRequest with this client's BackendKeyData, on a separate socket."""
        assert self.backend_key is not None, "no BackendKeyData received"
        await send_cancel(self.host, self.port, *self.backend_key, timeout=timeout)

    async def closed_by_peer(self, timeout: float = TIMEOUT) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionError, OSError):
            return True
        return data == b""

    async def close(self) -> None:
        try:
            self.writer.write(codec.terminate())
        except (ConnectionError, OSError, RuntimeError):
            pass
        self.abort()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, ConnectionError, OSError):
            pass

    def abort(self) -> None:
        """Drop the socket without Terminate (an abrupt disconnect)."""
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


async def send_cancel(host: str, port: int, pid: int, secret: int, *,
                      timeout: float = TIMEOUT) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(codec.cancel_request(pid, secret))
        await writer.drain()
        try:  # the proxy closes the socket when it has handled the request
            await asyncio.wait_for(reader.read(), timeout)
        except (ConnectionError, OSError):
            pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
