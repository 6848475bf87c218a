"""A second attack suite: a tenant speaking raw protocol against the proxy's bookkeeping.

Attacker A is ``acme`` (SME, shared role ``tenant_sme``) unless a test says otherwise;
victim B is ``initech`` (the same tenant type and role: only the signed context separates
them) or ``hooli`` (own schema, own role). The proxy has one or two servers, so A's and B's
transactions share backends. Every test checks the attacker's own result (it must still be
itself, or refused) AND the victim's next transaction (its own role, tenant id, rows and
defaults; nothing of A's).

Classes of attack:

1. the tracker believing SQL text instead of the server (EXECUTE of a protocol-prepared
   COMMIT, skipped Parses, stray copy messages);
2. proxy-owned objects reached from SQL (DEALLOCATE / PREPARE / EXECUTE of the proxy's
   global statement names and of ``__pgtenant_ctx``);
3. session state left on a server for the next tenant (settings through EXECUTE, lastval,
   pg_prepared_statements);
4. what the login role could do if reached (it must not be);
5. objects shared through the shared role (large objects, EXPLAIN ANALYZE's filter counts);
6. cancel requests landing on the next tenant's query;
7. denial of service (cancel floods, unauthenticated sockets, huge queries, log forging).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from collections.abc import Callable

import asyncpg
import pytest

from pgtenant.config import Config
from pgtenant.control.demo import DemoEnv

from . import rawpg
from .conftest import ProxyProcess
from .rawpg import Msg, RawPg, errors, ext, query, rows, sqlstates, sync

A = "acme"
B = "initech"
LOGIN_ROLE = "pgtenant_proxy"
WHO = "SELECT current_user, coalesce(current_setting('app.tenant_id', true), '')"


@pytest.fixture
def solo(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    """ONE server: every attacker and victim transaction shares the same backend. A fresh
    proxy (and so fresh backends) per test: state one attack leaves behind must not make
    the next test fail."""
    return start_proxy(pool_size=1, extra="auth_failure_delay = 0.0")


# ------------------------------------------------------------------------------ helpers


def org(env: DemoEnv, slug: str) -> str:
    return str(env.tenants[slug].org_id)


def role(env: DemoEnv, slug: str) -> str:
    return env.tenants[slug].role


def assert_is(env: DemoEnv, slug: str, row: list[str | None], what: str = "") -> None:
    """``row`` starts with (current_user, app.tenant_id) of tenant ``slug``."""
    assert row[0] != LOGIN_ROLE, f"{what}: ran as the login role: {row}"
    assert row[1] not in ("", None), f"{what}: ran without a tenant context: {row}"
    assert (row[0], row[1]) == (role(env, slug), org(env, slug)), (
        f"{what}: ran as {row[:2]}, not as {slug}")


async def victim_check(proxy: ProxyProcess, slug: str = B) -> int:
    """The victim's next transactions (simple and extended) are its own: role, tenant id,
    rows. Returns: the backend pid it ran on."""
    env = proxy.env
    raw = await RawPg.tenant(proxy, slug)
    try:
        got = await raw.request(query(WHO + ", pg_backend_pid()"))
        assert not errors(got), got
        (simple,) = rows(got)
        assert_is(env, slug, simple, "victim simple Query")
        got = await raw.request(ext(WHO + ", pg_backend_pid()"), sync())
        assert not errors(got), got
        (extended,) = rows(got)
        assert_is(env, slug, extended, "victim extended")
        table = "public.campaigns" if env.tenants[slug].tenant_type == "sme" else (
            f"{env.tenants[slug].schema}.projects")
        got = await raw.request(query(f"SELECT name FROM {table} ORDER BY name"))
        assert not errors(got), got
        assert [r[0] for r in rows(got)] == env.tenants[slug].rows[table]
        return int(simple[2])  # type: ignore[arg-type]
    finally:
        await raw.close()


async def attacker_still_itself(raw: RawPg, env: DemoEnv, slug: str = A) -> None:
    got = await raw.request(query("ROLLBACK"), query(WHO), n=2)
    who = rows(got)
    assert who, got
    assert_is(env, slug, who[-1], "attacker's next transaction")


async def global_name_or_none(raw: RawPg, statement: str) -> str | None:
    """The proxy's server-side name for a statement this client parsed (the view shows a
    client its own statements under its names, but the function under it lists the session
    it runs on), if the server has one by that text."""
    got = await raw.request(query(
        "SELECT name FROM pg_prepared_statement() WHERE statement = "
        f"'{statement.replace(chr(39), chr(39) * 2)}'"))
    names = [r[0] for r in rows(got) if r[0] and r[0].startswith("__pgtenant_p")]
    return names[0] if names else None


async def global_name(raw: RawPg, statement: str) -> str:
    name = await global_name_or_none(raw, statement)
    assert name, f"no global statement for {statement!r}"
    return name


def assert_no_context_free_rows(env: DemoEnv, slug: str, got: list[Msg], what: str) -> None:
    """Every (current_user, tenant id) row in ``got`` is ``slug``'s."""
    for row in rows(got):
        if (len(row) >= 2 and row[0] in (LOGIN_ROLE, "tenant_sme", "tenant_agency")) or (
                row and row[0] and row[0].startswith("t_")):
            assert_is(env, slug, row, what)


# ------------------------------------------------------------- 1. tracker believing the text


TXN_ENDS = ["COMMIT", "ROLLBACK", "END", "ABORT", "COMMIT AND CHAIN"]


@pytest.mark.parametrize("end", TXN_ENDS)
async def test_sql_execute_of_a_protocol_prepared_commit_leaves_no_context_free_statement(
    solo: ProxyProcess, end: str,
) -> None:
    """Parse "c" = COMMIT is renamed to a global name A can read; SQL ``EXECUTE`` of that
    name commits the injected transaction, which the tracker cannot see in the text. The
    next Query of the same write must still run as A with A's tenant id."""
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        got = await raw.request(rawpg.parse("c", end), sync())
        name = await global_name_or_none(raw, end)
        if name is None:  # the proxy parsed a refusal instead: nothing to EXECUTE
            assert errors(got) or True
            name = "c"
        got = await raw.request(query("BEGIN"), query(f'EXECUTE "{name}"'), query(WHO),
                                query("SELECT 'KEY', pgtenant.signing_key()"), n=4)
        assert not any(r[0] == "KEY" for r in rows(got)), f"signing key leaked: {got}"
        for row in rows(got):
            assert_is(env, A, row, f"statement after EXECUTE of {end}")
        await attacker_still_itself(raw, env)
    finally:
        await raw.close()
    await victim_check(solo)


@pytest.mark.parametrize("end", TXN_ENDS)
async def test_sql_execute_of_a_prepared_commit_inside_one_multi_statement_query(
    solo: ProxyProcess, end: str,
) -> None:
    """The guard refuses ``COMMIT; <more>`` in one Query by its text; ``EXECUTE "<global
    name of COMMIT>"; <more>`` hides the end from it."""
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        await raw.request(rawpg.parse("c", end), sync())
        name = await global_name_or_none(raw, end) or "c"
        got = await raw.request(query(f'EXECUTE "{name}"; {WHO}'))
        got += await raw.request(query(f'EXECUTE "{name}"; SELECT \'KEY\', '
                                       "pgtenant.signing_key()"))
        assert not any(r[0] == "KEY" for r in rows(got)), f"signing key leaked: {got}"
        for row in rows(got):
            assert_is(env, A, row, f"statement after EXECUTE of {end} in one Query")
        await attacker_still_itself(raw, env)
    finally:
        await raw.close()
    await victim_check(solo)


async def test_extended_bind_of_commit_by_global_name_in_sql_execute_inside_one_batch(
    solo: ProxyProcess,
) -> None:
    """The same through one extended batch: Parse "" = EXECUTE "<global COMMIT>", then a
    read of who we are before the Sync."""
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        await raw.request(rawpg.parse("c", "COMMIT"), sync())
        name = await global_name(raw, "COMMIT")
        got = await raw.request(ext(f'EXECUTE "{name}"'), ext(WHO),
                                ext("SELECT pgtenant.signing_key()"), sync())
        for row in rows(got):
            assert_is(env, A, row, "statement after EXECUTE of COMMIT in a batch")
        await attacker_still_itself(raw, env)
    finally:
        await raw.close()
    await victim_check(solo)


@pytest.mark.parametrize("skipped", ["COMMIT", WHO])
async def test_a_parse_the_server_skipped_after_an_error_is_not_what_a_later_bind_runs(
    solo: ProxyProcess, skipped: str,
) -> None:
    """After ``SELECT 1/0`` fails, the server skips the rest of the batch up to Sync, so the
    Parse "" that follows never happened; a later Bind "" must run what the server has (the
    failed statement) or what the client last had parsed — never without A's context."""
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        got = await raw.request(ext("SELECT 1/0"), rawpg.parse("", skipped), sync())
        assert sqlstates(got) == ["22012"], got
        got = await raw.request(rawpg.bind("", "", []), rawpg.execute(), ext(WHO), sync())
        # Either the bound statement fails (1/0 or nothing parsed) or it is a harmless read
        # as A; whatever runs after it is A's.
        for row in rows(got):
            assert_is(env, A, row, "after a skipped Parse")
        got = await raw.request(query(WHO))
        assert_is(env, A, rows(got)[0], "next transaction after a skipped Parse")
    finally:
        await raw.close()
    await victim_check(solo)


async def test_a_skipped_parse_of_commit_inside_an_explicit_block_does_not_end_it(
    solo: ProxyProcess,
) -> None:
    """BEGIN; then Parse "" COMMIT (skipped after an error in the same batch); ROLLBACK;
    then Bind "" / Execute in one more batch followed by a read: all as A."""
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        await raw.request(query("BEGIN"))
        got = await raw.request(rawpg.parse("", "COMMIT"), rawpg.parse("bad", "SELEC 1"),
                                rawpg.parse("", WHO), sync())
        assert "42601" in sqlstates(got), got
        await raw.request(query("ROLLBACK"))
        got = await raw.request(rawpg.bind("", "", []), rawpg.execute(), ext(WHO),
                                ext("SELECT pgtenant.signing_key()"), sync())
        for row in rows(got):
            assert_is(env, A, row, "after a skipped Parse in a block")
        await attacker_still_itself(raw, env)
    finally:
        await raw.close()
    await victim_check(solo)


@pytest.mark.parametrize("stray", [
    pytest.param(rawpg.copy_done(), id="copy_done"),
    pytest.param(rawpg.copy_fail("x"), id="copy_fail"),
    pytest.param(rawpg.copy_data(b"x\n"), id="copy_data"),
])
async def test_stray_copy_messages_outside_copy_do_not_shift_replies_to_the_victim(
    solo: ProxyProcess, stray: bytes,
) -> None:
    """Postgres ignores CopyData/CopyDone/CopyFail outside COPY. A sends P/B/E/S, a stray
    copy message, a bare Sync and a slow Query with a secret; victim B, queued on the same
    single server, must get only its own rows, as itself."""
    env = solo.env
    attacker = await RawPg.tenant(solo, A)
    victim = await RawPg.tenant(solo, B)
    try:
        attacker.send(ext("SELECT 'A-first'"), sync(), stray, sync(),
                      query("SELECT pg_sleep(0.5), 'A-secret'"))
        await asyncio.sleep(0.1)  # A's slow Query is running: B queues for the server
        victim.send(query(WHO + ", 'B-row'"), ext(WHO + ", 'B-ext'"), sync())
        victim_replies, ended = await victim.collect(2, timeout=15)
        text = repr(victim_replies)
        assert "A-secret" not in text and "A-first" not in text, (
            f"the victim received A's replies: {text}")
        assert ended == "ready", f"the victim's session was broken ({ended}): {text}"
        # The attacker's own replies: complete, or its connection closed (the proxy may
        # drop a client that speaks out of turn); never the victim's rows.
        attacker_replies = await attacker.drain_quietly(2.0)
        assert not errors(victim_replies), victim_replies
        vrows = rows(victim_replies)
        assert [r[-1] for r in vrows] == ["B-row", "B-ext"], victim_replies
        for row in vrows:
            assert_is(env, B, row, "victim while A sent stray copy messages")
        assert "B-row" not in repr(attacker_replies), attacker_replies
    finally:
        await attacker.close()
        await victim.close()
    await victim_check(solo)


async def test_stray_copy_done_between_pipelined_queries_keeps_each_clients_results(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Two servers, three clients: A interleaves stray CopyDone/CopyFail with Queries and
    Syncs over and over; B and hooli each run 30 reads meanwhile and must get only theirs."""
    proxy = start_proxy(pool_size=2)
    env = proxy.env
    attacker = await RawPg.tenant(proxy, A)
    victims = {slug: await RawPg.tenant(proxy, slug) for slug in (B, "hooli")}

    async def victim_loop(slug: str, raw: RawPg) -> None:
        for i in range(30):
            got = await raw.request(query(WHO + f", '{slug}-{i}'"), timeout=15)
            assert not errors(got), got
            (row,) = rows(got)
            assert row[-1] == f"{slug}-{i}", got
            assert_is(env, slug, row, f"{slug} #{i}")

    async def attack_loop() -> None:
        for i in range(15):
            attacker.send(rawpg.copy_done(), query(f"SELECT 'A-secret-{i}', pg_sleep(0.01)"),
                          rawpg.copy_fail("x"), sync(), ext(f"SELECT 'A-x-{i}'"),
                          rawpg.copy_done(), sync())
            got = await attacker.until_ready(3, timeout=15)
            got += await attacker.drain_quietly(0.05)

    try:
        await asyncio.gather(attack_loop(), *(victim_loop(s, r) for s, r in victims.items()))
    finally:
        await attacker.close()
        for raw in victims.values():
            await raw.close()
    await victim_check(proxy)


# ------------------------------------------------------------------ 2. proxy-owned objects


VICTIM_STMT = "SELECT 'B-own-text', current_user, current_setting('app.tenant_id', true)"


@pytest.mark.parametrize("attack", [
    "DEALLOCATE \"{g}\"",
    "DEALLOCATE PREPARE \"{g}\"",
    "DEALLOCATE \"{g}\"; PREPARE \"{g}\" AS SELECT 'A-evil'::text, "
    "'tenant_sme'::text, '{victim}'::text",
    "DEALLOCATE ALL",
], ids=["deallocate", "deallocate_prepare", "deallocate_and_prepare", "deallocate_all"])
async def test_sql_on_the_proxys_global_statement_name_cannot_change_what_the_victim_binds(
    solo: ProxyProcess, attack: str,
) -> None:
    """A and B are the same tenant type and search_path, so the same statement text gets the
    same global name on the shared server. A (which parsed it too) deallocates or redefines
    it from SQL; B's next Parse/Bind of its own named statement must run B's text as B."""
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        got = await raw.request(rawpg.parse("mine", VICTIM_STMT), sync())
        assert not errors(got), got
        g = await global_name(raw, VICTIM_STMT)
        sql = attack.format(g=g, victim=org(env, B))
        await raw.request(query(sql))  # refused or not: the victim's view decides
        await raw.request(query("ROLLBACK"))
    finally:
        await raw.close()
    victim = await RawPg.tenant(solo, B)
    try:
        got = await victim.request(rawpg.parse("v", VICTIM_STMT), rawpg.bind("", "v", []),
                                   rawpg.execute(), sync())
        assert not errors(got), got
        (row,) = rows(got)
        assert row[0] == "B-own-text", f"the victim's statement ran A's text: {row}"
        assert_is(env, B, row[1:], "victim's Bind of its own statement")
        got = await victim.request(rawpg.bind("", "v", []), rawpg.execute(), sync())
        (row,) = rows(got)
        assert row[0] == "B-own-text"
        assert_is(env, B, row[1:], "victim's second Bind")
    finally:
        await victim.close()
    await victim_check(solo)


@pytest.mark.parametrize("attack", [
    "DEALLOCATE __pgtenant_ctx",
    "DEALLOCATE \"__pgtenant_ctx\"",
    "DEALLOCATE ALL",
    "EXECUTE __pgtenant_ctx('{victim}', 'sme', '', '', '{{}}', '{{}}', 'public', 'tenant_sme')",
    "PREPARE __pgtenant_ctx AS SELECT 1",
], ids=["deallocate", "deallocate_quoted", "deallocate_all", "execute_forged", "prepare"])
async def test_sql_on_the_proxy_context_statement_is_refused_or_harmless(
    solo: ProxyProcess, attack: str,
) -> None:
    """``__pgtenant_ctx`` carries every extended transaction's context. From SQL, A must not
    drop it (B's next extended transaction would run without context), redefine it, or
    EXECUTE it with B's tenant id."""
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        await raw.request(ext("SELECT 1"), sync())  # the server has __pgtenant_ctx now
        got = await raw.request(query("BEGIN"), query(attack.format(victim=org(env, B))),
                                query(WHO), query("ROLLBACK"), n=4)
        for row in rows(got):
            if len(row) == 2:
                assert_is(env, A, row, "A right after its attack")
        got = await raw.request(ext(WHO), sync())
        assert_is(env, A, rows(got)[0], "A's next extended transaction")
    finally:
        await raw.close()
    victim = await RawPg.tenant(solo, B)
    try:
        for _ in range(3):
            got = await victim.request(ext(WHO), sync())
            assert not errors(got), got
            assert_is(env, B, rows(got)[0], "victim's extended transaction")
    finally:
        await victim.close()
    await victim_check(solo)


# --------------------------------------------------------- 3. session state between tenants


SETTINGS = [
    ("statement_timeout", "1"),
    ("DateStyle", "SQL, DMY"),
    ("TimeZone", "Pacific/Chatham"),
    ("default_transaction_read_only", "on"),
    ("standard_conforming_strings", "off"),
]


async def victim_settings(proxy: ProxyProcess) -> dict[str, str]:
    raw = await RawPg.tenant(proxy, B)
    try:
        out = {}
        for name, _ in SETTINGS:
            got = await raw.request(query(f"SHOW {name}"))
            assert not errors(got), got
            out[name] = rows(got)[0][0]
        got = await raw.request(ext(WHO), sync())
        assert_is(proxy.env, B, rows(got)[0], "victim")
        return out  # type: ignore[return-value]
    finally:
        await raw.close()


@pytest.mark.parametrize(("name", "value"), SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("how", ["sql_execute", "bind_execute", "sql_execute_in_block",
                                 "set_config"])
async def test_a_protocol_prepared_set_leaves_nothing_for_the_next_tenant(
    solo: ProxyProcess, name: str, value: str, how: str,
) -> None:
    before = await victim_settings(solo)
    assert before[name] != value or name == "standard_conforming_strings"
    raw = await RawPg.tenant(solo, A)
    try:
        text = f"SET {name} = '{value}'"
        got = await raw.request(rawpg.parse("s", text), sync())
        if how == "set_config":  # no EXECUTE: a plain session-level set_config
            got = await raw.request(query(f"SELECT set_config('{name}', '{value}', false)"))
        elif how == "bind_execute":
            got = await raw.request(rawpg.bind("", "s", []), rawpg.execute(), sync())
        else:
            # The proxy may have parsed something else in its place (a refusal): then
            # there is nothing by that text to EXECUTE.
            g = await global_name_or_none(raw, text)
            if g is None:
                pass
            elif how == "sql_execute":
                got = await raw.request(query(f'EXECUTE "{g}"'))
            else:
                got = await raw.request(query("BEGIN"), query(f'EXECUTE "{g}"'),
                                        query("COMMIT"), n=3)
        del got
    finally:
        await raw.close()
    after = await victim_settings(solo)
    assert after == before, f"A's {name} reached the victim: {after[name]!r}"
    await victim_check(solo)


@pytest.mark.parametrize(("planted", "probe", "sqlstate"), [
    ("PREPARE planted AS SELECT 'A-planted'::text", "EXECUTE planted", "26000"),
    ("DECLARE planted_cur CURSOR WITH HOLD FOR SELECT 'A-planted'::text",
     "FETCH ALL FROM planted_cur", "34000"),
], ids=["prepare", "declare_with_hold"])
async def test_session_objects_made_through_sql_execute_of_a_prepared_statement_stay_with_a(
    solo: ProxyProcess, planted: str, probe: str, sqlstate: str,
) -> None:
    """SQL PREPARE and DECLARE WITH HOLD pin the server to their client (the proxy reads
    them in the text). Wrapped in a protocol-prepared statement run by SQL EXECUTE, the text
    the proxy sees is only ``EXECUTE``: the object must still never reach the victim."""
    raw = await RawPg.tenant(solo, A)
    try:
        await raw.request(rawpg.parse("p", planted), sync())
        name = await global_name_or_none(raw, planted) or "p"
        await raw.request(query("BEGIN"), query(f'EXECUTE "{name}"'), query("COMMIT"), n=3)
    finally:
        await raw.close()
    victim = await RawPg.tenant(solo, B)
    try:
        got = await victim.request(query(probe))
    finally:
        await victim.close()
    assert "A-planted" not in repr(got), f"the victim ran A's planted object: {got}"
    assert sqlstates(got) == [sqlstate], got
    await victim_check(solo)


async def test_a_session_advisory_lock_taken_through_sql_execute_does_not_outlive_a(
    solo: ProxyProcess,
) -> None:
    raw = await RawPg.tenant(solo, A)
    try:
        text = "SELECT pg_advisory_lock(4243)"
        await raw.request(rawpg.parse("l", text), sync())
        name = await global_name_or_none(raw, text) or "l"
        await raw.request(query(f'EXECUTE "{name}"'))
    finally:
        await raw.close()
    await victim_check(solo)
    admin = await asyncpg.connect(solo.env.admin_dsn)
    try:
        for _ in range(50):  # a retired backend exits asynchronously
            held = await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4243 "
                "AND granted")
            if not held:
                break
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    assert not held, "A's session advisory lock is still held by a pooled server"


@pytest.fixture
async def shared_sequence(demo_env: DemoEnv) -> str:
    """A sequence both SME tenants may use (as an application might share one)."""
    admin = await asyncpg.connect(demo_env.admin_dsn)
    try:
        await admin.execute("CREATE SEQUENCE IF NOT EXISTS public.pgtest_shared_seq "
                            "START 424242")
        await admin.execute("GRANT USAGE, SELECT ON SEQUENCE public.pgtest_shared_seq "
                            "TO tenant_sme")
    finally:
        await admin.close()
    return "public.pgtest_shared_seq"


@pytest.mark.parametrize("protocol", ["simple", "extended"])
async def test_lastval_of_the_previous_tenant_is_not_visible_to_the_next(
    solo: ProxyProcess, shared_sequence: str, protocol: str,
) -> None:
    env = solo.env
    raw = await RawPg.tenant(solo, A)
    try:
        sql = f"SELECT nextval('{shared_sequence}'), pg_backend_pid()"
        got = await raw.request(query(sql) if protocol == "simple" else ext(sql) + sync())
        assert not errors(got), got
        a_value, a_pid = rows(got)[0]
    finally:
        await raw.close()
    victim = await RawPg.tenant(solo, B)
    try:
        for probe in ("SELECT lastval(), pg_backend_pid()",
                      f"SELECT currval('{shared_sequence}'), pg_backend_pid()"):
            got = await victim.request(query(probe))
            assert not rows(got) or rows(got)[0][0] != a_value, (
                f"victim read A's sequence value {a_value} with {probe!r}: {got}")
            assert sqlstates(got) == ["55000"], got
        got = await victim.request(query("SELECT pg_backend_pid()"))
        assert rows(got)[0][0] == a_pid, "the victim did not share A's backend (test setup)"
    finally:
        await victim.close()
    await victim_check(solo)
    del env


async def test_pg_prepared_statements_show_the_victim_nothing_of_the_attackers(
    solo: ProxyProcess,
) -> None:
    raw = await RawPg.tenant(solo, A)
    try:
        for name, sql in (("x", "SELECT 'A-secret-literal'"),
                          ("y", "SELECT name FROM campaigns WHERE name = 'A-secret-2'")):
            got = await raw.request(rawpg.parse(name, sql), rawpg.bind("", name, []),
                                    rawpg.execute(), sync())
            assert not errors(got), got
    finally:
        await raw.close()
    victim = await RawPg.tenant(solo, B)
    try:
        got = await victim.request(
            query("SELECT name, statement FROM pg_prepared_statements"),
            ext("SELECT name, statement FROM pg_prepared_statements"), sync(),
            query("SELECT name, statement FROM pg_prepared_statement()"), n=3)
    finally:
        await victim.close()
    assert "A-secret" not in repr(got), f"the victim sees A's statements: {rows(got)}"
    await victim_check(solo)


# ----------------------------------------------------------------- 4. login-role powers


async def test_escape_attempts_never_reach_signing_key_activity_or_cancel_powers(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Every escape of section 1 followed by what the login role could do: read the signing
    key, read another tenant's query text from pg_stat_activity, cancel its backend. The
    victim holds an open transaction on the other server meanwhile."""
    proxy = start_proxy(pool_size=2)
    env = proxy.env
    victim = await RawPg.tenant(proxy, B)
    try:
        got = await victim.request(query("BEGIN"), query(
            "SELECT pg_backend_pid(), 'victim-secret-text'"), n=2)
        vpid = rows(got)[0][0]
        powers = [
            "SELECT 'KEY', encode(pgtenant.signing_key(), 'hex')",
            f"SELECT 'ACT', query FROM pg_stat_activity WHERE pid = {vpid}",
            f"SELECT 'CANCEL', pg_cancel_backend({vpid})::text",
        ]
        raw = await RawPg.tenant(proxy, A)
        try:
            await raw.request(rawpg.parse("c", "COMMIT"), sync())
            g = await global_name(raw, "COMMIT")
            seen: list[Msg] = []
            for power in powers:
                seen += await raw.request(query("BEGIN"), query(f'EXECUTE "{g}"'),
                                          query(power), query("ROLLBACK"), n=4)
                seen += await raw.request(ext(f'EXECUTE "{g}"'), ext(power), sync())
                seen += await raw.request(rawpg.bind("", "c", []), rawpg.execute(),
                                          ext(power), sync())
        finally:
            await raw.close()
        reached = []
        for row in rows(seen):
            if row and row[0] == "KEY":
                reached.append(f"read the signing key {row[1]}")
            elif row and row[0] == "ACT" and row[1] not in (None, "<insufficient privilege>"):
                reached.append(f"read the victim's query text {row[1]!r}")
            elif row and row[0] == "CANCEL" and row[1] == "true":
                reached.append("cancelled the victim's backend")
        assert not reached, "the attacker, as the login role: " + "; ".join(reached)
        got = await victim.request(query(WHO), query("COMMIT"), n=2)
        assert not errors(got), got
        assert_is(env, B, rows(got)[0], "victim after A's attempts")
    finally:
        await victim.close()


# ------------------------------------------------------------------------ 5. shared role


async def test_large_objects_are_not_shared_between_tenants_of_one_role(
    solo: ProxyProcess,
) -> None:
    """Large objects have no RLS: one created by A (tenant_sme) is owned by tenant_sme, so
    B (also tenant_sme) could read it. Creating one must be refused, or B's read must be."""
    raw = await RawPg.tenant(solo, A)
    try:
        got = await raw.request(query("SELECT lo_from_bytea(0, 'A-large-secret')"))
        oids = [r[0] for r in rows(got)]
    finally:
        await raw.close()
    if not oids:
        assert sqlstates(got) == ["42501"], got
        return
    victim = await RawPg.tenant(solo, B)
    try:
        got = await victim.request(
            query(f"SELECT convert_from(lo_get({oids[0]}), 'UTF8')"),
            query("SELECT count(*)::text FROM pg_largeobject_metadata"), n=2)
    finally:
        await victim.close()
    assert "A-large-secret" not in repr(got), f"B read A's large object: {got}"
    # The object must not even be listed as existing for B.
    listed = [r[0] for r in rows(got) if r and r[0] and r[0].isdigit()]
    assert listed in ([], ["0"]), f"B sees A's large objects: {got}"


@pytest.mark.parametrize("sql", [
    "EXPLAIN ANALYZE SELECT * FROM public.campaigns",
    "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM public.campaigns",
    "EXPLAIN (ANALYZE, COSTS OFF) SELECT name FROM public.brand_guidelines",
], ids=["text", "json", "brand_guidelines"])
async def test_explain_analyze_on_a_shared_rls_table_is_refused_for_shared_role_types(
    solo: ProxyProcess, sql: str,
) -> None:
    """EXPLAIN ANALYZE reports how many rows the RLS filter removed: other tenants' row
    counts in a shared table."""
    raw = await RawPg.tenant(solo, A)
    try:
        got = await raw.request(query(sql))
    finally:
        await raw.close()
    text = repr(rows(got))
    assert not re.search(r"Rows Removed by Filter", text), text
    assert errors(got), f"EXPLAIN ANALYZE was not refused: {text[:500]}"
    await victim_check(solo)


# ----------------------------------------------------------------------------- 6. cancel


async def test_a_cancel_sent_right_after_the_attackers_query_never_cancels_the_victims(
    solo: ProxyProcess,
) -> None:
    """200 rounds on one server: A's short query completes, A sends a CancelRequest at once;
    B's query, queued behind A's, gets the server next. B must never see 57014."""
    env = solo.env
    attacker = await RawPg.tenant(solo, A)
    victim = await RawPg.tenant(solo, B)
    cancelled: list[int] = []
    try:
        for i in range(200):
            attacker.send(query("SELECT 1"))
            victim.send(query(f"SELECT pg_sleep(0.02), {i}, current_setting('app.tenant_id')"))
            await attacker.until_ready(1)
            await attacker.cancel()
            got = await victim.until_ready(1, timeout=15)
            if "57014" in sqlstates(got):
                cancelled.append(i)
            else:
                assert rows(got)[0][1:] == [str(i), org(env, B)], got
    finally:
        await attacker.close()
        await victim.close()
    assert not cancelled, f"A's cancel hit B's query in rounds {cancelled}"


# -------------------------------------------------------------------------------- 7. DoS


async def test_a_flood_of_cancel_requests_with_random_keys_does_not_block_clients(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2)
    rng = random.Random(7)

    async def burst(n: int) -> None:
        for _ in range(n):
            try:
                await rawpg.send_cancel("127.0.0.1", proxy.port, rng.randrange(1, 2**31),
                                        rng.randrange(-2**31, 2**31), timeout=10)
            except (TimeoutError, ConnectionError, OSError):
                pass

    started = time.monotonic()
    await asyncio.gather(*(burst(100) for _ in range(20)))  # 2,000 in all
    flood = time.monotonic() - started
    t0 = time.monotonic()
    raw = await RawPg.tenant(proxy, B, timeout=5)
    try:
        got = await raw.request(query(WHO), timeout=5)
        assert_is(proxy.env, B, rows(got)[0], "client after the flood")
    finally:
        await raw.close()
    assert time.monotonic() - t0 < 3, f"login + query took {time.monotonic() - t0:.1f}s"
    del flood


async def test_unauthenticated_sockets_do_not_block_authenticated_logins(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """300 sockets that never finish logging in, with max_client_conn = 200: logins in
    progress are capped (``max_login_clients``) and time out (``client_login_timeout``), so
    a tenant with a token still gets in promptly."""
    # Checked first: a proxy that refuses the config would leave the fixture's log file
    # open, and its ResourceWarning would surface in whichever test runs next.
    known = {f.name for f in dataclasses.fields(Config)}
    assert "max_login_clients" in known, (
        "no max_login_clients config key: today 300 unauthenticated sockets with "
        "max_client_conn = 200 get an authenticated tenant refused with 53300")
    proxy = start_proxy(pool_size=2, extra="max_client_conn = 200\nmax_login_clients = 50\n"
                                           "client_login_timeout = 2.0")
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for i in range(300):
            try:
                idle.append(await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", proxy.port), 5))
            except (TimeoutError, ConnectionError, OSError):
                pass
            if i % 2:  # half of them send half a startup packet
                idle[-1][1].write(b"\x00\x00\x00\x40\x00\x03")
        t0 = time.monotonic()
        raw = await RawPg.tenant(proxy, B, timeout=5)
        try:
            got = await raw.request(query(WHO), timeout=5)
            assert_is(proxy.env, B, rows(got)[0], "login beside 300 idle sockets")
        finally:
            await raw.close()
        assert time.monotonic() - t0 < 5
    finally:
        for _, writer in idle:
            writer.transport.abort()


async def test_a_huge_query_of_set_words_does_not_stall_other_clients(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=2)
    attacker = await RawPg.tenant(proxy, A)
    victim = await RawPg.tenant(proxy, B)
    try:
        await victim.request(query("SELECT 1"))
        huge = ("set " * 300_000)[:1_200_000]  # 1.2 MB
        attacker.send(query(huge))
        await asyncio.sleep(0.01)
        worst = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            got = await victim.request(query("SELECT 1"), timeout=30)
            worst = max(worst, time.monotonic() - t0)
            assert rows(got) == [["1"]], got
        got = await attacker.until_ready(1, timeout=60)
        assert errors(got), "a Query of 'set' words must fail"
        assert worst < 1.0, f"the victim's SELECT 1 waited {worst:.2f}s behind A's 1.2 MB Query"
    finally:
        await attacker.close()
        await victim.close()


async def test_a_newline_in_the_startup_user_name_does_not_forge_a_log_line(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=1)
    forged = "acme\n2026-01-01 00:00:00,000 ERROR FORGED-LINE admin logged in"
    for token in (proxy.env.tenants[A].token, "not-a-token"):
        try:
            raw = await RawPg.login(proxy.port, forged, token, timeout=5)
        except (rawpg.LoginFailed, ConnectionError, asyncio.IncompleteReadError):
            continue
        await raw.request(query("SELECT 1"))
        await raw.close()
    await asyncio.sleep(0.3)
    for line in proxy.log().splitlines():
        assert not line.startswith("2026-01-01") and not line.lstrip().startswith(
            "FORGED") and "FORGED-LINE" not in line.split("acme")[0], (
            f"forged log line: {line!r}")
