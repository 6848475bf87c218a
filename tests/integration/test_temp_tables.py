"""Temporary tables through the proxy (issue 15 item 4), decided per kind:

* ``ON COMMIT DROP`` inside a transaction just works and pins nothing;
* a session temp object (no ON COMMIT DROP, a temp view or sequence, SELECT INTO TEMP...)
  pins the server to its client, which keeps using it; the server is closed when it leaves;
* a temp object the proxy could not see created (a function's body) is reported by the
  database's ``pgtenant_temp_objects`` event trigger, and the server's temp schema is emptied
  (DISCARD TEMP) before anyone else, of this tenant or another, uses the server.

Every proxy here has ONE server, so the next client provably runs on the same backend as the
one before (or the test shows that backend was closed). The victims are another client of
the same tenant (no DISCARD ALL: same tenant), another tenant of the same shared-role type,
and a tenant of another type.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from pgtenant.config import TenantTypeConfig
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv
from pgtenant.control.hardening import TEMP_TRIGGER, check_lockdown
from pgtenant.control.init import check_fail_closed, init_database
from pgtenant.protocol import codec
from pgtenant.protocol.constants import TEMP_NOTICE

from .conftest import ProxyProcess, connect, free_port
from .helpers import TenantRaw, data_rows, metric_value, scrape

# What a victim checks on its server: every relation in its session's temp schema, and
# whether a table named ``name`` resolves in pg_temp.
TEMP_RELATIONS = ("SELECT count(*) FROM pg_catalog.pg_class "
                  "WHERE relnamespace = pg_catalog.pg_my_temp_schema()")
VICTIMS = ("acme", "initech", "globex")  # same tenant; same type and role; another type
# An application's function a tenant may call: its CREATE TEMP TABLE is invisible to the
# proxy's classifier (the client's text is only "SELECT public.temp_scratch()").
HIDDEN_FUNCTION = """
CREATE OR REPLACE FUNCTION public.temp_scratch() RETURNS int LANGUAGE sql AS $$
    CREATE TEMP TABLE IF NOT EXISTS hidden_scratch AS
        SELECT name FROM public.campaigns;
    SELECT 1
$$;
GRANT EXECUTE ON FUNCTION public.temp_scratch() TO PUBLIC;
"""


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def solo(demo_env: DemoEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(demo_env, tmp_path_factory.mktemp("temp_tables"), pool_size=1,
                        extra="auth_failure_delay = 0.0\n"
                              f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n')
    yield proc
    proc.check_invariants(proc.stop())


def temp_resets() -> float:
    """Returns: how many servers the proxy has emptied with DISCARD TEMP so far."""
    return metric_value(scrape(METRICS_PORT), "pgtenant_temp_resets_total")


@pytest.fixture(scope="module")
async def hidden_function(demo_env: DemoEnv) -> AsyncIterator[str]:
    admin = await asyncpg.connect(demo_env.admin_dsn)
    try:
        await admin.execute(HIDDEN_FUNCTION)
        yield "SELECT public.temp_scratch()"
        await admin.execute("DROP FUNCTION public.temp_scratch()")
    finally:
        await admin.close()


async def sees_nothing(proxy: ProxyProcess, slug: str, table: str) -> int:
    """As ``slug``, on the proxy's one server: no temp relation at all, and ``table`` does
    not resolve in pg_temp. Returns: that server's backend pid."""
    conn = await connect(proxy, slug)
    try:
        assert await conn.fetchval(TEMP_RELATIONS) == 0
        assert await conn.fetchval("SELECT pg_catalog.to_regclass($1)", f"pg_temp.{table}") \
            is None
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch(f"SELECT * FROM pg_temp.{table}")
        return int(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await conn.close()


def marker_notices(conn: asyncpg.Connection) -> list[str]:
    """Returns: a list that collects every notice the client gets with the marker."""
    seen: list[str] = []
    conn.add_log_listener(
        lambda _c, msg: seen.append(str(msg)) if TEMP_NOTICE in str(msg) else None)
    return seen


async def test_on_commit_drop_inside_a_transaction_works_and_pins_nothing(
    solo: ProxyProcess,
) -> None:
    acme = await connect(solo, "acme")
    resets = temp_resets()
    try:
        seen = marker_notices(acme)
        async with acme.transaction():
            await acme.execute("CREATE TEMP TABLE scratch (name text) ON COMMIT DROP")
            await acme.execute("INSERT INTO scratch SELECT name FROM campaigns")
            assert await acme.fetchval("SELECT count(*) FROM scratch") == len(
                solo.env.tenants["acme"].rows["public.campaigns"])
            pid = await acme.fetchval("SELECT pg_backend_pid()")
        # One Query with BEGIN ... COMMIT in it, as psql -c would send it.
        await acme.execute("BEGIN; CREATE TEMPORARY TABLE s2 ON COMMIT DROP AS SELECT 1 AS x; "
                           "SELECT * FROM s2; COMMIT")
        assert seen == []  # the proxy's notice, not the client's
        assert temp_resets() == resets + 2  # each transaction's server: DISCARD TEMP
        # Not pinned: with acme still connected, another tenant gets the only server.
        other = await connect(solo, "initech")
        try:
            assert await asyncio.wait_for(other.fetchval("SELECT pg_backend_pid()"), 10) == pid
            assert await other.fetchval(TEMP_RELATIONS) == 0
        finally:
            await other.close()
        assert await acme.fetchval(TEMP_RELATIONS) == 0  # nothing survived the COMMIT
        assert await acme.fetchval("SELECT pg_backend_pid()") == pid
    finally:
        await acme.close()


@pytest.mark.parametrize("create", [
    "CREATE TEMP TABLE kept (name text)",
    "CREATE TEMP TABLE kept (name text) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE kept (name text) ON COMMIT PRESERVE ROWS",
    "CREATE TEMP TABLE kept AS SELECT name FROM campaigns",
    "SELECT name INTO TEMP kept FROM campaigns",
    "CREATE TABLE pg_temp.kept (name text)",
    "CREATE TEMP VIEW kept AS SELECT name FROM campaigns",
    "CREATE TEMP SEQUENCE kept",
])
async def test_session_temp_objects_pin_the_server_and_die_with_their_client(
    solo: ProxyProcess, create: str,
) -> None:
    acme = await connect(solo, "acme")
    try:
        pid = await acme.fetchval("SELECT pg_backend_pid()")
        await acme.execute(create)
        for _ in range(3):  # later transactions: the same server, the object still there
            async with acme.transaction():
                assert await acme.fetchval("SELECT pg_backend_pid()") == pid
                assert await acme.fetchval("SELECT pg_catalog.to_regclass('pg_temp.kept')") \
                    is not None
        # Pinned: another client waits for the only server (here: until we give up).
        other = await connect(solo, "initech")
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(other.fetchval("SELECT 1"), 0.5)
        finally:
            other.terminate()
    finally:
        await acme.close()
    for slug in VICTIMS:
        assert await sees_nothing(solo, slug, "kept") != pid  # that server was closed


@pytest.mark.parametrize("quiet", [None, "error", "log", "warning"])
async def test_a_temp_table_made_where_the_proxy_cannot_see_is_gone_before_the_next_client(
    solo: ProxyProcess, hidden_function: str, quiet: str | None,
) -> None:
    acme = await connect(solo, "acme")
    try:
        seen = marker_notices(acme)
        if quiet is not None:
            # The tenant tries to hide the database's report: the trigger's function sets
            # its own client_min_messages.
            await acme.execute(f"SET client_min_messages = {quiet}")
        pid = await acme.fetchval("SELECT pg_backend_pid()")
        async with acme.transaction():
            assert await acme.fetchval(hidden_function) == 1
            assert await acme.fetchval("SELECT count(*) FROM pg_temp.hidden_scratch") == len(
                solo.env.tenants["acme"].rows["public.campaigns"])
        assert seen == []
        # Autocommit too, and the same client's next transaction: it is gone (the proxy
        # cannot keep what it did not see being made; made visibly, it would pin).
        assert await acme.fetchval(hidden_function) == 1
        assert await acme.fetchval(TEMP_RELATIONS) == 0
    finally:
        await acme.close()
    for slug in VICTIMS:
        # The same server (emptied, not closed), with nothing of acme's in it.
        assert await sees_nothing(solo, slug, "hidden_scratch") == pid


async def test_a_client_leaving_inside_a_transaction_with_a_temp_table_leaves_nothing(
    solo: ProxyProcess, hidden_function: str,
) -> None:
    """Pipelined: the hidden table commits with the first Query and the second opens a
    block. (The proxy holds the BEGIN until the first Query's ReadyForQuery, so the server
    goes back, emptied, in between; were both on one attachment, the rollback would be
    followed by DISCARD TEMP.) Either way the next client of the same tenant (no DISCARD
    ALL) finds nothing."""
    acme = await TenantRaw.login(solo, "acme")
    pid = int(rows_of(await acme.request(codec.query("SELECT pg_backend_pid()")))[0])
    acme.writer.write(codec.query(hidden_function) + codec.query("BEGIN"))
    assert (await acme.until())[-1] == ("Z", b"I")
    assert (await acme.until())[-1] == ("Z", b"T")
    seen = await acme.request(codec.query("CREATE TEMP TABLE left_open (x int) ON COMMIT DROP"))
    assert seen[-1] == ("Z", b"T"), seen
    acme.writer.close()  # mid-transaction: the proxy rolls back, empties pg_temp, reuses
    for _ in range(50):
        try:
            found = await sees_nothing(solo, "acme", "hidden_scratch")
            break
        except asyncpg.PostgresError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the server never came back")
    assert found == pid  # rolled back and reused, not closed
    assert await sees_nothing(solo, "acme", "left_open") == pid


def rows_of(messages: list[tuple[str, bytes]]) -> list[str]:
    """Returns: the first column of every DataRow, as text."""
    out = []
    for body in data_rows(messages):
        size = int.from_bytes(body[2:6], "big", signed=True)
        out.append(body[6:6 + size].decode())
    return out


async def test_a_function_that_would_hide_a_temp_table_from_the_trigger_is_refused(
    demo_env: DemoEnv,
) -> None:
    """EXPLAIN ANALYZE of CREATE TABLE AS / SELECT INTO fires no event trigger: a function
    body holding one cannot be created (even by the admin)."""
    admin = await asyncpg.connect(demo_env.admin_dsn)
    try:
        for body in ("EXPLAIN ANALYZE CREATE TEMP TABLE x AS SELECT 1; SELECT 1",
                     "explain (analyze) select 1 into temp x; select 1"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="EXPLAIN"):
                await admin.execute(
                    f"CREATE FUNCTION public.hide_temp() RETURNS int LANGUAGE sql AS $${body}$$")
        await admin.execute("CREATE FUNCTION public.explain_free() RETURNS int LANGUAGE sql "
                            "AS $$SELECT 1$$")
        await admin.execute("DROP FUNCTION public.explain_free()")
    finally:
        await admin.close()


async def test_tenant_types_without_temp_tables_get_no_temp_and_the_lockdown_needs_the_trigger(
    pg_cluster: PostgresCluster,
) -> None:
    pg_cluster.create_database("temp_switch")
    dsn = pg_cluster.admin_dsn("temp_switch")
    types = {
        "yes": TenantTypeConfig(name="yes", role="tts_yes"),
        "no": TenantTypeConfig(name="no", role="tts_no", temp_tables=False),
    }
    await init_database(dsn, proxy_role="tts_proxy", control_role="tts_control",
                        proxy_password="tts-proxy-pw", control_password="tts-control-pw",
                        tenant_types=types)
    conn = await asyncpg.connect(dsn)
    try:
        temp = "SELECT has_database_privilege($1, current_database(), 'TEMP')"
        assert await conn.fetchval(temp, "tts_yes") is True
        assert await conn.fetchval(temp, "tts_no") is False
        assert await conn.fetchval(temp, "tts_proxy") is False  # the login role: never
        await conn.execute("SET ROLE tts_no")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="temporary"):
            await conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
        await conn.execute("RESET ROLE")
        assert await check_fail_closed(dsn, "tts_proxy", "tts_control") == []
        roles = ["tts_yes", "tts_no"]
        # Turned off another way than ALWAYS, or gone: the proxy's start-up check says so.
        for change, problem in (
                (f"ALTER EVENT TRIGGER {TEMP_TRIGGER} ENABLE", "not enabled ALWAYS"),
                (f"ALTER EVENT TRIGGER {TEMP_TRIGGER} DISABLE", "not enabled ALWAYS"),
                (f"ALTER EVENT TRIGGER {TEMP_TRIGGER} ENABLE REPLICA", "not enabled ALWAYS"),
                (f"DROP EVENT TRIGGER {TEMP_TRIGGER}", "is missing")):
            await conn.execute(change)
            problems = await check_lockdown(conn, "tts_proxy", roles)
            assert any(TEMP_TRIGGER in p and problem in p for p in problems), problems
        # init puts it back, and takes TEMP away from a type that turned it off.
        await conn.execute("GRANT TEMPORARY ON DATABASE temp_switch TO tts_no")
        await init_database(dsn, proxy_role="tts_proxy", control_role="tts_control",
                            tenant_types=types)
        assert await check_lockdown(conn, "tts_proxy", roles) == []
        assert await conn.fetchval(temp, "tts_no") is False
    finally:
        await conn.close()


# A temporary type named like a built-in one: pg_temp is searched before pg_catalog for
# types unless a search_path lists it, so every unqualified "text" in SQL that runs in the
# tenant's session would mean this enum, and the implicit cast hands the tenant the values.
SHADOW_TEXT = (
    "CREATE TYPE pg_temp.text AS ENUM ('harmless', 'search_path', "
    "'standard_conforming_strings', 'client_encoding')",
    "CREATE FUNCTION pg_temp.to_t(pg_catalog.text) RETURNS pg_temp.text LANGUAGE sql "
    "AS $$ SELECT 'harmless'::pg_temp.text $$",
    "CREATE CAST (pg_catalog.text AS pg_temp.text) WITH FUNCTION "
    "pg_temp.to_t(pg_catalog.text) AS IMPLICIT",
    "CREATE FUNCTION pg_temp.from_t(pg_temp.text) RETURNS pg_catalog.text LANGUAGE sql "
    "AS $$ SELECT 'harmless'::pg_catalog.text $$",
    "CREATE CAST (pg_temp.text AS pg_catalog.text) WITH FUNCTION "
    "pg_temp.from_t(pg_temp.text) AS IMPLICIT",
)


async def test_a_temp_type_named_text_changes_nothing_the_proxy_or_its_functions_run(
    solo: ProxyProcess,
) -> None:
    acme = await connect(solo, "acme")
    try:
        for stmt in SHADOW_TEXT:  # pins the server: the type stays for later transactions
            await acme.execute(stmt)
        # pgtenant.set_config (the stand-in the guard rewrites set_config to) still refuses
        # protected names it only sees bound: its variable is declared pg_catalog.text.
        for name in ("search_path", "app.tenant_id", "standard_conforming_strings"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=name):
                await acme.fetchval("SELECT set_config($1, $2, false)", name, "off")
        # The proxy's extended-protocol context statement, parsed now, with the type there.
        assert await acme.fetchval("SELECT $1::int + 1", 1) == 2
        row = await acme.fetchrow("SELECT current_setting('app.tenant_id') AS t, "
                                  "current_setting('search_path') AS p, current_user AS u")
        assert (row["t"], row["p"], row["u"]) == (
            str(solo.env.tenants["acme"].org_id), "public", "tenant_sme")
    finally:
        await acme.close()
