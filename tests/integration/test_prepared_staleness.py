"""Renamed prepared statements against SQL DEALLOCATE and DDL (issue 15 item 5).

pgtenant renames a client's named statements to proxy-global ones shared by every client with
the same text, types and search_path (protocol/prepared.py). Two things broke that psycopg's
own suite found:

* psycopg evicts with SQL ``DEALLOCATE name`` and clears with ``DEALLOCATE ALL`` after
  ROLLBACK/DROP/ALTER, inside transaction blocks too, and in pipeline mode through the
  extended protocol: every form must drop the client's name, as Postgres would, and touch no
  other client's statement nor the proxy's.
* After a type is dropped and created again (or a column's type altered), a statement parsed
  before fails at Bind on a direct connection too; but a Parse made after it must get a
  fresh statement, where the proxy answered it with the stale shared copy ("cache lookup
  failed for type").

All on ONE server (pool_size 1), so the shared copy is there when the next Parse comes. The
tenant is an enterprise one (its own schema), given CREATE there for the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import asyncpg
import psycopg
import pytest

from . import rawpg
from .conftest import ProxyProcess
from .rawpg import Msg, RawPg, errors, query, rows, sqlstates, sync

T = "hooli"  # enterprise tenant: schema and role t_hooli, search_path (t_hooli, public)
SCHEMA = "t_hooli"
CAST = "SELECT $1::st_mood::text"  # the parameter's type is resolved to st_mood's OID
WHO = "SELECT current_setting('app.tenant_id', true)"


@pytest.fixture
def solo(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(pool_size=1, extra="auth_failure_delay = 0.0")


@pytest.fixture
async def admin(solo: ProxyProcess) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection straight to Postgres; the tenant may CREATE in its schema
    for the test (granted after the proxy started, revoked and cleaned after)."""
    conn = await asyncpg.connect(solo.env.admin_dsn)
    await conn.execute(f"GRANT CREATE ON SCHEMA {SCHEMA} TO {SCHEMA}")
    try:
        yield conn
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.st_t; "
                           f"DROP TYPE IF EXISTS {SCHEMA}.st_mood CASCADE; "
                           f"REVOKE CREATE ON SCHEMA {SCHEMA} FROM {SCHEMA}")
        await conn.close()


def tenant_id(proxy: ProxyProcess) -> str:
    return str(proxy.env.tenants[T].org_id)


def run(name: str, *params: bytes | None) -> bytes:
    """Bind statement ``name`` into the unnamed portal and execute it, with a Sync."""
    return rawpg.bind("", name, list(params)) + rawpg.execute() + sync()


def ok(msgs: list[Msg]) -> list[list[str | None]]:
    assert not errors(msgs), msgs
    return rows(msgs)


async def recreate_type(conn: RawPg | asyncpg.Connection) -> None:
    sql = (f"DROP TYPE IF EXISTS {SCHEMA}.st_mood CASCADE; "
           f"CREATE TYPE {SCHEMA}.st_mood AS ENUM ('a', 'b')")
    if isinstance(conn, RawPg):
        ok(await conn.request(query(sql)))
    else:
        await conn.execute(sql)


# ------------------------------------------------------------------ DEALLOCATE forms

def _ext(sql: str, name: str = "") -> bytes:
    return (rawpg.parse(name, sql) + rawpg.bind("", name, []) + rawpg.describe_portal()
            + rawpg.execute() + sync())


# In an aborted block Postgres refuses DEALLOCATE (25P02) and drops nothing.
_FAILED_BLOCK = query("BEGIN") + query("SELECT 1/0") + query("DEALLOCATE s") + query("ROLLBACK")
# form -> (frames, how many ReadyForQuery, the CommandComplete tag it must report, the
# SQLSTATEs of the errors it must get)
FORMS: dict[str, tuple[bytes, int, str, list[str | None]]] = {
    "simple": (query("DEALLOCATE s"), 1, "DEALLOCATE", []),
    "prepare_keyword": (query("DEALLOCATE PREPARE s"), 1, "DEALLOCATE", []),
    "all": (query("DEALLOCATE ALL"), 1, "DEALLOCATE ALL", []),
    "in_block": (query("BEGIN") + query("DEALLOCATE s") + query("COMMIT"), 3, "DEALLOCATE",
                 []),
    "all_in_block": (query("BEGIN") + query("DEALLOCATE ALL") + query("COMMIT"), 3,
                     "DEALLOCATE ALL", []),
    "failed_block_then_in_block": (
        _FAILED_BLOCK + query("BEGIN") + query("DEALLOCATE s") + query("COMMIT"), 7,
        "DEALLOCATE", ["22012", "25P02"]),
    "pipelined": (_ext("SELECT 1") + query("DEALLOCATE s") + _ext("SELECT 2"), 3,
                  "DEALLOCATE", []),
    "extended": (_ext("DEALLOCATE s"), 1, "DEALLOCATE", []),
    "extended_named": (_ext("DEALLOCATE s", "d"), 1, "DEALLOCATE", []),
    "extended_pipeline": (  # psycopg's pipeline mode: several statements, one Sync
        rawpg.parse("", "DEALLOCATE s") + rawpg.bind("", "", []) + rawpg.execute()
        + _ext("SELECT 2"), 1, "DEALLOCATE", []),
    "extended_pipeline_in_block": (
        query("BEGIN") + rawpg.parse("", "DEALLOCATE s") + rawpg.bind("", "", [])
        + rawpg.execute() + _ext("SELECT 2") + query("COMMIT"), 3, "DEALLOCATE", []),
    "extended_all": (_ext("DEALLOCATE ALL"), 1, "DEALLOCATE ALL", []),
    "extended_in_block": (query("BEGIN") + _ext("deallocate prepare s") + query("COMMIT"), 3,
                          "DEALLOCATE", []),
}


@pytest.mark.parametrize("form", list(FORMS))
async def test_sql_deallocate_of_a_protocol_statement_in_every_form(
        solo: ProxyProcess, admin: asyncpg.Connection, form: str) -> None:
    """The client's DEALLOCATE succeeds, its name is gone as in Postgres, and parsing the
    same text again is a real Parse: the type was re-created behind the proxy's back
    (straight on Postgres) meanwhile, as psycopg deallocates its statements after DDL.
    Another client's statement with the same text, and the proxy's context, are intact."""
    await recreate_type(admin)
    a = await RawPg.tenant(solo, T)
    b = await RawPg.tenant(solo, T)
    try:
        text = f"SELECT 'shared'::text, ({WHO})"
        ok(await a.request(rawpg.parse("s", CAST), rawpg.parse("w", text), run("s", b"a")))
        ok(await b.request(rawpg.parse("v", text), sync()))
        await recreate_type(admin)  # the server's copy of CAST is stale now

        frames, n, tag, states = FORMS[form]
        got = await a.request(frames, n=n)
        assert sqlstates(got) == states, got
        assert tag in [m.tag for m in got if m.type == "C"], got
        assert [m.body for m in got if m.type == "Z"][-1] == b"I", got

        assert sqlstates(await a.request(run("s", b"a"))) == ["26000"]  # s is gone
        # Parsed again: a fresh statement, not the stale shared copy.
        assert ok(await a.request(rawpg.parse("s", CAST), run("s", b"b"))) == [["b"]]
        # Another client's statement of the same text as A's "w", and A's context.
        assert ok(await b.request(run("v"))) == [["shared", tenant_id(solo)]]
        assert ok(await a.request(rawpg.parse("", WHO), run(""))) == [[tenant_id(solo)]]
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ DDL between executions

@pytest.mark.parametrize("ddl_by", ["same_client", "other_client"])
async def test_type_recreated_between_executions(
        solo: ProxyProcess, admin: asyncpg.Connection, ddl_by: str) -> None:
    """A type dropped and created again through the proxy, by the client or by another
    client of the tenant on the same server. The statement parsed before fails as on a
    direct connection ("cache lookup failed for type"); every statement parsed after,
    named or unnamed, by either client, and the same name parsed again after DEALLOCATE or
    Close, runs."""
    a = await RawPg.tenant(solo, T)
    b = await RawPg.tenant(solo, T)
    ddl = a if ddl_by == "same_client" else b
    try:
        await recreate_type(ddl)
        assert ok(await a.request(rawpg.parse("s", CAST), run("s", b"a"))) == [["a"]]
        assert ok(await a.request(rawpg.parse("", CAST), run("", b"a"))) == [["a"]]
        await recreate_type(ddl)

        old = await a.request(run("s", b"a"))
        assert not errors(old) or sqlstates(old) == ["XX000"], old  # as on Postgres
        for frames in (rawpg.parse("s2", CAST) + run("s2", b"b"),  # a new name, same text
                       rawpg.parse("", CAST) + run("", b"b")):  # the unnamed statement
            assert ok(await a.request(frames)) == [["b"]]
        assert ok(await b.request(rawpg.parse("v", CAST), run("v", b"b"))) == [["b"]]
        ok(await a.request(query("DEALLOCATE s")))
        assert ok(await a.request(rawpg.parse("s", CAST), run("s", b"b"))) == [["b"]]

        await recreate_type(ddl)  # and once more, closing instead of deallocating
        ok(await a.request(rawpg.close_statement("s"), sync()))
        assert ok(await a.request(rawpg.parse("s", CAST), run("s", b"a"))) == [["a"]]
        assert ok(await b.request(rawpg.parse("v2", CAST), run("v2", b"a"))) == [["a"]]
    finally:
        await a.close()
        await b.close()


async def test_ddl_behind_the_proxys_back_is_learnt_from_the_failed_bind(
        solo: ProxyProcess, admin: asyncpg.Connection) -> None:
    """A type re-created straight on Postgres (a migration, another worker): the proxy does
    not see it. The statement parsed before fails as on Postgres; from that error on, the
    client's next Parse of the text (another name, or the other client's) is a fresh one."""
    await recreate_type(admin)
    a = await RawPg.tenant(solo, T)
    b = await RawPg.tenant(solo, T)
    try:
        ok(await a.request(rawpg.parse("s", CAST), run("s", b"a")))
        await recreate_type(admin)
        assert sqlstates(await a.request(run("s", b"a"))) == ["XX000"]  # as on Postgres
        assert ok(await a.request(rawpg.parse("s2", CAST), run("s2", b"b"))) == [["b"]]
        assert ok(await b.request(rawpg.parse("v", CAST), run("v", b"a"))) == [["a"]]
    finally:
        await a.close()
        await b.close()


async def test_alter_column_type_between_executions(
        solo: ProxyProcess, admin: asyncpg.Connection) -> None:
    """ALTER TABLE ... ALTER COLUMN TYPE by another client: statements parsed after it run
    and describe the new type, before any client met the stale copy; those parsed before
    fail as on Postgres ("cached plan must not change result type", a datatype mismatch),
    and parsed again they run."""
    a = await RawPg.tenant(solo, T)
    b = await RawPg.tenant(solo, T)
    select, insert = f"SELECT x FROM {SCHEMA}.st_t", f"INSERT INTO {SCHEMA}.st_t VALUES ($1)"
    try:
        ok(await b.request(query(f"CREATE TABLE {SCHEMA}.st_t (x int); "
                                 f"INSERT INTO {SCHEMA}.st_t VALUES (1)")))
        ok(await a.request(rawpg.parse("q", select), rawpg.parse("i", insert), run("q"),
                           run("i", b"2")))
        ok(await b.request(query(f"ALTER TABLE {SCHEMA}.st_t ALTER COLUMN x TYPE text")))

        got = ok(await b.request(rawpg.parse("q2", select), rawpg.parse("i2", insert),
                                 rawpg.bind("", "i2", [b"4"]), rawpg.execute(),
                                 rawpg.bind("", "q2", []), rawpg.execute(), sync()))
        assert {"1", "2", "4"} <= {v[0] for v in got}, got
        (desc,) = [m for m in await b.request(rawpg.describe_statement("q2"), sync())
                   if m.type == "T"]
        type_oid = desc.body[desc.body.index(b"\x00", 2) + 7 : desc.body.index(b"\x00", 2) + 11]
        assert type_oid == (25).to_bytes(4, "big"), desc  # the column is text now
        for name, params in (("q", ()), ("i", (b"3",))):
            old = await a.request(run(name, *params))
            assert not errors(old) or sqlstates(old)[0] in ("0A000", "42804"), old
        for name, params in (("q3", ()), ("i3", (b"5",))):
            sql = select if name == "q3" else insert
            ok(await a.request(rawpg.parse(name, sql), run(name, *params)))
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ psycopg, as its tests do

def test_psycopg_change_type_and_lru_deallocate(
        solo: ProxyProcess, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg's test_change_type_execute, _savepoint and test_evict_lru_deallocate (without
    their pg_prepared_statements counts, which see the tenant's shared statements): psycopg
    clears its statements with DEALLOCATE ALL after ROLLBACK, and evicts with SQL DEALLOCATE
    when libpq has no PQsendClosePrepared (before 17: forced here)."""
    from psycopg import _connection_base

    monkeypatch.setattr(_connection_base, "_HAS_SEND_CLOSE", False)
    insert = f"INSERT INTO {SCHEMA}.st_t (bar) VALUES (%(enum_col)s::{SCHEMA}.st_mood[])"
    with psycopg.connect(**solo.conninfo(T)) as conn:
        conn.prepare_threshold = 0
        for _ in range(3):
            conn.execute(f"CREATE TYPE {SCHEMA}.st_mood AS ENUM ('foo', 'bar', 'baz')")
            conn.execute(f"CREATE TABLE {SCHEMA}.st_t (id integer, bar {SCHEMA}.st_mood[])")
            conn.cursor().execute(insert, {"enum_col": ["foo"]})
            conn.rollback()
        with conn.transaction():
            for _ in range(3):
                with pytest.raises(ZeroDivisionError), conn.transaction():
                    conn.execute(f"CREATE TYPE {SCHEMA}.st_mood AS ENUM ('foo', 'bar')")
                    conn.execute(f"CREATE TABLE {SCHEMA}.st_t (id int, bar {SCHEMA}.st_mood[])")
                    conn.cursor().execute(insert, {"enum_col": ["foo"]})
                    raise ZeroDivisionError()
        conn.prepared_max = 5
        for i in range(10):
            conn.execute("select 'a'")
            conn.execute(f"select {i}")
        assert len(conn._prepared._names) == 5
        assert conn.execute("select 7").fetchone() == (7,)
        conn.rollback()
