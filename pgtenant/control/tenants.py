"""Operator actions on tenants: create an organization (with its schema and role) and tokens.

Owns the rows in ``pgtenant.organizations``/``pgtenant.tokens`` and the per-tenant schema and
role of schema-per-tenant types. Tokens are shown once and stored only as their hash.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from uuid import UUID

import asyncpg

from ..config import TenantTypeConfig
from ..errors import ContextError
from ..identity.context import (
    TenantIdentity,
    default_schema_name,
    quote_ident,
    render_template,
)
from ..identity.tokens import generate_token, hash_token
from . import ControlError
from .init import ensure_tenant_role, grant_role_to_proxy, grant_temp
from .schema import SLUG_PATTERN

__all__ = [
    "CREATE_LOCK_KEY",
    "create_tenant",
    "issue_token",
    "list_tenants",
    "list_tokens",
    "revoke_token",
    "uses_schema",
]

_SLUG = re.compile(SLUG_PATTERN)


def uses_schema(tenant_type: TenantTypeConfig) -> bool:
    """Returns: whether the type's role or search_path templates need a per-tenant schema."""
    return any("{schema}" in t for t in (tenant_type.role, *tenant_type.search_path))


async def create_tenant(
    admin_dsn: str,
    *,
    slug: str,
    tenant_type: TenantTypeConfig,
    proxy_role: str = "pgtenant_proxy",
    schema: str | None = None,
    database: str | None = None,
    database_dsn: str | None = None,
) -> UUID:
    """Register an organization; for schema-per-tenant types also its schema and role.
    ``database`` names the proxy's ``[databases.<name>]`` it is served from (database per
    tenant; None: its tenant type's, else the dbname its clients ask for); ``database_dsn``
    is an admin URL of that database when it is not ``admin_dsn``'s: the schema and the
    per-database grants are made there (roles are cluster-wide, the row stays here).

    The schema is owned by the admin; a templated role is created NOLOGIN NOINHERIT, granted
    to the proxy, and is the only role given USAGE on the schema (plus default DML
    privileges on tables and USAGE on sequences the admin later creates there).

    Returns: the new organization's id.
    Raises: ControlError for a bad or duplicate slug, a static role that ``init`` has not
    created (unknown tenant type), a schema or role that already belongs to something else.
    """
    if not _SLUG.match(slug):
        raise ControlError(f"bad slug {slug!r}: expected {SLUG_PATTERN}")
    needs_schema = uses_schema(tenant_type)
    if schema is not None and not needs_schema:
        raise ControlError(
            f"tenant type {tenant_type.name!r} has no {{schema}} template; do not pass a schema"
        )
    if needs_schema and schema is None:
        schema = default_schema_name(slug)
    org_id = uuid.uuid4()
    identity = TenantIdentity(
        org_id=org_id, slug=slug, tenant_type=tenant_type.name, token_id=uuid.UUID(int=0),
        schema=schema,
    )
    try:
        role = render_template(tenant_type.role, identity, what="role")
        if schema is not None:
            schema = render_template("{schema}", identity, what="schema")
    except ContextError as exc:
        raise ControlError(str(exc)) from exc
    templated_role = "{" in tenant_type.role

    conn = await asyncpg.connect(admin_dsn)
    try:
        async with conn.transaction():
            # Serializes tenant creation cluster-wide: two concurrent GRANTs on the same
            # object (schema public) fail with "tuple concurrently updated" (XX000).
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *CREATE_LOCK_KEY)
            if await conn.fetchval("SELECT 1 FROM pgtenant.organizations WHERE slug = $1", slug):
                raise ControlError(f"tenant {slug!r} already exists")
            if not templated_role and not await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", role
            ):
                raise ControlError(
                    f"unknown tenant type {tenant_type.name!r}: role {role!r} does not exist; "
                    "run `pgtenant init` with this tenant type first"
                )
            await conn.execute(
                "INSERT INTO pgtenant.organizations (id, slug, tenant_type, schema, database) "
                "VALUES ($1, $2, $3, $4, $5)",
                org_id, slug, tenant_type.name, schema, database,
            )
            if templated_role:
                await _claim_role(conn, role, slug)
                await grant_role_to_proxy(conn, role, proxy_role)
            if database_dsn is None:
                await _prepare_database(conn, role, schema, tenant_type)
        if database_dsn is not None:
            # The tenant's own database: its schema and grants live there. Not atomic with
            # the row above; on a failure here `tenant drop` removes the row and role.
            await _prepare_remote(database_dsn, role, schema, tenant_type)
    finally:
        await conn.close()
    return org_id


# pg_advisory_xact_lock keys (two int4): "pgtn", "tcre" (tenant creation, cluster-wide
# because roles and their grants are).
CREATE_LOCK_KEY = (0x7067746E, 0x74637265)


async def _prepare_database(conn: asyncpg.Connection, role: str, schema: str | None,
                            tenant_type: TenantTypeConfig) -> None:
    # Inside a transaction holding CREATE_LOCK_KEY (the GRANT below must not race another).
    if not tenant_type.shared_role:
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {quote_ident(role)}")
    # TEMP is per database: a tenant in its own database needs it there (a static role's
    # in init's database was granted by init, again here harmlessly).
    await grant_temp(conn, role, tenant_type)
    if schema is not None:
        await _create_schema(conn, schema, role)


async def _prepare_remote(database_dsn: str, role: str, schema: str | None,
                          tenant_type: TenantTypeConfig) -> None:
    remote = await asyncpg.connect(database_dsn)
    try:
        async with remote.transaction():
            await remote.execute("SELECT pg_advisory_xact_lock($1, $2)", *CREATE_LOCK_KEY)
            await _prepare_database(remote, role, schema, tenant_type)
    finally:
        await remote.close()


async def _claim_role(conn: asyncpg.Connection, role: str, slug: str) -> None:
    # Roles are cluster-wide: the same tenant may live in several databases and reuse its
    # role, but a role already serving another organization here would merge two tenants.
    existing = await conn.fetchrow(
        "SELECT rolsuper OR rolbypassrls OR rolcanlogin AS unsafe FROM pg_roles "
        "WHERE rolname = $1",
        role,
    )
    if existing is not None:
        if existing["unsafe"]:
            raise ControlError(f"role {role!r} exists and can log in or bypass RLS; refusing it")
        other = await conn.fetchval(
            """
            SELECT o.slug FROM pgtenant.organizations o
              JOIN pg_namespace n ON n.nspname = o.schema
             WHERE o.slug <> $2 AND has_schema_privilege($1, n.oid, 'USAGE')
             LIMIT 1
            """,
            role, slug,
        )
        if other is not None:
            raise ControlError(f"role {role!r} already serves tenant {other!r}")
    await ensure_tenant_role(conn, role)


async def _create_schema(conn: asyncpg.Connection, schema: str, role: str) -> None:
    taken = 0
    if await conn.fetchval("SELECT to_regclass('pgtenant.organizations') IS NOT NULL"):
        taken = await conn.fetchval(
            "SELECT count(*) FROM pgtenant.organizations WHERE schema = $1", schema
        )
    if taken > 1 or await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
        raise ControlError(f"schema {schema!r} already exists")
    s, r = quote_ident(schema), quote_ident(role)
    await conn.execute(f"CREATE SCHEMA {s} AUTHORIZATION CURRENT_USER")
    await conn.execute(f"REVOKE ALL ON SCHEMA {s} FROM PUBLIC")
    await conn.execute(f"GRANT USAGE ON SCHEMA {s} TO {r}")
    await conn.execute(
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}"
    )
    await conn.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE ON SEQUENCES TO {r}")


async def issue_token(
    admin_dsn: str,
    *,
    tenant_slug: str,
    entity_id: UUID | None = None,
    expires_in: timedelta | None = None,
    label: str | None = None,
) -> tuple[UUID, str]:
    """Create a token for a tenant, optionally bound to one entity and/or expiring.

    Returns: ``(token_id, token)``; the token text is not stored and cannot be shown again.
    Raises: ControlError for an unknown tenant or a non-positive ``expires_in``.
    """
    if expires_in is not None and expires_in <= timedelta(0):
        raise ControlError("expires_in must be positive")
    token = generate_token()
    conn = await asyncpg.connect(admin_dsn)
    try:
        org_id = await _org_id(conn, tenant_slug)
        token_id = await conn.fetchval(
            """
            INSERT INTO pgtenant.tokens (org_id, entity_id, token_hash, label, expires_at)
            VALUES ($1, $2, $3, $4, now() + $5::interval)
            RETURNING id
            """,
            org_id, entity_id, hash_token(token), label, expires_in,
        )
    finally:
        await conn.close()
    return token_id, token


async def revoke_token(admin_dsn: str, token_id: UUID) -> bool:
    """Revoke a token; the proxy refuses it once its token cache entry expires.

    Returns: True if this call revoked it; False if it is unknown or was already revoked.
    Raises: asyncpg.PostgresError when the update fails.
    """
    conn = await asyncpg.connect(admin_dsn)
    try:
        row = await conn.fetchval(
            "UPDATE pgtenant.tokens SET revoked_at = now() "
            "WHERE id = $1 AND revoked_at IS NULL RETURNING id",
            token_id,
        )
    finally:
        await conn.close()
    return row is not None


async def list_tenants(admin_dsn: str) -> list[asyncpg.Record]:
    """Returns: every organization (slug, tenant_type, schema, database, created_at, id,
    status), by slug."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        # status through to_jsonb: an install from before the column lists as 'ready'
        return list(await conn.fetch(
            "SELECT slug, tenant_type, schema, database, created_at, id, "
            "coalesce(to_jsonb(o) ->> 'status', 'ready') AS status "
            "FROM pgtenant.organizations o ORDER BY slug"
        ))
    finally:
        await conn.close()


async def _org_id(conn: asyncpg.Connection, slug: str) -> object:
    """Returns: the organization id of tenant ``slug``.
    Raises: ControlError for an unknown tenant."""
    org_id = await conn.fetchval("SELECT id FROM pgtenant.organizations WHERE slug = $1", slug)
    if org_id is None:
        raise ControlError(f"unknown tenant {slug!r}")
    return org_id


async def list_tokens(admin_dsn: str, tenant_slug: str) -> list[asyncpg.Record]:
    """Returns: a tenant's tokens (id, label, entity_id, created_at, expires_at, revoked_at),
    oldest first. Never the hash: it is all an attacker needs to test guesses offline.

    Raises: ControlError for an unknown tenant.
    """
    conn = await asyncpg.connect(admin_dsn)
    try:
        org_id = await _org_id(conn, tenant_slug)
        return list(await conn.fetch(
            "SELECT id, label, entity_id, created_at, expires_at, revoked_at "
            "FROM pgtenant.tokens WHERE org_id = $1 ORDER BY created_at, id", org_id
        ))
    finally:
        await conn.close()
