"""Startup parameters and plain SETs follow the client to whichever server it gets (issue #4),
and never reach another tenant."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from .conftest import ProxyProcess

SHOW = ("SELECT current_setting('TimeZone') AS tz, current_setting('DateStyle') AS ds, "
        "current_setting('application_name') AS app, current_setting('statement_timeout') AS st,"
        " current_setting('app.tenant_id') AS t, pg_backend_pid() AS pid")


async def test_startup_parameters_hold_in_every_transaction_on_every_server(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2)
    conn = await asyncpg.connect(proxy.dsn("acme"), server_settings={
        "TimeZone": "Asia/Tokyo", "DateStyle": "SQL, DMY", "application_name": "tok-app"})
    other = await asyncpg.connect(proxy.dsn("initech"))
    try:
        assert conn.get_settings().TimeZone == "Asia/Tokyo"  # reported at login, as Postgres
        pids, other_pids = set(), set()
        for _ in range(4):
            async with conn.transaction():
                row = await conn.fetchrow(SHOW)
            assert (row["tz"], row["ds"], row["app"]) == ("Asia/Tokyo", "SQL, DMY", "tok-app")
            pids.add(row["pid"])
            mine = await other.fetchrow(SHOW)  # another tenant on the same servers
            assert mine["tz"] != "Asia/Tokyo" and mine["app"] != "tok-app"
            other_pids.add(mine["pid"])
        assert pids & other_pids  # they really shared a server
        assert conn.get_settings().TimeZone == "Asia/Tokyo"  # no report flipped it back
    finally:
        await conn.close()
        await other.close()


def test_options_settings_apply_and_protected_ones_are_refused(proxy: ProxyProcess) -> None:
    info = proxy.conninfo("acme")
    with psycopg.connect(**info, options="-c statement_timeout=1234 -c TimeZone=UTC") as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
    for options, word in (("-c role=t_hooli", "role"), ("-c search_path=t_hooli", "search_path"),
                          ("-c app.tenant_id=x", "app.tenant_id")):
        with pytest.raises(psycopg.OperationalError, match=word):
            psycopg.connect(**info, options=options)
    # temp_tablespaces is list-quoted: "SET LOCAL temp_tablespaces = 'a,b'" would make it
    # one name, "a,b"; it must hold exactly what the client asked for, as set_config keeps it.
    with psycopg.connect(**info, options="-c temp_tablespaces=pg_default,pg_default "
                                         "-c extra_float_digits=2") as conn:
        assert conn.execute("SHOW temp_tablespaces").fetchone() == ("pg_default,pg_default",)
        assert conn.execute("SHOW extra_float_digits").fetchone() == ("2",)
    # Client-only encodings would let Postgres and the guard read different statements.
    with pytest.raises(psycopg.OperationalError, match="client_encoding 'SJIS' is not supp"):
        psycopg.connect(**info, client_encoding="SJIS")
    with pytest.raises(psycopg.OperationalError,
                       match='invalid value for parameter "client_encoding": "KLINGON"'):
        psycopg.connect(**info, client_encoding="KLINGON")


def test_client_encoding_follows_each_client_on_a_shared_server(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """A LATIN1 client and a UTF8 client alternate on one server: each one's text is decoded
    and its rows encoded in its own encoding (Postgres decodes a message with the encoding in
    force when it arrives, so the proxy switches the session before the client's text)."""
    proxy = start_proxy(pool_size=1)
    sql = "SELECT 'café', length('café'), octet_length('café'), pg_backend_pid()"
    with psycopg.connect(**proxy.conninfo("acme"), client_encoding="latin1",
                         autocommit=True) as latin, \
            psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as utf:
        assert latin.info.parameter_status("client_encoding") == "LATIN1"
        pids = set()
        for _ in range(3):
            row = latin.execute(sql).fetchone()
            assert row[:3] == ("café", 4, 5)  # 0xE9 reached Postgres as LATIN1, not UTF8
            pids.add(row[3])
            assert latin.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
            with latin.transaction():
                assert latin.execute(sql).fetchone()[:3] == ("café", 4, 5)
            row = utf.execute(sql).fetchone()
            assert row[:3] == ("café", 4, 5)
            pids.add(row[3])
            assert utf.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        assert len(pids) == 1  # really one server, switched back and forth
        # No switch was ever reported to either client.
        assert latin.info.parameter_status("client_encoding") == "LATIN1"
        assert utf.info.parameter_status("client_encoding") == "UTF8"
        # The client's own SET is its session's, reported as Postgres reports it, and a
        # SET rolled back with its transaction is undone for the client too.
        utf.execute("SET client_encoding TO 'LATIN1'")
        assert utf.info.parameter_status("client_encoding") == "LATIN1"
        assert utf.execute(sql).fetchone()[:3] == ("café", 4, 5)
        assert latin.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        assert utf.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        with pytest.raises(psycopg.errors.DivisionByZero):
            with latin.transaction():
                latin.execute("SET client_encoding TO 'UTF8'")
                latin.execute("SELECT 1/0")
        assert latin.info.parameter_status("client_encoding") == "LATIN1"
        assert latin.execute(sql).fetchone()[:3] == ("café", 4, 5)
        utf.execute("RESET client_encoding")
        assert utf.execute("SHOW client_encoding").fetchone() == (
            utf.info.parameter_status("client_encoding"),)


def test_plain_set_is_replayed_in_later_transactions_and_reset_undoes_it(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2)
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as conn, \
            psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as other:
        default_tz = other.execute("SHOW TimeZone").fetchone()[0]
        conn.execute("SET TimeZone = 'Pacific/Auckland'")
        assert conn.info.timezone.key == "Pacific/Auckland"  # its ParameterStatus arrived
        conn.execute("SET statement_timeout = 4321")
        for _ in range(3):
            row = conn.execute("SELECT current_setting('TimeZone'), "
                               "current_setting('statement_timeout')").fetchone()
            assert row == ("Pacific/Auckland", "4321ms")
            with conn.transaction():
                assert conn.execute("SHOW TimeZone").fetchone() == ("Pacific/Auckland",)
            assert other.execute("SHOW TimeZone").fetchone() == (default_tz,)  # not leaked
        assert conn.info.timezone.key == "Pacific/Auckland"
        # A SET rolled back with its transaction is forgotten, as in Postgres.
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.transaction():
                conn.execute("SET TimeZone = 'Europe/Paris'")
                conn.execute("SELECT 1/0")
        assert conn.execute("SHOW TimeZone").fetchone() == ("Pacific/Auckland",)
        conn.execute("RESET TimeZone")
        assert conn.execute("SHOW TimeZone").fetchone() == (default_tz,)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)


def test_deallocate_all_and_discard_all_are_understood(proxy: ProxyProcess) -> None:
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True,
                         prepare_threshold=0) as conn:
        assert conn.execute("SELECT count(*) FROM campaigns").fetchone()[0] > 0
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        conn.execute("DEALLOCATE ALL", prepare=False)
        assert conn.execute("SELECT count(*) FROM campaigns").fetchone()[0] > 0  # re-prepared
        conn.execute("DISCARD ALL", prepare=False)
        assert conn.execute("SHOW TimeZone").fetchone()[0] != "Asia/Tokyo"  # forgotten
        assert conn.execute("SELECT current_setting('app.tenant_id')").fetchone() == (
            str(proxy.env.tenants["acme"].org_id),)  # the tenant context, of course, stays


def test_non_ascii_set_of_a_non_utf8_client_keeps_its_value(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """The proxy reads SQL as UTF-8, so it cannot replay a LATIN1 value: the server that ran
    the SET stays with the client instead, and the value holds."""
    proxy = start_proxy(pool_size=2)
    with psycopg.connect(**proxy.conninfo("acme"), client_encoding="LATIN1",
                         autocommit=True) as conn:
        conn.execute("SET custom.label = 'café'")
        for _ in range(3):
            assert conn.execute("SHOW custom.label").fetchone() == ("café",)
