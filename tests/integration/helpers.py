"""Helpers the integration tests share: raw protocol clients, the admin console through psql,
the metrics endpoint, a proxy started from a config file, waiting for a condition.

Tests import these from here, never from one another (a test module's private helpers are
free to change with it).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from pgtenant.control.cluster import find_bindir
from pgtenant.control.demo import DemoEnv
from pgtenant.protocol import codec

from .conftest import ROOT, ProxyProcess

READ_TIMEOUT = 5.0


# --------------------------------------------------------------- raw clients of the proxy

class Raw:
    """A raw TCP client of the proxy; every read times out instead of hanging."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_exactly(self, n: int, timeout: float = READ_TIMEOUT) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def read_message(self, timeout: float = READ_TIMEOUT) -> tuple[str, bytes]:
        """Returns: (type byte as a character, body) of the next backend message."""
        header = await self.read_exactly(5, timeout)
        msg_type, length = codec.HEADER.unpack(header)
        body = await self.read_exactly(length - 4, timeout) if length > 4 else b""
        return chr(msg_type), body

    async def read_until(self, wanted: str, timeout: float = READ_TIMEOUT
                         ) -> list[tuple[str, bytes]]:
        """Returns: all messages up to and including the first of type ``wanted``."""
        seen: list[tuple[str, bytes]] = []
        while True:
            msg = await self.read_message(timeout)
            seen.append(msg)
            if msg[0] == wanted:
                return seen

    async def at_eof(self, timeout: float = READ_TIMEOUT) -> bool:
        """Returns: whether the proxy closed the connection (no further bytes arrive)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


@asynccontextmanager
async def raw_client(proxy: ProxyProcess) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", proxy.port), READ_TIMEOUT
    )
    raw = Raw(reader, writer)
    try:
        yield raw
    finally:
        await raw.close()


def error_fields(body: bytes) -> dict[str, str]:
    return {chr(code): value.decode() for code, value in codec.parse_error_fields(body)}


async def expect_fatal_and_close(raw: Raw, sqlstate: str, *,
                                 timeout: float = READ_TIMEOUT) -> dict[str, str]:
    """Read an ErrorResponse with ``sqlstate`` then EOF. Returns: its fields."""
    msg_type, body = await raw.read_message(timeout)
    assert msg_type == "E", (msg_type, body)
    fields = error_fields(body)
    assert fields["C"] == sqlstate, fields
    assert fields["S"] == "FATAL", fields
    assert await raw.at_eof(), "the proxy kept the connection open after a FATAL error"
    return fields


def startup(user: str, database: str = "app") -> bytes:
    return codec.startup_message([("user", user), ("database", database)])


def versioned_startup(version: int, user: str = "acme") -> bytes:
    body = struct.pack("!i", version) + b"user\x00" + user.encode() + b"\x00database\x00app\x00\x00"
    return struct.pack("!i", len(body) + 4) + body


async def login(raw: Raw, env: DemoEnv, slug: str = "acme") -> None:
    """Run startup and cleartext token auth up to the first ReadyForQuery."""
    await raw.send(startup(slug))
    msg_type, body = await raw.read_message()
    assert (msg_type, body) == ("R", struct.pack("!i", 3)), "expected a cleartext request"
    await raw.send(codec.password_message(env.tenants[slug].token.encode()))
    messages = await raw.read_until("Z")
    assert ("R", struct.pack("!i", 0)) in messages
    assert messages[-1] == ("Z", b"I")


async def simple_query(raw: Raw, sql: str) -> list[tuple[str, bytes]]:
    await raw.send(codec.query(sql))
    return await raw.read_until("Z")


def data_values(messages: list[tuple[str, bytes]]) -> list[str]:
    """Returns: the first column of every DataRow in ``messages`` (text format)."""
    values = []
    for msg_type, body in messages:
        if msg_type == "D":
            (length,) = struct.unpack_from("!i", body, 2)
            values.append(body[6 : 6 + length].decode())
    return values


async def asyncpg_connect(proxy: ProxyProcess, slug: str, **kw: str) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(slug, **kw), statement_cache_size=0, timeout=10)


async def assert_healthy(proxy: ProxyProcess, slug: str = "initech") -> None:
    conn = await asyncpg_connect(proxy, slug)
    try:
        assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == str(
            proxy.env.tenants[slug].org_id)
    finally:
        await conn.close()


class TenantRaw:
    """A raw protocol client logged in as one tenant; every read times out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.key = (0, 0)  # BackendKeyData: (pid, secret) for a CancelRequest

    @classmethod
    async def login(cls, proxy: ProxyProcess, slug: str = "acme", *,
                    token: str | None = None) -> TenantRaw:
        """Logs in as ``slug`` with ``token`` (default: the demo's token of that tenant)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", proxy.port), READ_TIMEOUT)
        raw = cls(reader, writer)
        raw.writer.write(codec.startup_message([("user", slug), ("database", "app")]))
        assert await raw.read() == ("R", struct.pack("!i", 3))
        token = proxy.env.tenants[slug].token if token is None else token
        raw.writer.write(codec.password_message(token.encode()))
        seen = await raw.until()
        assert seen[-1] == ("Z", b"I")
        for kind, body in seen:
            if kind == "K":
                pid, secret = struct.unpack("!ii", body)
                raw.key = (pid, secret)
        return raw

    async def read(self) -> tuple[str, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(5), READ_TIMEOUT)
        msg_type, length = codec.HEADER.unpack(header)
        body = (await asyncio.wait_for(self.reader.readexactly(length - 4), READ_TIMEOUT)
                if length > 4 else b"")
        return chr(msg_type), body

    async def until(self, wanted: str = "Z") -> list[tuple[str, bytes]]:
        seen = []
        while True:
            seen.append(await self.read())
            if seen[-1][0] == wanted:
                return seen

    async def request(self, *messages: bytes) -> list[tuple[str, bytes]]:
        self.writer.write(b"".join(messages))
        await self.writer.drain()
        return await self.until()

    async def fatal_and_close(self, *messages: bytes) -> dict[str, str]:
        """Send ``messages``; expect a FATAL ErrorResponse, then the proxy closing."""
        self.writer.write(b"".join(messages))
        await self.writer.drain()
        kind, body = await self.read()
        while kind in "123CDTnstN":  # replies to what came before the refused message
            kind, body = await self.read()
        assert kind == "E", (kind, body)
        fields = {chr(k): v.decode() for k, v in codec.parse_error_fields(body)}
        assert fields["S"] == "FATAL", fields
        assert await asyncio.wait_for(self.reader.read(), READ_TIMEOUT) == b""
        return fields

    async def close(self) -> None:
        self.writer.write(codec.terminate())
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def errors(messages: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    return [{chr(k): v.decode() for k, v in codec.parse_error_fields(body)}
            for t, body in messages if t == "E"]


def data_rows(messages: list[tuple[str, bytes]]) -> list[bytes]:
    return [body for t, body in messages if t == "D"]


def extended(sql: str, name: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    return codec.parse(name, sql) + codec.bind("", name, list(params)) + codec.execute()


# ------------------------------------------------------------------------- admin console

ADMIN_TOKEN = "pgta_test-admin-token"
ADMIN = f'[admin]\ntoken_sha256 = "{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}"'
PSQL = str(find_bindir() / "psql")


def admin_psql(proxy: ProxyProcess, sql: str, *, token: str = ADMIN_TOKEN, user: str = "admin",
         check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [PSQL, "-X", "-A", "-F", "|", "-P", "footer=off", "-v", "ON_ERROR_STOP=1", "-c", sql,
         f"host=127.0.0.1 port={proxy.port} dbname=pgtenant user={user} password={token}"],
        capture_output=True, text=True, timeout=30)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def admin_rows(proxy: ProxyProcess, sql: str) -> list[dict[str, str]]:
    lines = admin_psql(proxy, sql).stdout.splitlines()
    header = lines[0].split("|")
    return [dict(zip(header, line.split("|"), strict=True)) for line in lines[1:]]


# ---------------------------------------------------------------------- metrics endpoint

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read().decode()
            conn.close()
            return resp.status, resp.getheader("content-type") or "", body
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def scrape(port: int) -> Samples:
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def metric_value(samples: Samples, name: str, **labels: str) -> float:
    """Returns: the sum of ``name`` over the series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= lbls)


# ----------------------------------------------------------------------------- processes

def serve_until(config: Path, wait_for: str, timeout: float = 20) -> tuple[int | None, str]:
    """Run ``pgtenant serve --config config`` until ``wait_for`` is in its log, it exits,
    or ``timeout``. Returns: its exit code (None: it was still running, then stopped) and
    its log."""
    log = config.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pgtenant", "serve", "--config",
                                 str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if wait_for in log.read_text(errors="replace"):
                break
            time.sleep(0.05)
        code = proc.poll()
        if code is None:
            proc.terminate()
            proc.wait(10)
    return code, log.read_text(errors="replace")


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def execute_in_thread(conn: psycopg.Connection[Any], sql: str
                      ) -> tuple[threading.Thread, threading.Event]:
    """Runs ``sql`` on ``conn`` in a thread, for a statement the proxy is expected to hold
    (PAUSE, a full pool): returns the thread, started, and the event set once it returned."""
    done = threading.Event()

    def run() -> None:
        conn.execute(sql)
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    return worker, done
