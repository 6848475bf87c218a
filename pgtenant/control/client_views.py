"""What a tenant reads of, and does to, the server session, as its own session would.

Owns ``pgtenant.prepared_statements(text[])``, which the statement guard reads a tenant's
``pg_prepared_statements`` through, and ``pgtenant.pg_terminate_backend(...)``, which its
``pg_terminate_backend(...)`` calls become (guard.py, protocol/redirect.py), the role that
owns the latter, and their start-up checks.

Terminating its own backend is what a client that calls ``pg_terminate_backend`` with its
own pid (``pg_backend_pid()``, or the pid its connection reported, which is the proxy's)
means: the server ends with FATAL 57P01 and the proxy ends the client with those words, as
Postgres would. The stand-in signals ``pg_backend_pid()`` and nothing else, whatever it is
given: the pid only decides whether it does so or refuses (42501), so even a forged call
can end only the caller's own server. It runs as ``pgtenant_signal``, a NOLOGIN role holding
``pg_signal_backend`` (a backend of the login role may not be signalled by another role
without it); no role is a member of it.

Why: a pooled server's ``pg_prepared_statements`` lists the server session's statements:
pgtenant's context statement and, under proxy-global names, every statement the tenant's
clients prepared there. A client that counts its prepared statements (drivers' tests,
ORMs deciding whether to prepare) would see a stranger's session. The proxy knows which
statements are the client's: it passes them, as (server name, client name) pairs, to this
function, which shows those rows under the client's names, with the server's details when
the statement is prepared on this server (the proxy prepares them all there first, in the
extended protocol), plus the statements the client prepared with SQL PREPARE (they exist
only on a server pinned to it). A named statement that reads the view is itself paired
with NULL (its server name is a hash of the very text that would have to carry it) and
found by its text: current_query().

Security: it is an ordinary function (SECURITY INVOKER) over a view any role may read; it
shows a subset of what the caller could read anyway.
"""

from __future__ import annotations

from typing import Final

import asyncpg

from .safe_settings import body_of

__all__ = ["CLIENT_PREPARED_STATEMENTS", "SIGNAL_OWNER", "TERMINATE_OWN",
           "check_client_views", "install_client_views"]

CLIENT_PREPARED_STATEMENTS: Final = "pgtenant.prepared_statements(text[])"
TERMINATE_OWN: Final = "pgtenant.pg_terminate_backend(integer, integer, bigint)"
SIGNAL_OWNER: Final = "pgtenant_signal"

_TERMINATE_SQL: Final = """
CREATE OR REPLACE FUNCTION pgtenant.pg_terminate_backend(client_pid integer, pid integer,
                                                         timeout bigint DEFAULT 0)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pid IS DISTINCT FROM pg_backend_pid() AND pid IS DISTINCT FROM client_pid THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'pgtenant: a tenant session may '
            'terminate only its own backend (pg_backend_pid(), or the pid its connection '
            'reported)';
    END IF;
    -- Its own backend only, and without waiting (it would wait for itself).
    RETURN pg_terminate_backend(pg_backend_pid());
END
$$
"""

# The view's own row type, so its columns (which vary between Postgres versions) are kept;
# jsonb_populate_record sets the client's name over the server's.
_SQL: Final = """
CREATE OR REPLACE FUNCTION pgtenant.prepared_statements(statements text[])
RETURNS SETOF pg_catalog.pg_prepared_statements
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (jsonb_populate_record(p, jsonb_build_object('name', m.client))).*
      FROM (SELECT statements[i] AS server, statements[i + 1] AS client, i
              FROM generate_subscripts(statements, 1) AS i WHERE i % 2 = 1) AS m
      LEFT JOIN pg_prepared_statements AS p
             ON p.name = m.server OR (m.server IS NULL AND p.statement = current_query())
    UNION ALL
    SELECT p.* FROM pg_prepared_statements AS p WHERE p.from_sql
$$
"""


async def install_client_views(conn: asyncpg.Connection) -> None:
    """Install ``pgtenant.prepared_statements`` and ``pgtenant.pg_terminate_backend``
    (idempotent; inside init's transaction, as a superuser)."""
    await conn.execute(_SQL)
    await conn.execute(f"REVOKE ALL ON FUNCTION {CLIENT_PREPARED_STATEMENTS} FROM PUBLIC")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {CLIENT_PREPARED_STATEMENTS} TO PUBLIC")
    if not await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1",
                               SIGNAL_OWNER):
        await conn.execute(f"CREATE ROLE {SIGNAL_OWNER} NOLOGIN")
    await conn.execute(f"GRANT pg_signal_backend TO {SIGNAL_OWNER}")
    await conn.execute(f"GRANT USAGE ON SCHEMA pgtenant TO {SIGNAL_OWNER}")
    await conn.execute(_TERMINATE_SQL)
    await conn.execute(f"ALTER FUNCTION {TERMINATE_OWN} OWNER TO {SIGNAL_OWNER}")
    await conn.execute(f"REVOKE ALL ON FUNCTION {TERMINATE_OWN} FROM PUBLIC")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {TERMINATE_OWN} TO PUBLIC")


async def check_client_views(conn: asyncpg.Connection) -> list[str]:
    """Returns: a problem line for each stand-in missing or not as installed."""
    problems = []
    for signature, what in ((CLIENT_PREPARED_STATEMENTS, "reads of pg_prepared_statements"),
                            (TERMINATE_OWN, "pg_terminate_backend() calls")):
        if not await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", signature):
            problems.append(f"function {signature} is missing (run pgtenant init): tenants' "
                            f"{what} fail until it is installed")
    row = await conn.fetchrow(
        "SELECT p.prosrc, r.rolname, r.rolcanlogin, r.rolsuper FROM pg_proc p "
        "JOIN pg_roles r ON r.oid = p.proowner WHERE p.oid = to_regprocedure($1)",
        TERMINATE_OWN)
    if row is not None and (row["prosrc"] != body_of(_TERMINATE_SQL)
                            or row["rolcanlogin"] or row["rolsuper"]):
        problems.append(f"{TERMINATE_OWN} is not the one this pgtenant installs, or its owner "
                        f"{row['rolname']!r} can log in or is a superuser (run pgtenant init)")
    return problems
