"""Control plane against a real Postgres: init, fail-closed defaults, tokens, demo isolation.

No proxy here: tests connect as the proxy's login role and do by hand what the proxy injects
(``SET LOCAL ROLE`` + ``set_config(..., true)``), always rolling back so the demo stays intact.
"""

from __future__ import annotations

import json
import tomllib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from uuid import UUID

import asyncpg
import pytest

from pgtenant.config import TenantTypeConfig
from pgtenant.configfile import parse_config
from pgtenant.control import ControlError
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv, build_demo
from pgtenant.control.init import check_fail_closed, init_database
from pgtenant.control.tenants import create_tenant, issue_token, revoke_token
from pgtenant.identity.context import TenantIdentity, build_context
from pgtenant.identity.tokens import hash_token
from pgtenant.protocol.inject import Injection

from .conftest import ProxyProcess, connect

__all__: list[str] = []

DENIED = asyncpg.InsufficientPrivilegeError
DEMO_TABLES = (
    "public.brand_guidelines", "public.campaigns", "tenant_b.workspace_entities",
    "tenant_b.entity_data", "public.resources_unified", "t_globex.projects", "t_hooli.projects",
)


@asynccontextmanager
async def as_tenant(
    env: DemoEnv, slug: str, *, entity: str | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """Yield a proxy-role connection inside a transaction running as ``slug``; roll back."""
    tenant = env.tenants[slug]
    identity = TenantIdentity(
        org_id=tenant.org_id, slug=slug, tenant_type=tenant.tenant_type,
        token_id=tenant.token_id, schema=tenant.schema,
        entity_id=tenant.entities[entity] if entity else None,
    )
    ctx = build_context(identity, env.tenant_types[tenant.tenant_type])
    # The key is the control role's alone; the proxy reads it on its control connection.
    control = await asyncpg.connect(env.control_dsn)
    try:
        key = await control.fetchval("SELECT pgtenant.signing_key()")
    finally:
        await control.close()
    conn = await asyncpg.connect(env.proxy_dsn)
    tx = conn.transaction()
    await tx.start()
    try:
        # Exactly what the proxy sends: the signed context, then the role switch.
        await conn.execute(Injection(ctx, key).q_prefix.decode())
        yield conn
    finally:
        await tx.rollback()
        await conn.close()


async def names(conn: asyncpg.Connection, sql: str) -> list[str]:
    return sorted(r[0] for r in await conn.fetch(sql))


async def resolve(env: DemoEnv, token: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(env.control_dsn)  # the registry's role, as the proxy does
    try:
        return await conn.fetch("SELECT * FROM pgtenant.resolve_token($1)", hash_token(token))
    finally:
        await conn.close()


# ----------------------------------------------------------------------------- init


async def test_init_twice_changes_nothing_and_keeps_password(demo_env: DemoEnv) -> None:
    result = await init_database(
        demo_env.admin_dsn, proxy_role=demo_env.proxy_role, tenant_types=demo_env.tenant_types
    )
    assert result.created_roles == []
    assert result.proxy_password is None
    assert await check_fail_closed(demo_env.admin_dsn, demo_env.proxy_role) == []
    # The old password still works: init did not re-key the role.
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    await conn.close()


async def test_check_fail_closed_is_empty_after_demo(demo_env: DemoEnv) -> None:
    assert await check_fail_closed(demo_env.admin_dsn, demo_env.proxy_role) == []


async def test_check_fail_closed_reports_weakened_role(
    demo_env: DemoEnv, pg_cluster: PostgresCluster
) -> None:
    # A separate database and login role, so weakening them cannot disturb other tests.
    pg_cluster.create_database("weak")
    dsn = pg_cluster.admin_dsn("weak")
    result = await init_database(dsn, proxy_role="weak_proxy")
    assert result.created_roles == ["weak_proxy"] and result.proxy_password
    assert await check_fail_closed(dsn, "weak_proxy") == []
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("ALTER ROLE weak_proxy INHERIT BYPASSRLS")
        await admin.execute("ALTER ROLE weak_proxy RESET app.tenant_id")
        await admin.execute("CREATE TABLE public.weak_owned (x int)")
        await admin.execute("ALTER TABLE public.weak_owned OWNER TO weak_proxy")
        await admin.execute("GRANT CREATE ON SCHEMA pgtenant TO PUBLIC")
        problems = "\n".join(await check_fail_closed(dsn, "weak_proxy"))
    finally:
        await admin.close()
        pg_cluster.psql("DROP DATABASE weak")
        pg_cluster.psql("DROP ROLE weak_proxy")
    assert "INHERIT" in problems
    assert "BYPASSRLS" in problems
    assert "app.tenant_id is unset" in problems
    assert "owns 1 object(s) in pg_class" in problems
    assert "privileges on table public.weak_owned" in problems
    assert "PUBLIC has CREATE on schema pgtenant" in problems


async def test_check_fail_closed_reports_missing_role(demo_env: DemoEnv) -> None:
    problems = await check_fail_closed(demo_env.admin_dsn, "no_such_role")
    assert problems == ["role 'no_such_role' does not exist (run pgtenant init)"]


# ----------------------------------------------------------------------------- proxy role


async def test_proxy_role_session_defaults_name_no_tenant_and_no_schema(
    demo_env: DemoEnv,
) -> None:
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT current_setting('app.tenant_id') AS tenant_id, "
            "current_setting('app.tenant_type') AS tenant_type, "
            "current_setting('app.entity_id') AS entity_id, "
            "current_schemas(false) AS schemas, current_user AS who"
        )
        assert dict(row) == {
            "tenant_id": "", "tenant_type": "", "entity_id": "", "schemas": [],
            "who": demo_env.proxy_role,
        }
        # An unqualified name resolves to nothing at all.
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("SELECT * FROM brand_guidelines")
    finally:
        await conn.close()


@pytest.mark.parametrize("table", DEMO_TABLES)
async def test_proxy_role_cannot_read_demo_tables(demo_env: DemoEnv, table: str) -> None:
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    try:
        with pytest.raises(DENIED):
            await conn.fetch(f"SELECT * FROM {table}")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM pgtenant.tokens",
        "SELECT * FROM pgtenant.organizations",
        "INSERT INTO pgtenant.organizations (slug, tenant_type) VALUES ('evil', 'sme')",
        "CREATE TEMP TABLE sneaky (x int)",
        "CREATE TABLE public.sneaky (x int)",
        "SELECT public.save_resource_routed('x', '{}'::jsonb)",
    ],
)
async def test_proxy_role_is_denied_control_tables_temp_and_ddl(
    demo_env: DemoEnv, sql: str
) -> None:
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    try:
        with pytest.raises(DENIED):
            await conn.execute(sql)
    finally:
        await conn.close()


# ----------------------------------------------------------------------------- tokens


async def test_resolve_token_returns_the_tokens_organization(demo_env: DemoEnv) -> None:
    acme = demo_env.tenants["acme"]
    rows = await resolve(demo_env, acme.token)
    assert [dict(r) for r in rows] == [{
        "token_id": acme.token_id, "org_id": acme.org_id, "slug": "acme",
        "tenant_type": "sme", "schema_name": None, "entity_id": None, "database_name": None,
        "status": "ready",
    }]
    globex = (await resolve(demo_env, demo_env.tenants["globex"].token))[0]
    assert (globex["tenant_type"], globex["schema_name"]) == ("enterprise", "t_globex")


async def test_resolve_token_carries_entity_of_bound_token(demo_env: DemoEnv) -> None:
    umbrella = demo_env.tenants["umbrella"]
    (row,) = await resolve(demo_env, umbrella.entity_tokens["client_a"])
    assert row["org_id"] == umbrella.org_id
    assert row["entity_id"] == umbrella.entities["client_a"]


async def test_resolve_token_returns_nothing_for_unknown_token(demo_env: DemoEnv) -> None:
    assert await resolve(demo_env, "pgt_not-a-real-token-at-all-xxxxxxxxxxxxxxxxxxxx") == []


async def test_revoked_token_no_longer_resolves(demo_env: DemoEnv) -> None:
    token_id, token = await issue_token(demo_env.admin_dsn, tenant_slug="initech", label="t")
    assert len(await resolve(demo_env, token)) == 1
    assert await revoke_token(demo_env.admin_dsn, token_id) is True
    assert await revoke_token(demo_env.admin_dsn, token_id) is False
    assert await revoke_token(demo_env.admin_dsn, uuid.uuid4()) is False
    assert await resolve(demo_env, token) == []


async def test_expired_token_no_longer_resolves(demo_env: DemoEnv) -> None:
    token_id, token = await issue_token(
        demo_env.admin_dsn, tenant_slug="initech", expires_in=timedelta(hours=1)
    )
    assert len(await resolve(demo_env, token)) == 1
    admin = await asyncpg.connect(demo_env.admin_dsn)
    try:
        await admin.execute(
            "UPDATE pgtenant.tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
            token_id,
        )
    finally:
        await admin.close()
    assert await resolve(demo_env, token) == []


async def test_only_the_token_hash_is_stored(demo_env: DemoEnv) -> None:
    acme = demo_env.tenants["acme"]
    admin = await asyncpg.connect(demo_env.admin_dsn)
    try:
        stored = await admin.fetchval(
            "SELECT token_hash FROM pgtenant.tokens WHERE id = $1", acme.token_id
        )
    finally:
        await admin.close()
    assert stored == hash_token(acme.token)


async def test_operator_mistakes_raise_control_error(demo_env: DemoEnv) -> None:
    dsn = demo_env.admin_dsn
    with pytest.raises(ControlError, match="already exists"):
        await create_tenant(dsn, slug="acme", tenant_type=demo_env.tenant_types["sme"])
    with pytest.raises(ControlError, match="bad slug"):
        await create_tenant(dsn, slug="Bad-Slug", tenant_type=demo_env.tenant_types["sme"])
    ghost = TenantTypeConfig(name="ghost", role="tenant_ghost")
    with pytest.raises(ControlError, match="unknown tenant type 'ghost'"):
        await create_tenant(dsn, slug="casper", tenant_type=ghost)
    with pytest.raises(ControlError, match="unknown tenant"):
        await issue_token(dsn, tenant_slug="nobody")
    with pytest.raises(ControlError, match="positive"):
        await issue_token(dsn, tenant_slug="acme", expires_in=timedelta(0))


async def test_build_demo_refuses_a_database_that_already_has_it(demo_env: DemoEnv) -> None:
    with pytest.raises(ControlError, match="demo tenants already exist"):
        await build_demo(demo_env.admin_dsn)
    # Refused before touching the proxy role: its password is unchanged.
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    await conn.close()


def test_demo_config_toml_is_accepted_by_the_config_loader(demo_env: DemoEnv) -> None:
    text = demo_env.config_toml(6543, pool_size=3, extra='log_level = "debug"')
    config = parse_config(tomllib.loads(text))
    assert config.listen == ("127.0.0.1", 6543)
    assert config.log_level == "debug"
    db = config.databases["app"]
    assert (db.pool_size, db.dsn.user, db.dsn.password) == (
        3, demo_env.proxy_role, demo_env.proxy_password
    )
    assert dict(config.tenant_types) == demo_env.tenant_types


# ----------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("slug", ["acme", "initech"])
async def test_sme_transaction_sees_only_its_own_rows(demo_env: DemoEnv, slug: str) -> None:
    tenant = demo_env.tenants[slug]
    async with as_tenant(demo_env, slug) as conn:
        # Unqualified names: the injected search_path is what makes them resolve.
        assert await names(conn, "SELECT name FROM brand_guidelines") == tenant.rows[
            "public.brand_guidelines"
        ]
        assert await names(conn, "SELECT name FROM campaigns") == tenant.rows["public.campaigns"]


async def test_tenant_role_without_tenant_id_sees_no_rows(demo_env: DemoEnv) -> None:
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE tenant_sme")
            assert await conn.fetchval("SELECT count(*) FROM public.brand_guidelines") == 0
            assert await conn.fetchval("SELECT count(*) FROM public.campaigns") == 0
    finally:
        await conn.close()


async def test_rls_refuses_writing_a_row_for_another_org(demo_env: DemoEnv) -> None:
    initech = demo_env.tenants["initech"].org_id
    async with as_tenant(demo_env, "acme") as conn:
        with pytest.raises(DENIED, match="row-level security"):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO campaigns (org_id, name) VALUES ($1, 'acme: hijack')", initech
                )
        # Other tenants' rows are invisible to UPDATE too.
        assert await conn.execute("UPDATE campaigns SET budget = 0 WHERE org_id = $1",
                                  initech) == "UPDATE 0"


async def test_a_tenant_insert_may_leave_the_tenant_column_out(
    demo_env: DemoEnv, proxy: ProxyProcess,
) -> None:
    # The demo's own suggestion, through the proxy: org_id defaults to the signed tenant.
    conn = await connect(proxy, "acme")
    try:
        tx = conn.transaction()
        await tx.start()
        org = await conn.fetchval(
            "INSERT INTO campaigns (name, budget) VALUES ('acme: x', 1) RETURNING org_id")
        assert org == demo_env.tenants["acme"].org_id
        await tx.rollback()  # other tests count acme's rows
    finally:
        await conn.close()


async def test_sme_role_cannot_write_agency_tables(demo_env: DemoEnv) -> None:
    acme = demo_env.tenants["acme"]
    entity = demo_env.tenants["umbrella"].entity_ids[0]
    async with as_tenant(demo_env, "acme") as conn:
        with pytest.raises(DENIED):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO tenant_b.entity_data (organization_id, entity_id, data_type) "
                    "VALUES ($1, $2, 'brand_guidelines')",
                    acme.org_id, entity,
                )
        with pytest.raises(DENIED):
            async with conn.transaction():
                await conn.execute("SELECT * FROM tenant_b.workspace_entities")


async def test_agency_role_cannot_write_sme_tables(demo_env: DemoEnv) -> None:
    umbrella = demo_env.tenants["umbrella"]
    async with as_tenant(demo_env, "umbrella") as conn:
        for sql in (
            "INSERT INTO public.campaigns (org_id, name) VALUES ($1, 'umbrella: x')",
            "INSERT INTO public.brand_guidelines (org_id, name) VALUES ($1, 'umbrella: x')",
        ):
            with pytest.raises(DENIED):
                async with conn.transaction():
                    await conn.execute(sql, umbrella.org_id)


async def test_agency_transaction_sees_only_its_entities(demo_env: DemoEnv) -> None:
    umbrella = demo_env.tenants["umbrella"]
    async with as_tenant(demo_env, "umbrella") as conn:
        assert await names(conn, "SELECT name FROM workspace_entities") == umbrella.rows[
            "tenant_b.workspace_entities"
        ]
        assert await names(conn, "SELECT content->>'name' FROM entity_data") == umbrella.rows[
            "tenant_b.entity_data"
        ]
        # Readable for the unified view, but RLS hides every SME row.
        assert await conn.fetchval("SELECT count(*) FROM public.brand_guidelines") == 0


async def test_router_writes_sme_resources_to_public(demo_env: DemoEnv) -> None:
    async with as_tenant(demo_env, "acme") as conn:
        result = json.loads(await conn.fetchval(
            "SELECT save_resource_routed('acme: routed', '{\"color\": \"red\"}'::jsonb)"
        ))
        assert result["schema"] == "public"
        row = await conn.fetchrow(
            "SELECT name, org_id FROM brand_guidelines WHERE id = $1", UUID(result["id"])
        )
        assert (row["name"], row["org_id"]) == ("acme: routed", demo_env.tenants["acme"].org_id)


async def test_router_writes_agency_resources_to_tenant_b(demo_env: DemoEnv) -> None:
    umbrella = demo_env.tenants["umbrella"]
    client_b = umbrella.entities["client_b"]
    async with as_tenant(demo_env, "umbrella") as conn:
        result = json.loads(await conn.fetchval(
            "SELECT save_resource_routed('umbrella: routed', '{}'::jsonb, $1)", client_b
        ))
        assert result["schema"] == "tenant_b"
        row = await conn.fetchrow(
            "SELECT entity_id, data_type, content->>'name' AS name FROM tenant_b.entity_data "
            "WHERE id = $1",
            UUID(result["id"]),
        )
        assert dict(row) == {
            "entity_id": client_b, "data_type": "brand_guidelines", "name": "umbrella: routed"
        }
        for entity in (None, uuid.uuid4()):
            with pytest.raises(asyncpg.PostgresError, match="entity"):
                async with conn.transaction():
                    await conn.fetchval(
                        "SELECT save_resource_routed('umbrella: x', '{}'::jsonb, $1)", entity
                    )


async def test_router_respects_entity_bound_context(demo_env: DemoEnv) -> None:
    umbrella = demo_env.tenants["umbrella"]
    async with as_tenant(demo_env, "umbrella", entity="client_a") as conn:
        result = json.loads(await conn.fetchval(
            "SELECT save_resource_routed('umbrella: bound', '{}'::jsonb)"
        ))
        entity = await conn.fetchval(
            "SELECT entity_id FROM entity_data WHERE id = $1", UUID(result["id"])
        )
        assert entity == umbrella.entities["client_a"]
        with pytest.raises(DENIED, match="bound to another entity"):
            async with conn.transaction():
                await conn.fetchval(
                    "SELECT save_resource_routed('umbrella: x', '{}'::jsonb, $1)",
                    umbrella.entities["client_b"],
                )


async def test_router_refuses_calls_without_tenant_context(demo_env: DemoEnv) -> None:
    conn = await asyncpg.connect(demo_env.proxy_dsn)
    try:
        with pytest.raises(DENIED, match="no tenant context"):
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE tenant_sme")
                await conn.fetchval("SELECT public.save_resource_routed('x', '{}'::jsonb)")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("slug", "source", "table"),
    [("acme", "public", "public.brand_guidelines"),
     ("initech", "public", "public.brand_guidelines"),
     ("umbrella", "tenant_b", "tenant_b.entity_data")],
)
async def test_unified_view_shows_only_own_rows(
    demo_env: DemoEnv, slug: str, source: str, table: str
) -> None:
    tenant = demo_env.tenants[slug]
    async with as_tenant(demo_env, slug) as conn:
        rows = await conn.fetch(
            "SELECT organization_id, source, data->>'name' AS name FROM resources_unified"
        )
    assert {r["organization_id"] for r in rows} == {tenant.org_id}
    assert {r["source"] for r in rows} == {source}
    expected = [n for n in tenant.rows[table] if "persona" not in n]
    assert sorted(r["name"] for r in rows) == expected


async def test_enterprise_tenant_reads_only_its_own_schema(demo_env: DemoEnv) -> None:
    globex = demo_env.tenants["globex"]
    async with as_tenant(demo_env, "globex") as conn:
        assert await names(conn, "SELECT name FROM projects") == globex.rows["t_globex.projects"]
        # Default privileges cover sequences, so serial inserts work.
        await conn.execute("INSERT INTO projects (name) VALUES ('globex: new')")
        for sql in ("SELECT * FROM t_hooli.projects", "SELECT * FROM public.brand_guidelines"):
            with pytest.raises(DENIED):
                async with conn.transaction():
                    await conn.fetch(sql)


async def test_hooli_does_not_see_globex_rows(demo_env: DemoEnv) -> None:
    async with as_tenant(demo_env, "hooli") as conn:
        assert await names(conn, "SELECT name FROM projects") == demo_env.tenants[
            "hooli"
        ].rows["t_hooli.projects"]
        assert await conn.fetchval(
            "SELECT has_schema_privilege('t_globex', 'USAGE')"
        ) is False


def test_cluster_exposes_client_tools_and_admin_dsn(pg_cluster: PostgresCluster) -> None:
    assert pg_cluster.tool("psql") is not None
    assert pg_cluster.tool("definitely-not-a-pg-tool") is None
    assert pg_cluster.admin_dsn("app") == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/app"
    assert pg_cluster.psql("SELECT 40 + 2").strip() == "42"
