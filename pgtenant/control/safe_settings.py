"""The tenants' ``set_config``: Postgres itself refuses the settings pgtenant owns.

Owns ``pgtenant.set_config(text, text, boolean)``, the table of protected names it reads
(``pgtenant.protected_settings``), the role that owns it, and the start-up check that they
are in place. The statement guard rewrites a tenant's ``set_config(...)`` and
``pg_catalog.set_config(...)`` calls to this function (guard.py); the built-in stays locked
(hardening.py), so a call the guard cannot see or rewrite fails with "permission denied".

Why a function in the database and not only the guard: the guard reads statement text, and
``set_config($1, $2, false)`` decides nothing until the Bind's values arrive. The function
decides on the values Postgres sees, however they were written.

Why it is safe:

* It is SECURITY DEFINER, owned by ``pgtenant_settings``, a NOLOGIN role with no privilege
  but EXECUTE on the built-in: the settings it may change are those any user may (Postgres
  checks PGC_SUSET settings against the owner), and Postgres refuses ``role`` and
  ``session_authorization`` inside any security-definer function.
* It has no ``SET`` clause on purpose: with one, Postgres restores every ``SET LOCAL`` made
  inside the function when it returns, so ``set_config(name, value, true)`` would do
  nothing. Instead every name it uses is schema-qualified, operators and the declared
  variable's type included, so the caller's search_path cannot change what it runs (a
  tenant with TEMP may create a type ``pg_temp.text`` with casts of its own; an unqualified
  ``text`` would resolve to it, pg_temp being searched first for types).
* Protected names are compared lower-cased, exactly (``search_path``) or by prefix (names
  ending in "."), and the lexer settings the guard depends on are held to what the guard
  can read (standard_conforming_strings on, a client_encoding whose characters never hide
  ASCII bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import asyncpg

from ..identity.context import quote_ident, quote_literal

__all__ = [
    "BUILTIN_PROTECTED",
    "SAFE_SET_CONFIG",
    "SETTINGS_OWNER",
    "body_of",
    "check_safe_settings",
    "install_safe_settings",
    "is_safe_set_config",
]

SAFE_SET_CONFIG: Final = "pgtenant.set_config(text, text, boolean)"
SETTINGS_OWNER: Final = "pgtenant_settings"
# Always refused, whatever the config's protected_settings: the context's own settings
# (guard.ALWAYS_PROTECTED), the random() seed (it outlives the transaction on a shared
# server) and the proxy's namespaces.
BUILTIN_PROTECTED: Final = ("role", "session_authorization", "search_path", "seed", "app.",
                            "pgtenant.")
# Postgres's canonical names of the client-only encodings the guard cannot read (see
# protocol/encoding.py): pg_char_to_encoding() normalises any spelling to one of these.
_UNSAFE_CANONICAL: Final = ("SJIS", "BIG5", "GBK", "UHC", "GB18030", "JOHAB",
                            "SHIFT_JIS_2004")

_TABLE_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS pgtenant.protected_settings (
        name text PRIMARY KEY CHECK (name = lower(name) AND name <> ''))""",
    "REVOKE ALL ON pgtenant.protected_settings FROM PUBLIC",
)

_FUNCTION_SQL: Final = """
CREATE OR REPLACE FUNCTION pgtenant.set_config(setting_name text, new_value text,
                                               is_local boolean)
RETURNS text LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    lowered pg_catalog.text := pg_catalog.lower(setting_name);
BEGIN
    IF EXISTS (SELECT FROM pgtenant.protected_settings p
                WHERE lowered OPERATOR(pg_catalog.=) p.name
                   OR (pg_catalog.right(p.name, 1) OPERATOR(pg_catalog.=) '.'
                       AND pg_catalog.starts_with(lowered, p.name))) THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            'pgtenant: set_config(%L, ...) is not allowed in tenant sessions: pgtenant sets '
            'it for every transaction', setting_name);
    END IF;
    IF lowered OPERATOR(pg_catalog.=) 'standard_conforming_strings'
       AND new_value IS NOT NULL AND new_value::pg_catalog.bool IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE =
            'pgtenant: standard_conforming_strings can only be on in tenant sessions';
    END IF;
    IF lowered OPERATOR(pg_catalog.=) 'client_encoding' AND new_value IS NOT NULL
       AND pg_catalog.pg_encoding_to_char(pg_catalog.pg_char_to_encoding(new_value))
           OPERATOR(pg_catalog.=) ANY (@UNSAFE@::pg_catalog.text[]) THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            'pgtenant: client_encoding %L is not allowed in tenant sessions: its multibyte '
            'characters can contain ASCII bytes; use UTF8', new_value);
    END IF;
    RETURN pg_catalog.set_config(setting_name, new_value, is_local);
END
$$
"""


def _function_sql() -> str:
    unsafe = quote_literal("{" + ",".join(_UNSAFE_CANONICAL) + "}")
    return _FUNCTION_SQL.replace("@UNSAFE@", unsafe)


def body_of(create_sql: str) -> str:
    """Returns: the source of the function ``create_sql`` creates, as pg_proc.prosrc holds
    it (between its $$), for the checks that a function is the one pgtenant installs."""
    return create_sql.split("$$")[1]


def _body() -> str:
    return body_of(_function_sql())


def is_safe_set_config(schema: str, name: str, source: str) -> bool:
    """Returns: whether a function is pgtenant's set_config as this version installs it
    (the audit then knows its lack of a SET clause is deliberate)."""
    return (schema, name) == ("pgtenant", "set_config") and source == _body()


async def install_safe_settings(conn: asyncpg.Connection,
                                protected: Iterable[str] = ()) -> None:
    """Install the table, the owner role and ``pgtenant.set_config`` (idempotent).

    ``protected``: the config's protected_settings, added to BUILTIN_PROTECTED (names are
    never removed here: another proxy may protect more). Runs inside init's transaction as
    a superuser.
    """
    owner = quote_ident(SETTINGS_OWNER)
    if not await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1",
                               SETTINGS_OWNER):
        await conn.execute(f"CREATE ROLE {owner} NOLOGIN NOINHERIT")
    for stmt in _TABLE_DDL:
        await conn.execute(stmt)
    names = sorted({n.lower() for n in (*BUILTIN_PROTECTED, *protected) if n})
    await conn.execute(
        "INSERT INTO pgtenant.protected_settings(name) SELECT unnest($1::text[]) "
        "ON CONFLICT DO NOTHING", names)
    await conn.execute(_function_sql())
    await conn.execute(f"ALTER FUNCTION {SAFE_SET_CONFIG} OWNER TO {owner}")
    await conn.execute(f"REVOKE ALL ON FUNCTION {SAFE_SET_CONFIG} FROM PUBLIC")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {SAFE_SET_CONFIG} TO PUBLIC")
    await conn.execute(f"GRANT USAGE ON SCHEMA pgtenant TO {owner}")
    await conn.execute(f"GRANT SELECT ON pgtenant.protected_settings TO {owner}")
    await conn.execute(
        f"GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO {owner}")


_CHECK = """
SELECT p.prosecdef, p.proconfig IS NULL AS no_set_clause, p.prosrc, r.rolname, r.rolsuper,
       r.rolbypassrls, r.rolcanlogin,
       has_function_privilege(r.oid, 'pg_catalog.set_config(text, text, boolean)',
                              'EXECUTE') AS may_set
  FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
 WHERE p.oid = to_regprocedure($1)
"""


async def check_safe_settings(conn: asyncpg.Connection,
                              protected: Iterable[str] = ()) -> list[str]:
    """Returns: one line per problem with ``pgtenant.set_config`` (empty when it is in
    place as this version installs it, owned by a role that cannot escalate, and refuses
    every name in ``protected``: asked of the function itself, in a transaction rolled back).
    """
    if not await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", SAFE_SET_CONFIG):
        return [f"function {SAFE_SET_CONFIG} is missing (run pgtenant init): tenants' "
                "set_config() calls fail until it is installed"]
    row = await conn.fetchrow(_CHECK, SAFE_SET_CONFIG)
    assert row is not None  # the function exists (checked above)
    problems = []
    owner = row["rolname"]
    if not row["prosecdef"]:
        problems.append(f"{SAFE_SET_CONFIG} is not SECURITY DEFINER")
    if not row["no_set_clause"]:
        problems.append(f"{SAFE_SET_CONFIG} has a SET clause (SET LOCAL through it would be "
                        "undone when it returns)")
    if row["prosrc"] != _body():
        problems.append(f"{SAFE_SET_CONFIG} is not the one this pgtenant installs (run "
                        "pgtenant init)")
    for column, what in (("rolsuper", "is a superuser"), ("rolbypassrls",
                         "can bypass row-level security"), ("rolcanlogin", "can log in")):
        if row[column]:
            problems.append(f"{SAFE_SET_CONFIG} is owned by {owner!r}, which {what} (it must "
                            f"be {SETTINGS_OWNER!r}: tenants would set settings as it)")
    if not row["may_set"]:
        problems.append(f"{SAFE_SET_CONFIG}'s owner {owner!r} may not execute the built-in "
                        "set_config (run pgtenant init)")
    for name in sorted({n.lower() for n in (*BUILTIN_PROTECTED, *protected) if n}):
        probe = name + "pgtenant_probe" if name.endswith(".") else name
        if not await _refuses(conn, probe):
            problems.append(f"{SAFE_SET_CONFIG} lets tenants set {name!r} (run pgtenant init "
                            "--config: pgtenant.protected_settings lacks it)")
    return problems


async def _refuses(conn: asyncpg.Connection, name: str) -> bool:
    """Returns: whether ``pgtenant.set_config(name, ...)`` raises 42501 (nothing is kept:
    the attempt runs in a transaction that is rolled back)."""
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute("SELECT pgtenant.set_config($1, '', true)", name)
    except asyncpg.InsufficientPrivilegeError:
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await tr.rollback()
    return False
