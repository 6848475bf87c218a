"""Pooling and the release rule with real clients: few servers for many clients, waits that
time out, clients that vanish mid-transaction, backends that die."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from pgtenant.control.demo import DemoEnv

from .conftest import ProxyProcess, connect

SLUGS = ("acme", "initech", "umbrella", "globex", "hooli")


async def proxy_backends(env: DemoEnv) -> list[asyncpg.Record]:
    """Backends the proxy's pools opened (the registry's log in as the control role)."""
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        return await admin.fetch(
            "SELECT pid, state, xact_start FROM pg_stat_activity "
            "WHERE usename = $1", env.proxy_role,
        )
    finally:
        await admin.close()


async def test_two_servers_serve_two_hundred_clients(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2)
    env = proxy.env
    conns = await asyncio.gather(*(connect(proxy, SLUGS[i % 5]) for i in range(200)))
    peak = 0

    async def work(i: int, conn: asyncpg.Connection) -> int:
        slug = SLUGS[i % 5]
        done = 0
        for n in range(5):
            if n % 2:
                async with conn.transaction():
                    got = await conn.fetchval("SELECT current_setting('app.tenant_id')")
            else:
                got = await conn.fetchval("SELECT current_setting('app.tenant_id')")
            assert got == str(env.tenants[slug].org_id)
            done += 1
        return done

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(await proxy_backends(env)))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    try:
        results = await asyncio.gather(*(work(i, c) for i, c in enumerate(conns)))
    finally:
        watcher.cancel()
        await asyncio.gather(*(c.close() for c in conns))
    assert sum(results) == 1000
    assert 1 <= peak <= 2
    assert len(await proxy_backends(env)) <= 2


async def test_waiting_past_query_wait_timeout_gets_53300_pool_exhausted(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=1, extra="query_wait_timeout = 1.0")
    holder = await connect(proxy, "acme")
    waiter = await connect(proxy, "initech")
    try:
        await holder.execute("BEGIN")
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as info:
            await waiter.fetchval("SELECT 1")
        elapsed = time.monotonic() - started
        assert info.value.sqlstate == "53300"
        assert "exhausted" in str(info.value) and "pool_size=1" in str(info.value)
        assert 0.9 <= elapsed < 5
        assert not waiter.is_closed()  # an ERROR, not FATAL: the client may retry
        await holder.execute("COMMIT")
        fresh = await connect(proxy, "initech")
        assert await fresh.fetchval("SELECT 1") == 1
        await fresh.close()
    finally:
        await holder.close()
        await waiter.close(timeout=2)
    assert "PoolTimeout" in proxy.log()


async def test_client_vanishing_mid_transaction_leaves_a_rolled_back_clean_server(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=1)
    env = proxy.env
    ghost = await connect(proxy, "acme")
    await ghost.execute("BEGIN")
    await ghost.execute(
        "INSERT INTO campaigns(org_id, name) VALUES (current_setting('app.tenant_id')::uuid, "
        "'acme: ghost')"
    )
    ghost_pid = await ghost.fetchval("SELECT pg_backend_pid()")
    ghost.terminate()  # the socket just goes away, transaction open

    other = await connect(proxy, "initech")
    try:
        row = await other.fetchrow(
            "SELECT pg_backend_pid() AS pid, current_setting('app.tenant_id') AS t, "
            "current_user AS u, (SELECT count(*) FROM campaigns) AS n"
        )
    finally:
        await other.close()
    assert row["pid"] == ghost_pid  # the same server, rolled back and reused
    assert row["t"] == str(env.tenants["initech"].org_id)
    assert row["n"] == len(env.tenants["initech"].rows["public.campaigns"])
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        ghosts = await admin.fetchval("SELECT count(*) FROM campaigns WHERE name = 'acme: ghost'")
        assert ghosts == 0
    finally:
        await admin.close()


async def test_client_vanishing_with_a_query_in_flight_closes_and_cancels_its_server(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=1)
    sleeper = await connect(proxy, "acme")
    sleeper_pid = await sleeper.fetchval("SELECT pg_backend_pid()")
    task = asyncio.ensure_future(sleeper.fetchval("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)
    sleeper.terminate()
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await task
    other = await connect(proxy, "initech")
    try:
        started = time.monotonic()
        assert await other.fetchval("SELECT pg_backend_pid()") != sleeper_pid
        assert time.monotonic() - started < 10
    finally:
        await other.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the cancel reached the abandoned backend
        pids = {r["pid"] for r in await proxy_backends(proxy.env)}
        if sleeper_pid not in pids:
            break
        await asyncio.sleep(0.1)
    assert sleeper_pid not in pids
    assert "left with requests in flight" in proxy.log()


async def test_backend_killed_mid_transaction_errors_only_that_client(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2)
    victim = await connect(proxy, "acme")
    bystander = await connect(proxy, "initech")
    try:
        await victim.execute("BEGIN")
        pid = await victim.fetchval("SELECT pg_backend_pid()")
        admin = await asyncpg.connect(proxy.env.admin_dsn)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await admin.close()
        # asyncpg reports this race in three ways, against Postgres directly as well
        # (ConnectionDoesNotExistError, InterfaceError or InternalClientError).
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError,
                            asyncpg.InternalClientError)):
            await victim.fetchval("SELECT 1")
        assert await bystander.fetchval("SELECT current_setting('app.tenant_id')") == str(
            proxy.env.tenants["initech"].org_id)
        fresh = await connect(proxy, "acme")
        assert await fresh.fetchval("SELECT 1") == 1
        await fresh.close()
    finally:
        victim.terminate()
        await bystander.close()


async def test_backend_unreachable_fails_waiting_clients_clearly(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    env_port = None

    def point_at_nothing(text: str) -> str:
        nonlocal env_port
        from .conftest import free_port

        real = text.split("[databases.app]\ndsn = ")[1].splitlines()[0].strip('"')
        env_port = real.rsplit(":", 1)[1].split("/", 1)[0]
        dead = real.replace(f":{env_port}/", f":{free_port()}/")  # nothing listens there
        # Tokens still resolve on the real database (the demo config's [control] dsn, as
        # the control role); only the pool's backend is gone.
        return text.replace(real, dead)

    proxy = start_proxy(pool_size=2, extra="server_connect_timeout = 2.0",
                        transform=point_at_nothing)
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect(proxy, "acme")
    assert info.value.sqlstate == "08006"
    assert "cannot connect to backend" in str(info.value)
    # A sentence a person can act on, not the socket layer's "[Errno 111] Connect call ...".
    assert "connection refused: is PostgreSQL running" in str(info.value)
    assert "Errno" not in str(info.value) and "Errno" not in proxy.log()
    assert time.monotonic() - started < 10
    assert "cannot connect to backend" in proxy.log()
