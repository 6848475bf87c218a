"""`pgtenant init` and its audit: the control schema, the login and control roles, tenant roles.

Owns the fail-closed lockdown of one database (``init_database``) and the check that it still
holds (``check_fail_closed``). Idempotent: re-running changes nothing that is already right.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg

from ..config import TenantTypeConfig
from ..identity.context import quote_ident, quote_literal
from . import ControlError
from .hardening import CONTROL_FUNCTIONS, check_lockdown, install_hardening
from .migrations.ledger import LEDGER_DDL
from .schema import (
    ACTIVE_HOLDS_SIGNATURE,
    CONTROL_DDL,
    CONTROL_SCHEMA,
    HOLDS_TABLE_DDL,
    PROXY_ROLE_DEFAULTS,
    PROXY_ROLE_OPTIONAL_DEFAULTS,
    RESOLVE_ORG_SIGNATURE,
    RESOLVE_TOKEN_SIGNATURE,
    TOKEN_REVOCATION_DDL,
    TOKEN_REVOCATION_FUNCTION,
    active_holds_ddl,
    resolve_org_ddl,
    resolve_token_ddl,
)

# The registry's SECURITY DEFINER lookups: only the control role may call them (with
# pgtenant.signing_key(), see hardening.CONTROL_FUNCTIONS), never the data-path login role,
# whose sessions a hostile tenant might reach without the injected context.
# active_holds: which tenants the migration runner holds right now (registry.py re-reads it).
_REGISTRY_FUNCTIONS = (RESOLVE_TOKEN_SIGNATURE, RESOLVE_ORG_SIGNATURE, ACTIVE_HOLDS_SIGNATURE)
DEFAULT_PROXY_ROLE = "pgtenant_proxy"
DEFAULT_CONTROL_ROLE = "pgtenant_control"

__all__ = [
    "DEFAULT_CONTROL_ROLE",
    "DEFAULT_PROXY_ROLE",
    "LOGIN_ROLE_OPTIONS",
    "TENANT_ROLE_OPTIONS",
    "InitResult",
    "check_fail_closed",
    "ensure_tenant_role",
    "grant_role_to_proxy",
    "grant_temp",
    "init_database",
    "scram_verifier",
    "static_role",
]

LOGIN_ROLE_OPTIONS = (
    "LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
)
TENANT_ROLE_OPTIONS = (
    "NOLOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
)


@dataclass(frozen=True, slots=True)
class InitResult:
    """What ``init_database`` did."""

    proxy_role: str
    # Set only when a password was generated or given; None means the old one still holds.
    proxy_password: str | None
    created_roles: list[str] = field(default_factory=list)
    # The control-plane login role (signing key, registry, revocation LISTEN); same rule.
    control_role: str = DEFAULT_CONTROL_ROLE
    control_password: str | None = None


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """Compute a SCRAM-SHA-256 verifier as Postgres stores it in ``pg_authid``.

    Sending the verifier instead of the password keeps the secret out of server logs and
    ``pg_stat_statements``. Postgres SASLprep-normalises passwords; printable ASCII (what
    ``secrets.token_urlsafe`` produces) is unchanged by it.

    Returns: ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``.
    Raises: ValueError for passwords outside printable ASCII (SASLprep not implemented).
    """
    if not password or any(ch not in string.printable or ch in "\t\n\r\x0b\x0c" for ch in password):
        raise ValueError("scram_verifier supports printable ASCII passwords only")
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _password_clause(password: str) -> str:
    try:
        return "PASSWORD " + quote_literal(scram_verifier(password))
    except ValueError:
        return "PASSWORD " + quote_literal(password)


async def _role_exists(conn: asyncpg.Connection, role: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role))


async def _ensure_login_role(conn: asyncpg.Connection, role: str,
                             password: str | None) -> tuple[bool, str | None]:
    """Create a login role with a random (or the given) password, or re-assert the safe
    attributes of an existing one (its password changes only when ``password`` is given).

    Returns: (whether it was created, the password set now or None).
    """
    ident = quote_ident(role)
    if await _role_exists(conn, role):
        options = LOGIN_ROLE_OPTIONS
        if password is not None:
            options += " " + _password_clause(password)
        await conn.execute(f"ALTER ROLE {ident} {options}")
        return False, password
    password = password or secrets.token_urlsafe(24)
    await conn.execute(f"CREATE ROLE {ident} {LOGIN_ROLE_OPTIONS} {_password_clause(password)}")
    return True, password


async def grant_role_to_proxy(conn: asyncpg.Connection, role: str, proxy_role: str) -> None:
    """Let the proxy ``SET LOCAL ROLE`` to ``role`` without inheriting its privileges.

    Returns: None.
    Raises: asyncpg.PostgresError from the GRANT.
    """
    sql = f"GRANT {quote_ident(role)} TO {quote_ident(proxy_role)}"
    if conn.get_server_version().major >= 16:
        # PG16 made inheritance a property of the grant; NOINHERIT on the login role only
        # sets the default, so say it explicitly.
        sql += " WITH INHERIT FALSE, SET TRUE"
    await conn.execute(sql)


async def ensure_tenant_role(conn: asyncpg.Connection, role: str) -> bool:
    """Create a NOLOGIN tenant role, or re-assert its safe attributes if it exists.

    Returns: whether the role was created.
    Raises: asyncpg.PostgresError from CREATE/ALTER ROLE.
    """
    created = not await _role_exists(conn, role)
    verb = "CREATE" if created else "ALTER"
    await conn.execute(f"{verb} ROLE {quote_ident(role)} {TENANT_ROLE_OPTIONS}")
    return created


async def grant_temp(conn: asyncpg.Connection, role: str,
                     tenant_type: TenantTypeConfig) -> None:
    """TEMP on the connection's database for a tenant role whose type allows temporary
    tables (``temp_tables``), revoked from one whose type does not. The proxy keeps temp
    objects from outliving what the client expects on a pooled server (pinning, DISCARD
    TEMP: see session.py); the login role itself never gets TEMP (check_fail_closed).

    Raises: asyncpg.PostgresError from the GRANT/REVOKE.
    """
    db = quote_ident(await conn.fetchval("SELECT current_database()"))
    if tenant_type.temp_tables:
        await conn.execute(f"GRANT TEMPORARY ON DATABASE {db} TO {quote_ident(role)}")
    else:
        await conn.execute(f"REVOKE TEMPORARY ON DATABASE {db} FROM {quote_ident(role)}")


def static_role(tenant_type: TenantTypeConfig) -> str | None:
    """Returns: the tenant type's one shared role, or None when the template is rendered per
    tenant (by create_tenant)."""
    return None if "{" in tenant_type.role else tenant_type.role


async def init_database(
    admin_dsn: str,
    *,
    proxy_role: str = DEFAULT_PROXY_ROLE,
    proxy_password: str | None = None,
    control_role: str = DEFAULT_CONTROL_ROLE,
    control_password: str | None = None,
    tenant_types: Mapping[str, TenantTypeConfig] | None = None,
    protected_settings: Iterable[str] = (),
) -> InitResult:
    """Install pgtenant's control schema and fail-closed roles into the DSN's database.

    Runs in one transaction as ``admin_dsn``'s user (a superuser: the lockdown changes the
    ACLs of ``pg_catalog`` functions). Creates the proxy login role and the control role
    with random passwords when they are new; an existing role keeps its password unless one
    is given. The control role alone may read the signing key and call the registry
    functions; grants of them to the proxy role (older installs) are revoked.

    Returns: an ``InitResult``.
    Raises: ControlError when both roles are the same; asyncpg.PostgresError when a
    statement fails (nothing is applied then).
    """
    if control_role == proxy_role:
        raise ControlError(
            f"the control role must not be the proxy's login role ({proxy_role!r}): the "
            "login role must not read the signing key or the registry (pass --control-role, "
            "or set [control] dsn to another role)"
        )
    created: list[str] = []
    conn = await asyncpg.connect(admin_dsn)
    try:
        async with conn.transaction():
            for stmt in (*CONTROL_DDL, *LEDGER_DDL, *HOLDS_TABLE_DDL):  # + the runner's
                await conn.execute(stmt)
            # Dropped and created (not replaced): their result columns grow between
            # versions; the grants below are given again.
            for fn in _REGISTRY_FUNCTIONS:
                await conn.execute(f"DROP FUNCTION IF EXISTS {fn}")
            await conn.execute(resolve_token_ddl())
            await conn.execute(resolve_org_ddl())
            await conn.execute(active_holds_ddl())
            for stmt in TOKEN_REVOCATION_DDL:
                await conn.execute(stmt)
            for fn in (*_REGISTRY_FUNCTIONS, TOKEN_REVOCATION_FUNCTION):
                await conn.execute(f"ALTER FUNCTION {fn} OWNER TO CURRENT_USER")

            proxy = quote_ident(proxy_role)
            is_new, password_out = await _ensure_login_role(conn, proxy_role, proxy_password)
            if is_new:
                created.append(proxy_role)
            control = quote_ident(control_role)
            is_new, control_out = await _ensure_login_role(conn, control_role,
                                                           control_password)
            if is_new:
                created.append(control_role)
            for guc, value in (*PROXY_ROLE_DEFAULTS, *PROXY_ROLE_OPTIONAL_DEFAULTS):
                # Role-wide (all databases): a session that escapes injection sees no tenant.
                await conn.execute(f"ALTER ROLE {proxy} SET {guc} = {quote_literal(value)}")

            for fn in _REGISTRY_FUNCTIONS:
                await conn.execute(f"REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC")
                # Re-created above, so no old grant survives; revoked anyway for the record.
                await conn.execute(f"REVOKE EXECUTE ON FUNCTION {fn} FROM {proxy}")
                await conn.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {control}")
            await conn.execute(f"GRANT USAGE ON SCHEMA {CONTROL_SCHEMA} TO {proxy}, {control}")

            dbname = quote_ident(await conn.fetchval("SELECT current_database()"))
            # Without PUBLIC's TEMP privilege only the tenant roles of types that allow
            # temp objects (temp_tables, granted below) can create them, and only explicit
            # grantees may connect.
            await conn.execute(f"REVOKE ALL ON DATABASE {dbname} FROM PUBLIC")
            await conn.execute(f"GRANT CONNECT ON DATABASE {dbname} TO {proxy}, {control}")
            await conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")

            for tenant_type in (tenant_types or {}).values():
                role = static_role(tenant_type)
                if role is None:
                    continue
                if await ensure_tenant_role(conn, role):
                    created.append(role)
                await conn.execute(f"GRANT USAGE ON SCHEMA public TO {quote_ident(role)}")
                await grant_temp(conn, role, tenant_type)
                await grant_role_to_proxy(conn, role, proxy_role)
            static_roles = [r for t in (tenant_types or {}).values()
                            if (r := static_role(t)) is not None]
            await install_hardening(conn, proxy_role, static_roles, control_role=control_role,
                                    protected_settings=protected_settings)
    finally:
        await conn.close()
    return InitResult(proxy_role=proxy_role, proxy_password=password_out, created_roles=created,
                      control_role=control_role, control_password=control_out)


_ROLE_FLAGS = (
    ("rolsuper", "is a superuser"),
    ("rolbypassrls", "has BYPASSRLS"),
    ("rolinherit", "has INHERIT (privileges of granted tenant roles would flow to it)"),
    ("rolcreaterole", "has CREATEROLE"),
    ("rolcreatedb", "has CREATEDB"),
    ("rolreplication", "has REPLICATION"),
)


async def check_fail_closed(admin_dsn: str, proxy_role: str,
                            control_role: str = DEFAULT_CONTROL_ROLE) -> list[str]:
    """Audit the proxy login role, the roles it may switch to and the control role, in the
    DSN's database.

    Returns: human-readable problems; empty when the setup fails closed.
    Raises: asyncpg.PostgresError when the catalogs cannot be read.
    """
    problems: list[str] = []
    conn = await asyncpg.connect(admin_dsn)
    try:
        role = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", proxy_role)
        if role is None:
            return [f"role {proxy_role!r} does not exist (run pgtenant init)"]
        for column, text in _ROLE_FLAGS:
            if role[column]:
                problems.append(f"role {proxy_role!r} {text}")

        owned = await conn.fetch(
            """
            SELECT classid::regclass::text AS catalog, count(*) AS n
              FROM pg_shdepend
             WHERE refclassid = 'pg_authid'::regclass AND refobjid = $1 AND deptype = 'o'
             GROUP BY 1 ORDER BY 1
            """,
            role["oid"],
        )
        for row in owned:
            problems.append(f"role {proxy_role!r} owns {row['n']} object(s) in {row['catalog']}")

        # Database-specific settings override role-wide ones: look at the effective value.
        rows = await conn.fetch(
            """
            SELECT setdatabase <> 0 AS db_specific, setconfig FROM pg_db_role_setting
             WHERE setrole = $1
               AND setdatabase IN (0, (SELECT oid FROM pg_database
                                        WHERE datname = current_database()))
             ORDER BY setdatabase
            """,
            role["oid"],
        )
        effective: dict[str, str] = {}
        for row in rows:
            for item in row["setconfig"] or []:
                key, _, value = item.partition("=")
                effective[key] = value
        for guc, want in PROXY_ROLE_DEFAULTS:
            got = effective.get(guc)
            ok = got is not None and (got == want or (guc == "search_path" and got == '""'))
            if not ok:
                shown = "unset" if got is None else repr(got)
                problems.append(
                    f"role {proxy_role!r} default {guc} is {shown}, expected {want!r} "
                    f"(ALTER ROLE ... SET {guc} = {quote_literal(want)})"
                )

        readable = await conn.fetch(
            """
            SELECT format('%I.%I', n.nspname, c.relname) AS rel FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND has_table_privilege($1, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')
             ORDER BY 1 LIMIT 10
            """,
            proxy_role,
        )
        for row in readable:
            problems.append(f"role {proxy_role!r} has privileges on table {row['rel']}")
        if await conn.fetchval(
            "SELECT has_database_privilege($1, current_database(), 'TEMP')", proxy_role
        ):
            problems.append(f"role {proxy_role!r} may create TEMP tables in this database")

        # The key and the registry: the control role's alone. That the login role (or a
        # role it may switch to) can call them is reported by check_lockdown below.
        control = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1",
                                      control_role)
        if control is None:
            problems.append(f"control role {control_role!r} does not exist (run pgtenant init)")
        else:
            for column, text in _ROLE_FLAGS:
                if control[column]:
                    problems.append(f"control role {control_role!r} {text}")
            if not await conn.fetchval(
                "SELECT has_database_privilege($1, current_database(), 'CONNECT')", control_role
            ):
                problems.append(f"control role {control_role!r} may not connect here")
        for signature in CONTROL_FUNCTIONS:
            fn = await conn.fetchval("SELECT to_regprocedure($1)::oid", signature)
            if fn is None:
                problems.append(f"function {signature} is missing")
                continue
            if await conn.fetchval(
                "SELECT has_function_privilege('public', $1::oid, 'EXECUTE')", fn
            ):
                problems.append(f"PUBLIC may execute {signature}")
            if control is not None and not await conn.fetchval(
                "SELECT has_function_privilege($1, $2::oid, 'EXECUTE')", control_role, fn
            ):
                problems.append(f"control role {control_role!r} may not execute {signature}")

        # Nobody but the owner (all) may touch the control schema; USAGE alone (needed to
        # call pgtenant.refuse/current_tenant) opens nothing: every object has its own ACL.
        grants = await conn.fetch(
            """
            SELECT coalesce(r.rolname, 'PUBLIC') AS grantee, a.privilege_type
              FROM pg_namespace n, aclexplode(n.nspacl) a
              LEFT JOIN pg_roles r ON r.oid = a.grantee
             WHERE n.nspname = $1 AND a.grantee <> n.nspowner
            """,
            CONTROL_SCHEMA,
        )
        for row in grants:
            if row["privilege_type"] != "USAGE":
                problems.append(
                    f"{row['grantee']} has {row['privilege_type']} on schema {CONTROL_SCHEMA}"
                )

        # The roles the proxy may become must not be able to escape RLS either.
        members = await conn.fetch(
            """
            SELECT r.rolname, r.rolsuper, r.rolbypassrls, r.rolcanlogin
              FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
             WHERE m.member = $1 ORDER BY 1
            """,
            role["oid"],
        )
        for row in members:
            for column, text in (("rolsuper", "is a superuser"), ("rolbypassrls", "has BYPASSRLS"),
                                 ("rolcanlogin", "can log in")):
                if row[column]:
                    problems.append(f"tenant role {row['rolname']!r} (granted to proxy) {text}")
        problems += await check_lockdown(conn, proxy_role, [r["rolname"] for r in members])
    finally:
        await conn.close()
    return problems
