"""Database-side security objects: lockdown, server-side refusals, and the signed context.

Owns the SQL ``pgtenant init`` runs for ARCHITECTURE.md §5 layers 3 and 4, and the checks
the proxy runs at start (``check_lockdown``) to refuse serving a database without them:

* lockdown: tenant roles get no dynamic-SQL paths (``set_config``, the ``query_to_xml``
  family, ``plpgsql`` for DO/CREATE FUNCTION), no CREATE on shared schemas;
* a worthless login role (ARCHITECTURE.md §5, "the login role is worth nothing"): PUBLIC may
  not read other backends' query text (``pg_stat_get_activity`` and friends, the
  ``pg_stat_statements`` functions) nor signal backends; the built-in roles
  ``pg_read_all_stats`` / ``pg_signal_backend`` get them back, so monitoring keeps working.
  The signing key and the registry functions belong to the control role alone. Function
  ACLs in ``pg_catalog`` are per database: init must run in every database the proxy serves;
* ``pgtenant.refuse(msg)``: raises SQLSTATE 42501, so the statement guard's refusals are
  raised by Postgres itself, in order;
* the ``pgtenant_temp_objects`` event trigger: a NOTICE after every command that created a
  temporary object, so the proxy empties that server's temp schema before reuse (see
  TEMP_TRIGGER_SQL);
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

from ..identity.context import context_signature, quote_ident, quote_literal
from ..protocol.constants import TEMP_NOTICE
from .client_views import check_client_views, install_client_views
from .safe_settings import check_safe_settings, install_safe_settings

__all__ = [
    "CONTROL_FUNCTIONS",
    "CURRENT_TENANT_SQL",
    "LOCKED_FUNCTIONS",
    "PG_NOTIFY_SIGNATURE",
    "PG_NOTIFY_SQL",
    "SIGNAL_FUNCTIONS",
    "SIGNING_KEY_SIGNATURE",
    "STATS_FUNCTIONS",
    "TEMP_TRIGGER",
    "TEMP_TRIGGER_FUNCTION",
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
# Built-ins that show other backends' query text. Postgres shows a backend's text to its own
# role: every pooled backend logs in as the same login role, so a statement that ran without
# the injected context (the login role is current_user then) would see every tenant's
# queries, with the injected prefix (org id, signature). Granted back to pg_read_all_stats.
# pg_stat_activity is a view over pg_stat_get_activity: functions in a view are checked
# against the caller, so revoking the function closes the view as well.
STATS_FUNCTIONS: Final = (
    "pg_catalog.pg_stat_get_activity(integer)",
    "pg_catalog.pg_stat_get_backend_activity(integer)",
)
# Built-ins that signal a backend of the same role: any pooled backend of any tenant.
# Granted back to pg_signal_backend. (The proxy cancels with a CancelRequest, not these.)
SIGNAL_FUNCTIONS: Final = (
    "pg_catalog.pg_cancel_backend(integer)",
    "pg_catalog.pg_terminate_backend(integer, bigint)",
)
_STATS_ROLE = "pg_read_all_stats"
_SIGNAL_ROLE = "pg_signal_backend"
SIGNING_KEY_SIGNATURE: Final = "pgtenant.signing_key()"
# What only the control role may execute: the key, and the registry lookups (init.py).
CONTROL_FUNCTIONS: Final = (
    "pgtenant.resolve_token(bytea)",
    "pgtenant.resolve_org(uuid)",
    SIGNING_KEY_SIGNATURE,
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
# The same with another SQLSTATE than 42501 (a refusal for a limit, 54000...). Only the
# class of the code is checked: a tenant cannot choose it (the proxy writes the CALL).
REFUSE_WITH_SQL: Final = """
CREATE OR REPLACE PROCEDURE pgtenant.refuse_with(code text, msg text,
                                                 VARIADIC args text[] DEFAULT '{}')
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = msg;
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

# Temporary objects: the server reports every one it creates, so the proxy empties the temp
# schema of a server before anyone else uses it, whether or not it saw the statement (a
# tenant's SQL function may create them). An event trigger, ENABLE ALWAYS so that even
# session_replication_role cannot skip it (and that is superuser-only anyway); the function
# sets client_min_messages itself, so a tenant's SET client_min_messages cannot hide the
# notice. Only a superuser may create, alter or disable event triggers. Which objects: the
# rows of pg_event_trigger_ddl_commands() in the session's temp schema (reported as
# 'pg_temp', whatever kind: table, view, sequence, index, type, function...).
# The one creation path that fires no event trigger is EXPLAIN ANALYZE of CREATE TABLE AS or
# SELECT INTO (it runs the query without the utility command): in SQL the proxy sees, the
# classifier pins the server for it (relpersistence 't' in the tree); a LANGUAGE sql
# function whose body holds EXPLAIN with CREATE or INTO is refused here, since its body runs
# where the proxy cannot look (atomic bodies cannot hold EXPLAIN; tenants have no plpgsql).
TEMP_TRIGGER: Final = "pgtenant_temp_objects"
TEMP_TRIGGER_FUNCTION: Final = "pgtenant.temp_objects()"
TEMP_TRIGGER_SQL: Final = (
    rf"""
CREATE OR REPLACE FUNCTION {TEMP_TRIGGER_FUNCTION} RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = notice AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger_ddl_commands() c
                WHERE c.schema_name = 'pg_temp' OR c.schema_name LIKE 'pg\_temp\_%') THEN
        RAISE NOTICE USING MESSAGE = {quote_literal(TEMP_NOTICE)};
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger_ddl_commands() c
                 JOIN pg_catalog.pg_proc p
                   ON c.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = c.objid
                 JOIN pg_catalog.pg_language l ON l.oid = p.prolang AND l.lanname = 'sql'
                WHERE p.prosrc OPERATOR(pg_catalog.~*) '\mexplain\M'
                  AND p.prosrc OPERATOR(pg_catalog.~*) '\m(create|into)\M') THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'pgtenant: a LANGUAGE sql '
            'function may not hold EXPLAIN of CREATE TABLE AS or SELECT INTO (it would make '
            'a temporary table the proxy cannot see)';
    END IF;
END
$$""",
    f"ALTER FUNCTION {TEMP_TRIGGER_FUNCTION} OWNER TO CURRENT_USER",
    f"REVOKE EXECUTE ON FUNCTION {TEMP_TRIGGER_FUNCTION} FROM PUBLIC",
    f"DROP EVENT TRIGGER IF EXISTS {TEMP_TRIGGER}",
    f"CREATE EVENT TRIGGER {TEMP_TRIGGER} ON ddl_command_end "
    f"EXECUTE FUNCTION {TEMP_TRIGGER_FUNCTION}",
    f"ALTER EVENT TRIGGER {TEMP_TRIGGER} ENABLE ALWAYS",
)


PG_NOTIFY_SIGNATURE: Final = "pgtenant.pg_notify(text, text)"
# pg_notify for tenants: the channel is mapped to the caller's tenant exactly as the proxy
# maps LISTEN/NOTIFY (protocol/listen.py channel_name: HMAC-SHA256 under the signing key of
# 'notify|' || tenant || '|' || type || '|' || channel, 40 hex digits), so only that tenant's
# listeners hear it. The tenant is the *verified* context (current_tenant() checks
# app.tenant_sig over tenant, type and entity); without one it refuses (42501). A trigger
# calling it notifies the tenant whose transaction fired it. Postgres's own checks on the
# channel (empty, too long: 22023) are made on the tenant's spelling, as pg_notify would.
PG_NOTIFY_SQL: Final = """
CREATE OR REPLACE FUNCTION pgtenant.pg_notify(channel text, payload text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtenant, pg_temp AS $$
DECLARE
    tenant uuid := pgtenant.current_tenant();
    k record;
BEGIN
    IF tenant IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = 'pgtenant.pg_notify: no verified tenant context in this transaction';
    END IF;
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'channel name cannot be empty';
    END IF;
    IF octet_length(channel) >= 64 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'channel name too long';
    END IF;
    SELECT s.k_ipad, s.k_opad INTO STRICT k FROM pgtenant.signing_keys s WHERE s.id = 1;
    PERFORM pg_catalog.pg_notify('pgtenant_' || pg_catalog.left(pg_catalog.encode(
        pg_catalog.sha256(k.k_opad || pg_catalog.sha256(k.k_ipad || pg_catalog.convert_to(
            'notify|' || tenant::text || '|' || pg_catalog.current_setting('app.tenant_type')
            || '|' || channel, 'UTF8'))), 'hex'), 40), payload);
END
$$
"""


def sign_context(key: bytes, org_id: str, tenant_type: str, entity_id: str) -> str:
    """Returns: the hex HMAC-SHA256 ``app.tenant_sig`` for a context (what the proxy sets)."""
    return context_signature(key, org_id, tenant_type, entity_id)


def _padded(key: bytes, pad: int) -> bytes:
    return bytes(b ^ pad for b in key.ljust(_BLOCK, b"\x00"))


async def install_hardening(conn: asyncpg.Connection, proxy_role: str,
                            tenant_roles: Iterable[str] = (), *, control_role: str,
                            protected_settings: Iterable[str] = ()) -> None:
    """Install lockdown, ``pgtenant.refuse``, the signed context and the tenants'
    ``pgtenant.set_config`` refusing ``protected_settings`` (idempotent).

    Must run inside init's transaction, as the owner of the ``pgtenant`` schema and a
    superuser (only the owner of ``pg_catalog``'s functions may change their ACLs).
    Raises: asyncpg.PostgresError when a statement fails.
    """
    proxy = quote_ident(proxy_role)
    control = quote_ident(control_role)
    await conn.execute(REFUSE_SQL)
    await conn.execute(REFUSE_WITH_SQL)
    await conn.execute("ALTER PROCEDURE pgtenant.refuse(text, text[]) OWNER TO CURRENT_USER")
    await conn.execute(
        "ALTER PROCEDURE pgtenant.refuse_with(text, text, text[]) OWNER TO CURRENT_USER")
    await conn.execute(
        "GRANT EXECUTE ON PROCEDURE pgtenant.refuse_with(text, text, text[]) TO PUBLIC")
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
    # The key is read on the control connection only; an older init granted it to the login
    # role, and CREATE OR REPLACE keeps that grant: take it back explicitly.
    await conn.execute(f"REVOKE EXECUTE ON FUNCTION {SIGNING_KEY_SIGNATURE} FROM {proxy}")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {SIGNING_KEY_SIGNATURE} TO {control}")
    await conn.execute(CURRENT_TENANT_SQL)
    for stmt in TEMP_TRIGGER_SQL:
        await conn.execute(stmt)
    await conn.execute("GRANT EXECUTE ON FUNCTION pgtenant.current_tenant() TO PUBLIC")
    await conn.execute(PG_NOTIFY_SQL)
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {PG_NOTIFY_SIGNATURE} TO PUBLIC")
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
    await install_safe_settings(conn, protected_settings)
    await install_client_views(conn)
    for functions, grantee in ((STATS_FUNCTIONS, _STATS_ROLE), (SIGNAL_FUNCTIONS, _SIGNAL_ROLE)):
        for func in await _existing(conn, functions):
            await conn.execute(f"REVOKE EXECUTE ON FUNCTION {func} FROM PUBLIC")
            await conn.execute(f"GRANT EXECUTE ON FUNCTION {func} TO {grantee}")
    # pg_stat_statements shows every query's text to its own role, like pg_stat_activity.
    # Only functions PUBLIC may call are moved (its reset function is superuser-only already).
    for rec in await conn.fetch(_STATEMENTS_PUBLIC):
        await conn.execute(f"REVOKE EXECUTE ON FUNCTION {rec[0]} FROM PUBLIC")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION {rec[0]} TO {_STATS_ROLE}")


async def _existing(conn: asyncpg.Connection, signatures: Iterable[str]) -> list[str]:
    """Returns: the signatures that name a function in this database (pg_terminate_backend
    took its timeout argument in PG 14; older servers have none of that signature)."""
    found = []
    for sig in signatures:
        if await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", sig):
            found.append(sig)
    return found


async def fetch_signing_key(conn: asyncpg.Connection) -> bytes | None:
    """Read the context-signing key, on a connection of the control role.

    Returns: the key, or None when the signed context is not installed.
    Raises: asyncpg.InsufficientPrivilegeError when ``conn``'s role may not read it (the
    login role, since init moved the key to the control role).
    """
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


# The functions of pg_stat_statements (when installed here) that PUBLIC may execute.
_STATEMENTS_PUBLIC = """
SELECT p.oid::regprocedure::text FROM pg_extension e
  JOIN pg_depend d ON d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid
                  AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
  JOIN pg_proc p ON p.oid = d.objid
 WHERE e.extname = 'pg_stat_statements'
   AND (p.proacl IS NULL OR EXISTS (
        SELECT 1 FROM aclexplode(p.proacl) a
         WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))
 ORDER BY 1
"""

# (role, function) pairs where the login role, or a role it may SET ROLE to (a NOINHERIT
# role still switches to every role granted to it), may execute a function of $2.
_ROLE_MAY_EXECUTE = """
SELECT r.rolname, f.sig FROM pg_roles r, unnest($2::text[]) AS f(sig)
 WHERE pg_has_role($1, r.oid, 'MEMBER')
   AND to_regprocedure(f.sig) IS NOT NULL
   AND has_function_privilege(r.oid, to_regprocedure(f.sig), 'EXECUTE')
 ORDER BY r.rolname <> $1, 1, 2
"""


_TENANT_ROLES = """
SELECT t.name, r.oid, r.rolsuper, r.rolbypassrls, r.rolcanlogin,
       r.oid IS NOT NULL AND has_function_privilege(
           r.oid, 'pg_catalog.set_config(text, text, boolean)', 'EXECUTE') AS set_config
  FROM unnest($1::text[]) AS t(name) LEFT JOIN pg_roles r ON r.rolname = t.name
"""
# CREATE on a schema: its owner's (acldefault) and its grantees'; a role holds it when it
# has the privileges of a grantee (pg_has_role USAGE: membership with INHERIT) or PUBLIC
# holds it. The same answer as has_schema_privilege, without one call per role and schema.
_TENANT_CREATE = """
SELECT DISTINCT r.rolname, n.nspname
  FROM pg_namespace n,
       aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a,
       pg_roles r
 WHERE r.rolname = ANY($1::text[]) AND a.privilege_type = 'CREATE'
   AND (a.grantee = 0 OR pg_has_role(r.oid, a.grantee, 'USAGE'))
   AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
 ORDER BY 1, 2
"""


async def check_lockdown(conn: asyncpg.Connection, login_role: str,
                         tenant_roles: Iterable[str],
                         protected_settings: Iterable[str] = ()) -> list[str]:
    """Check the lockdown from the proxy's own connection (catalog reads only), including
    the tenants' ``pgtenant.set_config`` and that it refuses ``protected_settings``.

    Includes "the login role is worth nothing": it, and every role it may switch to, must
    not read the signing key, call the registry, see other backends' query text or signal
    backends.

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
    watched = await _existing(conn, (*STATS_FUNCTIONS, *SIGNAL_FUNCTIONS))
    public_open: set[str] = set()
    for func in watched:
        if not await conn.fetchval("SELECT has_function_privilege('public', $1, 'EXECUTE')",
                                   func):
            continue
        public_open.add(func)
        signals = func in SIGNAL_FUNCTIONS
        problems.append(
            f"PUBLIC may execute {func} ("
            + ("signals any backend" if signals else "shows other sessions' query text")
            + f"; pgtenant init grants it to {_SIGNAL_ROLE if signals else _STATS_ROLE} only)"
        )
    for rec in await conn.fetch(_STATEMENTS_PUBLIC):
        problems.append(f"PUBLIC may execute {rec[0]} (pg_stat_statements shows query text; "
                        f"pgtenant init grants it to {_STATS_ROLE} only)")
    if row is not None:
        for rec in await conn.fetch(_ROLE_MAY_EXECUTE, login_role,
                                    [*CONTROL_FUNCTIONS, *watched]):
            if rec["sig"] in public_open:
                continue  # reported above, as PUBLIC's
            who = (f"login role {login_role!r}" if rec["rolname"] == login_role
                   else f"role {rec['rolname']!r} (the login role may SET ROLE to it)")
            fix = ("only the control role may: re-run `pgtenant init` and set [control] dsn "
                   "to the control role" if rec["sig"] in CONTROL_FUNCTIONS
                   else "revoke it: the login role must not see or signal other backends")
            problems.append(f"{who} may execute {rec['sig']} ({fix})")
    if await conn.fetchval(
        "SELECT has_language_privilege('public', 'plpgsql', 'USAGE') "
        "FROM pg_language WHERE lanname = 'plpgsql'"
    ):
        problems.append("PUBLIC may use plpgsql (DO blocks, CREATE FUNCTION)")
    if not await conn.fetchval(
            "SELECT to_regprocedure('pgtenant.refuse_with(text, text, text[])') IS NOT NULL"):
        problems.append("pgtenant.refuse_with(text, text, text[]) is missing (run pgtenant "
                        "init)")
    if not await conn.fetchval("SELECT to_regprocedure('pgtenant.refuse(text, text[])') "
                               "IS NOT NULL"):
        problems.append("pgtenant.refuse(text, text[]) is missing (run pgtenant init)")
    if not await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", PG_NOTIFY_SIGNATURE):
        problems.append(f"{PG_NOTIFY_SIGNATURE} is missing (run pgtenant init): tenants' "
                        "pg_notify needs it")
    problems += await check_safe_settings(conn, protected_settings)
    problems += await check_client_views(conn)
    problems += await _check_temp_trigger(conn)
    # One query per question for every tenant role at once (a thousand templated roles
    # must not mean thousands of round trips).
    roles = list(tenant_roles)
    found = {rec["name"]: rec for rec in await conn.fetch(_TENANT_ROLES, roles)}
    creatable: dict[str, list[str]] = {}
    for rec in await conn.fetch(_TENANT_CREATE, roles):
        creatable.setdefault(rec["rolname"], []).append(rec["nspname"])
    for role in roles:
        tenant = found.get(role)
        if tenant is None or tenant["oid"] is None:
            problems.append(f"tenant role {role!r} does not exist")
            continue
        for column, what in (("rolsuper", "is a superuser"), ("rolbypassrls",
                             "can bypass row-level security"), ("rolcanlogin", "can log in")):
            if tenant[column]:
                problems.append(f"tenant role {role!r} {what}")
        if tenant["set_config"]:
            problems.append(f"tenant role {role!r} may execute set_config")
        for schema in creatable.get(role, []):
            problems.append(f"tenant role {role!r} may CREATE in schema {schema!r}")
    return problems


# The event trigger as install_hardening makes it: on every command (no tag filter), enabled
# ALWAYS, running the function owned by a superuser with the body and settings installed.
_TEMP_TRIGGER_STATE = """
SELECT e.evtevent, e.evtenabled::text AS evtenabled, e.evttags IS NULL AS all_tags,
       e.evtfoid = to_regprocedure($2) AS our_function,
       coalesce((SELECT rolsuper FROM pg_roles WHERE oid = p.proowner), false) AS super_owned,
       p.prosrc, p.proconfig
  FROM pg_event_trigger e LEFT JOIN pg_proc p ON p.oid = e.evtfoid
 WHERE e.evtname = $1
"""


async def _check_temp_trigger(conn: asyncpg.Connection) -> list[str]:
    """Returns: what is wrong with the temp-object event trigger (TEMP_TRIGGER_SQL), whose
    notice is how the proxy learns that a server's temp schema must be emptied."""
    row = await conn.fetchrow(_TEMP_TRIGGER_STATE, TEMP_TRIGGER, TEMP_TRIGGER_FUNCTION)
    fix = "(run pgtenant init)"
    if row is None:
        return [f"event trigger {TEMP_TRIGGER} is missing {fix}: temporary objects a "
                "tenant's function creates would go unnoticed"]
    problems = []
    if row["evtevent"] != "ddl_command_end" or not row["all_tags"] or not row["our_function"]:
        problems.append(f"event trigger {TEMP_TRIGGER} is not the one pgtenant init installs "
                        f"(ddl_command_end, every command, {TEMP_TRIGGER_FUNCTION}) {fix}")
    if row["evtenabled"] != "A":
        problems.append(f"event trigger {TEMP_TRIGGER} is not enabled ALWAYS "
                        f"(evtenabled {row['evtenabled']!r}) {fix}")
    if not row["super_owned"] or TEMP_NOTICE not in (row["prosrc"] or "") or (
            "client_min_messages=notice" not in (row["proconfig"] or [])):
        problems.append(f"function {TEMP_TRIGGER_FUNCTION} is not the one pgtenant init "
                        f"installs (owned by a superuser, raising its notice) {fix}")
    return problems
