"""The SQL text of pgtenant's control schema: organizations, tokens and ``resolve_token``.

Owns the DDL only (every statement idempotent); ``init.py`` decides when and as whom it runs.
"""

from __future__ import annotations

__all__ = [
    "CONTROL_DDL",
    "CONTROL_SCHEMA",
    "PROXY_ROLE_DEFAULTS",
    "RESOLVE_TOKEN_SIGNATURE",
    "SLUG_PATTERN",
    "resolve_token_ddl",
]

CONTROL_SCHEMA = "pgtenant"

# Same rule as the CHECK constraint; the control-plane code checks it first for a clear error.
SLUG_PATTERN = r"^[a-z][a-z0-9_]{0,40}$"

RESOLVE_TOKEN_SIGNATURE = "pgtenant.resolve_token(bytea)"

# What a session of the proxy's login role sees when nothing was injected: no tenant, no
# schemas to resolve names in. ``search_path = ''`` is stored as '""' (one empty identifier
# that names no schema), so only pg_catalog is searched.
PROXY_ROLE_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("app.tenant_id", ""),
    ("app.tenant_type", ""),
    ("app.entity_id", ""),
    ("search_path", ""),
)

CONTROL_DDL: tuple[str, ...] = (
    "CREATE SCHEMA IF NOT EXISTS pgtenant",
    # Owned by whoever runs init (the admin); a pre-existing schema is taken over.
    "ALTER SCHEMA pgtenant OWNER TO CURRENT_USER",
    "REVOKE ALL ON SCHEMA pgtenant FROM PUBLIC",
    f"""
    CREATE TABLE IF NOT EXISTS pgtenant.organizations (
        id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        slug        text UNIQUE NOT NULL CHECK (slug ~ '{SLUG_PATTERN}'),
        tenant_type text NOT NULL,
        schema      text NULL,
        created_at  timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS pgtenant.tokens (
        id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        org_id      uuid NOT NULL REFERENCES pgtenant.organizations(id) ON DELETE CASCADE,
        entity_id   uuid NULL,
        token_hash  bytea UNIQUE NOT NULL,
        label       text,
        created_at  timestamptz NOT NULL DEFAULT now(),
        expires_at  timestamptz NULL,
        revoked_at  timestamptz NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS tokens_org_id_idx ON pgtenant.tokens (org_id)",
    "REVOKE ALL ON TABLE pgtenant.organizations, pgtenant.tokens FROM PUBLIC",
)


def resolve_token_ddl() -> str:
    """Returns: the ``CREATE OR REPLACE FUNCTION pgtenant.resolve_token`` statement.

    SECURITY DEFINER so the proxy role needs no privilege on the tables; the pinned
    search_path (pg_temp last) keeps callers from shadowing anything the body resolves.
    """
    return """
    CREATE OR REPLACE FUNCTION pgtenant.resolve_token(p_hash bytea)
    RETURNS TABLE (token_id uuid, org_id uuid, slug text, tenant_type text,
                   schema_name text, entity_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pgtenant, pg_temp
    AS $fn$
        SELECT t.id, o.id, o.slug, o.tenant_type, o.schema, t.entity_id
          FROM pgtenant.tokens AS t
          JOIN pgtenant.organizations AS o ON o.id = t.org_id
         WHERE t.token_hash = p_hash
           AND t.revoked_at IS NULL
           AND (t.expires_at IS NULL OR t.expires_at > pg_catalog.now())
    $fn$
    """
