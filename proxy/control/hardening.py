"""Database-side security objects: lockdown, server-side refusals, and the signed context.

Owns the SQL ``pgtenant init`` runs for ARCHITECTURE.md §5 layers 3 and 4, and the checks
the proxy runs at start (``check_lockdown``) to refuse serving a database without them:

* lockdown: tenant roles get no dynamic-SQL paths (``set_config``, the ``query_to_xml``
  family, ``plpgsql`` for DO/CREATE FUNCTION), no CREATE on shared schemas;
* ``pgtenant.refuse(msg)``: raises SQLSTATE 42501, so the statement guard's refusals are
  raised by Postgres itself, in order;
* signed context: ``app.tenant_sig`` = HMAC-SHA256 of the context under a key tenants cannot
  read; ``pgtenant.current_tenant()`` returns the tenant only when the signature verifies.
  HMAC is computed with the built-in ``sha256()`` (PG 11+) from stored inner/outer padded
  keys, so no extension (pgcrypto) is needed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Final

import asyncpg

from ..identity.context import context_signature, quote_ident

__all__ = [
    "CURRENT_TENANT_SQL",
    "LOCKED_FUNCTIONS",
    "check_lockdown",
    "fetch_signing_key",
    "install_hardening",
    "sign_context",
]

# Built-ins that set settings or run SQL given as text: tenants must not have EXECUTE.
LOCKED_FUNCTIONS: Final = (
    "pg_catalog.set_config(text, text, boolean)",
    "pg_catalog.query_to_xml(text, boolean, boolean, text)",
    "pg_catalog.query_to_xmlschema(text, boolean, boolean, text)",
    "pg_catalog.query_to_xml_and_xmlschema(text, boolean, boolean, text)",
    "pg_catalog.cursor_to_xml(refcursor, integer, boolean, boolean, text)",
    "pg_catalog.cursor_to_xmlschema(refcursor, boolean, boolean, text)",
)
_BLOCK = 64  # SHA-256 block size, for HMAC's padded keys

# A procedure, not a function: CALL sends no RowDescription before the error, so the reply
# to a refused Query or FunctionCall has exactly the shape the client expects.
REFUSE_SQL: Final = """
CREATE OR REPLACE PROCEDURE pgtenant.refuse(msg text, VARIADIC args text[] DEFAULT '{}')
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = msg;
END
$$
"""

SIGNING_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS pgtenant.signing_keys (
        id int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
        key bytea NOT NULL,
        k_ipad bytea NOT NULL,
        k_opad bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())""",
    "REVOKE ALL ON pgtenant.signing_keys FROM PUBLIC",
    """CREATE OR REPLACE FUNCTION pgtenant.signing_key() RETURNS bytea
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgtenant, pg_temp AS $$
        SELECT key FROM pgtenant.signing_keys WHERE id = 1
    $$""",
    "REVOKE EXECUTE ON FUNCTION pgtenant.signing_key() FROM PUBLIC",
)

# STABLE + SECURITY DEFINER: policies call it as ``(SELECT pgtenant.current_tenant())`` so it
# runs once per query (an initplan), and only it can read the key.
CURRENT_TENANT_SQL: Final = """
CREATE OR REPLACE FUNCTION pgtenant.current_tenant() RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgtenant, pg_temp AS $$
    SELECT CASE
        WHEN encode(sha256(k.k_opad || sha256(k.k_ipad || convert_to(
                 current_setting('app.tenant_id', true) || '|' ||
                 current_setting('app.tenant_type', true) || '|' ||
                 current_setting('app.entity_id', true), 'UTF8'))), 'hex')
             = current_setting('app.tenant_sig', true)
        THEN nullif(current_setting('app.tenant_id', true), '')::uuid
    END
    FROM pgtenant.signing_keys k WHERE k.id = 1
$$
"""


def sign_context(key: bytes, org_id: str, tenant_type: str, entity_id: str) -> str:
    """Returns: the hex HMAC-SHA256 ``app.tenant_sig`` for a context (what the proxy sets)."""
    return context_signature(key, org_id, tenant_type, entity_id)


def _padded(key: bytes, pad: int) -> bytes:
    return bytes(b ^ pad for b in key.ljust(_BLOCK, b"\x00"))


async def install_hardening(conn: asyncpg.Connection, proxy_role: str,
                            tenant_roles: Iterable[str] = ()) -> None:
    """Install lockdown, ``pgtenant.refuse`` and the signed context (idempotent).

    Must run inside init's transaction, as the owner of the ``pgtenant`` schema.
    Raises: asyncpg.PostgresError when a statement fails.
    """
    proxy = quote_ident(proxy_role)
    await conn.execute(REFUSE_SQL)
    await conn.execute("ALTER PROCEDURE pgtenant.refuse(text, text[]) OWNER TO CURRENT_USER")
    # Every tenant role may be refused; PUBLIC is simplest and grants nothing dangerous.
    await conn.execute("GRANT EXECUTE ON PROCEDURE pgtenant.refuse(text, text[]) TO PUBLIC")
    await conn.execute("GRANT USAGE ON SCHEMA pgtenant TO PUBLIC")
    for stmt in SIGNING_DDL:
        await conn.execute(stmt)
    if not await conn.fetchval("SELECT count(*) FROM pgtenant.signing_keys"):
        key = secrets.token_bytes(32)
        await conn.execute(
            "INSERT INTO pgtenant.signing_keys(id, key, k_ipad, k_opad) VALUES (1, $1, $2, $3)",
            key, _padded(key, 0x36), _padded(key, 0x5C),
        )
    await conn.execute(f"GRANT EXECUTE ON FUNCTION pgtenant.signing_key() TO {proxy}")
    await conn.execute(CURRENT_TENANT_SQL)
    await conn.execute("GRANT EXECUTE ON FUNCTION pgtenant.current_tenant() TO PUBLIC")
    for func in LOCKED_FUNCTIONS:
        await conn.execute(f"REVOKE EXECUTE ON FUNCTION {func} FROM PUBLIC")
    # The proxy's own injection calls set_config before the role switch takes effect.
    await conn.execute(
        f"GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO {proxy}"
    )
    if await conn.fetchval("SELECT count(*) FROM pg_language WHERE lanname = 'plpgsql'"):
        await conn.execute("REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC")
    for role in tenant_roles:
        await conn.execute(
            f"REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) "
            f"FROM {quote_ident(role)}"
        )


async def fetch_signing_key(conn: asyncpg.Connection) -> bytes | None:
    """Returns: the context-signing key (as the proxy role), or None when not installed."""
    exists = await conn.fetchval(
        "SELECT to_regprocedure('pgtenant.signing_key()') IS NOT NULL "
        "AND to_regprocedure('pgtenant.current_tenant()') IS NOT NULL"
    )
    if not exists:
        return None
    key = await conn.fetchval("SELECT pgtenant.signing_key()")
    return bytes(key) if key is not None else None


_PUBLIC_EXECUTE = """
SELECT p.oid::regprocedure::text FROM pg_proc p
 WHERE p.oid = ANY($1::regprocedure[])
   AND (p.proacl IS NULL OR EXISTS (
        SELECT 1 FROM aclexplode(p.proacl) a
         WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))
"""


async def check_lockdown(conn: asyncpg.Connection, login_role: str,
                         tenant_roles: Iterable[str]) -> list[str]:
    """Check the lockdown from the proxy's own connection (catalog reads only).

    Returns: one human-readable line per problem; empty when the database is locked down.
    """
    problems: list[str] = []
    row = await conn.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolinherit FROM pg_roles WHERE rolname = $1",
        login_role,
    )
    if row is None:
        problems.append(f"login role {login_role!r} not found")
    else:
        if row["rolsuper"]:
            problems.append(f"login role {login_role!r} is a superuser")
        if row["rolbypassrls"]:
            problems.append(f"login role {login_role!r} can bypass row-level security")
        if row["rolinherit"]:
            problems.append(f"login role {login_role!r} inherits tenant privileges (INHERIT)")
    open_funcs = await conn.fetch(_PUBLIC_EXECUTE, list(LOCKED_FUNCTIONS))
    for rec in open_funcs:
        problems.append(f"PUBLIC may execute {rec[0]}")
    if await conn.fetchval(
        "SELECT has_language_privilege('public', 'plpgsql', 'USAGE') "
        "FROM pg_language WHERE lanname = 'plpgsql'"
    ):
        problems.append("PUBLIC may use plpgsql (DO blocks, CREATE FUNCTION)")
    if not await conn.fetchval("SELECT to_regprocedure('pgtenant.refuse(text, text[])') "
                               "IS NOT NULL"):
        problems.append("pgtenant.refuse(text, text[]) is missing (run pgtenant init)")
    for role in tenant_roles:
        tenant = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = $1", role
        )
        if tenant is None:
            problems.append(f"tenant role {role!r} does not exist")
            continue
        for column, what in (("rolsuper", "is a superuser"), ("rolbypassrls",
                             "can bypass row-level security"), ("rolcanlogin", "can log in")):
            if tenant[column]:
                problems.append(f"tenant role {role!r} {what}")
        if await conn.fetchval("SELECT has_function_privilege($1, "
                               "'pg_catalog.set_config(text, text, boolean)', 'EXECUTE')", role):
            problems.append(f"tenant role {role!r} may execute set_config")
        creatable = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
            "AND nspname <> 'information_schema' AND has_schema_privilege($1, oid, 'CREATE')",
            role,
        )
        for rec in creatable:
            problems.append(f"tenant role {role!r} may CREATE in schema {rec[0]!r}")
    return problems
