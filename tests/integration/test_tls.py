"""TLS on both sides of a real pgtenant process, with real drivers and a real Postgres.

Client side: psycopg (``sslmode`` require / verify-full / disable) and asyncpg (an
``SSLContext``) against a proxy offering a throwaway CA's certificate, and a proxy without
one. Backend side: a separate cluster with ``ssl = on`` whose proxy login role may log in
only over TLS (``hostssl`` / ``hostnossl reject``), so the session cluster every other test
uses is untouched.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv, build_demo
from pgtenant.protocol import codec
from pgtenant.protocol.constants import GSSENC_REQUEST_CODE, SSL_REQUEST_CODE
from pgtenant.tls import make_self_signed

from .conftest import ROOT, ProxyProcess, free_port

READ_TIMEOUT = 5.0
Certs = tuple[Path, Path, Path]


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """(ca_file, cert_file, key_file) for 127.0.0.1 and localhost."""
    return make_self_signed(tmp_path_factory.mktemp("tls-certs"), ("127.0.0.1", "localhost"))


def tls_lines(certs: Certs, *more: str) -> str:
    _, cert, key = certs
    return "\n".join(["[tls]", f'cert_file = "{cert}"', f'key_file = "{key}"', *more])


@pytest.fixture(scope="module")
def tls_proxy(demo_env: DemoEnv, certs: Certs,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy offering TLS to clients, in front of the (plaintext) session cluster."""
    proc = ProxyProcess(demo_env, tmp_path_factory.mktemp("tls-proxy"), extra=tls_lines(certs))
    yield proc
    proc.check_invariants(proc.stop())


@pytest.fixture(scope="module")
def tls_cluster(certs: Certs) -> Iterator[PostgresCluster]:
    """A cluster of its own with ``ssl = on``; the proxy role may only log in over TLS."""
    _, cert, key = certs
    cluster = PostgresCluster(ssl_cert_key=(cert, key), tls_only_roles=("pgtenant_proxy",))
    cluster.start()
    try:
        cluster.create_database("app")
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
async def tls_env(tls_cluster: PostgresCluster) -> AsyncIterator[DemoEnv]:
    yield await build_demo(tls_cluster.admin_dsn("app"))


@contextmanager
def running(env: DemoEnv, workdir: Path, extra: str) -> Iterator[ProxyProcess]:
    """A proxy for one test; its log is checked for tracebacks when it stops."""
    proc = ProxyProcess(env, workdir, extra=extra)
    try:
        yield proc
    finally:
        proc.check_invariants(proc.stop())


async def tenant_rows(conn: psycopg.AsyncConnection[tuple[str]], table: str) -> list[str]:
    cur = await conn.execute(f"SELECT name FROM {table} ORDER BY name")  # type: ignore[arg-type]
    return [row[0] for row in await cur.fetchall()]


async def backend_ssl_flags(cluster: PostgresCluster, role: str) -> list[bool]:
    """Returns: pg_stat_ssl.ssl of every backend the proxy opened (its login ``role``; not
    application_name, which is the client's own during the client's transaction)."""
    conn = await asyncpg.connect(cluster.admin_dsn("app"))
    try:
        rows = await conn.fetch(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.usename = $1", role
        )
    finally:
        await conn.close()
    return [bool(r["ssl"]) for r in rows]


async def login_error(proxy: ProxyProcess, slug: str) -> asyncpg.PostgresError:
    """Log in with asyncpg (no TLS) and expect the proxy to refuse. Returns: the error."""
    with pytest.raises(asyncpg.PostgresError) as err:
        conn = await asyncpg.connect(proxy.dsn(slug), ssl=False, statement_cache_size=0,
                                     timeout=10)
        await conn.close()
    return err.value


# ------------------------------------------------------------------------------ client side

async def test_psycopg_sslmode_require_sees_its_tenant_rows_over_tls(
    tls_proxy: ProxyProcess,
) -> None:
    async with await psycopg.AsyncConnection.connect(
        **tls_proxy.conninfo("acme"), sslmode="require"
    ) as conn:
        assert conn.pgconn.ssl_in_use
        assert await tenant_rows(conn, "campaigns") == (
            tls_proxy.env.tenants["acme"].rows["public.campaigns"]
        )


async def test_psycopg_verify_full_accepts_the_proxy_cert_signed_by_the_ca(
    tls_proxy: ProxyProcess, certs: Certs,
) -> None:
    ca, _, _ = certs
    async with await psycopg.AsyncConnection.connect(
        **tls_proxy.conninfo("globex"), sslmode="verify-full", sslrootcert=str(ca)
    ) as conn:
        assert conn.pgconn.ssl_in_use
        env = tls_proxy.env
        assert await tenant_rows(conn, "projects") == env.tenants["globex"].rows[
            "t_globex.projects"
        ]
        # Several transactions on the TLS link, each with the tenant's context.
        for _ in range(3):
            cur = await conn.execute("SELECT current_setting('app.tenant_id')")
            assert (await cur.fetchone()) == (str(env.tenants["globex"].org_id),)


async def test_psycopg_verify_full_refuses_a_proxy_cert_from_another_ca(
    tls_proxy: ProxyProcess, tmp_path: Path,
) -> None:
    other_ca, _, _ = make_self_signed(tmp_path)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        await psycopg.AsyncConnection.connect(
            **tls_proxy.conninfo("acme"), sslmode="verify-full", sslrootcert=str(other_ca),
            connect_timeout=10,
        )


async def test_asyncpg_with_an_ssl_context_sees_its_tenant_rows(
    tls_proxy: ProxyProcess, certs: Certs,
) -> None:
    ca, _, _ = certs
    context = ssl.create_default_context(cafile=str(ca))
    conn = await asyncpg.connect(tls_proxy.dsn("umbrella"), ssl=context,
                                 statement_cache_size=0)
    try:
        rows = await conn.fetch("SELECT name FROM workspace_entities ORDER BY name")
        assert [r["name"] for r in rows] == (
            tls_proxy.env.tenants["umbrella"].rows["tenant_b.workspace_entities"]
        )
        assert conn._transport.get_extra_info("sslcontext") is context  # type: ignore[attr-defined]
    finally:
        await conn.close()


async def test_sslmode_disable_still_works_on_loopback(tls_proxy: ProxyProcess) -> None:
    async with await psycopg.AsyncConnection.connect(
        **tls_proxy.conninfo("initech"), sslmode="disable"
    ) as conn:
        assert not conn.pgconn.ssl_in_use
        assert await tenant_rows(conn, "campaigns") == (
            tls_proxy.env.tenants["initech"].rows["public.campaigns"]
        )


async def test_ssl_request_is_accepted_and_gssenc_still_declined(
    tls_proxy: ProxyProcess,
) -> None:
    for code, answer in ((SSL_REQUEST_CODE, b"S"), (GSSENC_REQUEST_CODE, b"N")):
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_proxy.port)
        try:
            writer.write(struct.pack("!ii", 8, code))
            assert await asyncio.wait_for(reader.readexactly(1), READ_TIMEOUT) == answer
        finally:
            writer.close()


async def test_plaintext_after_ssl_accepted_ends_the_connection_without_hanging(
    tls_proxy: ProxyProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_proxy.port)
    try:
        writer.write(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert await asyncio.wait_for(reader.readexactly(1), READ_TIMEOUT) == b"S"
        # A StartupMessage where a TLS ClientHello belongs: the handshake fails, we close.
        writer.write(codec.startup_message([("user", "acme"), ("database", "app")]))
        try:
            rest = await asyncio.wait_for(reader.read(), READ_TIMEOUT)
        except ConnectionResetError:
            rest = b""
        assert b"acme" not in rest  # nothing in cleartext, no login went on
    finally:
        writer.close()
    for _ in range(100):  # the proxy logs it a moment after closing
        if "TlsHandshakeFailed" in tls_proxy.log():
            break
        await asyncio.sleep(0.05)
    assert "TlsHandshakeFailed" in tls_proxy.log()


async def test_proxy_without_a_cert_declines_tls_and_sslmode_require_fails_clearly(
    proxy: ProxyProcess,
) -> None:
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        await psycopg.AsyncConnection.connect(**proxy.conninfo("acme"), sslmode="require",
                                              connect_timeout=10)


def test_unreadable_cert_file_stops_the_proxy_at_start_naming_tls_cert_file(
    demo_env: DemoEnv, tmp_path: Path,
) -> None:
    config = tmp_path / "bad-tls.toml"
    config.write_text(demo_env.config_toml(
        free_port(), tls=(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"))))
    proc = subprocess.run([sys.executable, "-m", "pgtenant", "serve", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "tls.cert_file" in proc.stderr and "missing.crt" in proc.stderr


# ------------------------------------------------------------------------------ backend side

async def test_server_tls_require_logs_in_to_the_backend_over_tls(
    tls_env: DemoEnv, tls_cluster: PostgresCluster, certs: Certs, tmp_path: Path,
) -> None:
    # TLS on both legs; the big result makes both TLS transports pause and resume.
    with running(tls_env, tmp_path, tls_lines(certs, 'server_tls = "require"')) as proc:
        async with await psycopg.AsyncConnection.connect(
            **proc.conninfo("acme"), sslmode="require"
        ) as conn:
            assert conn.pgconn.ssl_in_use
            assert await tenant_rows(conn, "campaigns") == (
                tls_env.tenants["acme"].rows["public.campaigns"]
            )
            flags = await backend_ssl_flags(tls_cluster, tls_env.proxy_role)
            assert flags and all(flags), flags
            cur = await conn.execute(
                "SELECT repeat('x', 1000) FROM generate_series(1, 20000)"
            )
            assert len(await cur.fetchall()) == 20000
            assert await tenant_rows(conn, "campaigns") == (
                tls_env.tenants["acme"].rows["public.campaigns"]
            )


async def test_server_tls_verify_full_checks_the_backend_cert_against_server_ca_file(
    tls_env: DemoEnv, tls_cluster: PostgresCluster, certs: Certs, tmp_path: Path,
) -> None:
    ca, _, _ = certs
    extra = f'[tls]\nserver_tls = "verify-full"\nserver_ca_file = "{ca}"'
    with running(tls_env, tmp_path, extra) as proc:
        async with await psycopg.AsyncConnection.connect(**proc.conninfo("globex")) as conn:
            assert await tenant_rows(conn, "projects") == (
                tls_env.tenants["globex"].rows["t_globex.projects"]
            )
    other_ca, _, _ = make_self_signed(tmp_path / "other")
    extra = f'[tls]\nserver_tls = "verify-full"\nserver_ca_file = "{other_ca}"'
    with running(tls_env, tmp_path, extra) as proc:
        err = await login_error(proc, "acme")
        assert err.sqlstate == "08004"
        assert "certificate verify failed" in str(err)


async def test_server_tls_require_to_a_backend_without_tls_fails_the_client_fast(
    demo_env: DemoEnv, tmp_path: Path,
) -> None:
    with running(demo_env, tmp_path, '[tls]\nserver_tls = "require"') as proc:
        started = time.monotonic()
        err = await login_error(proc, "acme")
        assert err.sqlstate == "08004"
        assert "does not accept TLS" in str(err)
        assert time.monotonic() - started < 5


async def test_server_tls_prefer_falls_back_to_plaintext_on_a_backend_without_tls(
    demo_env: DemoEnv, tmp_path: Path,
) -> None:
    with running(demo_env, tmp_path, '[tls]\nserver_tls = "prefer"') as proc:
        async with await psycopg.AsyncConnection.connect(**proc.conninfo("acme")) as conn:
            assert await tenant_rows(conn, "campaigns") == (
                demo_env.tenants["acme"].rows["public.campaigns"]
            )
