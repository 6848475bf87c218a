"""Issue #3 item 8: a tenant with raw SQL tries to escape its context through the real proxy.

Attacker: ``acme`` (SME, role ``tenant_sme``) unless a test says otherwise. Victims: initech's
``public.campaigns`` (same role, separated by RLS over the signed context), hooli's
``t_hooli.projects`` (own schema, own role) and umbrella's ``tenant_b.entity_data`` (agency).

Every attempt must be refused (SQLSTATE 42501 from the statement guard, or Postgres's own
permission error) or leave the other tenants' rows unreachable, checked

* in the SAME transaction: ``BEGIN; SAVEPOINT; attempt; ROLLBACK TO``, then the attacker reads
  and must still be itself and see only its own rows;
* in LATER transactions on the SAME server connection: the proxy has one server
  (``pool_size = 1``), ``pg_backend_pid()`` proves the attacker's and the victim's
  transactions share it, and the victim must see exactly its rows and its own
  ``app.tenant_id``. Attempts that leave session state behind (LISTEN, WITH HOLD, PREPARE,
  session advisory locks) retire the server instead: the victim's pid differs.

Escapes this suite found were fixed in the proxy; their tests stay as regression tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.protocol import codec

from .conftest import ProxyProcess
from .helpers import TenantRaw as Raw
from .helpers import data_rows, errors, extended

READ_TIMEOUT = 5.0
ATTACKER = "acme"
GUARD = "pgtenant:"  # every statement-guard refusal message starts with this

# What the attacker sees of the world: who it is and which rows it can reach.
ATTACKER_VIEW = (
    "SELECT pg_backend_pid() AS pid, current_user AS role, "
    "current_setting('app.tenant_id') AS tid, "
    "array(SELECT name FROM public.campaigns ORDER BY name) AS campaigns, "
    "(SELECT count(*) FROM tenant_b.entity_data) AS entity_rows, "
    "has_schema_privilege('t_hooli', 'USAGE') AS hooli_usage"
)
# victim slug -> (its role, the query that lists its rows, the table key in DemoTenant.rows)
VICTIMS: dict[str, tuple[str, str, str]] = {
    "initech": ("tenant_sme", "SELECT name FROM campaigns ORDER BY name", "public.campaigns"),
    "hooli": ("t_hooli", "SELECT name FROM projects ORDER BY name", "t_hooli.projects"),
    "umbrella": ("tenant_agency",
                 "SELECT content->>'name' FROM entity_data ORDER BY 1", "tenant_b.entity_data"),
}


# ------------------------------------------------------------------------------ helpers


async def connect(proxy: ProxyProcess, slug: str = ATTACKER, *,
                  token: str | None = None) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(slug, token=token), statement_cache_size=0,
                                 timeout=30)


async def pconnect(proxy: ProxyProcess, slug: str = ATTACKER) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(proxy.dsn(slug), autocommit=True,
                                                 connect_timeout=30)


async def simple_all(conn: psycopg.AsyncConnection, sql: str | bytes) -> list[list[tuple]]:
    """Run ``sql`` as ONE simple Query; returns the rows of every statement's result."""
    cur = await conn.execute(sql, prepare=False)  # type: ignore[arg-type]
    results: list[list[tuple]] = []
    while True:
        results.append(await cur.fetchall() if cur.description else [])
        if not cur.nextset():
            return results


async def simple_outcome(conn: psycopg.AsyncConnection, sql: str | bytes) -> Any:
    """Returns: the psycopg error the Query raised, or every result's rows if it ran."""
    try:
        return await simple_all(conn, sql)
    except psycopg.Error as exc:
        return exc


def assert_refused(err: Any, sqlstate: str = "42501",
                   contains: str | tuple[str, ...] = "") -> None:
    """``err`` is an exception (asyncpg or psycopg) with ``sqlstate`` whose message holds
    ``contains`` (or one of them); anything else means the attempt was not refused."""
    assert isinstance(err, (asyncpg.PostgresError, psycopg.Error)), (
        f"the attempt was NOT refused; it returned {err!r}")
    code = getattr(err, "sqlstate", None)
    assert code == sqlstate, f"expected SQLSTATE {sqlstate}, got {code}: {err}"
    wanted = (contains,) if isinstance(contains, str) else contains
    if any(wanted):
        assert any(w in str(err) for w in wanted), str(err)


def flat(results: Any) -> str:
    return repr(results)


def assert_no_victim_rows(results: Any, env: DemoEnv) -> None:
    text = flat(results)
    for slug in ("initech", "hooli", "umbrella", "globex"):
        assert f"{slug}:" not in text, f"{slug}'s rows leaked: {text}"


async def attacker_view(conn: asyncpg.Connection, env: DemoEnv,
                        slug: str = ATTACKER) -> int:
    """The attacker is still itself and reaches only its own rows. Returns: its backend pid."""
    row = await conn.fetchrow(ATTACKER_VIEW)
    assert row["role"] == "tenant_sme"
    assert row["tid"] == str(env.tenants[slug].org_id)
    assert list(row["campaigns"]) == env.tenants[slug].rows["public.campaigns"]
    assert row["entity_rows"] == 0
    assert row["hooli_usage"] is False
    return int(row["pid"])


async def error_of(coro: Any) -> Any:
    try:
        return await coro
    except (asyncpg.PostgresError, psycopg.Error) as exc:
        return exc


async def attempt_in_same_transaction(conn: asyncpg.Connection, env: DemoEnv, sql: str,
                                      *, extended: bool = False) -> Any:
    """BEGIN; SAVEPOINT; ``sql``; ROLLBACK TO; then the attacker reads in that transaction.

    Returns: the attempt's error (or its result when it was not refused).
    """
    async with conn.transaction():
        savepoint = conn.transaction()
        await savepoint.start()
        err = await error_of(conn.fetch(sql) if extended else conn.execute(sql))
        await savepoint.rollback()
        await attacker_view(conn, env)
    return err


async def victim_view(proxy: ProxyProcess, slug: str, *, same_pid: int | None = None,
                      other_pid: int | None = None) -> int:
    """The victim's own session still sees exactly its rows and its own context.

    ``same_pid``: the victim must run on that backend (the attacker's). ``other_pid``: the
    victim must NOT (the attacker's server was retired). Returns: the victim's pid.
    """
    env = proxy.env
    role, query, table = VICTIMS[slug]
    conn = await connect(proxy, slug)
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                "SELECT pg_backend_pid() AS pid, current_user AS role, "
                "current_setting('app.tenant_id') AS tid")
            rows = [r[0] for r in await conn.fetch(query)]
    finally:
        await conn.close()
    assert row["role"] == role
    assert row["tid"] == str(env.tenants[slug].org_id)
    assert rows == env.tenants[slug].rows[table]
    if same_pid is not None:
        assert row["pid"] == same_pid, "the victim did not get the attacker's backend"
    if other_pid is not None:
        assert row["pid"] != other_pid, "a server with session state was reused"
    return int(row["pid"])


async def refused_everywhere(proxy: ProxyProcess, sql: str, *, sqlstate: str = "42501",
                             contains: str = GUARD, extended: bool = True,
                             victim: str = "initech") -> None:
    """The full check for one single-statement attempt by the attacker.

    Same transaction (simple and, if ``extended``, extended protocol), then a later
    transaction on the same backend, then the victim's own session on that backend.
    """
    env = proxy.env
    conn = await connect(proxy)
    try:
        assert_refused(await attempt_in_same_transaction(conn, env, sql), sqlstate, contains)
        if extended:
            assert_refused(await attempt_in_same_transaction(conn, env, sql, extended=True),
                           sqlstate, contains)
        assert_refused(await error_of(conn.execute(sql)), sqlstate, contains)  # autocommit
        pid = await attacker_view(conn, env)  # a later transaction, same backend
    finally:
        await conn.close()
    await victim_view(proxy, victim, same_pid=pid)


# --- raw protocol -----------------------------------------------------------------------


# ------------------------------------------------------------------------------ 1. roles


async def test_set_role_to_another_tenant_role_is_refused(solo: ProxyProcess) -> None:
    await refused_everywhere(solo, "SET ROLE t_hooli", victim="hooli")


async def test_set_local_role_to_another_tenant_role_is_refused(solo: ProxyProcess) -> None:
    await refused_everywhere(solo, "SET LOCAL ROLE t_hooli", victim="hooli")


async def test_reset_role_to_the_login_role_is_refused(solo: ProxyProcess) -> None:
    await refused_everywhere(solo, "RESET ROLE")


async def test_set_role_none_is_refused(solo: ProxyProcess) -> None:
    await refused_everywhere(solo, "SET ROLE NONE")


@pytest.mark.parametrize("target", ["pgtenant_proxy", "postgres", "DEFAULT"])
async def test_set_session_authorization_is_refused(solo: ProxyProcess, target: str) -> None:
    await refused_everywhere(solo, f"SET SESSION AUTHORIZATION {target}")


async def test_reset_session_authorization_is_refused(solo: ProxyProcess) -> None:
    await refused_everywhere(solo, "RESET SESSION AUTHORIZATION")


@pytest.mark.parametrize("sql", [
    "SELECT set_config('role', 't_hooli', true)",
    "SELECT set_config('role', 't_hooli', false)",
    "SELECT pg_catalog.set_config('role', 't_hooli', true)",
    "SELECT PG_CATALOG.SET_CONFIG('ROLE', 't_hooli', true)",
    'SELECT "pg_catalog"."set_config"(\'role\', \'t_hooli\', true)',
    "SELECT set_config('Role', 't_hooli', true)",
    "SELECT set_config('session_authorization', 'pgtenant_proxy', true)",
    "SELECT set_config('ro' || 'le', 't_hooli', true)",
    "SELECT set_config(name, 't_hooli', true) FROM (VALUES ('role')) AS v(name)",
    "SELECT set_config(/* c */ 'role' /* c */, 't_hooli', true)",
], ids=["plain", "session", "pg_catalog", "mixed_case", "quoted_ident", "name_case",
        "session_authorization", "computed_name", "name_from_table", "comments"])
async def test_set_config_role_is_refused_in_every_spelling(solo: ProxyProcess, sql: str) -> None:
    await refused_everywhere(solo, sql, victim="hooli")


@pytest.mark.parametrize("sql", [
    "SeT   rOlE   t_hooli",
    'SET ROLE "t_hooli"',
    "SET /* hidden */ ROLE -- eol\n t_hooli",
    "SET\tLOCAL\nROLE\r't_hooli'",
    "SELECT 1 FROM (SELECT set_config('role', 't_hooli', true)) AS s",
    "WITH x AS (SELECT set_config('role', 't_hooli', true)) SELECT * FROM x",
    "WITH x AS MATERIALIZED (SELECT 1 WHERE set_config('role', 't_hooli', true) <> '') "
    "SELECT * FROM x",
    "SELECT CASE WHEN true THEN set_config('role', 't_hooli', true) END",
    "EXPLAIN ANALYZE SELECT set_config('role', 't_hooli', true)",
    "EXPLAIN (ANALYZE, FORMAT JSON) SELECT set_config('role', 't_hooli', true)",
    "VALUES (set_config('role', 't_hooli', true))",
    "SELECT * FROM generate_series(1, 1) WHERE set_config('role', 't_hooli', true) IS NULL",
], ids=["mixed_case", "quoted_role", "comments", "whitespace", "subquery", "cte",
        "materialized_cte", "case", "explain_analyze", "explain_json", "values", "where"])
async def test_role_change_hidden_in_syntax_is_refused(solo: ProxyProcess, sql: str) -> None:
    await refused_everywhere(solo, sql, victim="hooli")


@pytest.mark.parametrize("sql", [
    "SELECT 1; SET LOCAL ROLE t_hooli; SELECT name FROM t_hooli.projects",
    "SELECT 1; SELECT set_config('role', 't_hooli', true); SELECT name FROM t_hooli.projects",
    "SELECT 'SET ROLE t_hooli'; SET ROLE t_hooli; TABLE t_hooli.projects",
    "BEGIN; SET LOCAL ROLE t_hooli; SELECT name FROM t_hooli.projects; COMMIT",
])
async def test_role_change_after_a_harmless_statement_in_one_query_is_refused(
    solo: ProxyProcess, sql: str,
) -> None:
    env = solo.env
    conn = await pconnect(solo)
    try:
        out = await simple_outcome(conn, sql)
        assert_refused(out, contains=GUARD)
        # The whole Query was refused: not even the harmless first statement ran.
        await simple_all(conn, "ROLLBACK")
    finally:
        await conn.close()
    attacker = await connect(solo)
    try:
        pid = await attacker_view(attacker, env)
    finally:
        await attacker.close()
    await victim_view(solo, "hooli", same_pid=pid)


async def test_set_role_in_a_parse_message_is_refused_at_execute(solo: ProxyProcess) -> None:
    """Extended protocol, raw: the refusal arrives at Execute, in order, and Sync recovers."""
    raw = await Raw.login(solo)
    try:
        replies = await raw.request(
            extended("SET LOCAL ROLE t_hooli"),
            extended("SELECT name FROM t_hooli.projects"), codec.sync())
        errs = errors(replies)
        assert [e["C"] for e in errs] == ["42501"] and errs[0]["M"].startswith(GUARD)
        assert not data_rows(replies)
        after = await raw.request(extended("SELECT current_user"), codec.sync())
        assert data_rows(after) == [b"\x00\x01\x00\x00\x00\ntenant_sme"]
    finally:
        await raw.close()
    await victim_view(solo, "hooli")


async def test_unicode_escaped_set_config_is_refused(solo: ProxyProcess) -> None:
    """``U&"\\0073et_config"`` once hid the name from the guard's keyword pre-filter (only
    the lockdown stopped it); ``U&`` now sends the text to the parser, which decodes it."""
    await refused_everywhere(
        solo, "SELECT U&\"\\0073et_config\"('role', 't_hooli', true)",
        contains="set_config('role'", victim="hooli")


# ------------------------------------------------------------------------------ 2. forged context


@pytest.mark.parametrize("sql", [
    "SET app.tenant_id = '{victim}'",
    "SET LOCAL app.tenant_id = '{victim}'",
    "SET \"app.tenant_id\" TO '{victim}'",
    "SET APP.TENANT_ID = '{victim}'",
    "SET LOCAL app.tenant_sig = 'deadbeef'",
    "SET LOCAL app.tenant_type = 'agency'",
    "SET LOCAL app.entity_id = '{victim}'",
    "RESET app.tenant_sig",
    "SELECT set_config('app.tenant_id', '{victim}', true)",
    "SELECT set_config('APP.tenant_id', '{victim}', true)",
    "SELECT set_config('app.tenant_sig', 'deadbeef', false)",
    "SELECT set_config('app.tenant_type', 'enterprise', true)",
], ids=["set", "set_local", "quoted", "upper", "sig", "type", "entity", "reset_sig",
        "set_config", "set_config_case", "set_config_sig", "set_config_type"])
async def test_forging_the_tenant_context_is_refused(solo: ProxyProcess, sql: str) -> None:
    victim = str(solo.env.tenants["initech"].org_id)
    await refused_everywhere(solo, sql.format(victim=victim))


async def test_replaying_own_signature_with_the_victims_tenant_id_yields_no_rows(
    solo: ProxyProcess,
) -> None:
    """Layer 4 alone: even with app.* writable, a foreign tenant_id under the attacker's own
    signature makes pgtenant.current_tenant() NULL, so RLS shows nothing."""
    env = solo.env
    conn = await connect(solo)
    try:
        own_sig = await conn.fetchval("SELECT current_setting('app.tenant_sig')")
        assert len(own_sig) == 64
        victim = str(env.tenants["initech"].org_id)
        assert_refused(await error_of(conn.execute(
            f"SELECT set_config('app.tenant_id', '{victim}', true)")), contains=GUARD)
    finally:
        await conn.close()
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        async with admin.transaction():
            await admin.execute("SELECT set_config('app.tenant_id', $1, true), "
                                "set_config('app.tenant_type', 'sme', true), "
                                "set_config('app.entity_id', '', true), "
                                "set_config('app.tenant_sig', $2, true)", victim, own_sig)
            await admin.execute("SET LOCAL ROLE tenant_sme")
            assert await admin.fetchval("SELECT pgtenant.current_tenant()") is None
            assert await admin.fetch("SELECT name FROM public.campaigns") == []
    finally:
        await admin.close()


# ------------------------------------------------------------------------------ 3. search_path


@pytest.mark.parametrize("sql", [
    "SET search_path = t_hooli, public",
    "SET LOCAL search_path TO t_hooli",
    "SET SCHEMA 't_hooli'",
    "RESET search_path; SELECT 1",
    "SELECT set_config('search_path', 't_hooli', true)",
    "SELECT set_config('SEARCH_PATH', 'tenant_b', true)",
])
async def test_search_path_changes_are_refused(solo: ProxyProcess, sql: str) -> None:
    await refused_everywhere(solo, sql, victim="hooli")


@pytest.mark.parametrize("sql", [
    "SELECT * FROM t_hooli.projects",
    "SELECT * FROM \"t_hooli\".\"projects\"",
    "INSERT INTO t_hooli.projects (name) VALUES ('acme: planted')",
    "SELECT * FROM t_globex.projects",
    "DELETE FROM t_hooli.projects",
])
async def test_schema_qualified_access_to_another_tenants_schema_is_denied(
    solo: ProxyProcess, sql: str,
) -> None:
    await refused_everywhere(solo, sql, contains="permission denied for schema",
                             victim="hooli")


async def test_another_enterprise_tenant_cannot_read_hooli_schema(solo: ProxyProcess) -> None:
    conn = await connect(solo, "globex")
    try:
        assert await conn.fetchval("SELECT current_user") == "t_globex"
        assert_refused(await error_of(conn.fetch("SELECT * FROM t_hooli.projects")),
                       contains="permission denied for schema t_hooli")
        names = [r[0] for r in await conn.fetch("SELECT name FROM projects ORDER BY name")]
        assert names == solo.env.tenants["globex"].rows["t_globex.projects"]
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()
    await victim_view(solo, "hooli", same_pid=pid)


async def test_sme_sees_no_agency_rows_through_tables_or_the_unified_view(
    solo: ProxyProcess,
) -> None:
    env = solo.env
    conn = await connect(solo)
    try:
        assert await conn.fetch("SELECT * FROM tenant_b.entity_data") == []
        assert_refused(await error_of(conn.fetch("SELECT * FROM tenant_b.workspace_entities")),
                       contains="permission denied for table workspace_entities")
        rows = await conn.fetch("SELECT organization_id FROM public.resources_unified")
        assert rows and {r[0] for r in rows} == {env.tenants[ATTACKER].org_id}
        assert_refused(await error_of(conn.execute(
            "INSERT INTO tenant_b.entity_data (organization_id, entity_id, data_type) "
            f"VALUES ('{env.tenants['umbrella'].org_id}', "
            f"'{env.tenants['umbrella'].entities['client_a']}', 'x')")),
            contains="permission denied for table entity_data")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()
    await victim_view(solo, "umbrella", same_pid=pid)


# ------------------------------------------------------------------------------ 4. COMMIT tricks


@pytest.mark.parametrize(("sql", "sqlstate", "contains"), [
    ("COMMIT; SELECT * FROM campaigns", "42P01", 'relation "campaigns" does not exist'),
    ("COMMIT; SELECT * FROM public.campaigns", "42501", "permission denied for schema public"),
    ("ROLLBACK; SELECT * FROM public.campaigns", "42501", "permission denied for schema"),
    ("END; SELECT * FROM tenant_b.entity_data", "42501", "permission denied for schema"),
    ("ABORT; SELECT * FROM t_hooli.projects", "42501", "permission denied for schema"),
    ("COMMIT; SELECT * FROM pgtenant.signing_keys", "42501", "permission denied for table"),
    ("COMMIT; SELECT * FROM pgtenant.tokens", "42501", "permission denied for table"),
    ("COMMIT; SELECT * FROM pgtenant.organizations", "42501", "permission denied for table"),
    ("END; RESET ROLE; SELECT * FROM t_hooli.projects", "42501", GUARD),
    ("COMMIT; SET ROLE t_hooli; SELECT * FROM t_hooli.projects", "42501", GUARD),
    ("ROLLBACK; SELECT set_config('role', 't_hooli', true); TABLE t_hooli.projects",
     "42501", GUARD),
    ("COMMIT; SET SESSION AUTHORIZATION DEFAULT; TABLE public.campaigns", "42501", GUARD),
], ids=["commit_unqualified", "commit_public", "rollback", "end", "abort", "signing_keys",
        "tokens", "organizations", "end_reset_role", "commit_set_role",
        "rollback_set_config", "commit_session_authorization"])
async def test_statements_after_commit_run_as_the_login_role_and_see_nothing(
    solo: ProxyProcess, sql: str, sqlstate: str, contains: str,
) -> None:
    env = solo.env
    conn = await pconnect(solo)
    try:
        out = await simple_outcome(conn, sql)
        assert_no_victim_rows(out, env)
        # Either the guard refuses a text that goes on after a transaction end, or the rest
        # runs as the bare login role, which Postgres refuses on its own.
        if GUARD in str(out):
            assert_refused(out, "42501", GUARD)
        else:
            assert_refused(out, sqlstate, contains)
    finally:
        await conn.close()
    attacker = await connect(solo)
    try:
        pid = await attacker_view(attacker, env)
    finally:
        await attacker.close()
    await victim_view(solo, "initech", same_pid=pid)
    await victim_view(solo, "hooli", same_pid=pid)


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK", "END", "ABORT"])
async def test_commit_then_reading_the_signing_key_is_refused(
    solo: ProxyProcess, end: str,
) -> None:
    """Found escape (HEAD 455846b): the rest of the Query ran as the login role, which may
    EXECUTE pgtenant.signing_key(). The guard now refuses statements after a txn end."""
    conn = await pconnect(solo)
    try:
        out = await simple_outcome(conn, f"{end}; SELECT pgtenant.signing_key()")
    finally:
        await conn.close()
    assert_refused(out, contains=(GUARD, "permission denied for function signing_key"))
    attacker = await connect(solo)
    try:
        pid = await attacker_view(attacker, solo.env)
    finally:
        await attacker.close()
    await victim_view(solo, "initech", same_pid=pid)


@pytest.mark.parametrize("sql", [
    "COMMIT AND CHAIN", "ROLLBACK AND CHAIN", "END AND CHAIN", "ABORT AND CHAIN",
])
async def test_chained_transaction_without_context_is_refused(
    solo: ProxyProcess, sql: str,
) -> None:
    """AND CHAIN would open a transaction the proxy does not inject into (status stays T),
    so the next Query would run as the login role."""
    conn = await pconnect(solo)
    try:
        await simple_all(conn, "BEGIN")
        assert_refused(await simple_outcome(conn, sql), contains=GUARD)
        await simple_all(conn, "ROLLBACK")
        out = await simple_outcome(conn, "SELECT current_user, pgtenant.signing_key()")
        assert_refused(out, contains="permission denied for function signing_key")
    finally:
        await conn.close()
    attacker = await connect(solo)
    try:
        pid = await attacker_view(attacker, solo.env)
    finally:
        await attacker.close()
    await victim_view(solo, "initech", same_pid=pid)


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
async def test_extended_commit_then_reading_the_signing_key_is_refused(
    solo: ProxyProcess, end: str,
) -> None:
    raw = await Raw.login(solo)
    try:
        replies = await raw.request(extended(end), extended("SELECT pgtenant.signing_key()"),
                                    codec.sync())
    finally:
        await raw.close()
    await victim_view(solo, "initech")
    assert not data_rows(replies), f"signing key leaked: {data_rows(replies)}"
    assert errors(replies) and errors(replies)[0]["C"] == "42501"


async def test_query_inside_an_unsynced_batch_after_commit_is_not_the_login_role(
    solo: ProxyProcess,
) -> None:
    """Execute 'COMMIT' then a simple Query before any Sync: the Query shares the batch's
    ReadyForQuery; it must not run as the login role (signing key, set_config)."""
    raw = await Raw.login(solo)
    try:
        replies = await raw.request(
            extended("COMMIT"),
            codec.query("SELECT pgtenant.signing_key()"))
        rest = await raw.request(codec.sync())
        after = await raw.request(codec.query("SELECT current_user"))
    finally:
        await raw.close()
    assert not data_rows(replies) and not data_rows(rest), "signing key leaked"
    assert [e["C"] for e in errors(replies + rest)][:1] == ["42501"]
    assert b"tenant_sme" in data_rows(after)[0]
    await victim_view(solo, "initech")


async def test_extended_commit_then_unicode_escaped_set_config_role_is_refused(
    solo: ProxyProcess,
) -> None:
    env = solo.env
    raw = await Raw.login(solo)
    try:
        replies = await raw.request(
            extended("COMMIT"),
            extended("SELECT U&\"\\0073et_config\"('role', 't_hooli', true)"),
            extended("SELECT name FROM t_hooli.projects"), codec.sync())
    finally:
        await raw.close()
    await victim_view(solo, "hooli")
    assert_no_victim_rows(data_rows(replies), env)
    assert errors(replies) and errors(replies)[0]["C"] == "42501"


async def test_commit_then_unicode_escaped_set_config_role_is_refused(
    solo: ProxyProcess,
) -> None:
    env = solo.env
    conn = await pconnect(solo)
    try:
        out = await simple_outcome(
            conn, "COMMIT; SELECT U&\"\\0073et_config\"('role', 't_hooli', true); "
                  "SELECT name, current_user FROM t_hooli.projects")
    finally:
        await conn.close()
    await victim_view(solo, "hooli")
    assert_no_victim_rows(out, env)
    assert_refused(out)


async def test_commit_then_forging_a_signed_context_for_another_sme_is_refused(
    solo: ProxyProcess,
) -> None:
    env = solo.env
    victim = str(env.tenants["initech"].org_id)
    conn = await pconnect(solo)
    try:
        out = await simple_outcome(conn, "COMMIT; SELECT pgtenant.signing_key()")
        if isinstance(out, psycopg.Error):  # the key did not leak: nothing to forge with
            assert_refused(out)
            return
        key = bytes(out[-1][0][0])
        sig = hmac.new(key, f"{victim}|sme|".encode(), hashlib.sha256).hexdigest()
        setc = 'U&"\\0073et_config"'
        out = await simple_outcome(
            conn, f"COMMIT; SELECT {setc}('app.tenant_id', '{victim}', true), "
                  f"{setc}('app.tenant_type', 'sme', true), {setc}('app.entity_id', '', true), "
                  f"{setc}('app.tenant_sig', '{sig}', true), {setc}('role', 'tenant_sme', true);"
                  " SELECT name FROM public.campaigns")
    finally:
        await conn.close()
    assert_no_victim_rows(out, env)
    assert_refused(out)


async def test_extended_commit_then_binding_the_proxy_context_statement_is_refused(
    solo: ProxyProcess,
) -> None:
    """Found by this suite (an escape before the fix): after an executed COMMIT, a Bind of
    the proxy's own statement with chosen values ran as the login role. Its name is now
    reserved: the client is disconnected before anything of that batch reaches Postgres."""
    env = solo.env
    raw = await Raw.login(solo)
    try:
        values = (str(env.tenants["hooli"].org_id).encode(), b"enterprise", b"", b"",
                  b"t_hooli", b"t_hooli")
        fields = await raw.fatal_and_close(
            extended("COMMIT"),
            codec.bind("", "__pgtenant_ctx", list(values)), codec.execute(),
            extended("SELECT name FROM t_hooli.projects"), codec.sync())
    finally:
        await raw.close()
    assert fields["C"] == "08P01" and "reserved" in fields["M"]
    await victim_view(solo, "hooli")


# (before, after) the E'<lead byte>\' literal: Postgres runs ``after``; the guard sees it
# inside the string literal (plus, for the second, the comment ``/*'); -- */``).
_HIDDEN = {
    "set_role": (b"SELECT E'", b"; SET LOCAL ROLE t_hooli; "
                 b"SELECT name FROM t_hooli.projects; --'"),
    "commit_signing_key": (b"SELECT length(E'", b"); COMMIT; "
                           b"SELECT pgtenant.signing_key() /*'); -- */"),
}


@pytest.mark.parametrize(("encoding", "hidden"), [
    ("SJIS", "set_role"), ("BIG5", "set_role"), ("GBK", "set_role"),
    ("SJIS", "commit_signing_key"),
])
async def test_multibyte_client_encoding_cannot_hide_statements_from_the_guard(
    solo: ProxyProcess, encoding: str, hidden: str,
) -> None:
    env = solo.env
    lead = {"SJIS": b"\x95", "BIG5": b"\xa5", "GBK": b"\x81"}[encoding]
    before, after = _HIDDEN[hidden]
    payload = before + lead + b"\\'" + after
    conn = await psycopg.AsyncConnection.connect(solo.dsn(ATTACKER), autocommit=False)
    try:
        # Found by this suite (an escape before the fix): encodings whose multibyte
        # characters may contain ASCII bytes are refused, so the guard and Postgres always
        # lex the same text the same way.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="client_encoding"):
            await conn.execute(f"SET LOCAL client_encoding TO '{encoding}'", prepare=False)
        await conn.rollback()
        out = await simple_outcome(conn, payload)  # the same bytes, lexed as UTF-8 by both
        await conn.rollback()
    finally:
        await conn.close()
    await victim_view(solo, "hooli")
    assert_no_victim_rows(out, env)
    values = [v for res in (out if isinstance(out, list) else []) for row in res for v in row]
    assert not any(isinstance(v, (bytes, memoryview)) for v in values), f"key leaked: {out}"
    assert isinstance(out, psycopg.Error) and out.sqlstate in ("22021", "42501"), out


async def test_tenant_cannot_see_or_signal_other_tenants_backends(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Inside the tenant role: pg_stat_activity is refused (init revokes its function from
    PUBLIC), and cancel / terminate of another tenant's backend are refused by Postgres."""
    proxy = start_proxy(pool_size=2)
    env = proxy.env
    victim = await connect(proxy, "initech")
    attacker = await connect(proxy)
    try:
        tr = victim.transaction()
        await tr.start()  # holds its server: injected text (with its signature) is visible
        victim_pid = await victim.fetchval("SELECT pg_backend_pid()")
        victim_sig = await victim.fetchval("SELECT current_setting('app.tenant_sig')")
        rows = await error_of(attacker.fetch("SELECT pid, usename, query FROM pg_stat_activity"))
        assert_refused(rows, contains="permission denied for function pg_stat_get_activity")
        text = repr(rows)
        assert victim_sig not in text and str(env.tenants["initech"].org_id) not in text
        # pg_cancel_backend stays locked; pg_terminate_backend() calls become pgtenant's,
        # which ends only the caller's own backend.
        assert_refused(await error_of(attacker.fetchval("SELECT pg_cancel_backend($1)",
                                                        victim_pid)),
                       contains="permission denied for function pg_cancel_backend")
        for sql in ("SELECT pg_terminate_backend($1)",
                    "SELECT pg_catalog.pg_terminate_backend($1)"):
            assert_refused(await error_of(attacker.fetchval(sql, victim_pid)),
                           contains="only its own backend")
        # The victim is untouched and still itself.
        assert await victim.fetchval("SELECT current_setting('app.tenant_id')") == str(
            env.tenants["initech"].org_id)
        names = [r[0] for r in await victim.fetch("SELECT name FROM campaigns ORDER BY 1")]
        assert names == env.tenants["initech"].rows["public.campaigns"]
        await tr.rollback()
    finally:
        await attacker.close()
        await victim.close()


@pytest.mark.parametrize("protocol", ["simple", "extended"])
async def test_commit_then_spying_on_and_cancelling_other_tenants_backends_is_refused(
    start_proxy: Callable[..., ProxyProcess], protocol: str,
) -> None:
    proxy = start_proxy(pool_size=2)
    env = proxy.env
    victim = await connect(proxy, "initech")
    try:
        tr = victim.transaction()
        await tr.start()  # the victim's backend shows its injected Query text
        victim_pid = await victim.fetchval("SELECT pg_backend_pid()")
        spy_sql = f"SELECT query FROM pg_stat_activity WHERE pid = {victim_pid}"
        cancel_sql = f"SELECT pg_cancel_backend({victim_pid})"
        if protocol == "simple":
            spy = await pconnect(proxy)
            try:
                seen = await simple_outcome(spy, f"COMMIT; {spy_sql}")
                cancel = await simple_outcome(spy, f"COMMIT; {cancel_sql}")
            finally:
                await spy.close()
            assert_refused(cancel, contains=GUARD)
        else:
            raw = await Raw.login(proxy)
            try:
                seen = data_rows(await raw.request(extended("COMMIT"), extended(spy_sql),
                                                   codec.sync()))
                replies = await raw.request(extended("COMMIT"), extended(cancel_sql),
                                            codec.sync())
            finally:
                await raw.close()
            assert [e["C"] for e in errors(replies)] == ["42501"], data_rows(replies)
        assert await victim.fetchval("SELECT current_setting('app.tenant_id')") == str(
            env.tenants["initech"].org_id)
        await tr.rollback()
    finally:
        await victim.close()
    assert str(env.tenants["initech"].org_id) not in flat(seen), f"victim context: {seen}"


# ------------------------------------------------------------------------------ 5. temp objects


@pytest.mark.parametrize(("sql", "pins"), [
    ("CREATE TEMP TABLE campaigns (name text)", True),
    ("CREATE TEMPORARY VIEW campaigns AS SELECT 'x'::text AS name", True),
    ("CREATE TABLE pg_temp.campaigns (name text)", True),
    ("CREATE VIEW pg_temp.campaigns AS SELECT 'x'::text AS name", True),
    ("SELECT 1 AS name INTO TEMP campaigns", True),
    ("CREATE TEMP SEQUENCE s", True),
    ("CREATE TEMP TABLE campaigns (name text) ON COMMIT DROP", False),
])
async def test_temp_objects_shadowing_shared_tables_stay_in_the_attackers_session(
    solo: ProxyProcess, sql: str, pins: bool,
) -> None:
    """Tenants may make temp objects (temp_tables): one named like a shared table shadows
    it for the attacker's own session only. A session object pins the server, which is
    closed when the attacker leaves; an ON COMMIT DROP one leaves the server emptied for the
    next client on the same backend."""
    env = solo.env
    conn = await connect(solo)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        async with conn.transaction():
            await conn.execute(sql)
            # Inside the attacker's session, RLS still holds on what it can reach.
            assert_no_victim_rows(await conn.fetch("SELECT * FROM public.campaigns"), env)
    finally:
        await conn.close()
    if pins:
        await victim_view(solo, "initech", other_pid=pid)
    else:
        await victim_view(solo, "initech", same_pid=pid)
    again = await connect(solo)
    try:
        await attacker_view(again, env)  # its next session: the shared table again
        assert await again.fetchval("SELECT pg_catalog.to_regclass('pg_temp.campaigns')") \
            is None
    finally:
        await again.close()


async def test_pg_temp_qualified_names_resolve_to_nothing(solo: ProxyProcess) -> None:
    await refused_everywhere(solo, "SELECT * FROM pg_temp.campaigns", sqlstate="42P01",
                             contains="does not exist")


async def test_creating_functions_anywhere_is_denied(solo: ProxyProcess) -> None:
    for schema in ("public", "tenant_b", "t_hooli", "pgtenant"):
        await refused_everywhere(
            solo, f"CREATE FUNCTION {schema}.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            contains="permission denied for schema", extended=False)


# ------------------------------------------------------------------------------ 6. session state


async def test_with_hold_cursor_stays_with_its_session_and_dies_with_it(
    solo: ProxyProcess,
) -> None:
    """A WITH HOLD cursor pins its server to the client (session mode) for the rest of the
    client's session: its rows are the client's own; the next tenant gets a fresh server."""
    conn = await connect(solo)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("BEGIN; DECLARE leak CURSOR WITH HOLD FOR "
                           "SELECT name FROM public.campaigns; COMMIT")
        rows = [r["name"] for r in await conn.fetch("FETCH ALL FROM leak")]
        assert rows and all(r.startswith(f"{ATTACKER}: ") for r in rows), rows
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # pinned
    finally:
        await conn.close()
    victim_pid = await victim_view(solo, "initech", other_pid=pid)
    victim = await connect(solo, "initech")
    try:
        assert_refused(await error_of(victim.fetch("FETCH ALL FROM leak")), "34000")
        assert await victim.fetchval("SELECT pg_backend_pid()") == victim_pid
    finally:
        await victim.close()


async def test_listen_and_notify_where_channels_cannot_be_mapped_are_refused(
    solo: ProxyProcess,
) -> None:
    """Notification channels are database-wide: a lone LISTEN/NOTIFY is mapped to the
    tenant's own channels (tests/integration/test_notify.py); where the proxy cannot map it
    (several statements in one text) it is refused; pg_notify() calls become
    pgtenant.pg_notify(), which notifies the caller's own tenant only."""
    for sql in ("SELECT 1; LISTEN tenant_news", "SELECT 1; NOTIFY tenant_news, 'spoof'",
                "SELECT 1; UNLISTEN *"):
        await refused_everywhere(solo, sql, contains="only statement of")
    victim = await connect(solo, "initech")
    attacker = await connect(solo)
    heard: dict[str, list[str]] = {"victim": [], "attacker": []}
    try:
        await victim.add_listener("tenant_news", lambda *a: heard["victim"].append(a[3]))
        await attacker.add_listener("tenant_news", lambda *a: heard["attacker"].append(a[3]))
        for sql in ("SELECT pg_notify('tenant_news', 'spoof')",
                    "SELECT pg_catalog.pg_notify('tenant_news', 'spoof')",
                    "SELECT pg_notify($1, 'spoof') FROM (VALUES (1)) v"):
            args = ["tenant_news"] if "$1" in sql else []
            await attacker.fetch(sql, *args)
        for _ in range(100):
            if len(heard["attacker"]) == 3:
                break
            await asyncio.sleep(0.02)
        await victim.fetchval("SELECT 1")  # a round trip: anything owed has arrived
    finally:
        await attacker.close()
        await victim.close()
    assert heard == {"victim": [], "attacker": ["spoof"] * 3}


async def test_session_advisory_lock_does_not_outlive_the_transaction(
    solo: ProxyProcess,
) -> None:
    conn = await connect(solo)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert await conn.fetchval("SELECT pg_try_advisory_lock(4242)") is True
    finally:
        await conn.close()
    await victim_view(solo, "initech", other_pid=pid)
    victim = await connect(solo, "initech")
    try:
        for _ in range(50):  # the retired backend exits asynchronously
            if await victim.fetchval("SELECT pg_try_advisory_xact_lock(4242)"):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the attacker's session advisory lock outlived its transaction")
    finally:
        await victim.close()


async def test_sql_prepare_stays_with_its_session_and_never_reaches_the_victim(
    solo: ProxyProcess,
) -> None:
    """SQL PREPARE pins the server to its client (session mode): later transactions of that
    client may EXECUTE it (its own rows only); the victim never sees the statement."""
    conn = await connect(solo)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("PREPARE leak AS SELECT name FROM campaigns")
        rows = [r["name"] for r in await conn.fetch("EXECUTE leak")]
        assert rows and all(r.startswith(f"{ATTACKER}: ") for r in rows), rows
    finally:
        await conn.close()
    await victim_view(solo, "initech", other_pid=pid)
    victim = await connect(solo, "initech")
    try:
        assert_refused(await error_of(victim.fetch("EXECUTE leak")), "26000")
    finally:
        await victim.close()


async def test_protocol_named_statement_left_behind_is_not_bindable_by_the_victim(
    solo: ProxyProcess,
) -> None:
    raw = await Raw.login(solo)
    try:
        replies = await raw.request(
            codec.parse("leak", "SELECT name, current_user FROM campaigns"), codec.sync())
        assert not errors(replies)
    finally:
        await raw.close()
    victim = await Raw.login(solo, "initech")
    try:
        replies = await victim.request(codec.bind("", "leak", []), codec.execute(),
                                       codec.sync())
    finally:
        await victim.close()
    assert [e["C"] for e in errors(replies)] == ["26000"]
    assert not data_rows(replies)
    await victim_view(solo, "initech")


async def test_tenant_cannot_bind_the_proxy_context_statement_with_victim_values(
    solo: ProxyProcess,
) -> None:
    env = solo.env
    values = [str(env.tenants["initech"].org_id).encode(), b"sme", b"", b"", b"public",
              b"tenant_sme"]
    raw = await Raw.login(solo)
    try:
        replies = await raw.request(extended("SELECT pg_backend_pid()"), codec.sync())
        (pid_row,) = data_rows(replies)
        pid = int(pid_row[6:].decode())
        fields = await raw.fatal_and_close(
            codec.bind("", "__pgtenant_ctx", values), codec.execute(),
            extended("SELECT name FROM public.campaigns"), codec.sync())
    finally:
        await raw.close()
    assert fields["C"] == "08P01" and "reserved" in fields["M"]
    await victim_view(solo, "initech")
    del pid  # the attacker's server was closed with it, so no same-pid check here


@pytest.mark.parametrize("message", [
    codec.frame(ord("C"), b"S__pgtenant_ctx\x00"),
    codec.parse("__pgtenant_ctx", "SELECT " + ", ".join(f"${i}::text" for i in range(1, 7))),
    codec.frame(ord("D"), b"S__pgtenant_ctx\x00"),
], ids=["close", "parse", "describe"])
async def test_redefining_the_proxy_context_statement_is_refused(
    solo: ProxyProcess, message: bytes,
) -> None:
    """Closing or re-parsing __pgtenant_ctx would let the next transaction on that server run
    with the attacker's (no-op) context: the names are reserved."""
    raw = await Raw.login(solo)
    try:
        fields = await raw.fatal_and_close(extended("SELECT 1"), message, codec.sync())
    finally:
        await raw.close()
    assert fields["C"] == "08P01" and "reserved" in fields["M"]
    victim = await connect(solo, "initech")
    try:
        row = await victim.fetchrow("SELECT current_user, current_setting('app.tenant_id'), "
                                    "array(SELECT name FROM campaigns ORDER BY 1)")
    finally:
        await victim.close()
    assert row[0] == "tenant_sme" and row[1] == str(solo.env.tenants["initech"].org_id)
    assert list(row[2]) == solo.env.tenants["initech"].rows["public.campaigns"]


async def test_function_call_message_is_refused(solo: ProxyProcess) -> None:
    raw = await Raw.login(solo)
    try:
        # FunctionCall of set_config(text, text, boolean) (oid 2078): role := t_hooli.
        args = [b"role", b"t_hooli", b"\x01"]
        body = struct.pack("!iH", 2078, 0) + struct.pack("!H", len(args))
        for arg in args:
            body += struct.pack("!i", len(arg)) + arg
        body += struct.pack("!H", 0)
        replies = await raw.request(codec.frame(ord("F"), body))
        errs = errors(replies)
        assert [e["C"] for e in errs] == ["42501"] and "FunctionCall" in errs[0]["M"]
        assert not any(t == "V" for t, _ in replies)
        after = await raw.request(codec.query("SELECT current_user"))
        assert b"tenant_sme" in data_rows(after)[0]
    finally:
        await raw.close()
    await victim_view(solo, "hooli")


# ---------------------------------------------------------------------- 7. dynamic SQL etc.


@pytest.mark.parametrize("sql", [
    "DO $$ BEGIN PERFORM set_config('role', 't_hooli', true); END $$",
    "DO LANGUAGE sql $$ SELECT 1 $$",
    "SELECT query_to_xml('SELECT * FROM t_hooli.projects', true, true, '')",
    "SELECT query_to_xmlschema('SELECT 1', true, true, '')",
    "SELECT query_to_xml_and_xmlschema('SELECT 1', true, true, '')",
    "SELECT cursor_to_xml('c'::refcursor, 10, true, true, '')",
    "SELECT pg_catalog.cursor_to_xmlschema('c', true, true, '')",
    "LOAD 'auto_explain'",
    "COPY public.campaigns TO '/tmp/pgtenant-attack-x'",
    "COPY (SELECT name FROM public.campaigns) TO PROGRAM 'cat > /tmp/pgtenant-attack-y'",
    "COPY public.campaigns FROM PROGRAM 'echo x'",
    "COPY public.campaigns FROM '/etc/passwd'",
    "ALTER SYSTEM SET search_path = 't_hooli'",
    "ALTER ROLE tenant_sme SET app.tenant_id = 'x'",
    "ALTER ROLE pgtenant_proxy SET search_path = 't_hooli'",
    "ALTER DATABASE app SET role = 't_hooli'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT lo_import('/etc/passwd')",
], ids=["do_plpgsql", "do_sql", "query_to_xml", "query_to_xmlschema", "query_to_xml_and",
        "cursor_to_xml", "cursor_to_xmlschema", "load", "copy_to_file", "copy_to_program",
        "copy_from_program", "copy_from_file", "alter_system", "alter_role_set",
        "alter_login_role_set", "alter_database_set", "pg_read_file", "lo_import"])
async def test_dynamic_sql_and_server_side_paths_are_refused(solo: ProxyProcess, sql: str) -> None:
    await refused_everywhere(solo, sql, victim="hooli")


@pytest.mark.parametrize(("sql", "tag", "in_block"), [
    ("RESET search_path", "RESET", True),
    ("set search_path to default", "SET", True),
    ("RESET ALL", "RESET", False),
    ("DISCARD ALL", "DISCARD ALL", False),
])
async def test_reset_commands_are_answered_without_dropping_the_context(
        solo: ProxyProcess, sql: str, tag: str, in_block: bool) -> None:
    """RESET search_path, RESET ALL and DISCARD ALL mean "this session's defaults": pgtenant
    answers them itself (protocol/local.py), in the simple and the extended protocol, so
    Postgres never resets the injected context. Where the proxy does not answer them (inside
    a transaction block for RESET ALL / DISCARD ALL, or with other statements in the same
    text) the guard refuses them, and the attacker's next transaction and the victim's
    session on the same backend keep their own context."""
    env = solo.env
    conn = await connect(solo)
    try:
        assert await conn.execute(sql) == tag  # simple Query, outside a block
        await attacker_view(conn, env)
        # The extended protocol as asyncpg prepares (Parse/Describe/Sync, then Bind...): not
        # one batch the proxy answers, so the guard refuses where it would drop the context.
        if sql.startswith(("RESET ALL", "DISCARD")):
            assert_refused(await error_of(conn.fetch(sql)))
        await attacker_view(conn, env)
        if in_block:
            async with conn.transaction():
                assert await conn.execute(sql) == tag
                await attacker_view(conn, env)
        else:
            assert_refused(await attempt_in_same_transaction(conn, env, sql))
        assert_refused(await error_of(conn.execute(f"{sql}; SELECT 1")))
        pid = await attacker_view(conn, env)
    finally:
        await conn.close()
    await victim_view(solo, "initech", same_pid=pid)


def test_reset_commands_in_psycopg_extended_batches(solo: ProxyProcess) -> None:
    """psycopg sends each execute() as Parse/Bind/Describe/Execute/Sync of the unnamed
    statement: the same commands are answered there, with the tags Postgres gives (psycopg
    forgets its prepared statements on the "DISCARD ALL" tag)."""
    with psycopg.connect(solo.dsn(ATTACKER), autocommit=True) as conn:
        for sql, tag in (("RESET search_path", "RESET"), ("RESET ALL", "RESET"),
                         ("DISCARD ALL", "DISCARD ALL")):
            cur = conn.execute(sql)
            assert cur.statusmessage == tag
            assert conn.execute("SELECT current_setting('app.tenant_id')").fetchone() == (
                str(solo.env.tenants[ATTACKER].org_id),)
        conn.autocommit = False
        cur = conn.execute("reset search_path")  # in psycopg's BEGIN
        assert cur.statusmessage == "RESET"
        with pytest.raises(psycopg.ProgrammingError):
            cur.fetchone()
        assert conn.execute("SELECT current_user").fetchone() == ("tenant_sme",)
        conn.rollback()


async def test_discard_all_resets_only_the_clients_own_view(solo: ProxyProcess) -> None:
    """DISCARD ALL outside a transaction is answered by the proxy (the client's statements
    and settings are forgotten); it never reaches Postgres, so the context stays. Inside a
    transaction block (where Postgres refuses it too) the guard refuses it."""
    env = solo.env
    conn = await connect(solo)
    try:
        assert await conn.execute("DISCARD ALL") == "DISCARD ALL"
        await attacker_view(conn, env)
        async with conn.transaction():
            assert_refused(await error_of(conn.execute("DISCARD ALL")))
    finally:
        await conn.close()
    await victim_view(solo, "initech")


# ----------------------------------------------------------------- 8. router, view, control


async def test_router_refuses_an_entity_the_bound_token_does_not_own(solo: ProxyProcess) -> None:
    env = solo.env
    umbrella = env.tenants["umbrella"]
    conn = await connect(solo, "umbrella", token=umbrella.entity_tokens["client_a"])
    try:
        err = await error_of(conn.fetchval(
            "SELECT save_resource_routed('planted', '{}'::jsonb, $1)",
            umbrella.entities["client_b"]))
        assert_refused(err, contains="bound to another entity")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()
    await victim_view(solo, "umbrella", same_pid=pid)


async def test_router_cannot_write_into_another_orgs_entity(solo: ProxyProcess) -> None:
    """An SME naming umbrella's entity: the org comes from the context, so the row lands in
    the attacker's own public.brand_guidelines (rolled back), never in tenant_b."""
    env = solo.env
    conn = await connect(solo)
    try:
        tr = conn.transaction()
        await tr.start()
        out = await conn.fetchval(
            "SELECT save_resource_routed('acme: probe', '{}'::jsonb, $1)",
            env.tenants["umbrella"].entities["client_a"])
        assert '"schema": "public"' in out
        owner = await conn.fetchval(
            "SELECT org_id FROM public.brand_guidelines WHERE name = 'acme: probe'")
        assert owner == env.tenants[ATTACKER].org_id
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await tr.rollback()  # discard the probe row
    finally:
        await conn.close()
    await victim_view(solo, "umbrella", same_pid=pid)


async def test_router_is_not_executable_by_schema_per_tenant_roles(solo: ProxyProcess) -> None:
    conn = await connect(solo, "globex")
    try:
        assert_refused(await error_of(conn.fetchval(
            "SELECT public.save_resource_routed('x', '{}'::jsonb, NULL)")),
            contains="permission denied")
    finally:
        await conn.close()
    await victim_view(solo, "hooli")


async def test_resources_unified_view_shows_only_own_rows(solo: ProxyProcess) -> None:
    env = solo.env
    for slug in ("acme", "umbrella", "initech"):
        conn = await connect(solo, slug)
        try:
            orgs = {r[0] for r in await conn.fetch(
                "SELECT organization_id FROM public.resources_unified")}
        finally:
            await conn.close()
        assert orgs == {env.tenants[slug].org_id}, slug


@pytest.mark.parametrize(("sql", "contains"), [
    ("SELECT pgtenant.signing_key()", "permission denied for function signing_key"),
    ("SELECT * FROM pgtenant.signing_keys", "permission denied for table signing_keys"),
    ("SELECT * FROM pgtenant.resolve_token('\\x00'::bytea)",
     "permission denied for function resolve_token"),
    ("SELECT * FROM pgtenant.resolve_org('00000000-0000-0000-0000-000000000000')",
     "permission denied for function resolve_org"),
    ("SELECT * FROM pgtenant.tokens", "permission denied for table tokens"),
    ("SELECT * FROM pgtenant.organizations", "permission denied for table organizations"),
    ("UPDATE pgtenant.tokens SET revoked_at = NULL", "permission denied for table tokens"),
], ids=["signing_key", "signing_keys", "resolve_token", "resolve_org", "tokens",
        "organizations", "update_tokens"])
async def test_control_schema_is_out_of_reach(solo: ProxyProcess, sql: str,
                                              contains: str) -> None:
    await refused_everywhere(solo, sql, contains=contains)
