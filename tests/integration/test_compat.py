"""Drop-in compatibility (issue #4): real clients using COPY, cancel, notices, flow control,
server-side cursors and SQLAlchemy 2 through a real pgtenant, in transaction mode.

Most tests run asyncpg with ``statement_cache_size=0`` and psycopg with
``prepare_threshold=None`` to test one thing at a time; the tests at the end run them with
their default statement caches, whose named statements pgtenant renames to global ones.
"""

from __future__ import annotations

import asyncio
import decimal
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgtenant.protocol import codec

from .conftest import ProxyProcess

_K = ord("K")
_Z = ord("Z")


def _org(proxy: ProxyProcess, slug: str) -> str:
    return str(proxy.env.tenants[slug].org_id)


def _campaigns(proxy: ProxyProcess, slug: str) -> list[str]:
    return proxy.env.tenants[slug].rows["public.campaigns"]


def _rss_kib(pid: int) -> int:
    """Returns: the resident set size of process ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _tool(name: str) -> str | None:
    from pgtenant.control.cluster import find_bindir

    path = find_bindir() / name
    return str(path) if path.exists() else shutil.which(name)


def _psycopg(proxy: ProxyProcess, slug: str, **kw: object) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(slug), prepare_threshold=None, **kw)  # type: ignore[arg-type]


def _active_queries(proxy: ProxyProcess, needle: str) -> list[tuple[str, str | None]]:
    """Returns: (state, wait_event) of backends whose query text holds ``needle``."""
    with psycopg.connect(proxy.env.admin_dsn, autocommit=True) as admin:
        return admin.execute(
            "SELECT state, wait_event FROM pg_stat_activity "
            "WHERE query LIKE '%%' || %s || '%%' AND pid <> pg_backend_pid() AND state = 'active'",
            (needle,),
        ).fetchall()


# ------------------------------------------------------------------------------ raw protocol

class RawClient:
    """A blocking protocol-3 client: login, send bytes, read frames."""

    def __init__(self, proxy: ProxyProcess, slug: str, *, rcvbuf: int | None = None):
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", proxy.port))
        self.buf = bytearray()
        self.sock.sendall(codec.startup_message([("user", slug), ("database", "app")]))
        self.read_until(ord("R"))
        self.sock.sendall(codec.password_message(proxy.env.tenants[slug].token.encode()))
        frames = self.read_until(_Z)
        key = next(body for kind, body in frames if kind == _K)
        self.pid, self.secret = struct.unpack("!ii", key)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 5:
                length = int.from_bytes(self.buf[1:5], "big")
                if len(self.buf) >= 1 + length:
                    kind, body = self.buf[0], bytes(self.buf[5 : 1 + length])
                    del self.buf[: 1 + length]
                    return kind, body
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("proxy closed the connection")
            self.buf += chunk

    def read_until(self, last: int) -> list[tuple[int, bytes]]:
        frames = []
        while True:
            kind, body = self.frame()
            frames.append((kind, body))
            if kind == last:
                return frames

    def close(self) -> None:
        try:
            self.sock.sendall(codec.terminate())
        except OSError:
            pass
        self.sock.close()


def _send_cancel_request(port: int, pid: int, secret: int) -> None:
    """A CancelRequest on its own connection: int32 16, int32 80877102, pid, secret."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!iiii", 16, 80877102, pid, secret))
        assert sock.recv(1) == b""  # answered by closing the connection, like Postgres


def _data_row_values(body: bytes) -> list[str | None]:
    n = int.from_bytes(body[:2], "big")
    pos, values = 2, []
    for _ in range(n):
        size = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        if size < 0:
            values.append(None)
            continue
        values.append(body[pos : pos + size].decode())
        pos += size
    return values


# ------------------------------------------------------------------------------ COPY

def _projects(proxy: ProxyProcess, slug: str) -> list[str]:
    tenant = proxy.env.tenants[slug]
    return tenant.rows[f"{tenant.schema}.projects"]


def test_psycopg_copy_from_stdin_writes_into_the_tenants_own_schema(proxy: ProxyProcess) -> None:
    with _psycopg(proxy, "globex") as conn:
        cur = conn.cursor()
        with cur.copy("COPY projects (name) FROM STDIN") as copy:
            for i in range(100):
                copy.write_row((f"globex: copied {i}",))
        assert cur.rowcount == 100
        names = [r[0] for r in conn.execute("SELECT name FROM projects")]
        assert len(names) == 100 + len(_projects(proxy, "globex"))
        assert all(n.startswith("globex: ") for n in names)
        conn.rollback()
        assert sorted(r[0] for r in conn.execute("SELECT name FROM projects")) == _projects(
            proxy, "globex")
    with _psycopg(proxy, "hooli") as conn:  # another tenant's schema is out of reach
        schema = proxy.env.tenants["globex"].schema
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.cursor().copy(f"COPY {schema}.projects (name) FROM STDIN") as copy:
                copy.write_row(("hooli: smuggled",))


def test_copy_from_into_an_rls_table_is_refused_by_postgres(proxy: ProxyProcess) -> None:
    """Postgres refuses COPY FROM into a table with row-level security (0A000), so SME
    tenants (shared tables, FORCE RLS) load rows with INSERT; the session goes on."""
    org = _org(proxy, "acme")
    with _psycopg(proxy, "acme") as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="row-level security"):
            with conn.cursor().copy("COPY campaigns (org_id, name) FROM STDIN") as copy:
                copy.write_row((org, "acme: never"))
        conn.rollback()
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO campaigns (org_id, name) VALUES (%s, %s)",
                            [(org, f"acme: many {i}") for i in range(20)])
        assert conn.execute("SELECT count(*) FROM campaigns").fetchone() == (
            20 + len(_campaigns(proxy, "acme")),)
        conn.rollback()


@pytest.mark.parametrize("sql", [
    "COPY (SELECT org_id, name FROM campaigns ORDER BY name) TO STDOUT",
    "COPY campaigns (org_id, name) TO STDOUT",
])
def test_psycopg_copy_to_stdout_reads_only_own_rows(proxy: ProxyProcess, sql: str) -> None:
    for slug in ("acme", "initech"):
        with _psycopg(proxy, slug, autocommit=True) as conn:
            with conn.cursor().copy(sql) as copy:
                rows = list(copy.rows())
            assert sorted(r[1] for r in rows) == _campaigns(proxy, slug)
            assert {r[0] for r in rows} == {_org(proxy, slug)}
            # The server went back to the pool: the next transaction has its context.
            assert conn.execute("SELECT current_setting('app.tenant_id')").fetchone() == (
                _org(proxy, slug),)


@pytest.mark.parametrize("autocommit", [True, False])
def test_psycopg_copy_fail_errors_and_the_session_goes_on(
    proxy: ProxyProcess, autocommit: bool,
) -> None:
    org = _org(proxy, "globex")
    with _psycopg(proxy, "globex", autocommit=autocommit) as conn:
        cur = conn.cursor()
        # An exception inside the block makes psycopg send CopyFail (the server answers
        # 57014, which psycopg consumes) and re-raise the exception.
        with pytest.raises(RuntimeError, match="stop here"):
            with cur.copy("COPY projects (name) FROM STDIN") as copy:
                copy.write_row(("globex: never",))
                raise RuntimeError("stop here")
        if not autocommit:
            conn.rollback()
        assert conn.execute("SELECT count(*), current_setting('app.tenant_id') "
                            "FROM projects").fetchone() == (len(_projects(proxy, "globex")), org)


def test_large_copy_to_stdout_is_streamed_not_buffered(start_proxy) -> None:
    proxy = start_proxy(pool_size=2)
    payload = 50_000 * 1001  # ~50 MB: 50,000 lines of 1,000 bytes + newline
    with _psycopg(proxy, "acme", autocommit=True) as conn:
        conn.execute("SELECT 1")  # warm up: login, a server, the first transaction
        before = peak = _rss_kib(proxy.proc.pid)
        total = 0
        with conn.cursor().copy(
            "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 50000)) TO STDOUT"
        ) as copy:
            for i, chunk in enumerate(copy):
                total += len(chunk)
                if i % 2000 == 0:
                    peak = max(peak, _rss_kib(proxy.proc.pid))
        peak = max(peak, _rss_kib(proxy.proc.pid))
        assert total == payload
        assert conn.execute("SELECT current_setting('app.tenant_id')").fetchone() == (
            _org(proxy, "acme"),)
    growth = (peak - before) * 1024
    assert growth < payload // 5, f"proxy RSS grew by {growth} bytes for a {payload}-byte COPY"


async def test_asyncpg_copy_records_to_table_and_copy_from_query(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn("hooli"), statement_cache_size=0)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            result = await conn.copy_records_to_table(
                "projects", records=[(f"hooli: rec {i}",) for i in range(50)], columns=["name"])
            assert result == "COPY 50"
            chunks: list[bytes] = []

            async def sink(data: bytes) -> None:
                chunks.append(data)

            await conn.copy_from_query("SELECT name FROM projects ORDER BY name", output=sink)
            lines = b"".join(chunks).decode().splitlines()
            assert len(lines) == 50 + len(_projects(proxy, "hooli"))
            assert all(line.startswith("hooli: ") for line in lines)
        finally:
            await tx.rollback()
        assert await conn.fetchval("SELECT count(*) FROM projects") == len(
            _projects(proxy, "hooli"))
    finally:
        await conn.close()
    conn = await asyncpg.connect(proxy.dsn("acme"), statement_cache_size=0)
    try:
        chunks.clear()
        await conn.copy_from_query("SELECT org_id, name FROM campaigns", output=sink)
        lines = b"".join(chunks).decode().splitlines()
        assert sorted(line.split("\t")[1] for line in lines) == _campaigns(proxy, "acme")
        assert {line.split("\t")[0] for line in lines} == {_org(proxy, "acme")}
        # COPY FROM into an RLS table: Postgres's refusal, outside an explicit transaction.
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="row-level security"):
            await conn.copy_records_to_table("campaigns", records=[(_org(proxy, "acme"), "x")],
                                             columns=["org_id", "name"])
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == len(
            _campaigns(proxy, "acme"))
    finally:
        await conn.close()


def test_psycopg_large_copy_from_stdin_is_streamed_not_buffered(start_proxy) -> None:
    proxy = start_proxy(pool_size=2)
    line = ("globex: " + "z" * 992 + "\n").encode()  # 1,001 bytes
    with _psycopg(proxy, "globex") as conn:
        conn.execute("SELECT 1")
        before = peak = _rss_kib(proxy.proc.pid)
        with conn.cursor().copy("COPY projects (name) FROM STDIN") as copy:
            block = line * 1000
            for i in range(50):  # ~50 MB
                copy.write(block)
                if i % 5 == 0:
                    peak = max(peak, _rss_kib(proxy.proc.pid))
        peak = max(peak, _rss_kib(proxy.proc.pid))
        assert conn.execute("SELECT count(*) FROM projects").fetchone() == (
            50_000 + len(_projects(proxy, "globex")),)
        conn.rollback()
    growth = (peak - before) * 1024
    assert growth < 50_000_000 // 5, f"proxy RSS grew by {growth} bytes for a 50 MB COPY"


def test_extended_protocol_copy_from_stdin_keeps_the_link_in_step(start_proxy) -> None:
    # Postgres ignores a Sync received in copy-in mode, so a client that started COPY with
    # Parse/Bind/Execute/Sync sends one more Sync after CopyDone and gets one ReadyForQuery.
    proxy = start_proxy(pool_size=1, extra="query_wait_timeout = 2.0")
    raw = RawClient(proxy, "globex")
    raw.sock.settimeout(3)
    try:
        raw.send(codec.query("BEGIN"))
        assert raw.read_until(_Z)[-1] == (_Z, b"T")
        raw.send(codec.parse("", "COPY projects (name) FROM STDIN") + codec.bind("", "", [])
                 + codec.execute("", 0) + codec.sync())
        assert [chr(k) for k, _ in raw.read_until(ord("G"))] == ["1", "2", "G"]
        raw.send(codec.frame(ord("d"), b"globex: extended copy\n") + codec.frame(ord("c"), b"")
                 + codec.sync())
        assert [(chr(k), b) for k, b in raw.read_until(_Z)] == [("C", b"COPY 1\x00"),
                                                                 ("Z", b"T")]
        raw.send(codec.query("ROLLBACK"))
        assert [chr(k) for k, _ in raw.read_until(_Z)] == ["C", "Z"]
        raw.send(codec.query("SELECT current_setting('app.tenant_id')"))
        frames = raw.read_until(_Z)  # today: held forever (times out)
        # Outside a transaction block the injected context row (tenant id, type,
        # app.tenant_sig, search_path, role) arrived first, as a result set of its own.
        assert [chr(k) for k, _ in frames] == ["T", "D", "C", "Z"]
        assert _data_row_values(frames[1][1]) == [_org(proxy, "globex")]
        # And the only server went back to the pool: another tenant gets it.
        with _psycopg(proxy, "hooli", autocommit=True) as other:
            assert other.execute("SELECT count(*) FROM projects").fetchone() == (
                len(_projects(proxy, "hooli")),)
    finally:
        raw.close()


# ------------------------------------------------------------------------------ cancel

@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_psycopg_cancel_ends_a_running_query(proxy: ProxyProcess, method: str,
                                             autocommit: bool) -> None:
    with _psycopg(proxy, "acme", autocommit=autocommit) as conn:
        timer = threading.Timer(0.5, getattr(conn, method))
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled) as info:
                conn.execute("SELECT pg_sleep(10)")
        finally:
            timer.join()
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - started < 5
        if not autocommit:
            conn.rollback()
        assert conn.execute("SELECT current_setting('app.tenant_id')").fetchone() == (
            _org(proxy, "acme"),)


async def test_asyncpg_timeout_cancels_the_running_query(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn("initech"), statement_cache_size=0)
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(10.01)", timeout=0.5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(10.01)"), 0.5)
        # asyncpg waits for the cancelled query's ReadyForQuery before the next one.
        assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == _org(
            proxy, "initech")
        assert time.monotonic() - started < 6
        assert await asyncio.to_thread(_active_queries, proxy, "pg_sleep(10.01)") == []
    finally:
        await conn.close()


async def test_asyncpg_task_cancellation_inside_a_transaction(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn("initech"), statement_cache_size=0)
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            async with conn.transaction():
                task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(10.02)"))
                await asyncio.sleep(0.5)
                task.cancel()
                await task
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == len(
            _campaigns(proxy, "initech"))
        assert time.monotonic() - started < 6
        assert await asyncio.to_thread(_active_queries, proxy, "pg_sleep(10.02)") == []
    finally:
        await conn.close()


def test_cancel_key_of_an_idle_client_does_not_cancel_another_tenant(start_proxy) -> None:
    # One server: tenant B's query runs on the very backend client A used a moment ago.
    proxy = start_proxy(pool_size=1)
    a, b = RawClient(proxy, "acme"), RawClient(proxy, "initech")
    try:
        a.send(codec.query("SELECT pg_backend_pid()"))
        a_backend = next(_data_row_values(body)[0] for kind, body in a.read_until(_Z)
                         if kind == ord("D"))
        b.send(codec.query("SELECT pg_backend_pid()::text, pg_sleep(1.5)::text"))
        time.sleep(0.4)
        # A is idle (no server): its key must reach nobody, least of all B's backend.
        _send_cancel_request(proxy.port, a.pid, a.secret)
        _send_cancel_request(proxy.port, a.pid, a.secret ^ 1)  # a wrong secret: nothing
        _send_cancel_request(proxy.port, b.pid, b.secret ^ 1)
        frames = b.read_until(_Z)
        assert [k for k, _ in frames if k == ord("E")] == []
        assert [_data_row_values(body) for kind, body in frames if kind == ord("D")] == [
            [a_backend, ""]]
        # The positive control: B's own key cancels B's query.
        b.send(codec.query("SELECT pg_sleep(10)"))
        time.sleep(0.4)
        _send_cancel_request(proxy.port, b.pid, b.secret)
        started = time.monotonic()
        frames = b.read_until(_Z)
        assert time.monotonic() - started < 3
        errors = [dict(codec.parse_error_fields(body)) for kind, body in frames
                  if kind == ord("E")]
        assert [e[ord("C")] for e in errors] == [b"57014"]
    finally:
        a.close()
        b.close()


def test_cancel_of_a_query_waiting_for_a_server_ends_it(start_proxy) -> None:
    proxy = start_proxy(pool_size=1)
    holder = _psycopg(proxy, "initech")
    waiter = RawClient(proxy, "acme")
    waiter.sock.settimeout(3)
    try:
        holder.execute("SELECT 1")  # an open transaction holds the only server
        waiter.send(codec.query("SELECT 42"))
        time.sleep(0.3)
        _send_cancel_request(proxy.port, waiter.pid, waiter.secret)
        frames = waiter.read_until(_Z)  # Postgres would answer at once: 57014
        errors = [dict(codec.parse_error_fields(body)) for kind, body in frames
                  if kind == ord("E")]
        assert [e[ord("C")] for e in errors] == [b"57014"]
        assert not [k for k, _ in frames if k == ord("D")]
    finally:
        holder.rollback()
        holder.close()
        waiter.close()


# ------------------------------------------------------------------------------ notices

def test_psycopg_sees_its_own_notices_and_none_from_the_proxy(proxy: ProxyProcess) -> None:
    notices: list[tuple[str, str | None, str | None]] = []
    with _psycopg(proxy, "acme", autocommit=True) as conn:
        conn.add_notice_handler(
            lambda d: notices.append((d.severity_nonlocalized, d.sqlstate, d.message_primary)))
        # Ordinary traffic, both protocols, in and out of transactions: no notice at all.
        conn.execute("SELECT 1")
        conn.execute("SELECT %s::int", (1,))
        conn.execute("SELECT 1; SELECT 2")
        with conn.transaction():
            conn.execute("SELECT count(*) FROM campaigns")
            conn.execute("SELECT %s::text", ("x",))
        assert notices == []
        # The client's own statements' notices reach it, once each.
        conn.execute("DROP TABLE IF EXISTS pgtenant_compat_no_such_table")
        assert notices == [("NOTICE", "00000",
                            'table "pgtenant_compat_no_such_table" does not exist, skipping')]
        notices.clear()
        with conn.transaction():
            conn.execute("DROP TABLE IF EXISTS pgtenant_compat_no_such_table")
            conn.execute("SELECT count(*) FROM campaigns")
        assert [n[1] for n in notices] == ["00000"]


async def test_asyncpg_sees_its_own_notices_and_none_from_the_proxy(
    proxy: ProxyProcess,
) -> None:
    messages: list[tuple[str, str]] = []
    conn = await asyncpg.connect(proxy.dsn("initech"), statement_cache_size=0)
    try:
        conn.add_log_listener(lambda _c, msg: messages.append((msg.sqlstate, msg.message)))
        await conn.execute("SELECT 1")  # simple protocol
        await conn.fetchval("SELECT $1::int", 1)  # extended protocol
        async with conn.transaction():
            await conn.fetch("SELECT name FROM campaigns")
        await asyncio.sleep(0.05)  # listeners are called soon, not at once
        assert messages == []
        await conn.execute("DROP TABLE IF EXISTS pgtenant_compat_no_such_table")
        await asyncio.sleep(0.05)
        assert messages == [("00000",
                             'table "pgtenant_compat_no_such_table" does not exist, skipping')]
    finally:
        await conn.close()


def test_listen_and_notify_work_per_tenant_or_are_refused_clearly(
    proxy: ProxyProcess,
) -> None:
    """Channels are database-wide, so pgtenant maps each tenant's to its own (issue 15):
    LISTEN/NOTIFY work as the only statement of a query, pg_notify() runs as
    pgtenant.pg_notify, and what cannot be mapped is refused clearly (issue #4: each
    feature works or is refused clearly)."""
    channel = f"pgtenant_compat_{uuid.uuid4().hex[:8]}"
    with _psycopg(proxy, "acme", autocommit=True) as conn:
        conn.execute(f"LISTEN {channel}")
        conn.execute(f"NOTIFY {channel}, 'x'")
        conn.execute(f"SELECT pgtenant.pg_notify('{channel}', 'y')")
        conn.execute(f"SELECT pg_notify('{channel}', 'z')")
        got = [(n.channel, n.payload) for n in conn.notifies(timeout=2.0, stop_after=3)]
        assert got == [(channel, "x"), (channel, "y"), (channel, "z")]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgtenant"):
            conn.execute(f"SELECT 1; LISTEN {channel}")
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on


# ------------------------------------------------------------------------------ flow control

def test_flush_without_sync_gets_the_replies_so_far(proxy: ProxyProcess) -> None:
    org = _org(proxy, "acme")
    flush = codec.frame(ord("H"), b"")
    raw = RawClient(proxy, "acme")
    try:
        for _ in range(2):  # a fresh server each time: the first message of a transaction
            raw.send(codec.parse("", "SELECT current_setting('app.tenant_id'), current_user")
                     + codec.bind("", "", []) + codec.execute("", 0) + flush)
            frames = raw.read_until(ord("C"))  # arrives with no Sync sent
            assert [chr(k) for k, _ in frames] == ["1", "2", "D", "C"]
            assert _data_row_values(frames[2][1]) == [org, "tenant_sme"]
            raw.send(codec.sync())
            assert raw.read_until(_Z) == [(_Z, b"I")]
        # Inside a transaction block too, and a Describe answered before the Sync.
        raw.send(codec.query("BEGIN"))
        raw.read_until(_Z)
        raw.send(codec.parse("s1", "SELECT count(*) FROM campaigns")
                 + codec.frame(ord("D"), b"Ss1\x00") + flush)
        frames = raw.read_until(ord("T"))
        assert [chr(k) for k, _ in frames] == ["1", "t", "T"]
        raw.send(codec.bind("", "s1", []) + codec.execute("", 0) + flush)
        frames = raw.read_until(ord("C"))
        assert _data_row_values(frames[1][1]) == [str(len(_campaigns(proxy, "acme")))]
        raw.send(codec.sync() + codec.query("COMMIT"))
        raw.read_until(_Z)
        assert raw.read_until(_Z)[-1] == (_Z, b"I")
    finally:
        raw.close()


def test_slow_reader_of_a_large_result_is_not_buffered_by_the_proxy(start_proxy) -> None:
    proxy = start_proxy(pool_size=2)
    rows, width = 32_000, 1000  # ~32 MB: more than the kernel's socket buffers can hold
    sql = f"SELECT repeat('y', {width}) FROM generate_series(1, {rows})"
    raw = RawClient(proxy, "initech", rcvbuf=64 * 1024)
    try:
        raw.send(codec.query("SELECT 1"))
        raw.read_until(_Z)
        before = _rss_kib(proxy.proc.pid)
        raw.send(codec.query(sql))
        time.sleep(1.5)  # read nothing: the proxy must stop reading from the server
        stalled = _rss_kib(proxy.proc.pid)
        # Postgres itself is blocked writing to the proxy.
        assert _active_queries(proxy, f"generate_series(1, {rows})") == [("active", "ClientWrite")]
        count = 0
        peak = stalled
        while True:
            kind, _ = raw.frame()
            if kind == ord("D"):
                count += 1
                if count % 4000 == 0:
                    peak = max(peak, _rss_kib(proxy.proc.pid))
                    time.sleep(0.02)  # a slow reader
            elif kind == _Z:
                break
        assert count == rows
        payload = rows * (width + 11)
        growth = (max(peak, stalled) - before) * 1024
        assert growth < payload // 4, f"proxy RSS grew by {growth} bytes for {payload} bytes"
    finally:
        raw.close()


# ------------------------------------------------------------------------------ cursors

def test_psycopg_named_cursor_fetches_own_rows_in_batches(proxy: ProxyProcess) -> None:
    org = _org(proxy, "acme")
    with _psycopg(proxy, "acme") as conn:
        conn.execute("INSERT INTO campaigns (org_id, name) SELECT %s, 'acme: bulk ' || g "
                     "FROM generate_series(1, 95) g", (org,))
        with conn.cursor(name="c") as cur:
            cur.itersize = 10
            cur.execute("SELECT org_id::text, name FROM campaigns ORDER BY name")
            batches = []
            while batch := cur.fetchmany(7):
                batches.append(batch)
        rows = [r for b in batches for r in b]
        total = 95 + len(_campaigns(proxy, "acme"))
        assert len(rows) == total and len(batches) == -(-total // 7)
        assert {r[0] for r in rows} == {org}
        assert conn.execute("SELECT current_setting('app.tenant_id')").fetchone() == (org,)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM campaigns").fetchone() == (
            len(_campaigns(proxy, "acme")),)


async def test_asyncpg_cursor_in_a_transaction(proxy: ProxyProcess) -> None:
    org = proxy.env.tenants["initech"].org_id
    conn = await asyncpg.connect(proxy.dsn("initech"), statement_cache_size=0)
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO campaigns (org_id, name) SELECT $1, 'initech: b' || g "
                               "FROM generate_series(1, 40) g", org)
            seen = [r async for r in conn.cursor("SELECT org_id, name FROM campaigns",
                                                 prefetch=6)]
            assert len(seen) == 40 + len(_campaigns(proxy, "initech"))
            assert {r["org_id"] for r in seen} == {org}
            cur = await conn.cursor("SELECT name FROM campaigns ORDER BY name")
            first = await cur.fetch(5)
            await cur.forward(30)
            rest = await cur.fetch(100)
            assert len(first) + 30 + len(rest) == len(seen)
            await conn.execute("DELETE FROM campaigns WHERE name LIKE 'initech: b%'")
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == len(
            _campaigns(proxy, "initech"))
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ SQLAlchemy 2

class _Base(DeclarativeBase):
    pass


class Campaign(_Base):
    """public.campaigns; org_id defaults to the tenant of the transaction's context."""

    __tablename__ = "campaigns"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True,
                                          server_default=sa.text("gen_random_uuid()"))
    org_id: Mapped[uuid.UUID] = mapped_column(
        default=sa.cast(sa.func.current_setting("app.tenant_id"), sa.Uuid))
    name: Mapped[str]
    budget: Mapped[decimal.Decimal | None]


def _sa_url(proxy: ProxyProcess, slug: str, driver: str) -> sa.URL:
    return sa.URL.create(f"postgresql+{driver}", username=slug,
                         password=proxy.env.tenants[slug].token, host="127.0.0.1",
                         port=proxy.port, database="app")


def _admin_rows(proxy: ProxyProcess, like: str) -> list[tuple[str, str, decimal.Decimal]]:
    with psycopg.connect(proxy.env.admin_dsn, autocommit=True) as admin:
        return admin.execute("SELECT org_id::text, name, budget FROM public.campaigns "
                             "WHERE name LIKE %s ORDER BY name", (like,)).fetchall()


def _admin_delete(proxy: ProxyProcess, like: str) -> None:
    with psycopg.connect(proxy.env.admin_dsn, autocommit=True) as admin:
        admin.execute("DELETE FROM public.campaigns WHERE name LIKE %s", (like,))


@pytest.fixture
def orm_tag(proxy: ProxyProcess) -> Iterator[str]:
    tag = f"acme: orm {uuid.uuid4().hex[:8]}"
    yield tag
    _admin_delete(proxy, tag + "%")


def test_sqlalchemy_sync_orm_workload_stays_in_its_tenant(proxy: ProxyProcess,
                                                          orm_tag: str) -> None:
    # prepare_threshold=None until issue #4; the default pool (reset on return = ROLLBACK)
    # needs nothing else.
    engine = sa.create_engine(_sa_url(proxy, "acme", "psycopg"),
                              connect_args={"prepare_threshold": None})
    other = sa.create_engine(_sa_url(proxy, "initech", "psycopg"),
                             connect_args={"prepare_threshold": None})
    org = _org(proxy, "acme")
    mine = Campaign.name.like(orm_tag + "%")
    try:
        with Session(engine) as s, s.begin():
            s.add_all([Campaign(name=f"{orm_tag} {i}", budget=i) for i in range(3)])
        assert [(r[0], r[2]) for r in _admin_rows(proxy, orm_tag + "%")] == [
            (org, 0), (org, 1), (org, 2)]
        with Session(engine) as s:
            everything = s.scalars(sa.select(Campaign).order_by(Campaign.name)).all()
            assert {str(c.org_id) for c in everything} == {org}
            assert len(everything) == 3 + len(_campaigns(proxy, "acme"))
        with Session(engine) as s, s.begin():
            s.execute(sa.update(Campaign).where(mine).values(budget=Campaign.budget + 100))
            first = s.scalars(sa.select(Campaign).where(mine).order_by(Campaign.name)).first()
            assert first is not None
            first.budget = decimal.Decimal(7)
        assert [r[2] for r in _admin_rows(proxy, orm_tag + "%")] == [7, 101, 102]
        with Session(other) as s, s.begin():
            assert s.scalars(sa.select(Campaign).where(mine)).all() == []
            assert all(c.name.startswith("initech: ")
                       for c in s.scalars(sa.select(Campaign)).all())
            assert s.execute(sa.update(Campaign).where(mine).values(budget=0)).rowcount == 0
            assert s.execute(sa.delete(Campaign).where(mine)).rowcount == 0
        with Session(engine) as s, s.begin():
            for c in s.scalars(sa.select(Campaign).where(mine)).all():
                s.delete(c)
        assert _admin_rows(proxy, orm_tag + "%") == []
    finally:
        engine.dispose()
        other.dispose()


async def test_sqlalchemy_async_orm_workload_stays_in_its_tenant(proxy: ProxyProcess,
                                                                 orm_tag: str) -> None:
    # asyncpg: statement_cache_size=0, and SQLAlchemy's own prepared-statement cache off
    # (prepared_statement_cache_size=0), until issue #4. SQLAlchemy connects with
    # asyncpg.connect (not asyncpg's pool, whose reset query holds RESET ALL), and its pool
    # resets with ROLLBACK, which the proxy allows: the default pool works as is.
    args = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    engine = create_async_engine(_sa_url(proxy, "acme", "asyncpg"), connect_args=args)
    other = create_async_engine(_sa_url(proxy, "initech", "asyncpg"), connect_args=args)
    org = _org(proxy, "acme")
    mine = Campaign.name.like(orm_tag + "%")
    try:
        async with AsyncSession(engine) as s, s.begin():
            s.add_all([Campaign(name=f"{orm_tag} {i}", budget=i) for i in range(3)])
        rows = await asyncio.to_thread(_admin_rows, proxy, orm_tag + "%")
        assert [(r[0], r[2]) for r in rows] == [(org, 0), (org, 1), (org, 2)]
        async with AsyncSession(engine) as s:
            everything = (await s.scalars(sa.select(Campaign))).all()
            assert {str(c.org_id) for c in everything} == {org}
            assert len(everything) == 3 + len(_campaigns(proxy, "acme"))
        async with AsyncSession(engine) as s, s.begin():
            await s.execute(sa.update(Campaign).where(mine).values(budget=Campaign.budget + 100))
            first = (await s.scalars(
                sa.select(Campaign).where(mine).order_by(Campaign.name))).first()
            assert first is not None
            first.budget = decimal.Decimal(7)
        rows = await asyncio.to_thread(_admin_rows, proxy, orm_tag + "%")
        assert [r[2] for r in rows] == [7, 101, 102]
        async with AsyncSession(other) as s, s.begin():
            assert (await s.scalars(sa.select(Campaign).where(mine))).all() == []
            assert (await s.execute(sa.delete(Campaign).where(mine))).rowcount == 0
        async with AsyncSession(engine) as s, s.begin():
            for c in (await s.scalars(sa.select(Campaign).where(mine))).all():
                await s.delete(c)
        assert await asyncio.to_thread(_admin_rows, proxy, orm_tag + "%") == []
    finally:
        await engine.dispose()
        await other.dispose()


async def _backend_pids(engine: object, n: int) -> set[int]:
    pids = set()
    for _ in range(n):
        async with AsyncSession(engine) as s:  # type: ignore[call-overload]
            pids.add((await s.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
    return pids


def test_sqlalchemy_sync_engine_reuses_pooled_servers(proxy: ProxyProcess) -> None:
    engine = sa.create_engine(_sa_url(proxy, "initech", "psycopg"),
                              connect_args={"prepare_threshold": None})
    try:
        pids = set()
        for _ in range(8):
            with Session(engine) as s:
                pids.add(s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        assert len(pids) <= 4  # the proxy's pool_size: no server was retired
    finally:
        engine.dispose()


@pytest.mark.parametrize("args", [
    {"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    {"statement_cache_size": 0},
], ids=["no-caches", "sqlalchemy-cache"])
async def test_sqlalchemy_async_engine_reuses_pooled_servers(proxy: ProxyProcess,
                                                             args: dict[str, int]) -> None:
    # With statement_cache_size=0 asyncpg's prepare() uses the unnamed statement, so
    # SQLAlchemy's dialect leaves no session state and servers go back to the pool.
    engine = create_async_engine(_sa_url(proxy, "initech", "asyncpg"), connect_args=args)
    try:
        assert len(await _backend_pids(engine, 8)) <= 4
        async with AsyncSession(engine) as s:  # the same statements again, in new transactions
            for _ in range(3):
                assert (await s.scalars(sa.select(Campaign.name).order_by(Campaign.name))).all(
                ) == _campaigns(proxy, "initech")
                await s.commit()
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------ issue #4 gaps




async def test_asyncpg_statement_cache_across_transactions(start_proxy) -> None:
    proxy = start_proxy(pool_size=2)
    conn = await asyncpg.connect(proxy.dsn("acme"))  # default statement cache
    try:
        for _ in range(2):
            async with conn.transaction():
                assert await conn.fetchval("SELECT count(*) FROM campaigns") == len(
                    _campaigns(proxy, "acme"))
    finally:
        await conn.close()


def test_pgbench_prepared_mode(proxy: ProxyProcess, tmp_path: Path) -> None:
    exe = _tool("pgbench")
    if exe is None:
        pytest.skip("pgbench is not installed")
    tenant = proxy.env.tenants["acme"]
    script = tmp_path / "prepared.sql"
    script.write_text(f"SELECT 1/(count(*) = {len(_campaigns(proxy, 'acme'))})::int "
                      "FROM campaigns;\n")
    out = subprocess.run(
        [exe, "-n", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "acme", "-M", "prepared",
         "-c", "4", "-t", "20", "-f", str(script), "app"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PGPASSWORD": tenant.token},
    )
    assert out.returncode == 0, out.stderr + out.stdout
    assert "number of transactions actually processed: 80/80" in out.stdout


def test_psycopg_prepare_threshold_zero(proxy: ProxyProcess) -> None:
    with psycopg.connect(**proxy.conninfo("acme"), prepare_threshold=0) as conn:
        for _ in range(2):
            assert conn.execute("SELECT count(*) FROM campaigns").fetchone() == (
                len(_campaigns(proxy, "acme")),)
            conn.commit()



async def test_tenants_sharing_a_prepared_statement_each_see_only_their_rows(
    start_proxy,
) -> None:
    """One server, two SME tenants, asyncpg's default statement cache: the same text is one
    global statement on that server, and RLS still filters per tenant at every execution."""
    proxy = start_proxy(pool_size=1)
    sql = "SELECT name FROM campaigns ORDER BY name"
    conns = {slug: await asyncpg.connect(proxy.dsn(slug)) for slug in ("acme", "initech")}
    try:
        for _ in range(3):
            for slug, conn in conns.items():
                rows = [r["name"] for r in await conn.fetch(sql)]
                assert rows == _campaigns(proxy, slug), slug
        pids = {await c.fetchval("SELECT pg_backend_pid()") for c in conns.values()}
        assert len(pids) == 1  # really one backend, reused, not retired
    finally:
        for conn in conns.values():
            await conn.close()


async def test_schema_per_tenant_prepared_statements_are_not_shared(start_proxy) -> None:
    """Same text, different search_path: different global statements (no shared plans)."""
    proxy = start_proxy(pool_size=1)
    for _ in range(2):
        for slug in ("globex", "hooli"):
            conn = await asyncpg.connect(proxy.dsn(slug))
            try:
                rows = [r["name"] for r in await conn.fetch("SELECT name FROM projects")]
                assert rows and all(r.startswith(f"{slug}: ") for r in rows), rows
            finally:
                await conn.close()


async def test_statement_whose_result_type_changed_after_ddl_is_prepared_again(
    start_proxy,
) -> None:
    """After ALTER TABLE, Postgres refuses the old plan once ("cached plan must not change
    result type"); asyncpg re-prepares by itself, and that Parse must really reach the
    server (pgtenant had answered it from its cache before, failing forever)."""
    proxy = start_proxy(pool_size=1)
    schema = proxy.env.tenants["globex"].schema
    admin = await asyncpg.connect(proxy.env.admin_dsn)
    await admin.execute(f"DROP TABLE IF EXISTS {schema}.shape; "
                        f"CREATE TABLE {schema}.shape (a int); "
                        f"INSERT INTO {schema}.shape VALUES (1); "
                        f"GRANT SELECT ON {schema}.shape TO {schema}")
    conn = await asyncpg.connect(proxy.dsn("globex"))  # default statement cache
    try:
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM shape")] == [(1,)]
        await admin.execute(f"ALTER TABLE {schema}.shape ADD COLUMN b int DEFAULT 2")
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM shape")] == [(1, 2)]
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM shape")] == [(1, 2)]
    finally:
        await conn.close()
        await admin.execute(f"DROP TABLE {schema}.shape")
        await admin.close()


def test_plan_change_after_ddl_is_healed_for_clients_that_describe(start_proxy) -> None:
    """psycopg's prepared execution (libpq: Bind, Describe portal, Execute, Sync) learns the
    row shape from every execution: pgtenant hides the plan-change error, re-prepares once
    and returns the rows of the new shape. Direct Postgres would hand the error over."""
    proxy = start_proxy(pool_size=1)
    schema = proxy.env.tenants["globex"].schema
    with psycopg.connect(proxy.env.admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {schema}.shape2")
        admin.execute(f"CREATE TABLE {schema}.shape2 (a int)")
        admin.execute(f"INSERT INTO {schema}.shape2 VALUES (1)")
        admin.execute(f"GRANT SELECT ON {schema}.shape2 TO {schema}")
        try:
            with psycopg.connect(**proxy.conninfo("globex"), prepare_threshold=0,
                                 autocommit=True) as conn:
                cur = conn.execute("SELECT * FROM shape2")
                assert cur.fetchall() == [(1,)]
                admin.execute(f"ALTER TABLE {schema}.shape2 ADD COLUMN b text DEFAULT 'x'")
                for _ in range(2):  # healed once, then the new statement is the cached one
                    cur = conn.execute("SELECT * FROM shape2")
                    assert [d.name for d in cur.description or ()] == ["a", "b"]
                    assert cur.fetchall() == [(1, "x")]
                # Still the tenant's context after the retry: its own search_path only.
                assert conn.execute("SELECT current_schema()").fetchone() == (schema,)
        finally:
            admin.execute(f"DROP TABLE {schema}.shape2")
