"""Run the audit of one database: read the catalogs once, build the model, run every check.

``run_audit`` is what ``pgtenant audit`` prints, and what ``tenant provision`` and each wave
of ``migrate apply`` call on the schemas they touched (``schemas=``) to stop on a new error.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from dataclasses import dataclass

import asyncpg

from ...config import Config
from ..init import DEFAULT_CONTROL_ROLE, check_fail_closed
from .catalog import Relation, read_snapshot
from .checks_access import access_checks
from .checks_functions import function_checks
from .checks_tables import TableChecks
from .findings import Finding, Severity, sort_findings
from .model import build_model

__all__ = ["AuditReport", "run_audit"]

# check_fail_closed lines the audit's own checks report better (per role, with a fix):
# tenant_create_on_shared_schema, tenant_role_privileged, login_role_reaches_bypass.
_COVERED = re.compile(r"may CREATE in schema|^tenant role '.*' (\(granted to proxy\) )?"
                      r"(is a superuser|has BYPASSRLS|can bypass row-level security|"
                      r"can log in)$")


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What one audit found. ``findings`` are sorted worst first."""

    database: str
    findings: list[Finding]
    stats: dict[str, int]
    seconds: float

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]


async def run_audit(admin_dsn: str, config: Config, *,
                    schemas: Collection[str] | None = None) -> AuditReport:
    """Audit the database of ``admin_dsn`` (a superuser or the owner of everything: it must
    read every catalog row) against ``config``'s tenant types.

    ``schemas``: audit only the relations and functions of these schemas (roles, schema
    privileges, default privileges and the lockdown are always checked whole).

    Returns: the report. Raises: asyncpg.PostgresError / OSError when the database cannot be
    read.
    """
    started = time.perf_counter()
    conn = await asyncpg.connect(admin_dsn)
    try:
        snapshot = await read_snapshot(conn, config.audit.tenant_columns, schemas)
    finally:
        await conn.close()
    model = build_model(snapshot, config)
    tables = TableChecks(model)
    findings = tables.run()
    shared: dict[tuple[str, str], Relation] = {
        (rel.schema, rel.name): rel for rel in snapshot.relations.values()
        if rel.kind in ("r", "p") and rel.tenant_columns
        and model.tenants_of(model.by_oid[o] for o in tables.reach(rel)) >= 2
    }
    findings += function_checks(model, shared)
    findings += access_checks(model, tables.sound)
    if model.proxy_role is not None:
        control = config.control.dsn.user if config.control.dsn else DEFAULT_CONTROL_ROLE
        for problem in await check_fail_closed(admin_dsn, model.proxy_role, control):
            if _COVERED.search(problem):
                continue
            findings.append(Finding(
                "lockdown", Severity.ERROR, problem, f"lockdown: {problem}",
                "pgtenant init --dsn ADMIN --config CONFIG (idempotent: it re-applies the "
                "lockdown)", kind="database"))
    stats = {
        "tenant_roles": len(model.tenant_roles),
        "organizations": len(snapshot.organizations),
        "schemas": len(snapshot.schemas),
        "tables": sum(1 for r in snapshot.relations.values() if r.kind in ("r", "p")),
        "tenant_tables": sum(1 for r in snapshot.relations.values()
                             if r.kind in ("r", "p") and r.tenant_columns),
        "views": sum(1 for r in snapshot.relations.values() if r.kind in ("v", "m")),
        "policies": sum(len(p) for p in snapshot.policies.values()),
        "functions": len(snapshot.functions),
    }
    return AuditReport(snapshot.database, sort_findings(findings), stats,
                       time.perf_counter() - started)
