"""Startup, token authentication and wire-protocol hygiene of a real pgtenant process.

Clients are real drivers (asyncpg, psycopg) or raw sockets speaking bytes built with
``pgtenant.protocol.codec``; every read has a timeout so a misbehaving proxy fails a test instead
of hanging it.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.control.tenants import issue_token, revoke_token
from pgtenant.protocol import codec
from pgtenant.protocol.constants import GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE

from .conftest import ProxyProcess
from .helpers import (
    assert_healthy,
    asyncpg_connect,
    data_values,
    error_fields,
    expect_fatal_and_close,
    login,
    raw_client,
    simple_query,
    startup,
    versioned_startup,
)

# Longer than the module proxy's token_cache_ttl (0.2 s): a cached lookup has expired by then.
PAST_CACHE_TTL = 0.5


# ------------------------------------------------------------------------------ tokens

async def _auth_error_asyncpg(proxy: ProxyProcess, token: str) -> tuple[str, str]:
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(proxy.dsn("acme", token=token), timeout=10)
    err = info.value
    return err.sqlstate, f"{err.message}\nHINT:  {err.hint}"


def _auth_error_psycopg(proxy: ProxyProcess, token: str) -> tuple[str | None, str]:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(**proxy.conninfo("acme", token=token), connect_timeout=10)
    text = str(info.value)
    # libpq reports 'FATAL:  <message>' (then 'HINT:  <hint>'); keep what the server said.
    assert "FATAL:  " in text, text
    return info.value.sqlstate, text.split("FATAL:  ", 1)[1].strip()


async def _expired_token(env: DemoEnv, proxy: ProxyProcess) -> str:
    token_id, token = await issue_token(env.admin_dsn, tenant_slug="acme", label="to expire")
    await assert_token_works(proxy, token)
    conn = await asyncpg.connect(env.admin_dsn)
    try:
        await conn.execute(
            "UPDATE pgtenant.tokens SET expires_at = now() - interval '1 minute' WHERE id = $1",
            token_id,
        )
    finally:
        await conn.close()
    return token


async def _revoked_token(env: DemoEnv, proxy: ProxyProcess) -> str:
    token_id, token = await issue_token(env.admin_dsn, tenant_slug="acme", label="to revoke")
    await assert_token_works(proxy, token)  # now cached in the proxy
    assert await revoke_token(env.admin_dsn, token_id)
    return token


async def assert_token_works(proxy: ProxyProcess, token: str) -> None:
    conn = await asyncpg.connect(proxy.dsn("acme", token=token), statement_cache_size=0,
                                 timeout=10)
    try:
        assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == str(
            proxy.env.tenants["acme"].org_id)
    finally:
        await conn.close()


async def test_wrong_revoked_and_expired_tokens_fail_alike(proxy: ProxyProcess) -> None:
    env = proxy.env
    real = env.tenants["acme"].token
    bad = {
        "not a token": "definitely-not-a-token",
        "wrong token": real[:-4] + ("aaaa" if not real.endswith("aaaa") else "bbbb"),
        "revoked": await _revoked_token(env, proxy),
        "expired": await _expired_token(env, proxy),
    }
    await asyncio.sleep(PAST_CACHE_TTL)  # let the cached "valid" answers expire

    asyncpg_errors = {kind: await _auth_error_asyncpg(proxy, tok) for kind, tok in bad.items()}
    psycopg_errors = {
        kind: await asyncio.to_thread(_auth_error_psycopg, proxy, tok) for kind, tok in bad.items()
    }
    # libpq keeps no SQLSTATE for a failed connection, so psycopg's is None: the text counts.
    assert {state for state, _ in asyncpg_errors.values()} == {"28P01"}, asyncpg_errors
    assert {state for state, _ in psycopg_errors.values()} == {None}, psycopg_errors
    for errors in (asyncpg_errors, psycopg_errors):
        messages = {message for _, message in errors.values()}
        assert len(messages) == 1, f"the messages tell the failures apart: {errors}"
        (message,) = messages
        assert message.startswith('password authentication failed for user "acme"'), message
    assert asyncpg_errors["wrong token"][1] == psycopg_errors["wrong token"][1]
    # The tenant's own token is untouched by all this.
    await assert_token_works(proxy, real)


async def test_user_name_is_not_trusted_the_token_decides_the_tenant(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    # any_user = ["*"] accepts every user name (else it must be the slug, test_login_match);
    # even then, and even under another tenant's slug, the token alone picks the tenant.
    proxy = start_proxy(extra='any_user = ["*"]\n')
    env = proxy.env
    for user in ("postgres", "initech", "anyone"):
        conn = await asyncpg_connect(proxy, "acme", user=user)
        try:
            row = await conn.fetchrow(
                "SELECT current_setting('app.tenant_id') AS tid, current_user AS cu, "
                "array_agg(name ORDER BY name) AS names FROM campaigns"
            )
        finally:
            await conn.close()
        assert row["tid"] == str(env.tenants["acme"].org_id)
        assert row["cu"] == env.tenants["acme"].role
        assert row["names"] == env.tenants["acme"].rows["public.campaigns"]


async def test_unknown_database_is_3D000_naming_it(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
        await asyncpg.connect(proxy.dsn("acme", dbname="no_such_db"), timeout=10)
    assert info.value.sqlstate == "3D000"
    assert "no_such_db" in str(info.value)

    def via_psycopg() -> str:
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(**{**proxy.conninfo("acme"), "dbname": "no_such_db"},
                            connect_timeout=10)
        return str(err.value)

    assert '"no_such_db"' in await asyncio.to_thread(via_psycopg)


# ------------------------------------------------------------------------------ startup bytes

async def test_ssl_request_is_declined_and_startup_continues_on_the_same_socket(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert await raw.read_exactly(1) == b"N"
        await login(raw, proxy.env, "acme")
        reply = await simple_query(raw, "SELECT current_setting('app.tenant_id')")
        assert data_values(reply) == [str(proxy.env.tenants["acme"].org_id)]
        await raw.send(codec.terminate())
        assert await raw.at_eof()


async def test_gssenc_request_is_declined(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(struct.pack("!ii", 8, GSSENC_REQUEST_CODE))
        assert await raw.read_exactly(1) == b"N"
        await login(raw, proxy.env, "initech")


async def test_protocol_2_is_refused_with_0A000(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(versioned_startup(0x00020000))
        fields = await expect_fatal_and_close(raw, "0A000")
        assert "protocol" in fields["M"]


async def test_newer_3x_minor_is_negotiated_down_to_3_0_as_postgres_does(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(versioned_startup(0x00030005))
        msg_type, body = await raw.read_message()
        assert (msg_type, body) == ("v", struct.pack("!ii", 0, 0))  # newest minor 0, no options
        msg_type, body = await raw.read_message()
        assert (msg_type, body) == ("R", struct.pack("!i", 3))  # then auth goes on as 3.0
        await raw.send(codec.password_message(proxy.env.tenants["acme"].token.encode()))
        assert (await raw.read_until("Z"))[-1] == ("Z", b"I")


@pytest.mark.parametrize("length", [4, 7, 10_001, 1 << 30], ids=["4", "7", "10001", "1GiB"])
async def test_bad_startup_packet_length_is_08P01(proxy: ProxyProcess, length: int) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(struct.pack("!ii", length, PROTOCOL_3_0))
        fields = await expect_fatal_and_close(raw, "08P01")
        assert str(length) in fields["M"]


async def test_bytes_pipelined_after_ssl_request_are_refused(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(struct.pack("!ii", 8, SSL_REQUEST_CODE) + startup("acme"))
        await expect_fatal_and_close(raw, "08P01")


async def test_non_password_message_during_auth_is_08P01(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(startup("acme"))
        assert (await raw.read_message())[0] == "R"
        await raw.send(codec.query("SELECT 1"))
        fields = await expect_fatal_and_close(raw, "08P01")
        assert "password" in fields["M"]


# ------------------------------------------------------------------------------ after login

async def test_malformed_length_ends_only_that_client(proxy: ProxyProcess) -> None:
    other = await asyncpg_connect(proxy, "initech")
    try:
        assert await other.fetchval("SELECT 1") == 1
        async with raw_client(proxy) as raw:
            await login(raw, proxy.env, "acme")
            await raw.send(b"Q" + struct.pack("!i", 2))
            await expect_fatal_and_close(raw, "08P01")
        assert await other.fetchval("SELECT current_setting('app.tenant_id')") == str(
            proxy.env.tenants["initech"].org_id)
    finally:
        await other.close()
    await assert_healthy(proxy, "acme")


async def test_message_over_max_message_size_is_08P01(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    small = start_proxy(extra="max_message_size = 8192")
    other = await asyncpg_connect(small, "initech")
    try:
        assert await other.fetchval("SELECT 1") == 1
        async with raw_client(small) as raw:
            await login(raw, small.env, "acme")
            # A query just under the limit still runs.
            reply = await simple_query(raw, "SELECT '" + "x" * 8000 + "'::text")
            assert data_values(reply) == ["x" * 8000]
            # Only the header of the oversized frame is needed to refuse it.
            await raw.send(b"Q" + struct.pack("!i", 100_000))
            fields = await expect_fatal_and_close(raw, "08P01")
            assert "max_message_size" in fields["M"]
        assert await other.fetchval("SELECT 2") == 2
    finally:
        await other.close()


async def test_function_call_message_is_refused_with_42501_and_the_session_goes_on(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        # FunctionCall: oid int32, 0 arg formats, 0 args, result format text.
        body = struct.pack("!ihhh", 1598, 0, 0, 0)  # 1598 = md5(text), irrelevant here
        await raw.send(codec.frame(ord("F"), body))
        replies = await raw.read_until("Z")
        assert [kind for kind, _ in replies] == ["E", "Z"]
        fields = error_fields(replies[0][1])
        assert (fields["C"], fields["S"]) == ("42501", "ERROR")
        assert "FunctionCall" in fields["M"]
        assert data_values(await simple_query(raw, "SELECT 'still here'")) == ["still here"]


# ------------------------------------------------------------------------------ timeouts

async def test_client_login_timeout_ends_silent_and_half_logged_in_clients(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    quick = start_proxy(extra="client_login_timeout = 1.0")

    async def silent() -> dict[str, str]:
        async with raw_client(quick) as raw:  # slow loris: sends nothing at all
            return await expect_fatal_and_close(raw, "08P01", timeout=3.0)

    async def no_password() -> dict[str, str]:
        async with raw_client(quick) as raw:
            await raw.send(startup("acme"))
            assert (await raw.read_message())[0] == "R"
            return await expect_fatal_and_close(raw, "08P01", timeout=3.0)

    started = time.monotonic()
    results = await asyncio.gather(silent(), no_password())
    assert time.monotonic() - started < 3.5
    for fields in results:
        assert "client_login_timeout" in fields["M"]
    # A client that logs in promptly is unaffected, and stays past the login timeout.
    conn = await asyncpg_connect(quick, "acme")
    try:
        await asyncio.sleep(1.5)
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ leaving

async def _idle_in_transaction(env: DemoEnv) -> int:
    conn = await asyncpg.connect(env.admin_dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2 "
            "AND state LIKE 'idle in transaction%'",
            env.proxy_role, env.dbname,
        ))
    finally:
        await conn.close()


async def _wait_no_idle_in_transaction(env: DemoEnv, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout * 10) + 1):
        count = await _idle_in_transaction(env)
        if count == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert count == 0, "a server connection was left idle in transaction"


@pytest.mark.parametrize("how", ["terminate", "drop"])
async def test_client_leaving_mid_transaction_leaves_the_proxy_healthy(
    proxy: ProxyProcess, how: str,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        reply = await simple_query(raw, "BEGIN")
        assert reply[-1] == ("Z", b"T")
        reply = await simple_query(raw, "SELECT count(*) FROM campaigns")
        assert reply[-1] == ("Z", b"T")
        assert await _idle_in_transaction(proxy.env) == 1  # the check below can see one
        if how == "terminate":
            await raw.send(codec.terminate())
            assert await raw.at_eof()
    # The abandoned transaction is rolled back, not parked on a pooled server.
    await _wait_no_idle_in_transaction(proxy.env)
    # More clients than the pool has servers: every server handed out is clean.
    conns = [await asyncpg_connect(proxy, slug) for slug in ("acme", "initech") * 3]
    try:
        results = await asyncio.gather(*(
            c.fetchval("SELECT current_setting('app.tenant_id')") for c in conns
        ))
        for slug, conn, tid in zip(("acme", "initech") * 3, conns, results, strict=True):
            assert tid == str(proxy.env.tenants[slug].org_id)
            assert not conn.is_in_transaction(), "handed a server with an open transaction"
    finally:
        for c in conns:
            await c.close()


async def test_client_dropping_with_a_query_in_flight_leaves_the_proxy_healthy(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "initech")
        await raw.send(codec.query("SELECT pg_sleep(0.3)"))
    await asyncio.sleep(0.5)
    for _ in range(3):
        await assert_healthy(proxy, "initech")
        await assert_healthy(proxy, "acme")
