"""Issue #10, classes 1, 3, 4 and 6: protocol state a hostile tenant can reach.

Each test plays the attacker with raw protocol messages (``Raw`` from test_attacks) through
a proxy with ONE server, so the attacker's and the victim's transactions share a backend,
and checks the VICTIM's next transaction as well as what the attacker got:

* the tracker's model must follow the server, not SQL text (EXECUTE hiding a COMMIT, a
  Parse the server skipped after an error, copy messages outside COPY);
* proxy-owned statement names are refused in SQL;
* a server changes tenant empty (sequence state, prepared statements, settings);
* a CancelRequest reaches only the canceller's own running query.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import asyncpg
import pytest

from pgtenant.protocol import codec

from .conftest import ProxyProcess
from .helpers import TenantRaw as Raw
from .helpers import data_rows, errors

ATTACKER = "acme"  # sme: role tenant_sme, RLS on the shared tables
VICTIM = "initech"  # the same tenant type and role: only the signed context separates them
LOGIN_ROLE = "pgtenant_proxy"
WHO = "SELECT current_user, current_setting('app.tenant_id', true)"


def org(proxy: ProxyProcess, slug: str) -> str:
    return str(proxy.env.tenants[slug].org_id)


def rows_text(messages: list[tuple[str, bytes]]) -> list[list[str]]:
    """Returns: every DataRow's columns as text (NULL as '')."""
    out = []
    for body in data_rows(messages):
        count = int.from_bytes(body[:2], "big")
        pos, cols = 2, []
        for _ in range(count):
            size = int.from_bytes(body[pos:pos + 4], "big", signed=True)
            pos += 4
            cols.append("" if size < 0 else body[pos:pos + size].decode())
            pos += max(size, 0)
        out.append(cols)
    return out


async def until_n(raw: Raw, n: int) -> list[tuple[str, bytes]]:
    """Read until the ``n``-th ReadyForQuery."""
    seen: list[tuple[str, bytes]] = []
    for _ in range(n):
        seen += await raw.until()
    return seen


async def victim_who(proxy: ProxyProcess, slug: str = VICTIM) -> tuple[str, str]:
    conn = await asyncpg.connect(proxy.dsn(slug), statement_cache_size=0, timeout=30)
    try:
        row = await conn.fetchrow(WHO)
        assert row is not None
        return row[0], row[1]
    finally:
        await conn.close()


def assert_never_without_context(proxy: ProxyProcess, rows: list[list[str]]) -> None:
    for row in rows:
        if len(row) == 2 and row[0] in (LOGIN_ROLE, "tenant_sme"):
            assert row[0] != LOGIN_ROLE, f"a statement ran as the login role: {row}"
            assert row[1] == org(proxy, ATTACKER), f"a statement ran without context: {row}"


# ------------------------------------------------------------------------------ class 1


async def test_sql_execute_of_a_proxy_statement_is_refused(solo: ProxyProcess) -> None:
    """The attacker prepares COMMIT with the protocol, finds the proxy's global name for it
    in pg_prepared_statement() and EXECUTEs it by SQL between BEGIN and a statement that would
    then run as the login role: the EXECUTE is refused, nothing runs without context."""
    raw = await Raw.login(solo, ATTACKER)
    try:
        await raw.request(codec.parse("c", "COMMIT"), codec.sync())
        listed = await raw.request(codec.query(
            "SELECT name FROM pg_prepared_statement() WHERE statement = 'COMMIT'"))
        names = [r[0] for r in rows_text(listed)]
        assert names and all(n.startswith("__pgtenant_p") for n in names), names
        # Unguessable: not the plain hash of the text that a tenant could compute.
        plain = hashlib.sha1(b"COMMIT\x00\x00\x00\x00public",
                             usedforsecurity=False).hexdigest()[:24]
        assert "__pgtenant_p" + plain not in names
        raw.writer.write(codec.query("BEGIN") + codec.query(f'EXECUTE "{names[0]}"')
                         + codec.query(WHO))
        got = await until_n(raw, 3)
        refused = errors(got)
        assert refused and refused[0]["C"] == "42501" and "reserved" in refused[0]["M"]
        assert_never_without_context(solo, rows_text(got))
        for stmt in (f'DEALLOCATE "{names[0]}"', f'PREPARE "{names[0]}" AS SELECT 1',
                     'EXECUTE "__pgtenant_ctx"', "DEALLOCATE __PGTENANT_CTX"):
            raw.writer.write(codec.query("ROLLBACK") + codec.query(stmt))
            reply = await until_n(raw, 2)
            assert errors(reply) and errors(reply)[0]["C"] == "42501", (stmt, reply)
        await raw.request(codec.query("ROLLBACK"))
    finally:
        await raw.close()
    assert await victim_who(solo) == ("tenant_sme", org(solo, VICTIM))


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_parse_the_server_skipped_is_not_taken_for_the_unnamed_statement(
        solo: ProxyProcess, pipelined: bool) -> None:
    """The server keeps its unnamed statement (COMMIT) when a later Parse "" is skipped after
    an error; a Bind "" after it must not run that COMMIT believed to be a SELECT, which would
    leave the rest of the batch running after the transaction ended, without context."""
    raw = await Raw.login(solo, ATTACKER)
    try:
        await raw.request(codec.parse("", "COMMIT"), codec.sync())
        # The error comes from a named statement, so the skipped Parse "" is the only one.
        skipped = (codec.parse("x", "SELECT 1/0") + codec.bind("", "x", []) + codec.execute()
                   + codec.parse("", "SELECT 2") + codec.sync())
        # No Query here: a Query would destroy the unnamed statement.
        attack = (codec.parse("b", "BEGIN") + codec.bind("", "b", []) + codec.execute()
                  + codec.bind("", "", []) + codec.execute()
                  + codec.parse("w", WHO) + codec.bind("", "w", []) + codec.execute()
                  + codec.sync())
        if pipelined:
            raw.writer.write(skipped + attack)
            got = await until_n(raw, 2)
        else:
            first = await raw.request(skipped)
            assert errors(first)[0]["C"] == "22012"
            raw.writer.write(attack)
            got = await until_n(raw, 1)
        rows = rows_text(got)
        assert_never_without_context(solo, rows)
        assert ["tenant_sme", org(solo, ATTACKER)] in rows or errors(got)
        await raw.request(codec.query("ROLLBACK"))
    finally:
        await raw.close()
    assert await victim_who(solo) == ("tenant_sme", org(solo, VICTIM))


async def test_stray_copy_messages_never_release_a_busy_server(solo: ProxyProcess) -> None:
    """CopyDone/CopyFail/CopyData outside COPY are ignored (as Postgres ignores them), so a
    Sync after them still earns its ReadyForQuery in the proxy's model: the server is not
    released while the attacker's slow query runs, and the victim never gets its row."""
    raw = await Raw.login(solo, ATTACKER)
    victim = await asyncpg.connect(solo.dsn(VICTIM), statement_cache_size=0, timeout=30)
    try:
        raw.writer.write(
            codec.parse("", "SELECT 1") + codec.bind("", "", []) + codec.execute()
            + codec.sync() + codec.frame(ord("c"), b"") + codec.frame(ord("f"), b"x\x00")
            + codec.frame(ord("d"), b"junk") + codec.sync()
            + codec.query("SELECT pg_sleep(0.5), 'attacker-secret'"))
        await asyncio.sleep(0.1)
        got = await asyncio.wait_for(victim.fetch("SELECT 'victim-row' AS v"), 10)
        assert [r["v"] for r in got] == ["victim-row"]
        mine = await until_n(raw, 3)
        assert b"attacker-secret" in b"".join(data_rows(mine))
        assert not errors(mine)
    finally:
        await victim.close()
        await raw.close()


async def test_copy_in_pipelined_the_way_libpq_sends_it_keeps_the_model_exact(
        solo: ProxyProcess) -> None:
    """libpq sends COPY with Parse/Bind/Execute/Sync, then the data, CopyDone and a second
    Sync; Postgres ignores the first Sync (copy-in mode) and answers once. The server's
    CopyInResponse, not the client's messages, tells the proxy so."""
    raw = await Raw.login(solo, "hooli")
    try:
        raw.writer.write(codec.parse("", "COPY projects (name) FROM STDIN")
                         + codec.bind("", "", []) + codec.execute() + codec.sync())
        seen = [await raw.read() for _ in range(3)]
        assert [k for k, _ in seen] == ["1", "2", "G"], seen
        raw.writer.write(codec.frame(ord("d"), b"hooli: copied\n") + codec.sync()
                         + codec.frame(ord("c"), b"") + codec.sync())
        done = await raw.until()
        assert ("C", b"COPY 1\x00") in done and done[-1] == ("Z", b"I")
        after = await raw.request(codec.query("SELECT count(*) FROM projects "
                                              "WHERE name = 'hooli: copied'"))
        assert rows_text(after) == [["1"]]
        await raw.request(codec.query("DELETE FROM projects WHERE name = 'hooli: copied'"))
    finally:
        await raw.close()


# ------------------------------------------------------------------------------ class 4


async def test_sequence_state_does_not_reach_the_next_tenant(solo: ProxyProcess) -> None:
    """lastval() is session state of the backend: the victim must not read the id the
    attacker's INSERT generated last on the same server."""
    raw = await Raw.login(solo, "hooli")  # t_hooli.projects has a serial id
    try:
        got = await raw.request(codec.query(
            "INSERT INTO projects (name) VALUES ('hooli: seq probe') "
            "RETURNING id, pg_backend_pid(), lastval()"))
        assert not errors(got), errors(got)
        (generated, attacker_pid, last), = rows_text(got)
        assert generated == last
        await raw.request(codec.query("DELETE FROM projects WHERE name = 'hooli: seq probe'"))
    finally:
        await raw.close()
    victim = await asyncpg.connect(solo.dsn(VICTIM), statement_cache_size=0, timeout=30)
    try:
        assert str(await victim.fetchval("SELECT pg_backend_pid()")) == attacker_pid
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
            await victim.fetchval("SELECT lastval()")
    finally:
        await victim.close()


async def test_prepared_statements_of_one_tenant_are_invisible_to_the_next(
        solo: ProxyProcess) -> None:
    raw = await Raw.login(solo, ATTACKER)
    try:
        await raw.request(codec.parse("s", "SELECT 'acme-secret-literal'"),
                          codec.bind("", "s", []), codec.execute(), codec.sync())
        mine = await raw.request(codec.query("SELECT statement FROM pg_prepared_statements"))
        assert "acme-secret-literal" in str(rows_text(mine))
    finally:
        await raw.close()
    victim = await asyncpg.connect(solo.dsn(VICTIM), statement_cache_size=0, timeout=30)
    try:
        seen = await victim.fetch("SELECT statement FROM pg_prepared_statements")
        seen += await victim.fetch("SELECT statement FROM pg_prepared_statement()")
        assert "acme-secret-literal" not in str(seen)
    finally:
        await victim.close()


async def test_a_server_changes_tenant_with_its_settings_reset(solo: ProxyProcess) -> None:
    """Whatever the attacker's session left on the server (here through a SECURITY DEFINER
    function of the application that sets a session setting, a path the proxy cannot see),
    the next tenant's transaction starts from the defaults."""
    admin = await asyncpg.connect(solo.env.admin_dsn)
    try:
        await admin.execute(
            "CREATE OR REPLACE FUNCTION public.app_set_style() RETURNS text LANGUAGE sql "
            "SECURITY DEFINER SET search_path = pg_catalog AS "
            "$$ SELECT set_config('DateStyle', 'SQL, DMY', false) $$")
        await admin.execute("GRANT EXECUTE ON FUNCTION public.app_set_style() TO tenant_sme")
        raw = await Raw.login(solo, ATTACKER)
        try:
            got = await raw.request(codec.query("SELECT public.app_set_style(), "
                                                "pg_backend_pid()"))
            assert not errors(got), errors(got)
            attacker_pid = rows_text(got)[0][1]
        finally:
            await raw.close()
        victim = await asyncpg.connect(solo.dsn(VICTIM), statement_cache_size=0, timeout=30)
        try:
            assert str(await victim.fetchval("SELECT pg_backend_pid()")) == attacker_pid
            assert await victim.fetchval("SHOW DateStyle") == "ISO, MDY"
        finally:
            await victim.close()
    finally:
        await admin.execute("DROP FUNCTION IF EXISTS public.app_set_style()")
        await admin.close()


# ------------------------------------------------------------------------------ class 6


async def test_cancel_after_own_query_never_cancels_the_next_tenants_query(
        solo: ProxyProcess) -> None:
    """The attacker cancels right after its own short query completed: the cancel must not
    land on the victim's query that got the same (only) server next."""
    raw = await Raw.login(solo, ATTACKER)
    victim = await asyncpg.connect(solo.dsn(VICTIM), statement_cache_size=0, timeout=30)
    pid, secret = raw.key
    try:
        for _ in range(40):
            raw.writer.write(codec.query("SELECT 1"))
            victim_query = asyncio.ensure_future(victim.fetchval("SELECT pg_sleep(0.02)"))
            await raw.until()
            _, w = await asyncio.open_connection("127.0.0.1", solo.port)
            w.write(codec.cancel_request(pid, secret))
            await w.drain()
            w.close()
            await asyncio.wait_for(victim_query, 10)  # QueryCanceledError would fail here
    finally:
        await victim.close()
        await raw.close()


async def test_cancel_of_a_running_query_still_works(solo: ProxyProcess) -> None:
    raw = await Raw.login(solo, ATTACKER)
    try:
        raw.writer.write(codec.query("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.3)
        _, w = await asyncio.open_connection("127.0.0.1", solo.port)
        w.write(codec.cancel_request(*raw.key))
        await w.drain()
        w.close()
        got = await raw.until()
        assert errors(got)[0]["C"] == "57014"
    finally:
        await raw.close()
    assert await victim_who(solo) == ("tenant_sme", org(solo, VICTIM))


async def test_a_tenant_cannot_pin_more_servers_than_its_cap(
        start_proxy: Callable[..., ProxyProcess]) -> None:
    """Session state pins a server to its client (session mode); one tenant's sessions may
    keep at most max_pinned_servers, so they cannot starve the pool that way."""
    proxy = start_proxy(pool_size=3, extra="[tenant_limits]\nmax_pinned_servers = 1")
    first = await asyncpg.connect(proxy.dsn(ATTACKER), statement_cache_size=0, timeout=30)
    second = await asyncpg.connect(proxy.dsn(ATTACKER), statement_cache_size=0, timeout=30)
    other = await asyncpg.connect(proxy.dsn(VICTIM), statement_cache_size=0, timeout=30)
    try:
        await first.execute("PREPARE p AS SELECT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="max_pinned_servers"):
            await second.execute("PREPARE p AS SELECT 2")
        await second.fetchval("SELECT 1")  # ordinary work goes on
        await other.execute("PREPARE p AS SELECT 3")  # another tenant has its own cap
        assert await other.fetchval("EXECUTE p") == 3
        await first.close()
        for _ in range(50):  # the cap frees once the pinned session is gone
            try:
                await second.execute("PREPARE p AS SELECT 2")
                break
            except asyncpg.InsufficientPrivilegeError:
                await asyncio.sleep(0.05)
        assert await second.fetchval("EXECUTE p") == 2
    finally:
        for conn in (first, second, other):
            if not conn.is_closed():
                await conn.close()
