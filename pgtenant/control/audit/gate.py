"""The audit gate of the tenant lifecycle: ``migrate apply`` and ``tenant provision`` stop on a
NEW audit error in what they touched.

One ``AuditGate`` per run. ``before`` audits the databases (and schemas, when known) the run
is about to change and remembers the error keys already there, so an imperfect database does
not block every rollout: only an error that was not there before, and that the config's
baseline (``[audit] baseline``) does not accept, stops it. ``check`` audits after a wave or
phase and returns those new errors; ``describe`` turns them into the lines an operator reads
(check, object, message, fix).

Databases: ``None`` is the database of ``admin_dsn`` (the control database); another name is
a ``[databases.*]`` entry reached through ``other_databases`` (database per tenant).
Schemas: ``None`` audits every relation and function of the database; the shared schemas
(``SHARED``) are every schema that is no tenant's own, read from the registry.

Does not decide when to audit (the runner's ``after_wave`` hook, ``provision.py``'s phase).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg

from .. import ControlError
from ..migrations.ledger import LEDGER_DDL, SHARED_TARGET
from .baseline import Baseline, BaselineError, load_baseline
from .findings import Finding, sort_findings
from .runner import run_audit

if TYPE_CHECKING:
    from ...config import Config
    from ..migrations.runner import TargetPlan

__all__ = ["SHARED", "AuditGate", "MigrateAudit", "Scope", "describe"]

# A scope: schema names, or None for the whole database. The name SHARED stands for every
# schema that is no tenant's own (what a scope=shared migration can touch).
SHARED: Final = "\x00shared"
Scope = Collection[str] | None

_STOPS_DDL: Final = next(s for s in LEDGER_DDL if "audit_stops" in s and "CREATE" in s)

_SHARED_SCHEMAS_SQL = """
SELECT n.nspname FROM pg_namespace n
 WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
   AND (to_regclass('pgtenant.organizations') IS NULL
        OR NOT EXISTS (SELECT 1 FROM pgtenant.organizations o WHERE o.schema = n.nspname))
"""


def describe(findings: Collection[Finding]) -> list[str]:
    """Returns: one line per finding: check, object (subject), message and fix."""
    out = []
    for f in sort_findings(list(findings)):
        who = f" (role {f.subject})" if f.subject else ""
        out.append(f"{f.check} {f.object}{who}: {f.message}; fix: {f.fix}")
    return out


class AuditGate:
    """The audit before and after the changes of one run (see the module docstring).

    ``own_schemas``: schemas whose objects are never pre-existing (a tenant being
    provisioned: a rerun of a provision that stopped on a hole in its schema must stop
    again, though the hole was there before this attempt).
    Raises (constructor): ControlError when the config's baseline cannot be loaded.
    """

    def __init__(self, admin_dsn: str, config: Config, config_dir: str | Path, *,
                 other_databases: Mapping[str, str] | None = None,
                 own_schemas: Collection[str] = ()) -> None:
        self.admin_dsn = admin_dsn
        self.config = config
        self.others = dict(other_databases or {})
        self.own_schemas = set(own_schemas)
        self.baseline: Baseline | None = None
        if config.audit.baseline:
            path = Path(config_dir) / config.audit.baseline
            try:
                self.baseline = load_baseline(path)
            except BaselineError as exc:
                raise ControlError(f"[audit] baseline: {exc}") from None
        # database -> error keys found before the changes (None: not audited before)
        self._before: dict[str | None, set[tuple[str, str, str]]] = {}
        self.seconds = 0.0

    def _url(self, database: str | None) -> str:
        if database is None:
            return self.admin_dsn
        try:
            return self.others[database]
        except KeyError:
            raise ControlError(f"audit: no admin URL for database {database!r}") from None

    async def _schemas(self, url: str, scope: Scope) -> Collection[str] | None:
        if scope is None or SHARED not in scope:
            return None if scope is None else set(scope)
        conn = await asyncpg.connect(url)
        try:
            shared = {r[0] for r in await conn.fetch(_SHARED_SCHEMAS_SQL)}
        finally:
            await conn.close()
        return shared | (set(scope) - {SHARED})

    async def _errors(self, database: str | None, scope: Scope) -> list[Finding]:
        url = self._url(database)
        report = await run_audit(url, self.config, schemas=await self._schemas(url, scope))
        self.seconds += report.seconds
        return report.errors

    def _own(self, finding: Finding) -> bool:
        obj = f" {finding.object}"
        return any(f" {s}." in obj or finding.object == s for s in self.own_schemas)

    async def before(self, scopes: Mapping[str | None, Scope]) -> None:
        """Remember the errors already there: ``scopes`` maps each database the run will
        change to the schemas it will change there (None: all of them).

        An error that stopped an earlier run (``pgtenant.audit_stops``) is not "already
        there": while one is still found (and the baseline does not accept it), the run
        refuses to start, whatever schemas it would touch; one no longer found is forgotten.
        Raises: ControlError for such an error; asyncpg.PostgresError / OSError when a
        database cannot be audited."""
        stopped = await self._stops()
        unresolved: list[str] = []
        for database, scope in scopes.items():
            mine = {k[1:] for k in stopped if k[0] == (database or "")}
            if mine:
                # The whole database, once: it answers the scoped question below too (the
                # keys of objects outside the scope are never asked about again).
                errors = everything = await self._errors(database, None)
                still = [f for f in everything if f.key in mine
                         and (self.baseline is None or self.baseline.match(f) is None)]
                await self._forget(database, mine - {f.key for f in everything})
                where = f"database {database}: " if database is not None else ""
                unresolved += [where + line for line in describe(still)]
            else:
                errors = await self._errors(database, scope)
            self._before.setdefault(database, set()).update(
                f.key for f in errors if not self._own(f))
        if unresolved:
            raise ControlError(
                "an earlier run stopped on these audit errors, still there: fix each, or "
                "accept it with a reason in the [audit] baseline, then run again:\n  "
                + "\n  ".join(unresolved))

    async def _forget(self, database: str | None,
                      keys: Collection[tuple[str, str, str]]) -> None:
        if not keys:
            return
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.executemany(
                "DELETE FROM pgtenant.audit_stops WHERE database = $1 AND check_name = $2 "
                "AND object = $3 AND subject = $4", [(database or "", *k) for k in keys])
        finally:
            await conn.close()

    async def _stops(self) -> set[tuple[str, str, str, str]]:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(_STOPS_DDL)  # installs from before the table: made here
            return {(r[0], r[1], r[2], r[3]) for r in await conn.fetch(
                "SELECT database, check_name, object, subject FROM pgtenant.audit_stops")}
        finally:
            await conn.close()

    async def record(self, findings: Collection[Finding], *, database: str | None) -> None:
        """Remember ``findings`` as errors that stopped a run (see ``before``).
        Raises: asyncpg.PostgresError / OSError when the control database is unreachable."""
        if not findings:
            return
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(_STOPS_DDL)
            await conn.executemany(
                "INSERT INTO pgtenant.audit_stops (database, check_name, object, subject) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                [(database or "", *f.key) for f in findings])
        finally:
            await conn.close()

    async def check(self, schemas: Scope, *, database: str | None = None) -> list[Finding]:
        """Audit ``schemas`` (names, SHARED among them; None: all) of ``database`` after a
        change.

        Returns: the errors that were not there before (when ``before`` audited that
        database) and that the baseline does not accept, worst first.
        Raises: asyncpg.PostgresError / OSError when the database cannot be audited.
        """
        before = self._before.get(database, set())
        new = [f for f in await self._errors(database, schemas)
               if f.key not in before
               and (self.baseline is None or self.baseline.match(f) is None)]
        await self.record(new, database=database)
        return new


class MigrateAudit:
    """``migrate apply``'s audit (the runner's ``WaveAudit``): before the rollout, the
    databases and schemas its targets will change; after each wave, those the wave changed.
    The shared target changes the shared schemas of the control database; a tenant its own
    schema, or, in a database of its own without one, that whole database."""

    def __init__(self, gate: AuditGate) -> None:
        self.gate = gate

    @staticmethod
    def scopes(targets: Sequence[TargetPlan]) -> dict[str | None, Scope]:
        """Returns: database (None: the control database) -> the schemas the targets
        change there (None: all of them)."""
        out: dict[str | None, set[str] | None] = {}
        for t in targets:
            if t.row.target == SHARED_TARGET:
                wanted: set[str] | None = {SHARED}
            elif t.row.schema is not None:
                wanted = {t.row.schema}
            else:
                wanted = None  # the tenant's own database, through its search_path
            have = out.get(t.remote, set())
            out[t.remote] = None if have is None or wanted is None else have | wanted
        return dict(out)

    async def before(self, targets: Sequence[TargetPlan]) -> None:
        """Raises: ControlError when a database cannot be audited (nothing was changed)."""
        try:
            await self.gate.before(self.scopes(targets))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise ControlError(f"the audit before the rollout could not run: {exc} "
                               "(--no-audit skips it)") from exc

    async def after_wave(self, wave: str, targets: Sequence[TargetPlan]) -> list[str]:
        """Returns: one line per new error in what the wave migrated (or one saying the
        audit could not run: the rollout does not go on unaudited)."""
        lines: list[str] = []
        for database, scope in self.scopes(targets).items():
            where = f"database {database}: " if database is not None else ""
            try:
                found = await self.gate.check(scope, database=database)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                    ControlError) as exc:
                lines.append(f"{where}the audit after {wave} could not run: {exc} "
                             "(--no-audit skips it)")
                continue
            lines.extend(where + line for line in describe(found))
        return lines
