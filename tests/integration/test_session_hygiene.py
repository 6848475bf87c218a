"""Nothing a tenant does to its server session reaches the next tenant on that server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from .conftest import ProxyProcess, connect


async def run_then_next_tenant(proxy: ProxyProcess, sql: str) -> tuple[int, asyncpg.Record]:
    """Tenant acme runs ``sql`` on the only server; then initech takes the pool's server."""
    first = await connect(proxy, "acme")
    try:
        pid = await first.fetchval("SELECT pg_backend_pid()")
        await first.execute(sql)
    finally:
        await first.close()
    second = await connect(proxy, "initech")
    try:
        row = await second.fetchrow(
            "SELECT pg_backend_pid() AS pid, current_setting('statement_timeout') AS st, "
            "current_setting('app.tenant_id') AS t, "
            "(SELECT count(*) FROM pg_listening_channels()) AS listening, "
            "(SELECT count(*) FROM pg_cursors WHERE is_holdable) AS cursors, "
            # (The function under the view: the view shows the client's own statements.)
            "(SELECT count(*) FROM pg_prepared_statement() WHERE NOT from_sql) AS proto_stmts, "
            "(SELECT count(*) FROM pg_prepared_statement() WHERE from_sql) AS sql_stmts, "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory') AS advisory"
        )
    finally:
        await second.close()
    return pid, row


@pytest.mark.parametrize(
    "sql",
    [
        "SET statement_timeout = 1234",
        "PREPARE mine AS SELECT 1",
        "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        "SELECT pg_advisory_lock(7)",
        "SELECT pg_advisory_lock_shared(9)",
        "CREATE TEMP TABLE mine (x int)",
    ],
)
async def test_session_state_is_not_inherited_by_the_next_tenant(
    start_proxy: Callable[..., ProxyProcess], sql: str,
) -> None:
    proxy = start_proxy(pool_size=1)
    pid, row = await run_then_next_tenant(proxy, sql)
    assert row["pid"] != pid  # the dirty server was closed, not pooled
    assert row["t"] == str(proxy.env.tenants["initech"].org_id)
    assert row["st"] == "0"
    assert (row["listening"], row["cursors"], row["sql_stmts"], row["advisory"]) == (0, 0, 0, 0)


async def test_clean_transactions_reuse_the_same_server(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=1)
    pid, row = await run_then_next_tenant(proxy, "SELECT count(*) FROM campaigns")
    assert row["pid"] == pid
    assert row["proto_stmts"] == 1  # only the proxy's own context statement


async def test_a_temp_table_shadowing_a_shared_one_stays_in_its_own_session(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Tenants may create temp tables (temp_tables, on by default); one named like a shared
    table shadows it for its creator only, and ends with its creator's session."""
    proxy = start_proxy(pool_size=2)
    rows = proxy.env.tenants["initech"].rows["public.campaigns"]
    conn = await connect(proxy, "acme")
    other = await connect(proxy, "initech")
    try:
        await conn.execute("CREATE TEMP TABLE campaigns(name text)")
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == 0
        assert sorted(r["name"] for r in await other.fetch("SELECT name FROM campaigns")) \
            == rows
    finally:
        await conn.close()
    try:
        again = await connect(proxy, "acme")
        try:
            assert await again.fetchval("SELECT count(*) FROM campaigns") == len(
                proxy.env.tenants["acme"].rows["public.campaigns"])
        finally:
            await again.close()
        assert sorted(r["name"] for r in await other.fetch("SELECT name FROM campaigns")) \
            == rows
    finally:
        await other.close()


async def test_vacuum_is_refused_unless_the_tenant_type_allows_it(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    strict = start_proxy(pool_size=1)
    conn = await connect(strict, "acme")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.execute("VACUUM campaigns")
        assert "VACUUM cannot run through pgtenant" in str(info.value)
    finally:
        await conn.close()

    def allow_vacuum(text: str) -> str:
        return text.replace('[tenant_types.sme]\n',
                            '[tenant_types.sme]\nallow_outside_transaction = ["VACUUM"]\n')

    lenient = start_proxy(pool_size=1, transform=allow_vacuum)
    conn = await connect(lenient, "acme")
    try:
        before = await conn.fetchval("SELECT pg_backend_pid()")
        notices: list[str] = []
        conn.add_log_listener(lambda _c, msg: notices.append(str(msg)))
        await conn.execute("VACUUM campaigns")  # runs as tenant_sme: skipped, not owner
        assert any("skipping" in n and "campaigns" in n for n in notices), notices
        row = await conn.fetchrow("SELECT pg_backend_pid() AS pid, "
                                  "current_setting('app.tenant_id') AS t, current_user AS u")
        assert row["pid"] != before  # the server that ran it was retired
        assert (row["t"], row["u"]) == (str(lenient.env.tenants["acme"].org_id), "tenant_sme")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # still not inside a block
            async with conn.transaction():
                await conn.execute("VACUUM campaigns")
    finally:
        await conn.close()


async def test_session_state_pins_the_server_to_its_client_as_session_mode_would(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2)
    conn = await connect(proxy, "acme")
    other = await connect(proxy, "initech")
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("BEGIN; DECLARE c CURSOR WITH HOLD FOR "
                           "SELECT name FROM campaigns ORDER BY name; COMMIT")
        await conn.execute("PREPARE mine AS SELECT count(*) FROM campaigns")
        assert await conn.fetchval("SELECT pg_try_advisory_lock(77)") is True
        for _ in range(3):  # later transactions: same server, state still there
            async with conn.transaction():
                assert await conn.fetchval("SELECT pg_backend_pid()") == pid
                assert await conn.fetchval("EXECUTE mine") == len(
                    proxy.env.tenants["acme"].rows["public.campaigns"])
            assert await other.fetchval("SELECT pg_backend_pid()") != pid  # not shared
        first = await conn.fetchrow("FETCH NEXT FROM c")
        assert first["name"] == proxy.env.tenants["acme"].rows["public.campaigns"][0]
        # The lock is the client's: another session cannot take it meanwhile.
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock(77)") is False
    finally:
        await conn.close()
    try:
        for _ in range(50):  # the pinned server went away with its client (and the lock)
            if await other.fetchval("SELECT pg_try_advisory_xact_lock(77)"):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the advisory lock outlived its client")
    finally:
        await other.close()
