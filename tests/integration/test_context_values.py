"""Issue 16, lever 3: the context values policies read, and who can change them.

A proxy with ONE server, so the attacker's and the victim's transactions share a backend;
every test checks the VICTIM's next transaction as well as what the attacker got.

A function body runs later, where the statement guard cannot look: before the guard judged
bodies at CREATE, a tenant of a type with temp_tables made a ``pg_temp`` LANGUAGE sql
function running ``SET ROLE`` to another tenant's role (the login role is a member of every
tenant role) and read that tenant's schema in the same transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.identity.context import context_signature
from pgtenant.protocol import codec

from .conftest import ProxyProcess
from .helpers import TenantRaw as Raw
from .helpers import errors, extended
from .test_attacks_state import rows_text

ATTACKER = "acme"  # sme: role tenant_sme, temp_tables allowed (the default)
VICTIM = "initech"  # same type and role
READ_HOOLI = "SELECT current_user, string_agg(name, ',') FROM t_hooli.projects"
CONTEXT = ("SELECT current_user, current_setting('app.tenant_id', true), "
           "current_setting('app.entity_id', true), current_setting('search_path'), "
           "pg_backend_pid()")


async def _row(proxy: ProxyProcess, slug: str, sql: str, token: str | None = None
               ) -> list[str]:
    """Returns: the first row of ``sql`` (a simple Query, which must not fail) in a session
    of its own, as ``slug`` with ``token`` (default: the demo's token)."""
    raw = await Raw.login(proxy, slug, token=token)
    try:
        got = await raw.request(codec.query(sql))
        assert not errors(got), errors(got)
        return rows_text(got)[0]
    finally:
        await raw.close()


async def _context(proxy: ProxyProcess, slug: str) -> list[str]:
    return await _row(proxy, slug, CONTEXT)


@pytest.mark.parametrize("body", [
    "$$ SET ROLE t_hooli; SELECT current_user::text $$",
    "E'\\x53ET ROLE t_hooli; SELECT current_user::text'",  # no SET in the text itself
    "$$ SET app.entity_id = 'forged'; SELECT current_user::text $$",
    "$$ SET app.tenant_id = '00000000-0000-0000-0000-000000000000'; SELECT ''::text $$",
    "$$ SET search_path = t_hooli; SELECT current_user::text $$",
])
async def test_a_function_body_cannot_switch_role_or_context(solo: ProxyProcess,
                                                            body: str) -> None:
    raw = await Raw.login(solo, ATTACKER)
    try:
        got = await raw.request(codec.query(
            f"CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS {body}"))
        assert [e["C"] for e in errors(got)] == ["42501"], errors(got)
        assert "is not allowed in tenant sessions" in errors(got)[0]["M"]
        got = await raw.request(codec.query(f"SELECT pg_temp.g(); {READ_HOOLI}"))
        assert errors(got) and "hooli" not in str(rows_text(got))
        got = await raw.request(codec.query(CONTEXT))
        assert not errors(got), errors(got)
        user, _, entity, path, attacker_pid = rows_text(got)[0]
        assert (user, entity, path) == ("tenant_sme", "", "public")
    finally:
        await raw.close()
    victim = await _context(solo, VICTIM)
    assert victim == ["tenant_sme", str(solo.env.tenants[VICTIM].org_id), "", "public",
                      attacker_pid]



async def test_a_function_body_is_judged_in_a_parse_too(solo: ProxyProcess) -> None:
    raw = await Raw.login(solo, ATTACKER)
    try:
        got = await raw.request(extended(
            "CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS "
            "$$ SET ROLE t_hooli; SELECT current_user::text $$"), codec.sync())
        assert [e["C"] for e in errors(got)] == ["42501"], errors(got)
        got = await raw.request(codec.query(f"SELECT pg_temp.g(); {READ_HOOLI}"))
        assert errors(got) and "hooli" not in str(rows_text(got))
        got = await raw.request(codec.query(CONTEXT))
        assert not errors(got), errors(got)
        attacker_pid = rows_text(got)[0][4]
    finally:
        await raw.close()
    victim = await _context(solo, VICTIM)  # the next transaction on the same server
    assert victim == ["tenant_sme", str(solo.env.tenants[VICTIM].org_id), "", "public",
                      attacker_pid]

# ------------------------------------------------------------------ the values policies read

VALUES = ("SELECT current_setting('app.tenant_id', true), current_setting('app.tenant_type', "
          "true), current_setting('app.entity_id', true), current_setting('app.tenant_sig', "
          "true), coalesce(pgtenant.current_tenant()::text, 'NULL'), current_user, "
          "current_setting('search_path')")


async def _values(proxy: ProxyProcess, slug: str, token: str, form: str) -> list[str]:
    """Returns: VALUES as the tenant's transaction reads them, in a simple Query (the SET
    LOCAL prefix) or through asyncpg's extended protocol (the context statement)."""
    if form == "extended":
        conn = await asyncpg.connect(proxy.dsn(slug, token=token), statement_cache_size=0,
                                     timeout=30)
        try:
            row = await conn.fetchrow(VALUES)
            assert row is not None
            return list(row)
        finally:
            await conn.close()
    return await _row(proxy, slug, VALUES, token)


async def _signing_key(env: DemoEnv) -> bytes:
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        return bytes(await admin.fetchval("SELECT key FROM pgtenant.signing_keys WHERE id = 1"))
    finally:
        await admin.close()


CASES = [  # slug, entity name or None; role and search_path
    ("acme", None, "tenant_sme", "public"),
    ("umbrella", None, "tenant_agency", "tenant_b, public"),
    ("umbrella", "client_a", "tenant_agency", "tenant_b, public"),
    ("hooli", None, "t_hooli", "t_hooli, public"),
]


@pytest.mark.parametrize("signing", ["auto", "off"])
async def test_policies_read_the_same_values_in_every_tenant_type_and_form(
        start_proxy: Callable[..., ProxyProcess], demo_env: DemoEnv, signing: str) -> None:
    """With and without entity, with and without signing, simple and extended: what a
    transaction reads is the tenant's own context, the signature verifies exactly when the
    proxy signs, and an omitted SET LOCAL leaves '' (the server's startup value) in force."""
    proxy = start_proxy(pool_size=1, extra=f'context_signing = "{signing}"')
    key = await _signing_key(demo_env) if signing == "auto" else None
    for slug, entity, role, path in CASES:
        tenant = demo_env.tenants[slug]
        token = tenant.entity_tokens[entity] if entity else tenant.token
        entity_id = str(tenant.entities[entity]) if entity else ""
        org = str(tenant.org_id)
        sig = context_signature(key, org, tenant.tenant_type, entity_id) if key else ""
        verified = org if key else "NULL"
        for form in ("simple", "extended", "simple"):
            got = await _values(proxy, slug, token, form)
            assert got == [org, tenant.tenant_type, entity_id, sig, verified, role, path], (
                slug, entity, form)


async def _query_text_seen_by_postgres(proxy: ProxyProcess, env: DemoEnv, slug: str,
                                       token: str) -> str:
    raw = await Raw.login(proxy, slug, token=token)
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        raw.writer.write(codec.query("SELECT pg_sleep(0.8) AS context_text_probe"))
        for _ in range(100):
            text = await admin.fetchval(
                "SELECT query FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE '%context_text_probe%' "
                "AND pid <> pg_backend_pid()")
            if text:
                break
            await asyncio.sleep(0.02)
        assert not errors(await raw.until())
        return str(text)
    finally:
        await admin.close()
        await raw.close()


async def test_empty_entity_and_signature_are_not_sent_when_the_defaults_hold_them(
        start_proxy: Callable[..., ProxyProcess], demo_env: DemoEnv) -> None:
    unsigned = start_proxy(pool_size=1, extra='context_signing = "off"')
    acme = demo_env.tenants["acme"]
    text = await _query_text_seen_by_postgres(unsigned, demo_env, "acme", acme.token)
    assert text.startswith("SET LOCAL app.tenant_id = ") and "app.tenant_type" in text
    assert "app.entity_id" not in text and "app.tenant_sig" not in text
    signed = start_proxy(pool_size=1)
    umbrella = demo_env.tenants["umbrella"]
    text = await _query_text_seen_by_postgres(signed, demo_env, "umbrella",
                                              umbrella.entity_tokens["client_a"])
    assert "SET LOCAL app.entity_id = '" + str(umbrella.entities["client_a"]) in text
    assert "SET LOCAL app.tenant_sig = '" in text


LEAVE_BEHIND = [
    "SET app.entity_id = 'forged'",
    "SET SESSION app.tenant_sig = 'forged'",
    "SELECT set_config('app.entity_id', 'forged', false)",
    "SELECT pg_catalog.set_config('app.tenant_sig', 'forged', false)",
    "SELECT pgtenant.set_config('app.entity_id', 'forged', false)",
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS "
    "$$ SET app.entity_id = 'forged'; SELECT '' $$",
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS "
    "E'\\x53ET app.tenant_sig = ''forged''; SELECT '''''",
]


async def test_a_tenant_cannot_leave_app_values_for_the_next_transaction_on_its_server(
        start_proxy: Callable[..., ProxyProcess], demo_env: DemoEnv) -> None:
    """The omitted statements rely on the session value being ''. The
    victim is a client of the SAME tenant and token (no DISCARD ALL between them): every
    way to set app.* for the session is refused, and the victim's next transaction, on the
    same server, reads ''."""
    proxy = start_proxy(pool_size=1, extra='context_signing = "off"')
    acme = demo_env.tenants["acme"]
    raw = await Raw.login(proxy, "acme")
    try:
        for sql in LEAVE_BEHIND:
            got = await raw.request(codec.query(sql))
            assert [e["C"] for e in errors(got)] == ["42501"], (sql, errors(got))
        got = await raw.request(extended("SELECT set_config($1, $2, false)", "",
                                         (b"app.entity_id", b"forged")), codec.sync())
        assert [e["C"] for e in errors(got)] == ["42501"], errors(got)
        got = await raw.request(codec.query("SELECT pg_backend_pid()"))
        pid = rows_text(got)[0][0]
    finally:
        await raw.close()
    for form in ("simple", "extended"):
        victim = await _values(proxy, "acme", acme.token, form)
        assert victim[2:4] == ["", ""], victim
    assert (await _row(proxy, "acme", "SELECT pg_backend_pid()"))[0] == pid  # the same server


async def test_an_application_function_setting_app_values_reaches_no_other_tenant(
        start_proxy: Callable[..., ProxyProcess], demo_env: DemoEnv) -> None:
    """The one path left to a session-wide app.* value is the application's own code (a
    function the admin created, which the guard never sees). Another tenant's transaction
    on that server still reads '' (DISCARD ALL restores the servers' startup values)."""
    proxy = start_proxy(pool_size=1, extra='context_signing = "off"')
    admin = await asyncpg.connect(demo_env.admin_dsn)
    try:
        await admin.execute(
            "CREATE OR REPLACE FUNCTION public.app_set_entity() RETURNS text LANGUAGE sql "
            "SECURITY DEFINER SET search_path = pg_catalog AS "
            "$$ SELECT set_config('app.entity_id', 'forged', false) $$")
        await admin.execute("GRANT EXECUTE ON FUNCTION public.app_set_entity() TO tenant_sme")
        raw = await Raw.login(proxy, ATTACKER)
        try:
            got = await raw.request(codec.query("SELECT public.app_set_entity()"))
            assert not errors(got), errors(got)
        finally:
            await raw.close()
        for form in ("simple", "extended"):
            victim = await _values(proxy, VICTIM, demo_env.tenants[VICTIM].token, form)
            assert victim[0] == str(demo_env.tenants[VICTIM].org_id)
            assert victim[2:4] == ["", ""], victim
    finally:
        await admin.execute("DROP FUNCTION IF EXISTS public.app_set_entity()")
        await admin.close()


async def test_omitted_values_are_empty_whatever_the_login_role_defaults_say(
        start_proxy: Callable[..., ProxyProcess], demo_env: DemoEnv) -> None:
    """The omitted SET LOCALs rely on every server's session holding '': the pool logs its
    servers in with those values as startup parameters, which override a default an
    operator sets on the login role (ALTER ROLE ... SET), before or after the proxy starts,
    and survive the DISCARD ALL between tenants."""
    admin = await asyncpg.connect(demo_env.admin_dsn)
    role = f'"{demo_env.proxy_role}"'
    database = await admin.fetchval("SELECT current_database()")
    try:
        await admin.execute(f"ALTER ROLE {role} IN DATABASE \"{database}\" "
                            "SET app.entity_id = 'operator'")
        proxy = start_proxy(pool_size=1, extra='context_signing = "off"')
        await admin.execute(f"ALTER ROLE {role} IN DATABASE \"{database}\" "
                            "SET app.tenant_sig = 'operator'")
        for slug in (VICTIM, ATTACKER, VICTIM):  # a tenant change: DISCARD ALL between
            for form in ("simple", "extended"):
                got = await _values(proxy, slug, demo_env.tenants[slug].token, form)
                assert got[0] == str(demo_env.tenants[slug].org_id)
                assert got[2:4] == ["", ""], (slug, form, got)
        # Without the startup parameters, a session of the login role would read the
        # operator's values (so the test above could fail).
        direct = await asyncpg.connect(demo_env.proxy_dsn)
        try:
            assert await direct.fetchval("SELECT current_setting('app.entity_id')") == "operator"
        finally:
            await direct.close()
    finally:
        await admin.execute(f"ALTER ROLE {role} IN DATABASE \"{database}\" RESET ALL")
        await admin.close()
