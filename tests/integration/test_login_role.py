"""The login role is worth nothing: a statement that reaches Postgres without pgtenant's
context (simulated by connecting straight to Postgres as ``pgtenant_proxy`` with its real
password) reads no signing key, calls no registry function, sees no other backend's query
text and signals no backend. The control role alone holds the key and the registry, and the
proxy still serves tenants with it.

Databases other than ``app`` are scratch ones made here; changes to the shared ``app``
database happen only inside transactions that are rolled back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv
from pgtenant.control.hardening import check_lockdown
from pgtenant.control.init import check_fail_closed, init_database
from pgtenant.identity.tokens import hash_token

from .conftest import ProxyProcess, connect, free_port
from .helpers import serve_until as _serve

__all__: list[str] = []

DENIED = "42501"  # insufficient_privilege
MARKER = "pgtenant_victim_marker"


async def outcome(conn: asyncpg.Connection, sql: str, *args: object) -> Any:
    """Returns: the rows of ``sql``, or the Postgres error it raised."""
    try:
        return await conn.fetch(sql, *args)
    except asyncpg.PostgresError as exc:
        return exc


def assert_denied(result: Any) -> None:
    assert isinstance(result, asyncpg.PostgresError), f"NOT refused; it returned {result!r}"
    assert result.sqlstate == DENIED, f"expected {DENIED}, got {result.sqlstate}: {result}"


@pytest.fixture
async def victim(demo_env: DemoEnv) -> AsyncIterator[int]:
    """Another backend of the login role, busy with ``SELECT pg_sleep(...)`` (what a pooled
    server running a tenant's statement looks like). Yields its pid once it is running."""
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    sleeping = asyncio.ensure_future(conn.fetchval(f"SELECT pg_sleep(60) /* {MARKER} */"))
    admin = await asyncpg.connect(demo_env.admin_dsn)
    try:
        deadline = time.monotonic() + 10
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active' "
            "AND query LIKE '%' || $2 || '%'", pid, MARKER,
        ):
            assert time.monotonic() < deadline, "the victim backend never started its query"
            await asyncio.sleep(0.05)
        yield pid
        # Whatever the spy tried, the victim is still running its statement.
        assert await admin.fetchval(
            "SELECT state FROM pg_stat_activity WHERE pid = $1", pid) == "active"
        assert not sleeping.done()
    finally:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await admin.close()
        try:
            await sleeping
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
            pass
        conn.terminate()


@pytest.fixture
async def spy(demo_env: DemoEnv) -> AsyncIterator[asyncpg.Connection]:
    """A statement without context: a session of the login role, straight to Postgres."""
    conn = await asyncpg.connect(demo_env.proxy_dsn, statement_cache_size=0)
    assert await conn.fetchval("SELECT current_user") == demo_env.proxy_role
    try:
        yield conn
    finally:
        await conn.close()


# ------------------------------------------------------------------- key and registry


async def test_login_role_may_not_read_the_signing_key(spy: asyncpg.Connection) -> None:
    assert_denied(await outcome(spy, "SELECT pgtenant.signing_key()"))
    assert_denied(await outcome(spy, "SELECT * FROM pgtenant.signing_keys"))


async def test_login_role_may_not_call_the_registry(demo_env: DemoEnv,
                                                    spy: asyncpg.Connection) -> None:
    token = demo_env.tenants["acme"].token
    assert_denied(await outcome(spy, "SELECT * FROM pgtenant.resolve_token($1)",
                                hash_token(token)))
    assert_denied(await outcome(spy, "SELECT * FROM pgtenant.resolve_org($1)",
                                demo_env.tenants["acme"].org_id))


async def test_control_role_reads_the_key_and_the_registry(demo_env: DemoEnv) -> None:
    # The other half: the functions exist and work, for the control role alone.
    conn = await asyncpg.connect(demo_env.control_dsn)
    try:
        assert len(await conn.fetchval("SELECT pgtenant.signing_key()")) == 32
        rows = await conn.fetch("SELECT * FROM pgtenant.resolve_token($1)",
                                hash_token(demo_env.tenants["acme"].token))
        assert [r["org_id"] for r in rows] == [demo_env.tenants["acme"].org_id]
        # Nothing else: no tenant data, no control tables.
        for table in ("public.campaigns", "pgtenant.tokens", "pgtenant.signing_keys"):
            assert_denied(await outcome(conn, f"SELECT 1 FROM {table}"))
    finally:
        await conn.close()


# ------------------------------------------------------------------- other backends


async def test_login_role_sees_no_query_text_of_other_backends(
    spy: asyncpg.Connection, victim: int,
) -> None:
    # Postgres shows a backend's query to its own role: without the lockdown this is the
    # victim's text (with, through the proxy, the injected org id and signature).
    for sql in ("SELECT pid, query FROM pg_stat_activity",
                "SELECT pg_stat_get_backend_pid(i) AS pid, pg_stat_get_backend_activity(i) "
                "FROM pg_stat_get_backend_idset() AS i",
                "SELECT pid, query FROM pg_stat_get_activity(NULL)"):
        result = await outcome(spy, sql)
        assert MARKER not in repr(result), f"{sql}: {result!r}"
        if not isinstance(result, asyncpg.PostgresError):
            assert all(r[1] in (None, "<insufficient privilege>")
                       for r in result if r[0] == victim), result
    assert_denied(await outcome(spy, "SELECT query FROM pg_stat_activity"))


@pytest.mark.parametrize("fn", ["pg_cancel_backend", "pg_terminate_backend"])
async def test_login_role_may_not_signal_other_backends(
    spy: asyncpg.Connection, victim: int, fn: str,
) -> None:
    assert_denied(await outcome(spy, f"SELECT {fn}($1)", victim))
    # The fixture's teardown checks the victim is still running its statement.


async def test_monitoring_roles_keep_pg_stat_activity_and_signals(demo_env: DemoEnv,
                                                                  victim: int) -> None:
    # Granted back to the built-in roles: a pg_monitor member still sees every query.
    admin = await asyncpg.connect(demo_env.admin_dsn)
    name = f"monitor_{uuid.uuid4().hex[:8]}"
    tx = admin.transaction()
    await tx.start()
    try:  # the role exists only inside this transaction
        await admin.execute(f"CREATE ROLE {name} NOLOGIN IN ROLE pg_monitor")
        await admin.execute(f"SET LOCAL ROLE {name}")
        seen = await admin.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", victim)
        assert MARKER in seen
    finally:
        await tx.rollback()
        await admin.close()


# ------------------------------------------------------------------- the audit


async def test_check_lockdown_reports_each_missing_revocation(demo_env: DemoEnv) -> None:
    admin = await asyncpg.connect(demo_env.admin_dsn)
    proxy = demo_env.proxy_role
    try:
        assert await check_lockdown(admin, proxy, []) == []
        tx = admin.transaction()
        await tx.start()
        try:  # an install from before the control role and the lockdown; rolled back
            for fn in ("pg_stat_get_activity(integer)", "pg_stat_get_backend_activity(integer)",
                       "pg_cancel_backend(integer)", "pg_terminate_backend(integer, bigint)"):
                await admin.execute(f"GRANT EXECUTE ON FUNCTION pg_catalog.{fn} TO PUBLIC")
            for fn in ("pgtenant.signing_key()", "pgtenant.resolve_token(bytea)",
                       "pgtenant.resolve_org(uuid)"):
                await admin.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {proxy}")
            problems = "\n".join(await check_lockdown(admin, proxy, []))
        finally:
            await tx.rollback()
        assert await check_lockdown(admin, proxy, []) == []
    finally:
        await admin.close()
    for fn in ("pg_stat_get_activity(integer)", "pg_stat_get_backend_activity(integer)",
               "pg_cancel_backend(integer)", "pg_terminate_backend(integer, bigint)"):
        assert f"PUBLIC may execute pg_catalog.{fn}" in problems, problems
    for fn in ("pgtenant.signing_key()", "pgtenant.resolve_token(bytea)",
               "pgtenant.resolve_org(uuid)"):
        assert f"login role {proxy!r} may execute {fn}" in problems, problems
    assert "[control] dsn" in problems


async def test_check_lockdown_reports_a_role_the_login_role_may_switch_to(
    demo_env: DemoEnv,
) -> None:
    # NOINHERIT does not stop SET ROLE: membership of a monitoring role (or of the control
    # role) would give a statement without context what the lockdown took away.
    admin = await asyncpg.connect(demo_env.admin_dsn)
    proxy = demo_env.proxy_role
    try:
        tx = admin.transaction()
        await tx.start()
        await admin.execute(f"GRANT pg_read_all_stats, {demo_env.control_role} TO {proxy}")
        problems = "\n".join(await check_lockdown(admin, proxy, []))
        await tx.rollback()
        assert await check_lockdown(admin, proxy, []) == []
    finally:
        await admin.close()
    assert ("role 'pg_read_all_stats' (the login role may SET ROLE to it) may execute "
            "pg_catalog.pg_stat_get_activity(integer)") in problems, problems
    assert (f"role {demo_env.control_role!r} (the login role may SET ROLE to it) may execute "
            "pgtenant.signing_key()") in problems, problems


async def test_init_takes_old_grants_back_from_the_login_role(
    demo_env: DemoEnv, pg_cluster: PostgresCluster,
) -> None:
    """Re-running init on an install from before the control role removes the login role's
    grants; function ACLs in pg_catalog are per database, so each database gets its own."""
    dbname = f"old_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(dbname)
    dsn = pg_cluster.admin_dsn(dbname)
    proxy, control = demo_env.proxy_role, demo_env.control_role
    try:
        # Existing roles keep their passwords (demo_env's DSNs stay valid).
        await init_database(dsn, proxy_role=proxy, control_role=control)
        admin = await asyncpg.connect(dsn)
        try:
            for fn in ("pgtenant.signing_key()", "pg_catalog.pg_stat_get_activity(integer)",
                       "pg_catalog.pg_cancel_backend(integer)"):
                await admin.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO PUBLIC")
            await admin.execute(f"GRANT EXECUTE ON FUNCTION pgtenant.signing_key() TO {proxy}")
            assert await check_fail_closed(dsn, proxy, control) != []
            await init_database(dsn, proxy_role=proxy, control_role=control)
            assert await check_fail_closed(dsn, proxy, control) == []
            for fn, who, allowed in (
                ("pgtenant.signing_key()", proxy, False),
                ("pgtenant.signing_key()", control, True),
                ("pgtenant.resolve_token(bytea)", proxy, False),
                ("pgtenant.resolve_token(bytea)", control, True),
                ("pg_catalog.pg_stat_get_activity(integer)", "public", False),
                ("pg_catalog.pg_stat_get_activity(integer)", "pg_read_all_stats", True),
                ("pg_catalog.pg_cancel_backend(integer)", "public", False),
                ("pg_catalog.pg_cancel_backend(integer)", "pg_signal_backend", True),
            ):
                assert await admin.fetchval(
                    "SELECT has_function_privilege($1, $2, 'EXECUTE')", who, fn
                ) is allowed, (fn, who)
        finally:
            await admin.close()
    finally:
        pg_cluster.psql(f"DROP DATABASE {dbname}")


async def test_init_moves_pg_stat_statements_to_pg_read_all_stats(
    demo_env: DemoEnv, pg_cluster: PostgresCluster,
) -> None:
    dbname = f"pgss_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(dbname)
    dsn = pg_cluster.admin_dsn(dbname)
    admin = await asyncpg.connect(dsn)
    try:
        if not await admin.fetchval("SELECT count(*) FROM pg_available_extensions "
                                    "WHERE name = 'pg_stat_statements'"):
            pytest.skip("pg_stat_statements is not installed with this PostgreSQL")
        await admin.execute("CREATE EXTENSION pg_stat_statements")
        fn = await admin.fetchval(
            "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE proname = "
            "'pg_stat_statements' AND pronargs = 1")
        assert await admin.fetchval("SELECT has_function_privilege('public', $1, 'EXECUTE')",
                                    fn)
        assert f"PUBLIC may execute {fn}" in "\n".join(
            await check_lockdown(admin, demo_env.proxy_role, []))
        await init_database(dsn, proxy_role=demo_env.proxy_role,
                            control_role=demo_env.control_role)
        assert not await admin.fetchval(
            "SELECT has_function_privilege('public', $1, 'EXECUTE')", fn)
        assert await admin.fetchval(
            "SELECT has_function_privilege('pg_read_all_stats', $1, 'EXECUTE')", fn)
        assert not any("pg_stat_statements" in p for p in
                       await check_lockdown(admin, demo_env.proxy_role, []))
    finally:
        await admin.close()
        pg_cluster.psql(f"DROP DATABASE {dbname}")


# ------------------------------------------------------------------- through the proxy


async def test_tenants_are_served_with_the_key_read_as_the_control_role(
    proxy: ProxyProcess,
) -> None:
    # The demo config has a [control] dsn of the control role; the signature the proxy sets
    # verifies inside Postgres, so the key it read is the real one.
    assert "CONTROL ROLE WARNING" not in proxy.log()
    conn = await connect(proxy, "acme")
    try:
        acme = proxy.env.tenants["acme"]
        assert await conn.fetchval("SELECT pgtenant.current_tenant()") == acme.org_id
        names = [r[0] for r in await conn.fetch("SELECT name FROM campaigns ORDER BY 1")]
        assert names == acme.rows["public.campaigns"]
    finally:
        await conn.close()


async def test_proxy_refuses_a_login_role_that_still_holds_the_key(
    demo_env: DemoEnv, pg_cluster: PostgresCluster, tmp_path: Path,
) -> None:
    dbname = f"held_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(dbname)
    dsn = pg_cluster.admin_dsn(dbname)
    try:
        await init_database(dsn, proxy_role=demo_env.proxy_role,
                            control_role=demo_env.control_role,
                            tenant_types=demo_env.tenant_types)
        admin = await asyncpg.connect(dsn)
        try:  # an install from before the control role
            for fn in ("pgtenant.signing_key()", "pgtenant.resolve_token(bytea)"):
                await admin.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {demo_env.proxy_role}")
        finally:
            await admin.close()
        login = demo_env.proxy_dsn.rsplit("/", 1)[0] + f"/{dbname}"
        types = "".join(f'[tenant_types.{n}]\nrole = "{t.role}"\n'
                        for n, t in demo_env.tenant_types.items())
        base = f'listen = "127.0.0.1:{{port}}"\n{{extra}}\n[databases.{dbname}]\ndsn = "{login}"\n'
        strict = tmp_path / "strict.toml"
        strict.write_text(base.format(port=free_port(), extra="") + types)
        code, log = _serve(strict, "listening on")
        assert code == 1, log
        assert f"database {dbname!r} is not locked down" in log
        assert f"login role {demo_env.proxy_role!r} may execute pgtenant.signing_key()" in log
        assert "[control] dsn" in log and "HINT: run `pgtenant init" in log
        assert "CONTROL ROLE WARNING" in log  # no [control] dsn: said at start

        lenient = tmp_path / "lenient.toml"
        lenient.write_text(base.format(port=free_port(), extra='lockdown_check = "warn"')
                           + types)
        code, log = _serve(lenient, "listening on")
        assert code is None, log  # it started (old layout, warned); we stopped it
        assert "CONTROL ROLE WARNING" in log and "LOCKDOWN WARNING" in log
    finally:
        pg_cluster.psql(f"DROP DATABASE {dbname}")


async def test_proxy_without_control_role_cannot_read_a_new_installs_key(
    demo_env: DemoEnv, tmp_path: Path,
) -> None:
    # A config that never got its [control] dsn, against a database init moved the key
    # from: refused at start with the fix named, not served unsigned.
    config = tmp_path / "nocontrol.toml"
    types = "".join(f'[tenant_types.{n}]\nrole = "{t.role}"\n'
                    for n, t in demo_env.tenant_types.items())
    config.write_text(f'listen = "127.0.0.1:{free_port()}"\nlockdown_check = "off"\n'
                      f'[databases.app]\ndsn = "{demo_env.proxy_dsn}"\n' + types)
    code, log = _serve(config, "listening on")
    assert code == 1, log
    assert f"role {demo_env.proxy_role!r} may not read the context-signing key" in log
    assert "[control] dsn" in log
