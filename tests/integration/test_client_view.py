"""What a client sets and reads of the session, as a direct connection would have it (issue
15): set_config with bound names and values through pgtenant.set_config, judged on the
values Postgres sees; pg_prepared_statements showing the client's own statements."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from pgtenant.control.hardening import check_lockdown
from pgtenant.control.init import DEFAULT_PROXY_ROLE

from .conftest import ProxyProcess

WHO = ("SELECT current_user, current_setting('app.tenant_id'), "
       "current_setting('search_path'), pg_backend_pid()")
STATEMENTS = "SELECT name, statement FROM pg_prepared_statements ORDER BY name"


def _who(conn: psycopg.Connection) -> tuple[str, str, str, int]:
    row = conn.execute(WHO, prepare=False).fetchone()
    assert row is not None
    return row


def _context(conn: psycopg.Connection) -> tuple[str, str, str]:
    """Who the session is: role, tenant, search_path (not which server it got)."""
    return _who(conn)[:3]


@pytest.mark.parametrize(("name", "value"), [
    ("role", "tenant_agency"), ("ROLE", "postgres"), ("session_authorization", "postgres"),
    ("app.tenant_id", "00000000-0000-0000-0000-000000000000"), ("App.Tenant_Sig", "x"),
    ("app.anything", "x"), ("search_path", "t_hooli, public"), ("seed", "0.5"),
    ("standard_conforming_strings", "off"), ("client_encoding", "SJIS"),
    ("client_encoding", "shift-jis"),
])
@pytest.mark.parametrize("prepare", [False, True])
@pytest.mark.parametrize("is_local", [True, False])
def test_bound_set_config_of_what_pgtenant_owns_is_refused_by_postgres(
        solo: ProxyProcess, name: str, value: str, prepare: bool, is_local: bool) -> None:
    """The text is set_config(%s, %s, ...): the guard sees no name, pgtenant.set_config sees
    the bound values. The attacker stays itself; the victim on the same server too."""
    proxy = solo
    with psycopg.connect(proxy.dsn("acme"), autocommit=True) as conn:
        before = _context(conn)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgtenant"):
            conn.execute("SELECT set_config(%s, %s, %s)", [name, value, is_local],
                         prepare=prepare)
        assert _context(conn) == before
        with conn.transaction():  # in a block: the rest of the block keeps the context
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute("SELECT pg_catalog.set_config(%s, %s, %s)",
                                 [name, value, is_local], prepare=prepare)
            assert _context(conn) == before
        assert conn.info.encoding == "utf-8"
    with psycopg.connect(proxy.dsn("initech"), autocommit=True) as victim:
        user, tenant, _, _ = _who(victim)  # on the one server of the pool
        assert (user, tenant) == ("tenant_sme", str(proxy.env.tenants["initech"].org_id))
        assert victim.execute("SHOW standard_conforming_strings").fetchone() == ("on",)


def test_bound_set_config_of_ordinary_settings_works(
        start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(pool_size=1)
    with psycopg.connect(proxy.dsn("acme")) as conn:
        # SET LOCAL through the stand-in lasts the transaction (it has no SET clause).
        conn.execute("SELECT set_config(%s, %s, true)", ["TimeZone", "Asia/Tokyo"])
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
        conn.rollback()
        assert conn.execute("SHOW TimeZone").fetchone() != ("Asia/Tokyo",)
        conn.rollback()
        # client_encoding follows the client, as a SET of it does.
        conn.execute("SELECT set_config('client_encoding', %s, false)", ["LATIN9"])
        conn.commit()
        assert conn.info.encoding == "iso8859-15"
        assert conn.execute("SELECT 'caf\u00e9\u20ac'").fetchone() == ("caf\u00e9\u20ac",)
        conn.commit()
        # A session setting made with a bound name keeps the server for this session.
        conn.execute("SELECT set_config(%s, %s, false)", ["DateStyle", "SQL, DMY"])
        conn.commit()
        assert conn.execute("SHOW DateStyle").fetchone() == ("SQL, DMY",)
        conn.commit()
        pinned_pid = _who(conn)[3]
        conn.commit()
    with psycopg.connect(proxy.dsn("acme"), autocommit=True) as other:
        # The same tenant's next client: the pinned server was not handed on with the
        # setting (closed when its client left), and the encoding is its own.
        pid = _who(other)[3]
        assert other.execute("SHOW DateStyle").fetchone() != ("SQL, DMY",)
        assert other.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        assert pid != pinned_pid


def test_pg_prepared_statements_shows_the_clients_own_statements(
        start_proxy: Callable[..., ProxyProcess]) -> None:
    """Two clients of one tenant share one server: each sees its own statements under its
    own names, never the other's nor pgtenant's context statement."""
    proxy = start_proxy(pool_size=1)
    odd = b"we'ird\"\\name"
    with psycopg.connect(proxy.dsn("acme"), autocommit=True) as one, \
            psycopg.connect(proxy.dsn("acme"), autocommit=True) as two:
        assert one.execute(STATEMENTS, prepare=False).fetchall() == []
        one.execute("SELECT %s::int AS one", [1], prepare=True)
        one.pgconn.prepare(odd, b"SELECT 'odd'")
        two.execute("SELECT %s::text AS two", ["x"], prepare=True)
        mine = one.execute(STATEMENTS, prepare=False).fetchall()
        assert sorted(r[1] for r in mine) == ["SELECT $1::int AS one", "SELECT 'odd'"]
        assert odd.decode() in {r[0] for r in mine}
        theirs = two.execute(STATEMENTS, prepare=False).fetchall()
        assert [r[1] for r in theirs] == ["SELECT $1::text AS two"]
        # Prepared itself, the reading statement is one of the client's statements.
        # (Its text is the one the server runs: pgtenant's rewrite shows.)
        named = two.execute(STATEMENTS, prepare=True).fetchall()
        assert len(named) == 2 and named[0][1] == "SELECT $1::text AS two"
        assert named[1][1].startswith("SELECT name, statement FROM pgtenant.prepared_stat")
        # Qualified, aliased, joined to itself, as a simple Query: the same view.
        joined = two.execute("SELECT count(*) FROM pg_catalog.pg_prepared_statements AS x, "
                             "pg_prepared_statements y WHERE x.name = y.name",
                             prepare=False).fetchone()
        assert joined == (2,)
        simple = two.pgconn.exec_(b"SELECT count(*) FROM pg_prepared_statements")
        assert simple.get_value(0, 0) == b"2"
        # The context statement never shows, whatever the query.
        assert one.execute("SELECT count(*) FROM pg_prepared_statements "
                           "WHERE name LIKE '\\_\\_pgtenant%%'", prepare=False).fetchone() == (0,)


async def test_lockdown_check_notices_a_missing_or_weakened_stand_in(
        demo_env: object, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(pool_size=1)
    admin = await asyncpg.connect(proxy.env.admin_dsn)
    try:
        login = await asyncpg.connect(proxy.env.proxy_dsn)
        try:
            assert await check_lockdown(login, DEFAULT_PROXY_ROLE, []) == []
            tr = admin.transaction()
            await tr.start()
            try:
                await admin.execute("DELETE FROM pgtenant.protected_settings "
                                    "WHERE name = 'app.'")
                await admin.execute("ALTER FUNCTION pgtenant.set_config(text, text, boolean) "
                                    "SET search_path = pg_catalog")
                await admin.execute("DROP FUNCTION pgtenant.prepared_statements(text[])")
                problems = "\n".join(await check_lockdown(admin, DEFAULT_PROXY_ROLE, []))
            finally:
                await tr.rollback()
        finally:
            await login.close()
    finally:
        await admin.close()
    assert "has a SET clause" in problems
    assert "lets tenants set 'app.'" in problems
    assert "pgtenant.prepared_statements(text[]) is missing" in problems


@pytest.mark.parametrize("how", ["pg_backend_pid()", "reported"])
def test_a_session_may_terminate_its_own_backend_only(
        start_proxy: Callable[..., ProxyProcess], how: str) -> None:
    """pg_terminate_backend with its own pid (the server's, or the one its connection
    reported) ends the session as Postgres would (57P01); any other pid is refused, and the
    other session lives on."""
    proxy = start_proxy(pool_size=2)
    with psycopg.connect(proxy.dsn("initech")) as victim:  # holds its server: a block is open
        victim_pid = _who(victim)[3]
        with psycopg.connect(proxy.dsn("acme"), autocommit=True) as conn:
            for pid in (victim_pid, victim.pgconn.backend_pid, 1):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only its own"):
                    conn.execute("SELECT pg_terminate_backend(%s)", [pid])
            # Not even by naming the stand-in with a forged "own" pid: it ends the caller's
            # backend, never the one it is given.
            with pytest.raises(psycopg.errors.AdminShutdown):
                conn.execute("SELECT pgtenant.pg_terminate_backend(%s, %s)",
                             [victim_pid, victim_pid])
        assert _who(victim)[3] == victim_pid  # the victim's server lives, in its block
        with psycopg.connect(proxy.dsn("acme"), autocommit=True) as conn:
            arg = "pg_backend_pid()" if how == "pg_backend_pid()" else str(
                conn.pgconn.backend_pid)
            with pytest.raises(psycopg.errors.AdminShutdown):
                conn.execute(f"SELECT pg_terminate_backend({arg})")
            assert conn.closed
        assert _who(victim)[3] == victim_pid
        victim.rollback()
    with psycopg.connect(proxy.dsn("acme"), autocommit=True) as after:
        assert _context(after)[0] == "tenant_sme"  # the pool serves on
