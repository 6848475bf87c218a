"""The migration ledger in the control schema: runs, applied versions, and the event log.

Owns the DDL (idempotent, installed on first use by the runner and by ``pgtenant init``) and
the SQL that reads and writes it. Three tables:

- ``pgtenant.migration_runs``: one row per ``apply``/``rollback`` (id, kind, status, args,
  started/finished, the runner's pid and host).
- ``pgtenant.schema_versions``: what each target has *now*: (target, version) is the primary
  key. A row is written in the same transaction as that target's DDL, so a target is never
  half-migrated and a second attempt of the same version fails on the key, not twice.
- ``pgtenant.migration_log``: every attempt (run id, tenant slug, version, checksum, status,
  started, finished, duration, error with SQLSTATE and statement). Successes are written in
  the DDL's transaction; failures after its rollback.

A target is an organization's id (so a slug re-used after a drop starts from zero) or
``SHARED_TARGET`` for ``scope=shared`` files (shown as the tenant ``:shared``).
Does not decide what runs where (``runner.py``).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

__all__ = [
    "ADVISORY_LOCK_KEY",
    "LEDGER_DDL",
    "SHARED_SLUG",
    "SHARED_TARGET",
    "FleetRow",
    "RunInfo",
    "fetch_fleet",
    "finish_run",
    "install_ledger",
    "install_local_ledger",
    "running_run",
    "start_run",
]

SHARED_TARGET = UUID(int=0)
SHARED_SLUG = ":shared"  # not a valid slug, so it can never name a real tenant
# Session advisory lock one runner holds for its whole run (two int4 keys: "pgtn", "migr").
ADVISORY_LOCK_KEY = (0x7067746E, 0x6D696772)
APP_NAME_PREFIX = "pgtenant-migrate run="

LEDGER_DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS pgtenant.migration_runs (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind        text NOT NULL CHECK (kind IN ('apply', 'rollback')),
        status      text NOT NULL DEFAULT 'running',
        args        jsonb NOT NULL DEFAULT '{}',
        pid         int,
        host        text,
        started_at  timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS pgtenant.schema_versions (
        target      uuid NOT NULL,
        version     int NOT NULL,
        name        text NOT NULL,
        checksum    text NOT NULL,
        run_id      bigint NOT NULL,
        applied_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (target, version)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS pgtenant.migration_log (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id      bigint NOT NULL,
        target      uuid NOT NULL,
        tenant      text NOT NULL,
        version     int NOT NULL,
        checksum    text NOT NULL,
        status      text NOT NULL CHECK (status IN ('applied', 'failed', 'rolled_back')),
        started_at  timestamptz NOT NULL,
        finished_at timestamptz NOT NULL,
        duration_ms double precision NOT NULL,
        error       text,
        sqlstate    text,
        statement   text
    )
    """,
    "CREATE INDEX IF NOT EXISTS migration_log_run_idx ON pgtenant.migration_log (run_id)",
    "CREATE INDEX IF NOT EXISTS migration_log_target_idx "
    "ON pgtenant.migration_log (target, id)",
    # The audit errors that stopped a rollout or a provisioning (audit/gate.py): they stay
    # "new" for later runs, so a rerun stops again until the hole is fixed or baselined.
    """
    CREATE TABLE IF NOT EXISTS pgtenant.audit_stops (
        database    text NOT NULL,
        check_name  text NOT NULL,
        object      text NOT NULL,
        subject     text NOT NULL,
        stopped_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (database, check_name, object, subject)
    )
    """,
    "REVOKE ALL ON TABLE pgtenant.migration_runs, pgtenant.schema_versions, "
    "pgtenant.migration_log, pgtenant.audit_stops FROM PUBLIC",
)


async def install_ledger(conn: asyncpg.Connection) -> None:
    """Create the ledger tables if missing (the control schema must exist: ``pgtenant init``).

    Raises: asyncpg.PostgresError (e.g. no pgtenant schema).
    """
    if await conn.fetchval("SELECT to_regclass('pgtenant.migration_log') IS NOT NULL"):
        return
    async with conn.transaction():
        # two runners on a fresh install: the second waits here, then finds the tables
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", ADVISORY_LOCK_KEY[0],
                           ADVISORY_LOCK_KEY[1] + 1)
        for stmt in LEDGER_DDL:
            await conn.execute(stmt)


async def install_local_ledger(
        conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]) -> None:
    """In another database (database per tenant): the schema_versions table its tenants'
    DDL commits with. The control schema there is created if ``init`` never ran."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", ADVISORY_LOCK_KEY[0],
                           ADVISORY_LOCK_KEY[1] + 1)
        await conn.execute("CREATE SCHEMA IF NOT EXISTS pgtenant")
        await conn.execute("REVOKE ALL ON SCHEMA pgtenant FROM PUBLIC")
        await conn.execute(LEDGER_DDL[1])
        await conn.execute("REVOKE ALL ON TABLE pgtenant.schema_versions FROM PUBLIC")


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A row of ``pgtenant.migration_runs``."""

    id: int
    kind: str
    status: str
    pid: int | None
    host: str | None
    started_at: datetime

    def describe(self) -> str:
        """Returns: one line naming the run, for refusals."""
        return (f"run {self.id} ({self.kind}, started {self.started_at:%Y-%m-%d %H:%M:%S%z} "
                f"by pid {self.pid} on {self.host})")


async def running_run(conn: asyncpg.Connection) -> RunInfo | None:
    """Returns: the newest run still marked running, if any."""
    row = await conn.fetchrow(
        "SELECT id, kind, status, pid, host, started_at FROM pgtenant.migration_runs "
        "WHERE status = 'running' ORDER BY id DESC LIMIT 1"
    )
    return RunInfo(**dict(row)) if row is not None else None


async def start_run(conn: asyncpg.Connection, kind: str, args: dict[str, Any]) -> int:
    """Mark runs left 'running' by a killed runner as interrupted, end their leftover backends
    (a backend of a killed client may still be inside a statement), and open a new run.

    Call only while holding the advisory lock. Returns: the new run id.
    """
    stale = await conn.fetch(
        "UPDATE pgtenant.migration_runs SET status = 'interrupted', finished_at = now() "
        "WHERE status = 'running' RETURNING id"
    )
    for row in stale:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()",
            f"{APP_NAME_PREFIX}{row['id']}",
        )
    run_id: int = await conn.fetchval(
        "INSERT INTO pgtenant.migration_runs (kind, args, pid, host) "
        "VALUES ($1, $2::jsonb, $3, $4) RETURNING id",
        kind, json.dumps(args), os.getpid(), socket.gethostname(),
    )
    return run_id


async def finish_run(conn: asyncpg.Connection, run_id: int, status: str) -> None:
    """Close a run with its final status (done, failed, stopped)."""
    await conn.execute(
        "UPDATE pgtenant.migration_runs SET status = $2, finished_at = now() WHERE id = $1",
        run_id, status,
    )


@dataclass(frozen=True, slots=True)
class FleetRow:
    """One target's state, from ``fetch_fleet``."""

    target: UUID
    slug: str
    schema: str | None
    database: str | None
    size: int
    versions: dict[int, str]  # applied version -> checksum
    last_status: str | None  # status of the newest log row
    last_error: str | None
    last_version: int | None


# One query for the whole fleet (the "plan < 2 s on 1,000 tenants"): every
# organization with its own schema, its schema's size, its applied versions and its newest
# log row; plus the shared pseudo-target. Each input is aggregated in ONE pass and joined by
# hash (a correlated subquery per tenant scanned pg_class once per tenant: 1 s at 1,000).
# Size: pg_relation_size (a stat() per relation, milliseconds) since relpages misses tables
# never vacuumed.
_FLEET_SQL = """
WITH targets AS (
    SELECT o.id, o.slug, o.schema, o.database FROM pgtenant.organizations o
     WHERE o.schema IS NOT NULL OR o.database IS NOT NULL
    UNION ALL
    SELECT $1::uuid, $2::text, NULL, NULL
), sizes AS (
    SELECT n.nspname, sum(pg_relation_size(c.oid))::bigint AS size
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'm', 'i', 't')
       AND n.nspname IN (SELECT schema FROM targets WHERE schema IS NOT NULL)
     GROUP BY n.nspname
), versions AS (
    SELECT target, array_agg(version ORDER BY version) AS versions,
           array_agg(checksum ORDER BY version) AS checksums
      FROM pgtenant.schema_versions GROUP BY target
), last_log AS (
    SELECT DISTINCT ON (target) target, status, error, version
      FROM pgtenant.migration_log ORDER BY target, id DESC
)
SELECT t.id AS target, t.slug, t.schema, t.database, coalesce(s.size, 0) AS size,
       coalesce(v.versions, '{}') AS versions, coalesce(v.checksums, '{}') AS checksums,
       l.status AS last_status, l.error AS last_error, l.version AS last_version
  FROM targets t
  LEFT JOIN sizes s ON s.nspname = t.schema
  LEFT JOIN versions v ON v.target = t.id
  LEFT JOIN last_log l ON l.target = t.id
 ORDER BY t.slug
"""


async def fetch_fleet(conn: asyncpg.Connection) -> list[FleetRow]:
    """Returns: every target's state in one query (the shared target included)."""
    rows = await conn.fetch(_FLEET_SQL, SHARED_TARGET, SHARED_SLUG)
    return [
        FleetRow(
            target=r["target"], slug=r["slug"], schema=r["schema"], database=r["database"],
            size=r["size"], versions=dict(zip(r["versions"], r["checksums"], strict=True)),
            last_status=r["last_status"], last_error=r["last_error"],
            last_version=r["last_version"],
        )
        for r in rows
    ]
