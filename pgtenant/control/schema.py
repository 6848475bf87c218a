"""The SQL text of pgtenant's control schema: organizations, tokens, the lookup functions.

Lookup functions: ``resolve_token`` (opaque tokens) and ``resolve_org`` (the organization a
JWT names). The revocation trigger on ``pgtenant.tokens`` NOTIFYs ``TOKEN_CHANNEL``.

Owns the DDL only (every statement idempotent); ``init.py`` decides when and as whom it runs.
"""

from __future__ import annotations

__all__ = [
    "ACTIVE_HOLDS_SIGNATURE",
    "CONTROL_DDL",
    "CONTROL_SCHEMA",
    "HOLDS_TABLE_DDL",
    "HOLD_ACK_CHANNEL",
    "HOLD_CHANNEL",
    "ORG_STATUSES",
    "ORG_STATUS_DDL",
    "PROXY_ROLE_DEFAULTS",
    "PROXY_ROLE_OPTIONAL_DEFAULTS",
    "RESOLVE_ORG_SIGNATURE",
    "RESOLVE_TOKEN_SIGNATURE",
    "SLUG_PATTERN",
    "TOKEN_CHANNEL",
    "TOKEN_REVOCATION_DDL",
    "TOKEN_REVOCATION_FUNCTION",
    "active_holds_ddl",
    "resolve_org_ddl",
    "resolve_token_ddl",
]

CONTROL_SCHEMA = "pgtenant"

# Same rule as the CHECK constraint; the control-plane code checks it first for a clear error.
SLUG_PATTERN = r"^[a-z][a-z0-9_]{0,40}$"

RESOLVE_TOKEN_SIGNATURE = "pgtenant.resolve_token(bytea)"
RESOLVE_ORG_SIGNATURE = "pgtenant.resolve_org(uuid)"
# Channel the proxy LISTENs on; the payload is the id of a revoked or deleted token.
TOKEN_CHANNEL = "pgtenant_tokens"
TOKEN_REVOCATION_FUNCTION = "pgtenant.notify_token_revoked()"

# What a session of the proxy's login role sees when nothing was injected: no tenant, no
# schemas to resolve names in. ``search_path = ''`` is stored as '""' (one empty identifier
# that names no schema), so only pg_catalog is searched.
PROXY_ROLE_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("app.tenant_id", ""),
    ("app.tenant_type", ""),
    ("app.entity_id", ""),
    ("search_path", ""),
)
# Set by init too, but not required by the lockdown check (installs from before it lack it):
# with it, a proxy without signing need not send SET LOCAL app.tenant_sig = '' with every
# transaction (protocol/inject.py, OMITTABLE; the proxy reads it at start).
PROXY_ROLE_OPTIONAL_DEFAULTS: tuple[tuple[str, str], ...] = (("app.tenant_sig", ""),)

# The organization lifecycle: 'provisioning' (being built by ``tenant provision``; logins
# refused), 'ready', 'dropping' (``tenant drop`` started; logins refused).
ORG_STATUSES = ("provisioning", "ready", "dropping")
ORG_STATUS_DDL = (
    "ALTER TABLE pgtenant.organizations ADD COLUMN IF NOT EXISTS status text NOT NULL "
    "DEFAULT 'ready' CHECK (status IN ('provisioning', 'ready', 'dropping'))"
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
    # Database per tenant: the [databases.<name>] this organization is served from (NULL:
    # its tenant type's, else the dbname it connects with). Added to older installs too.
    "ALTER TABLE pgtenant.organizations ADD COLUMN IF NOT EXISTS database text NULL",
    # Lifecycle (``tenant provision``/``tenant drop``): only a 'ready' tenant may log in.
    # Existing rows and ``tenant create`` get 'ready' from the default.
    ORG_STATUS_DDL,
    "REVOKE ALL ON TABLE pgtenant.organizations, pgtenant.tokens FROM PUBLIC",
)


def resolve_token_ddl() -> str:
    """Returns: the ``CREATE OR REPLACE FUNCTION pgtenant.resolve_token`` statement.

    SECURITY DEFINER so the proxy role needs no privilege on the tables; the pinned
    search_path (pg_temp last) keeps callers from shadowing anything the body resolves.
    ``status`` is returned, not filtered on, so the proxy can refuse a tenant that is not
    ready with a message that says so (57P03) instead of "wrong password".
    """
    return """
    CREATE FUNCTION pgtenant.resolve_token(p_hash bytea)
    RETURNS TABLE (token_id uuid, org_id uuid, slug text, tenant_type text,
                   schema_name text, entity_id uuid, database_name text, status text)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pgtenant, pg_temp
    AS $fn$
        SELECT t.id, o.id, o.slug, o.tenant_type, o.schema, t.entity_id, o.database,
               o.status
          FROM pgtenant.tokens AS t
          JOIN pgtenant.organizations AS o ON o.id = t.org_id
         WHERE t.token_hash = p_hash
           AND t.revoked_at IS NULL
           AND (t.expires_at IS NULL OR t.expires_at > pg_catalog.now())
    $fn$
    """


def resolve_org_ddl() -> str:
    """Returns: the ``CREATE OR REPLACE FUNCTION pgtenant.resolve_org`` statement.

    The organization named by a verified JWT's org claim; same safety as ``resolve_token``
    (SECURITY DEFINER, pinned search_path). It reveals no more than a valid token would.
    """
    return """
    CREATE FUNCTION pgtenant.resolve_org(p_org uuid)
    RETURNS TABLE (org_id uuid, slug text, tenant_type text, schema_name text,
                   database_name text, status text)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pgtenant, pg_temp
    AS $fn$
        SELECT o.id, o.slug, o.tenant_type, o.schema, o.database, o.status
          FROM pgtenant.organizations AS o
         WHERE o.id = p_org
    $fn$
    """


# Every running proxy LISTENs on TOKEN_CHANNEL and forgets a token the moment it is revoked
# (revoked_at set) or deleted (also through ON DELETE CASCADE from its organization).
# NOTIFY is delivered at commit, so a rolled-back revocation is never announced. The
# triggers are dropped and re-created so a re-run of init leaves exactly these two.
TOKEN_REVOCATION_DDL: tuple[str, ...] = (
    f"""
    CREATE OR REPLACE FUNCTION {TOKEN_REVOCATION_FUNCTION}
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pgtenant, pg_temp
    AS $fn$
    BEGIN
        PERFORM pg_catalog.pg_notify('{TOKEN_CHANNEL}', OLD.id::text);
        RETURN NULL;
    END
    $fn$
    """,
    "DROP TRIGGER IF EXISTS tokens_revoked_notify ON pgtenant.tokens",
    f"""
    CREATE TRIGGER tokens_revoked_notify
    AFTER UPDATE OF revoked_at ON pgtenant.tokens
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION {TOKEN_REVOCATION_FUNCTION}
    """,
    "DROP TRIGGER IF EXISTS tokens_deleted_notify ON pgtenant.tokens",
    f"""
    CREATE TRIGGER tokens_deleted_notify
    AFTER DELETE ON pgtenant.tokens
    FOR EACH ROW EXECUTE FUNCTION {TOKEN_REVOCATION_FUNCTION}
    """,
    f"REVOKE ALL ON FUNCTION {TOKEN_REVOCATION_FUNCTION} FROM PUBLIC",
)


# Tenant holds (the migration runner asks every proxy to hold a tenant's NEW transactions
# while that tenant's DDL runs; see control/migrations/holds.py). The runner owns the rows
# (one per tenant being migrated, refreshed while it runs) and NOTIFYs HOLD_CHANNEL on every
# change; a proxy treats a notification only as "re-read", and re-reads through
# ACTIVE_HOLDS_SIGNATURE (SECURITY DEFINER, the control role's), because any role may
# NOTIFY any channel: a tenant forging a notification must not be able to hold another
# tenant. A row past its expires_at is ignored (a runner killed -9 cannot hold forever).
# Proxies answer on HOLD_ACK_CHANNEL once their in-flight transactions of the tenant ended.
HOLD_CHANNEL = "pgtenant_holds"
HOLD_ACK_CHANNEL = "pgtenant_hold_acks"
ACTIVE_HOLDS_SIGNATURE = "pgtenant.active_holds()"

HOLDS_TABLE_DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS pgtenant.tenant_holds (
        org_id      uuid PRIMARY KEY,
        run_id      bigint NOT NULL,
        since       timestamptz NOT NULL DEFAULT now(),
        expires_at  timestamptz NOT NULL
    )
    """,
    "REVOKE ALL ON TABLE pgtenant.tenant_holds FROM PUBLIC",
)


def active_holds_ddl() -> str:
    """Returns: the ``CREATE FUNCTION pgtenant.active_holds`` statement: the holds in force
    with the seconds each has left (relative, so proxy and database clocks need not agree)."""
    return """
    CREATE FUNCTION pgtenant.active_holds()
    RETURNS TABLE (org_id uuid, run_id bigint, seconds_left double precision)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pgtenant, pg_temp
    AS $fn$
        SELECT h.org_id, h.run_id,
               extract(epoch FROM h.expires_at - pg_catalog.clock_timestamp())::float8
          FROM pgtenant.tenant_holds AS h
         WHERE h.expires_at > pg_catalog.clock_timestamp()
    $fn$
    """
