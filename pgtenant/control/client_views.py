"""What a tenant reads of the server session, shown as its own session would have it.

Owns ``pgtenant.prepared_statements(text[])``, which the statement guard reads a tenant's
``pg_prepared_statements`` through (guard.py, protocol/redirect.py), and its start-up check.

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

__all__ = ["CLIENT_PREPARED_STATEMENTS", "check_client_views", "install_client_views"]

CLIENT_PREPARED_STATEMENTS: Final = "pgtenant.prepared_statements(text[])"

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
    """Install ``pgtenant.prepared_statements`` (idempotent; inside init's transaction)."""
    await conn.execute(_SQL)
    await conn.execute(f"REVOKE ALL ON FUNCTION {CLIENT_PREPARED_STATEMENTS} FROM PUBLIC")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {CLIENT_PREPARED_STATEMENTS} TO PUBLIC")


async def check_client_views(conn: asyncpg.Connection) -> list[str]:
    """Returns: a problem line when ``pgtenant.prepared_statements`` is missing."""
    if await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL",
                           CLIENT_PREPARED_STATEMENTS):
        return []
    return [f"function {CLIENT_PREPARED_STATEMENTS} is missing (run pgtenant init): tenants' "
            "reads of pg_prepared_statements fail until it is installed"]
