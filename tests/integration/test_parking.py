"""Parked servers (issue 16, lever 4) with a real proxy, real Postgres and real clients.

A client that ends a transaction on a clean server while nobody waits keeps first claim on
it (pool_state's "Parking"); another client reclaims it when no other server is idle. These
tests check that every transaction still starts with the admission checks and its own
context, and that a parked server is an idle server to everything else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg
import pytest

from pgtenant.control.migrations.holds import Holds
from pgtenant.control.tenants import issue_token, revoke_token

from .conftest import ProxyProcess
from .helpers import ADMIN, execute_in_thread
from .helpers import admin_psql as psql
from .helpers import admin_rows as rows

_WHO = ("SELECT current_setting('app.tenant_id'), current_user, "
        "current_setting('work_mem'), current_setting('statement_timeout'), "
        "pg_backend_pid()")


def _foreign_rows(conn: psycopg.Connection, slug: str) -> int:
    """Returns: the demo rows ``conn`` sees that are not its tenant's (must be 0): campaigns
    for the SME tenants (one table, RLS), projects for the enterprise ones (own schema)."""
    table = "projects" if slug in ("globex", "hooli") else "campaigns"
    row = conn.execute(f"SELECT count(*) FILTER (WHERE name NOT LIKE %s), count(*) "
                       f"FROM {table}", [f"{slug}: %"]).fetchone()
    assert row is not None and row[1] > 0, "the tenant's own rows must be visible"
    return int(row[0])


def _pool(proxy: ProxyProcess) -> dict[str, str]:
    (pool,) = rows(proxy, "SHOW POOLS")
    return pool


def test_pool_of_one_two_tenants_alternating_each_sees_only_its_own(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """One server, three tenants' clients taking turns (two share a role and a table under
    RLS, one has its own role and schema): each transaction reclaims the server another
    parked; the victim's next transaction sees its context, its rows and its own settings,
    never another's."""
    proxy = start_proxy(pool_size=1, extra=ADMIN)
    env = proxy.env
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as acme, \
            psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as initech, \
            psycopg.connect(**proxy.conninfo("globex"), autocommit=True) as globex:
        acme.execute("SET statement_timeout = '12345ms'")  # tracked, replayed per client
        initech.execute("SET work_mem = '7MB'")
        expected = {"acme": ("4MB", "12345ms"), "initech": ("7MB", "0"),
                    "globex": ("4MB", "0")}
        pids = set()
        for _ in range(10):
            for conn, slug in ((acme, "acme"), (initech, "initech"), (globex, "globex")):
                row = conn.execute(_WHO).fetchone()
                assert row is not None
                tenant_id, role, work_mem, timeout, pid = row
                assert tenant_id == str(env.tenants[slug].org_id)
                assert role == env.tenants[slug].role
                assert (work_mem, timeout) == expected[slug]
                assert _foreign_rows(conn, slug) == 0
                with conn.transaction():  # an explicit block too
                    assert _foreign_rows(conn, slug) == 0
                pids.add(pid)
        assert len(pids) == 1  # one server went back and forth (reclaimed every time)
        assert int(_pool(proxy)["sv_idle"]) == 1


def test_a_parked_server_shows_as_idle_and_goes_back_to_its_client(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=3, extra=ADMIN)
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as acme, \
            psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as initech:
        # Two servers; acme's is given back last, so it is the warmest idle one (LIFO would
        # hand it to the next client who asks).
        with acme.transaction():
            first = acme.execute("SELECT pg_backend_pid()").fetchone()
            with initech.transaction():
                initech.execute("SELECT 1")
        pool = _pool(proxy)
        assert (pool["sv_active"], pool["cl_active"], pool["cl_waiting"]) == ("0", "2", "0")
        assert int(pool["sv_idle"]) >= 1
        servers = rows(proxy, "SHOW SERVERS")
        assert {s["state"] for s in servers} == {"idle"} and all(not s["tenant"]
                                                                  for s in servers)
        # Another client takes a server while acme's is parked: not acme's, and acme gets
        # its own back.
        for _ in range(5):
            with initech.transaction():
                other = initech.execute("SELECT pg_backend_pid()").fetchone()
                assert other != first
                assert acme.execute("SELECT pg_backend_pid()").fetchone() == first


def test_a_client_gone_while_parked_returns_its_server(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=1, extra=ADMIN)
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as acme:
        (pid,) = acme.execute("SELECT pg_backend_pid()").fetchone() or (None,)
    assert _pool(proxy)["sv_idle"] == "1"
    with psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as initech:
        row = initech.execute(_WHO).fetchone()
        assert row is not None and row[4] == pid  # the same backend, emptied for initech
        assert row[0] == str(proxy.env.tenants["initech"].org_id)
        assert _foreign_rows(initech, "initech") == 0


def test_pause_closes_a_parked_server_and_holds_its_clients_next_transaction(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2, extra=ADMIN)
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as acme:
        acme.execute("SELECT 1")
        psql(proxy, "PAUSE")
        assert int(_pool(proxy)["sv_idle"]) == 0  # the parked server was closed too
        worker, done = execute_in_thread(acme, "SELECT 2")
        assert not done.wait(0.7)
        assert _pool(proxy)["cl_waiting"] == "1"
        psql(proxy, "RESUME")
        assert done.wait(10)
        worker.join()


def test_idle_timeout_closes_a_parked_server(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2, extra="server_idle_timeout = 0.5\n" + ADMIN)
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as acme:
        first = acme.execute("SELECT pg_backend_pid()").fetchone()
        deadline = time.monotonic() + 5
        while int(_pool(proxy)["sv_idle"]):
            assert time.monotonic() < deadline, "parked server not closed"
            time.sleep(0.1)
        assert acme.execute("SELECT pg_backend_pid()").fetchone() != first  # a new one
    assert "server_idle_timeout" in proxy.log()


async def test_a_migration_hold_applies_to_a_client_whose_server_is_parked(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2, extra="query_wait_timeout = 1.0")
    env = proxy.env
    acme = await psycopg.AsyncConnection.connect(**proxy.conninfo("acme"), autocommit=True)
    try:
        await acme.execute("SELECT 1")  # parks its server
        async with Holds(env.admin_dsn, run_id=990_001, ttl=30) as holds:
            await holds.hold(env.tenants["acme"].org_id)
            with pytest.raises(psycopg.errors.OperationalError,
                               match="this tenant is being migrated"):
                await acme.execute("SELECT 2")
            await holds.release(env.tenants["acme"].org_id)
        for _ in range(50):  # the release reaches the proxy through its listener
            try:
                cur = await acme.execute("SELECT current_setting('app.tenant_id')")
                break
            except psycopg.errors.OperationalError:
                await asyncio.sleep(0.1)
        assert await cur.fetchone() == (str(env.tenants["acme"].org_id),)
    finally:
        await acme.close()


async def test_a_revoked_token_ends_a_client_whose_server_is_parked(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=1, extra=ADMIN)
    env = proxy.env
    token_id, token = await issue_token(env.admin_dsn, tenant_slug="acme", label="parked")
    conn = await psycopg.AsyncConnection.connect(**proxy.conninfo("acme", token=token),
                                                 autocommit=True)
    try:
        await conn.execute("SELECT 1")  # parks its server
        assert await revoke_token(env.admin_dsn, token_id)
        with pytest.raises(psycopg.OperationalError):
            for _ in range(50):  # the registry hears the revocation through LISTEN
                await conn.execute("SELECT 1")
                await asyncio.sleep(0.1)
    finally:
        await conn.close()
    # Its server was not lost with it: the one server serves the next client.
    other = await psycopg.AsyncConnection.connect(**proxy.conninfo("initech"),
                                                  autocommit=True)
    try:
        cur = await other.execute("SELECT current_setting('app.tenant_id')")
        assert await cur.fetchone() == (str(env.tenants["initech"].org_id),)
    finally:
        await other.close()
    assert _pool(proxy)["sv_idle"] == "1"


def test_state_left_by_the_tenant_that_reclaimed_a_parked_server_never_reaches_its_owner(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """One server: acme parks it, initech reclaims it and tries to leave session state
    behind (refused, pinned then closed with its client, or reset); acme's next
    transaction, on that server or a new one, sees none of it."""
    proxy = start_proxy(pool_size=1, extra="query_wait_timeout = 3.0\n" + ADMIN)
    env = proxy.env
    attempts = ("PREPARE leak AS SELECT 1", "CREATE TEMP TABLE leak(x int)",
                "SET work_mem = '9MB'", "DECLARE leak CURSOR WITH HOLD FOR SELECT 1",
                "SELECT pg_advisory_lock(4242)")
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as acme:
        for attempt in attempts:
            acme.execute("SELECT 1")  # parks the one server
            # A client of its own per attempt: what pins a server to it (PREPARE, WITH HOLD,
            # temp table, session lock) keeps it until it goes, then closes it.
            with psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as initech:
                try:
                    initech.execute(attempt)  # reclaims it
                except psycopg.Error:
                    pass
            row = acme.execute(
                "SELECT current_setting('app.tenant_id'), current_setting('work_mem'), "
                "(SELECT count(*) FROM pg_prepared_statements), "
                "(SELECT count(*) FROM pg_cursors), "
                "to_regclass('pg_temp.leak') IS NULL, "
                "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                " AND pid = pg_backend_pid())").fetchone()
            assert row == (str(env.tenants["acme"].org_id), "4MB", 0, 0, True, 0), attempt
            assert _foreign_rows(acme, "acme") == 0
