"""``pgtenant audit --probe``: the audit's questions asked live, through a running pgtenant.

The catalog checks say what a tenant role *may* do; the probe signs in as one real tenant of
each tenant type (a short-lived token, revoked afterwards) and tries to read and write other
tenants' objects. Everything runs inside one transaction per tenant that is always rolled
back, each attempt under its own savepoint, so a probe leaves nothing behind. Targets come
from one bulk catalog read through the admin DSN. Owns neither the checks' vocabulary
(``findings``) nor the report formats.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final
from uuid import UUID

import asyncpg

from ...config import Config, parse_dsn
from ...errors import ContextError
from ...identity.context import TenantIdentity, build_context, quote_ident, render_template
from ..tenants import issue_token, revoke_token
from .findings import Finding, Severity

__all__ = ["DEFAULT_TENANT_COLUMNS", "ProbeError", "ProbeTenant", "choose_tenants", "run_probe"]

DEFAULT_TENANT_COLUMNS: Final = ("org_id", "tenant_id", "organization_id")
TOKEN_LABEL: Final = "pgtenant audit probe"
# Long enough for a slow probe, short enough that a token a crash failed to revoke dies soon.
_TOKEN_LIFETIME: Final = timedelta(minutes=5)
# Server-side bounds on every probe statement: a probe must never hang on a lock or a scan.
_STATEMENT_TIMEOUT: Final = "2s"
_LOCK_TIMEOUT: Final = "1s"
# Client-side bound, for a proxy that stops answering (the server bounds are inside it).
_CLIENT_TIMEOUT: Final = 15.0
_CONNECT_TIMEOUT: Final = 10.0
# Rows read/touched per probe at most: enough to prove a hole, bounded on big tables.
_ROW_LIMIT: Final = 1000
_SAVEPOINT: Final = "pgtenant_audit_probe"
# What "the database said no" looks like: permission denied (also RLS WITH CHECK
# violations), undefined table, undefined schema. Anything else proves nothing either way.
_BLOCKED: Final = frozenset({"42501", "42P01", "3F000"})
_SYSTEM_SCHEMAS: Final = ("pg_catalog", "information_schema", "pgtenant", "pg_toast")
_RESERVED_PREFIX: Final = "__pgtenant"  # the proxy refuses these names: not probeable


class ProbeError(Exception):
    """The probe could not run at all (no pgtenant answering at host:port)."""


@dataclass(frozen=True, slots=True)
class ProbeTenant:
    """An organization as the probe sees it: who it is and which schemas are its own."""

    org_id: UUID
    slug: str
    tenant_type: str
    schema: str | None

    def identity(self) -> TenantIdentity:
        return TenantIdentity(org_id=self.org_id, slug=self.slug, tenant_type=self.tenant_type,
                              token_id=UUID(int=0), schema=self.schema)


@dataclass(frozen=True, slots=True)
class _Table:
    schema: str
    name: str
    tenant_column: str | None
    tenant_type_sql: str | None  # format_type() of the tenant column: safe to splice
    first_column: str | None

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


@dataclass(slots=True)
class _Outcome:
    """What one probing tenant managed, per table label (merged into one finding each)."""

    reads: dict[_Table, list[str]] = field(default_factory=dict)
    writes: dict[_Table, list[str]] = field(default_factory=dict)
    cross: dict[_Table, list[str]] = field(default_factory=dict)
    owners: dict[_Table, str] = field(default_factory=dict)  # (b) tables: whose they are
    write_attempts: int = 0
    write_inconclusive: int = 0
    other_inconclusive: int = 0


_TABLES_SQL: Final = """
SELECT n.nspname AS schema, c.relname AS name,
       tc.attname AS tenant_column, format_type(tc.atttypid, tc.atttypmod) AS tenant_type,
       (SELECT a.attname FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum LIMIT 1) AS first_column
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN LATERAL (
       SELECT a.attname, a.atttypid, a.atttypmod FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname = ANY($1::text[])
        ORDER BY array_position($1::text[], a.attname::text) LIMIT 1) tc ON true
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname <> ALL($2::text[])
   AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'
 ORDER BY 1, 2
"""
# status arrived with tenant lifecycle; read through to_jsonb so older installs still work.
_ORGS_SQL: Final = """
SELECT o.id, o.slug, o.tenant_type, o.schema, o.database,
       coalesce(to_jsonb(o) ->> 'status', 'ready') AS status
  FROM pgtenant.organizations o ORDER BY o.slug
"""


async def run_probe(admin_dsn: str, config: Config, *, host: str, port: int,
                    dbname: str | None = None,
                    tenant_columns: Sequence[str] = DEFAULT_TENANT_COLUMNS) -> list[Finding]:
    """Probe the pgtenant at ``host:port`` as one ready tenant of each configured type.

    ``dbname`` is the proxy database to connect to (default: the admin DSN's database);
    only organizations served from it are used and probed against.

    Returns: the findings (``probe_read``/``probe_write``/``probe_cross_type_write`` errors,
    ``probe_failed`` for types that could not be probed).
    Raises: ProbeError when no pgtenant answers at host:port; asyncpg errors from the
    admin DSN's catalog reads.
    """
    dbname = dbname or parse_dsn(admin_dsn).dbname
    admin = await asyncpg.connect(admin_dsn)
    try:
        orgs = await admin.fetch(_ORGS_SQL)
        rows = await admin.fetch(_TABLES_SQL, list(tenant_columns), list(_SYSTEM_SCHEMAS))
    finally:
        await admin.close()
    tenants = [ProbeTenant(r["id"], r["slug"], r["tenant_type"], r["schema"]) for r in orgs
               if r["status"] == "ready" and _served_here(config, r, dbname)]
    tables = [_Table(r["schema"], r["name"], r["tenant_column"], r["tenant_type"],
                     r["first_column"]) for r in rows
              if not (r["schema"].startswith(_RESERVED_PREFIX)
                      or r["name"].startswith(_RESERVED_PREFIX))]
    findings: list[Finding] = []
    probers = choose_tenants(config, tenants)
    for type_name in config.tenant_types:
        prober = probers.get(type_name)
        if prober is None:
            findings.append(Finding(
                "probe_failed", Severity.INFO, f"tenant type {type_name}",
                f"no ready tenant of type {type_name} is served from database {dbname}: "
                "nothing to probe as", "create a tenant of this type to probe it",
                subject=f"type {type_name}", kind="tenant type"))
            continue
        findings += await _probe_as(admin_dsn, config, prober, tenants, tables,
                                    host=host, port=port, dbname=dbname)
    return findings


def choose_tenants(config: Config, tenants: Sequence[ProbeTenant]) -> dict[str, ProbeTenant]:
    """Returns: per configured tenant type, the tenant the probe signs in as (the first by
    slug of ``tenants``, already filtered to ready ones served from the database)."""
    chosen: dict[str, ProbeTenant] = {}
    for tenant in sorted(tenants, key=lambda t: t.slug):
        if tenant.tenant_type in config.tenant_types:
            chosen.setdefault(tenant.tenant_type, tenant)
    return chosen


def _served_here(config: Config, org: asyncpg.Record, dbname: str) -> bool:
    # The proxy routes an org to its own database, else its type's, else the dbname asked.
    tenant_type = config.tenant_types.get(org["tenant_type"])
    if tenant_type is None:
        return False
    database = org["database"] or tenant_type.database
    return database is None or database == dbname


def _tenant_schemas(config: Config, tenant: ProbeTenant) -> set[str]:
    """Returns: the schemas that are this tenant's own: its organizations.schema and its
    type's search_path templates that render per tenant."""
    own = {tenant.schema} if tenant.schema else set()
    tenant_type = config.tenant_types.get(tenant.tenant_type)
    for template in tenant_type.search_path if tenant_type else ():
        if "{" in template:
            try:
                own.add(render_template(template, tenant.identity(), what="search_path"))
            except ContextError:
                continue  # the proxy cannot serve this tenant either; nothing to own
    return own


def _type_schemas(config: Config) -> dict[str, str]:
    """Returns: schema -> tenant type, for schemas named by exactly one type's static
    search_path entries (tenant_b for agency); a schema all types name is shared."""
    named: dict[str, set[str]] = {}
    for name, tenant_type in config.tenant_types.items():
        for entry in tenant_type.search_path:
            if "{" not in entry:
                named.setdefault(entry, set()).add(name)
    return {schema: next(iter(types)) for schema, types in named.items() if len(types) == 1}


async def _probe_as(admin_dsn: str, config: Config, prober: ProbeTenant,
                    tenants: Sequence[ProbeTenant], tables: Sequence[_Table], *,
                    host: str, port: int, dbname: str) -> list[Finding]:
    subject = f"{prober.slug} (type {prober.tenant_type})"
    tenant_type = config.tenant_types[prober.tenant_type]
    try:
        role = build_context(prober.identity(), tenant_type).role
    except ContextError as exc:
        return [_failed(prober, f"cannot render the tenant's role: {exc}", Severity.WARNING)]
    own_schemas = _tenant_schemas(config, prober)
    others_schemas: dict[str, ProbeTenant] = {}
    for other in tenants:
        if other.org_id != prober.org_id:
            for schema in _tenant_schemas(config, other) - own_schemas:
                others_schemas[schema] = other
    type_schemas = _type_schemas(config)
    # Another tenant's id to plant rows with: one of the same type when there is one (the
    # table's natural neighbour), else any other, else one no tenant has.
    others = [t for t in tenants if t.org_id != prober.org_id]
    others.sort(key=lambda t: (t.tenant_type != prober.tenant_type, t.slug))
    foreign_id = str(others[0].org_id if others else uuid.uuid4())

    token_id, token = await issue_token(admin_dsn, tenant_slug=prober.slug,
                                        expires_in=_TOKEN_LIFETIME, label=TOKEN_LABEL)
    try:
        try:
            conn = await asyncpg.connect(host=host, port=port, user=prober.slug,
                                         password=token, database=dbname,
                                         statement_cache_size=0, timeout=_CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise ProbeError(f"cannot connect to pgtenant at {host}:{port}: {exc}") from exc
        except (asyncpg.InvalidAuthorizationSpecificationError,
                asyncpg.InvalidCatalogNameError) as exc:
            # A token issued a moment ago refused, or the database unknown: whatever answers
            # there does not serve this database's registry (a plain Postgres, another
            # pgtenant). Every type would fail alike, so say it once.
            raise ProbeError(
                f"pgtenant at {host}:{port} refused tenant {prober.slug!r} with a fresh token "
                f"({exc}): is it the pgtenant serving database {dbname!r}?") from exc
        except asyncpg.PostgresError as exc:
            # pgtenant answered but would not let this tenant in: this type goes unprobed.
            return [_failed(prober, f"pgtenant at {host}:{port} refused the login: {exc}",
                            Severity.WARNING)]
        outcome = _Outcome()
        probe = _Prober(conn, str(prober.org_id), foreign_id, outcome)
        try:
            await conn.execute("BEGIN")
            await probe.run(f"SET LOCAL statement_timeout = '{_STATEMENT_TIMEOUT}'")
            await probe.run(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            for table in tables:
                if table.schema in own_schemas:
                    continue  # the tenant's own objects: reaching them is the point
                owner = others_schemas.get(table.schema)
                if table.tenant_column is not None:
                    await probe.tenant_table(table)
                if owner is not None:
                    await probe.foreign_object(table, owner)
                other_type = type_schemas.get(table.schema)
                if other_type is not None and other_type != prober.tenant_type:
                    await probe.cross_type(table, other_type)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            # Only a lost connection, a timeout or a failing BEGIN/SAVEPOINT gets here (each
            # probe statement's own errors are its result): keep what was found so far.
            findings = _findings(outcome, subject, role)
            return [*findings, _failed(prober, f"the probe stopped early: {exc!r}",
                                       Severity.WARNING)]
        finally:
            await _close(conn)
        findings = _findings(outcome, subject, role)
        if outcome.write_attempts and outcome.write_inconclusive == outcome.write_attempts:
            findings.append(_failed(
                prober, f"all {outcome.write_attempts} INSERT probes were inconclusive (each "
                "failed on something other than a privilege or policy: a constraint, a "
                "timeout, a refusal by pgtenant; "
                f"{outcome.other_inconclusive} other probes were inconclusive too)",
                Severity.INFO))
        return findings
    finally:
        await revoke_token(admin_dsn, token_id)


async def _close(conn: asyncpg.Connection) -> None:
    # The rollback is what guarantees nothing stays; closing alone would also roll back,
    # but only once pgtenant notices, and a pooled server may outlive the client briefly.
    try:
        if not conn.is_closed():
            await conn.execute("ROLLBACK", timeout=_CLIENT_TIMEOUT)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        pass
    try:
        await conn.close(timeout=5)
    except (asyncpg.InterfaceError, OSError, TimeoutError):
        conn.terminate()


class _Prober:
    """The attempts of one tenant, inside its open transaction, each under a savepoint."""

    def __init__(self, conn: asyncpg.Connection, own_id: str, foreign_id: str,
                 outcome: _Outcome) -> None:
        self.conn = conn
        self.own = own_id
        self.foreign = foreign_id
        self.out = outcome

    async def run(self, sql: str) -> None:
        await self.conn.execute(sql, timeout=_CLIENT_TIMEOUT)

    async def attempt(self, sql: str, *args: object) -> tuple[str, object]:
        """Run one statement under a savepoint, always rolled back to it.

        Returns: ("ok", its value), ("blocked", sqlstate) when privileges or policies
        refused it, or ("inconclusive", sqlstate) for any other error (constraints,
        timeouts, and pgtenant's own refusals, which prove nothing about the database).
        """
        await self.run(f"SAVEPOINT {_SAVEPOINT}")
        try:
            value = await self.conn.fetchval(sql, *args, timeout=_CLIENT_TIMEOUT)
            result: tuple[str, object] = ("ok", value)
        except asyncpg.PostgresError as exc:
            state = exc.sqlstate or ""
            refused = str(exc).startswith("pgtenant")
            result = ("blocked" if state in _BLOCKED and not refused else "inconclusive",
                      state)
        await self.run(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        await self.run(f"RELEASE SAVEPOINT {_SAVEPOINT}")
        return result

    async def counted(self, sql: str, *args: object) -> int | None:
        """Returns: the count a statement returned, 0 when blocked, None if inconclusive."""
        status, value = await self.attempt(sql, *args)
        if status == "ok":
            return int(value) if isinstance(value, int) else 0
        if status == "inconclusive":
            self.out.other_inconclusive += 1
        return 0 if status == "blocked" else None

    async def tenant_table(self, table: _Table) -> None:
        """(a) A table with a tenant column: other tenants' rows read, updated, planted,
        deleted. Bounded by _ROW_LIMIT via (tableoid, ctid) so a big table is not rewritten."""
        t, col, where = table.sql, quote_ident(table.tenant_column or ""), table.label
        other = f"{col}::text IS DISTINCT FROM $1::text"
        some = f"(tableoid, ctid) IN (SELECT tableoid, ctid FROM {t} WHERE {other} " \
               f"LIMIT {_ROW_LIMIT})"
        read = await self.counted(
            f"SELECT count(*) FROM (SELECT 1 FROM {t} WHERE {other} LIMIT {_ROW_LIMIT}) s",
            self.own)
        if read:
            self.note(self.out.reads, table, f"read {_rows(read)} of other tenants in {where}")
        updated = await self.counted(
            f"WITH w AS (UPDATE {t} SET {col} = {col} WHERE {other} AND {some} RETURNING 1) "
            "SELECT count(*) FROM w", self.own)
        if updated:
            self.note(self.out.writes, table,
                      f"updated {_rows(updated)} of other tenants in {where}")
        deleted = await self.counted(
            f"WITH w AS (DELETE FROM {t} WHERE {other} AND {some} RETURNING 1) "
            "SELECT count(*) FROM w", self.own)
        if deleted:
            self.note(self.out.writes, table,
                      f"deleted {_rows(deleted)} of other tenants in {where}")
        if await self.insert(f"INSERT INTO {t} ({col}) VALUES "
                             f"(CAST($1::text AS {table.tenant_type_sql}))", self.foreign):
            self.note(self.out.writes, table,
                      f"got a row with another tenant's id past the privileges and policies "
                      f"of {where}")

    async def insert(self, sql: str, *args: object) -> bool:
        """Returns: whether privileges and policies let the row in. Postgres checks an
        INSERT's row-level security WITH CHECK before the table's constraints, so a
        constraint error (class 23: not-null, check, unique, foreign key) means the policy
        accepted the row and only the probe's incomplete row stopped it: a finding too.
        Any other error is inconclusive (counted, no finding)."""
        self.out.write_attempts += 1
        status, value = await self.attempt(sql, *args)
        if status == "inconclusive" and str(value).startswith("23"):
            return True
        if status == "inconclusive":
            self.out.write_inconclusive += 1
        return status == "ok"

    async def foreign_object(self, table: _Table, owner: ProbeTenant) -> None:
        """(b) A table in another tenant's own schema: opening it at all is the hole."""
        t = table.sql
        whose = f"(a table of tenant {owner.slug})"
        self.out.owners[table] = owner.slug
        status, _ = await self.attempt(f"SELECT 1 FROM {t} LIMIT 0")
        if status == "ok":
            self.note(self.out.reads, table, f"opened {table.label} {whose}")
        if await self.insert(f"INSERT INTO {t} DEFAULT VALUES"):
            self.note(self.out.writes, table, f"inserted a row into {table.label} {whose}")
        # WHERE false touches nothing: it succeeds exactly when the privilege is held.
        status, _ = await self.attempt(f"DELETE FROM {t} WHERE false")
        if status == "ok":
            self.note(self.out.writes, table, f"was allowed to DELETE from {table.label} {whose}")
        if table.first_column is not None:
            c = quote_ident(table.first_column)
            status, _ = await self.attempt(f"UPDATE {t} SET {c} = {c} WHERE false")
            if status == "ok":
                self.note(self.out.writes, table, f"was allowed to UPDATE {table.label} {whose}")

    async def cross_type(self, table: _Table, other_type: str) -> None:
        """(c) A table in a schema of another tenant type: a row with the tenant's own id
        (which its policies may well accept) mixes the two data models."""
        if table.tenant_column is not None:
            sql = (f"INSERT INTO {table.sql} ({quote_ident(table.tenant_column)}) "
                   f"VALUES (CAST($1::text AS {table.tenant_type_sql}))")
            ok = await self.insert(sql, self.own)
        else:
            ok = await self.insert(f"INSERT INTO {table.sql} DEFAULT VALUES")
        if ok:
            self.note(self.out.cross, table,
                      f"got a row (with its own id) past the privileges and policies of "
                      f"{table.label}, a table of tenant type {other_type}")

    @staticmethod
    def note(into: dict[_Table, list[str]], table: _Table, what: str) -> None:
        into.setdefault(table, []).append(what)


def _rows(n: int) -> str:
    text = f"{n} row" + ("" if n == 1 else "s")
    return f"at least {text}" if n >= _ROW_LIMIT else text


def _findings(out: _Outcome, subject: str, role: str) -> list[Finding]:
    r = quote_ident(role)
    check_policies = "(pgtenant audit without --probe names the hole)"
    findings: list[Finding] = []

    def revoke(t: _Table, privileges: str) -> str:
        text = f"REVOKE {privileges} ON {t.sql} FROM {r} (or from PUBLIC / the role it " \
               "inherits it from)"
        if t in out.owners:  # another tenant's schema: the USAGE grant is a hole of its own
            text += f"; REVOKE USAGE ON SCHEMA {quote_ident(t.schema)} FROM {r}"
        return text

    for t, what in out.reads.items():
        fix = revoke(t, "SELECT")
        if t.tenant_column is not None and t not in out.owners:
            fix += (f", or ALTER TABLE {t.sql} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL "
                    f"SECURITY; check its policies {check_policies}")
        findings.append(Finding("probe_read", Severity.ERROR, t.label,
                                f"tenant {subject} {'; '.join(what)}", fix,
                                subject=subject, kind="table"))
    for t, what in out.writes.items():
        fix = revoke(t, "INSERT, UPDATE, DELETE")
        if t.tenant_column is not None and t not in out.owners:
            fix += (f", or ALTER TABLE {t.sql} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL "
                    f"SECURITY; check its policies and their WITH CHECK {check_policies}")
        findings.append(Finding("probe_write", Severity.ERROR, t.label,
                                f"tenant {subject} {'; '.join(what)} (rolled back)", fix,
                                subject=subject, kind="table"))
    for t, what in out.cross.items():
        findings.append(Finding(
            "probe_cross_type_write", Severity.ERROR, t.label,
            f"tenant {subject} {'; '.join(what)} (rolled back)",
            f"{revoke(t, 'INSERT')}: tenants write their own type's tables {check_policies}",
            subject=subject, kind="table"))
    return findings


def _failed(tenant: ProbeTenant, why: str, severity: Severity) -> Finding:
    subject = f"{tenant.slug} (type {tenant.tenant_type})"
    return Finding("probe_failed", severity, f"tenant type {tenant.tenant_type}",
                   f"probe as tenant {subject}: {why}",
                   "check that pgtenant serves this tenant, then run the probe again",
                   subject=subject, kind="tenant type")
