"""What a migration run would do: the fleet read once, compared with the files.

``make_plan`` reads every target's ledger in one catalog query (``ledger.fetch_fleet``; a
database of its own is read there), and says what is pending where, which applied file was
edited since (refused, naming it), which version is applied somewhere but has no file, and
what the lint flags. ``status`` is the fleet's state for ``migrate status``. Pure reading:
the rollout is ``runner.py``'s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg

from .files import Migration, Warning_, lint
from .ledger import SHARED_TARGET, FleetRow, fetch_fleet, install_ledger

__all__ = ["Plan", "TargetPlan", "make_plan", "status"]


@dataclass(slots=True)
class TargetPlan:
    """One target and the files it lacks."""

    row: FleetRow
    pending: list[Migration]
    skipped: str | None = None
    # the [databases.*] name when the tenant lives in another database (database per
    # tenant): its DDL and its authoritative ledger rows run there, mirrored here after
    remote: str | None = None

    @property
    def slug(self) -> str:
        """Returns: the tenant's slug (``:shared`` for the shared target)."""
        return self.row.slug

    @property
    def version(self) -> int:
        """Returns: the highest applied version (0: none)."""
        return max(self.row.versions, default=0)


@dataclass(slots=True)
class Plan:
    """What ``apply`` would do."""

    migrations: list[Migration]
    targets: list[TargetPlan]
    edited: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[Warning_] = field(default_factory=list)
    query_seconds: float = 0.0

    @property
    def pending_targets(self) -> list[TargetPlan]:
        """Returns: targets with something to run (skipped ones excluded)."""
        return [t for t in self.targets if t.pending and t.skipped is None]

    def to_json(self) -> dict[str, Any]:
        """Returns: the plan as one JSON-able object."""
        return {
            "migrations": [{"version": m.version, "file": m.filename, "scope": m.scope,
                            "transaction": m.transactional, "down": m.down is not None}
                           for m in self.migrations],
            "targets": [{"tenant": t.slug, "version": t.version,
                         "pending": [m.version for m in t.pending], "skipped": t.skipped}
                        for t in self.targets if t.pending or t.skipped],
            "up_to_date": sum(1 for t in self.targets if not t.pending and not t.skipped),
            "edited": self.edited, "missing": self.missing,
            "warnings": [{"file": w.filename, "statement": w.statement, "message": w.message}
                         for w in self.warnings],
        }


def _plan_from(fleet: Sequence[FleetRow], migrations: Sequence[Migration],
               other_databases: Mapping[str, str]) -> Plan:
    by_version = {m.version: m for m in migrations}
    plan = Plan(migrations=list(migrations), targets=[])
    edited: dict[str, list[str]] = {}
    for row in fleet:
        scope = "shared" if row.target == SHARED_TARGET else "tenant"
        for v, checksum in row.versions.items():
            mig = by_version.get(v)
            if mig is None:
                if f"{v:04d}" not in plan.missing:
                    plan.missing.append(f"{v:04d}")
            elif mig.checksum != checksum:
                edited.setdefault(mig.filename, []).append(row.slug)
        pending = [m for m in migrations if m.scope == scope and m.version not in row.versions]
        remote = row.database if row.database in other_databases else None
        if remote is None and row.schema is None and scope == "tenant":
            continue  # a shared-schema tenant served from this database: nothing of its own
        plan.targets.append(TargetPlan(row=row, pending=pending, remote=remote))
    plan.edited = [
        f"{name} was edited after it was applied (checksum differs on "
        f"{len(slugs)} target(s): {', '.join(slugs[:5])}{' ...' if len(slugs) > 5 else ''}); "
        "restore it and put the change in a new migration"
        for name, slugs in sorted(edited.items())
    ]
    for mig in migrations:
        plan.warnings.extend(lint(mig))
    return plan


_LOCAL_SIZE_SQL = """
SELECT CASE WHEN $1::text IS NULL THEN pg_database_size(current_database())
       ELSE (SELECT coalesce(sum(pg_relation_size(c.oid)), 0) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1) END::bigint
"""


async def _read_local_ledger(url: str, ids: list[UUID]) -> dict[UUID, tuple[dict[int, str], int]]:
    # One query per database: each target's applied versions (none when the ledger was
    # never installed there); the size ordering uses the whole database's size.
    conn = await asyncpg.connect(url)
    try:
        size: int = await conn.fetchval(_LOCAL_SIZE_SQL, None)
        if not await conn.fetchval("SELECT to_regclass('pgtenant.schema_versions') IS NOT NULL"):
            return {i: ({}, size) for i in ids}  # nothing ever migrated there
        rows = await conn.fetch(
            """
            SELECT t.id, coalesce(v.versions, '{}') AS versions,
                   coalesce(v.checksums, '{}') AS checksums
              FROM unnest($1::uuid[]) AS t(id)
              LEFT JOIN (SELECT target, array_agg(version ORDER BY version) AS versions,
                                array_agg(checksum ORDER BY version) AS checksums
                           FROM pgtenant.schema_versions GROUP BY target) v
                ON v.target = t.id
            """, ids)
        return {r["id"]: (dict(zip(r["versions"], r["checksums"], strict=True)), size)
                for r in rows}
    finally:
        await conn.close()


async def make_plan(conn: asyncpg.Connection, migrations: Sequence[Migration], *,
                    other_databases: Mapping[str, str] | None = None) -> Plan:
    """Compare the fleet (one query here, plus one per other database that holds tenants)
    with the files.

    ``other_databases``: ``[databases.*]`` name -> admin URL of each database that is not
    this one; organizations whose ``database`` names one are migrated there, and the
    ledger in that database (written with their DDL) is the truth about their versions.
    Returns: the Plan (``edited`` non-empty means ``apply`` will refuse).
    Raises: OSError/asyncpg errors when another database cannot be reached.
    """
    others = dict(other_databases or {})
    await install_ledger(conn)
    started = time.perf_counter()
    fleet = await fetch_fleet(conn)
    for name, url in others.items():
        ids = [r.target for r in fleet if r.database == name]
        if ids:
            local = await _read_local_ledger(url, ids)
            fleet = [dataclasses.replace(r, versions=local[r.target][0],
                                         size=local[r.target][1])
                     if r.target in local else r for r in fleet]
    elapsed = time.perf_counter() - started
    plan = _plan_from(fleet, migrations, others)
    plan.query_seconds = elapsed
    return plan


def status(plan: Plan) -> list[dict[str, Any]]:
    """Returns: one object per target: tenant, version, status (ok, behind, failed,
    skipped), pending versions, and the last error when it failed."""
    out: list[dict[str, Any]] = []
    for t in plan.targets:
        if t.skipped:
            state = "skipped"
        elif t.pending and t.row.last_status == "failed":
            state = "failed"
        elif t.pending:
            state = "behind"
        else:
            state = "ok"
        out.append({
            "tenant": t.slug, "version": t.version, "status": state,
            "pending": [m.version for m in t.pending], "schema": t.row.schema,
            "error": t.row.last_error if state == "failed" else None,
            "failed_version": t.row.last_version if state == "failed" else None,
        })
    return out
