"""Tenant lifecycle: ``tenant provision`` (a tenant from nothing to ready) and ``tenant drop``.

Provision, in phases, each timed: ``register`` (the organization row with status
'provisioning', its role, granted to the proxy), ``database`` (database per tenant: CREATE
DATABASE from a template when the tenant's database does not exist yet), ``schema`` (its
schema and grants, in the database it is served from), ``migrate`` (every tenant-scope
migration, through the runner's per-target apply: same transactions, ledger rows and lock
retries as ``migrate apply``), ``audit`` (when an ``AuditGate`` is given: the tenant's schema,
or its own database, audited before and after the migrations; a new error fails the provision
and the tenant stays 'provisioning'), ``grant`` (DML on every table and sequence of its schema to
its role), ``seed`` (one SQL file, in ONE transaction with the tenant's context: role,
search_path, ``app.*`` and signature exactly as the proxy injects them; or as the admin), ``ready``
(status 'ready': logins accepted from then on). The proxy refuses a tenant that is not
ready with SQLSTATE 57P03 (``identity/registry.py``).

Idempotent and resumable: each phase checks what exists before it acts, the seed commits
with a marker row (``pgtenant.tenant_seeds``) so it never runs twice, and migrations skip
what the ledger has. A rerun after a crash at any point completes the tenant; ``tenant
drop`` removes whatever exists. Provisions of different tenants run concurrently (a
per-slug advisory lock serializes two of the same slug); a provision holds the migration
runner's lock in *shared* mode, so a ``migrate apply`` started meanwhile is refused and a
provision waits (up to ``RUNNER_WAIT_S``) for a rollout in progress.

Drop: status 'dropping' (logins refused), tokens revoked (the revocation trigger NOTIFYs
every proxy, which ends the tenant's open sessions at their next transaction), optional
``pg_dump`` (its schema, or its whole database for database per tenant), then its schema (or
database), role, ledger rows, seed marker, and the organization row.

Does not own the files or the rollout (``migrations/``), nor ``tenant create`` (``tenants.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

import asyncpg

from ..config import TenantTypeConfig, parse_dsn
from ..errors import ContextError
from ..identity.context import (
    TenantIdentity,
    build_context,
    default_schema_name,
    quote_ident,
    quote_literal,
    render_template,
)
from . import ControlError
from .audit.gate import AuditGate, describe
from .hardening import fetch_signing_key, sign_context
from .init import grant_role_to_proxy, grant_temp
from .migrations.files import Migration
from .migrations.holds import DEFAULT_DRAIN_TIMEOUT, DEFAULT_HOLD_TTL, Holds
from .migrations.ledger import ADVISORY_LOCK_KEY, install_ledger, install_local_ledger
from .migrations.runner import RolloutOptions, apply_one, make_plan
from .schema import ORG_STATUS_DDL, SLUG_PATTERN
from .tenants import CREATE_LOCK_KEY, _claim_role, _create_schema

__all__ = [
    "RUNNER_WAIT_S",
    "DropResult",
    "ProvisionResult",
    "SeedAs",
    "drop_tenant",
    "provision_tenant",
]

SeedAs = Literal["tenant", "admin"]

# Session advisory lock per slug (key 1 "pgtn", key 2 hashtext(slug)): one provision or
# drop of a tenant at a time; different tenants do not wait for each other.
_SLUG_LOCK_SQL = "SELECT pg_advisory_lock(1886680174, hashtext($1))"
# How long a provision waits for a `migrate apply` in progress before giving up.
RUNNER_WAIT_S = 60
APP_NAME = "pgtenant-provision"
# The run id of a drop's hold in pgtenant.tenant_holds (holds.py): migration runs are
# numbered from 1 (pgtenant.migration_runs.id), so 0 is never a run the ledger ends.
DROP_HOLD_RUN_ID = 0
# A drop's DROP SCHEMA / DROP DATABASE waits at most this long for its lock per attempt,
# and tries this many times (a transaction the drain did not wait for still holds it).
DROP_LOCK_TIMEOUT_MS = 2000
DROP_LOCK_ATTEMPTS = 4

_SEEDS_DDL = (
    "CREATE TABLE IF NOT EXISTS pgtenant.tenant_seeds (target uuid PRIMARY KEY, "
    "checksum text NOT NULL, seeded_at timestamptz NOT NULL DEFAULT now())",
    "REVOKE ALL ON TABLE pgtenant.tenant_seeds FROM PUBLIC",
)


@dataclass(slots=True)
class ProvisionResult:
    """What a provision did, with each phase's wall time in seconds."""

    org_id: UUID
    slug: str
    status: str = "ready"
    resumed: bool = False
    already_ready: bool = False
    applied: list[int] = field(default_factory=list)
    seeded: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Returns: the result as one JSON-able object."""
        return {"org_id": str(self.org_id), "slug": self.slug, "status": self.status,
                "resumed": self.resumed, "already_ready": self.already_ready,
                "applied": self.applied, "seeded": self.seeded,
                "phases": {k: round(v, 4) for k, v in self.phases.items()},
                "seconds": round(self.seconds, 4)}


@dataclass(slots=True)
class DropResult:
    """What a drop removed."""

    slug: str
    found: bool
    revoked_tokens: int = 0
    dumped_to: str | None = None
    dropped: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    # The hold at the proxies (holds.py): proxies asked, drained, seconds waited.
    drain: dict[str, Any] = field(default_factory=dict)


class _Timer:
    def __init__(self, phases: dict[str, float]) -> None:
        self.phases = phases

    def phase(self, name: str) -> _Phase:
        return _Phase(self.phases, name)


class _Phase:
    def __init__(self, phases: dict[str, float], name: str) -> None:
        self.phases, self.name, self.t0 = phases, name, 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.phases[self.name] = self.phases.get(self.name, 0.0) + time.perf_counter() - self.t0


class _Quiet:
    def event(self, kind: str, **fields: Any) -> None:
        """Lock retries are the only events a single-target apply sends; not shown."""


async def _connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APP_NAME},
                                 statement_cache_size=0)
    if conn.get_server_version().major >= 14:
        # A provision killed mid-statement (a slow seed) leaves its backend running and
        # holding the slug's lock until it next writes to the socket; with this check the
        # server notices the dead client within a second, rolls back and frees the lock, so
        # the rerun starts at once.
        await conn.execute("SET client_connection_check_interval = 1000")
    return conn


async def _ensure_status_column(conn: asyncpg.Connection) -> None:
    # ALTER TABLE takes an ACCESS EXCLUSIVE lock even when the column exists: only run it
    # on an install from before the column (and tell them to re-run init for the lookups).
    if not await conn.fetchval(
            "SELECT 1 FROM pg_attribute WHERE attrelid = 'pgtenant.organizations'::regclass "
            "AND attname = 'status' AND NOT attisdropped"):
        await conn.execute(ORG_STATUS_DDL)
    if not await conn.fetchval(
            "SELECT 'status' = ANY(proargnames) FROM pg_proc "
            "WHERE oid = 'pgtenant.resolve_token(bytea)'::regprocedure"):
        raise ControlError("the control schema predates tenant lifecycle: its lookup functions "
                           "do not report a tenant's status, so the proxy would let a tenant "
                           "being provisioned log in; re-run `pgtenant init` first")


def _database_url(admin_dsn: str, dbname: str) -> str:
    return dataclasses.replace(parse_dsn(admin_dsn, key="--dsn"), dbname=dbname).to_url()


async def _runner_shared_lock(conn: asyncpg.Connection) -> None:
    # Shared mode of the runner's lock: provisions coexist, `migrate apply` (exclusive) does
    # not, so a rollout's plan never misses a tenant being built, nor races its ledger rows.
    await conn.execute(f"SET lock_timeout = '{RUNNER_WAIT_S}s'")
    try:
        await conn.execute("SELECT pg_advisory_lock_shared($1, $2)", *ADVISORY_LOCK_KEY)
    except asyncpg.LockNotAvailableError as exc:
        raise ControlError(f"a `pgtenant migrate` run still holds the migration lock after "
                           f"{RUNNER_WAIT_S} s; provision again when it has finished") from exc
    finally:
        await conn.execute("RESET lock_timeout")


async def provision_tenant(
    admin_dsn: str,
    *,
    slug: str,
    tenant_type: TenantTypeConfig,
    migrations: Sequence[Migration],
    proxy_role: str = "pgtenant_proxy",
    schema: str | None = None,
    database: str | None = None,
    other_databases: Mapping[str, str] | None = None,
    template: str | None = None,
    seed_sql: str | None = None,
    seed_as: SeedAs = "tenant",
    opts: RolloutOptions | None = None,
    audit: AuditGate | None = None,
) -> ProvisionResult:
    """Bring a tenant from nothing (or from a crashed provision) to ready.

    ``database``: the ``[databases.<name>]`` it is served from; when that name is in
    ``other_databases`` (name -> admin URL; a database that is not ``admin_dsn``'s) its
    schema, migrations and seed go there, and that database is created first (``CREATE
    DATABASE ... TEMPLATE template`` when given) if it does not exist. ``seed_as``:
    'tenant' runs the seed as the tenant's role under its RLS and privileges (the default:
    a seed can write no other tenant's rows), 'admin' as the admin with the same
    search_path and ``app.*`` settings (for seeds that need more). ``audit``: the gate
    that audits the tenant's schema (or own database) around its migrations; a new error
    raises ControlError listing it, and the tenant stays 'provisioning'.

    Returns: the result with each phase's time.
    Raises: ControlError (bad slug, a tenant of that slug of another type or being dropped,
    an edited migration, pending shared migrations, a failing migration or seed).
    """
    if not re.match(SLUG_PATTERN, slug):
        raise ControlError(f"bad slug {slug!r}: expected {SLUG_PATTERN}")
    opts = opts or RolloutOptions()
    others = dict(other_databases or {})
    started = time.perf_counter()
    result = ProvisionResult(org_id=uuid.UUID(int=0), slug=slug)
    timer = _Timer(result.phases)
    templated_role = "{" in tenant_type.role
    needs_schema = any("{schema}" in t for t in (tenant_type.role, *tenant_type.search_path))
    if schema is not None and not needs_schema:
        raise ControlError(f"tenant type {tenant_type.name!r} has no {{schema}} template; "
                           "do not pass a schema")
    remote_url = others.get(database) if database is not None else None

    conn = await _connect(admin_dsn)
    try:
        with timer.phase("register"):
            await conn.execute(_SLUG_LOCK_SQL, slug)
            await _ensure_status_column(conn)
            row = await conn.fetchrow(
                "SELECT id, tenant_type, schema, database, status FROM pgtenant.organizations "
                "WHERE slug = $1", slug)
            if row is not None:
                if row["status"] == "dropping":
                    raise ControlError(f"tenant {slug!r} is being dropped; finish with "
                                       "`pgtenant tenant drop` first")
                if row["tenant_type"] != tenant_type.name or row["database"] != database or (
                        schema is not None and row["schema"] != schema):
                    raise ControlError(
                        f"tenant {slug!r} already exists as type {row['tenant_type']!r}, "
                        f"schema {row['schema']!r}, database {row['database']!r}")
                org_id, schema = row["id"], row["schema"]
                result.org_id = org_id
                if row["status"] == "ready":
                    result.already_ready = True
                    result.seconds = time.perf_counter() - started
                    return result
                result.resumed = True
            else:
                org_id = uuid.uuid4()
                if needs_schema and schema is None:
                    schema = default_schema_name(slug)
            identity = TenantIdentity(org_id=org_id, slug=slug, tenant_type=tenant_type.name,
                                      token_id=uuid.UUID(int=0), schema=schema,
                                      database=database)
            try:
                context = build_context(identity, tenant_type)
                if schema is not None:
                    schema = render_template("{schema}", identity, what="schema")
            except ContextError as exc:
                raise ControlError(str(exc)) from exc
            result.org_id = org_id
            role = context.role
            if row is None and schema is not None and await _schema_exists(
                    conn, remote_url, schema):
                # Never adopt a schema this provision did not make: it may hold another
                # tenant's data (and `tenant drop` would drop it).
                raise ControlError(f"schema {schema!r} already exists; pass --schema, or "
                                   "drop that schema first")
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *CREATE_LOCK_KEY)
                if row is None:
                    if not templated_role and not await conn.fetchval(
                            "SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                        raise ControlError(
                            f"unknown tenant type {tenant_type.name!r}: role {role!r} does "
                            "not exist; run `pgtenant init` with this tenant type first")
                    await conn.execute(
                        "INSERT INTO pgtenant.organizations (id, slug, tenant_type, schema, "
                        "database, status) VALUES ($1, $2, $3, $4, $5, 'provisioning')",
                        org_id, slug, tenant_type.name, schema, database)
                if templated_role:
                    await _claim_role(conn, role, slug)
                    await grant_role_to_proxy(conn, role, proxy_role)

        if remote_url is not None:
            with timer.phase("database"):
                await _ensure_database(conn, remote_url, template)

        target = conn if remote_url is None else await _connect(remote_url)
        try:
            with timer.phase("schema"):
                if target is not conn:
                    await install_local_ledger(target)  # also its pgtenant schema
                async with target.transaction():
                    await target.execute("SELECT pg_advisory_xact_lock($1, $2)",
                                         *CREATE_LOCK_KEY)
                    if templated_role:
                        await target.execute(f"GRANT USAGE ON SCHEMA public TO "
                                             f"{quote_ident(role)}")
                    await grant_temp(target, role, tenant_type)  # TEMP is per database
                    if schema is not None:
                        exists = await target.fetchval(
                            "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
                        if not exists:
                            await _create_schema(target, schema, role)
                    # Under the lock: concurrent CREATE TABLE IF NOT EXISTS of one table
                    # can fail on pg_type's unique index.
                    if not await target.fetchval(
                            "SELECT to_regclass('pgtenant.tenant_seeds') IS NOT NULL"):
                        for stmt in _SEEDS_DDL:
                            await target.execute(stmt)

            # Its schema; or, in a database of its own without one, that whole database.
            audited = audit is not None and (schema is not None or remote_url is not None)
            scope = {database if remote_url is not None else None:
                     [schema] if schema is not None else None}
            if audit is not None and audited:
                with timer.phase("audit"):
                    audit.own_schemas.update(s for s in (schema,) if s is not None)
                    await _audit(audit.before(scope), slug)

            with timer.phase("migrate"):
                result.applied = await _migrate(conn, target, org_id, slug, migrations,
                                                others, opts)

            if audit is not None and audited:
                with timer.phase("audit"):
                    db, schemas = next(iter(scope.items()))
                    found = await _audit(audit.check(schemas, database=db), slug)
                    if found:
                        raise ControlError(
                            f"tenant {slug}: the audit after its migrations found "
                            f"{len(found)} new error(s); it stays in status 'provisioning' "
                            "(logins refused): fix them in a new migration and provision "
                            "again, accept them in [audit] baseline, or `tenant drop` it:\n  "
                            + "\n  ".join(describe(found)))

            with timer.phase("grant"):
                if schema is not None and templated_role:
                    s, r = quote_ident(schema), quote_ident(role)
                    # Tables a migration created as another owner miss the default
                    # privileges; the tenant's role needs DML on all of its schema.
                    await target.execute(
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} "
                        f"TO {r}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {r}")

            if seed_sql is not None:
                with timer.phase("seed"):
                    result.seeded = await _seed(target, org_id, context, seed_sql, seed_as)

            with timer.phase("ready"):
                await conn.execute("UPDATE pgtenant.organizations SET status = 'ready' "
                                   "WHERE id = $1", org_id)
        finally:
            if target is not conn:
                await target.close()
    finally:
        await conn.close()  # also releases the session advisory locks
    result.seconds = time.perf_counter() - started
    return result


_A = TypeVar("_A")


async def _audit(step: Awaitable[_A], slug: str) -> _A:
    try:
        return await step
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise ControlError(f"tenant {slug}: the audit could not run: {exc} (--no-audit "
                           "skips it)") from exc


async def _schema_exists(conn: asyncpg.Connection, remote_url: str | None,
                         schema: str) -> bool:
    if remote_url is None:
        return bool(await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1",
                                        schema))
    if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1",
                               parse_dsn(remote_url).dbname):
        return False
    remote = await _connect(remote_url)
    try:
        return bool(await remote.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1",
                                          schema))
    finally:
        await remote.close()


async def _ensure_database(conn: asyncpg.Connection, remote_url: str,
                           template: str | None) -> None:
    dbname = parse_dsn(remote_url).dbname
    if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname):
        return
    sql = f"CREATE DATABASE {quote_ident(dbname)}"
    if template is not None:
        # CREATE DATABASE copies the template at file level: a template holding the schema
        # at the latest migration makes a tenant's database ready in the time of a copy.
        sql += f" TEMPLATE {quote_ident(template)}"
    try:
        await conn.execute(sql)
    except asyncpg.DuplicateDatabaseError:
        pass  # a concurrent or crashed provision got there first


async def _migrate(conn: asyncpg.Connection, target: asyncpg.Connection, org_id: UUID,
                   slug: str, migrations: Sequence[Migration], others: Mapping[str, str],
                   opts: RolloutOptions) -> list[int]:
    await install_ledger(conn)
    await _runner_shared_lock(conn)
    try:
        plan = await make_plan(conn, migrations, other_databases=others)
        if plan.edited:
            raise ControlError("; ".join(plan.edited))
        shared = [t for t in plan.targets if t.row.target == uuid.UUID(int=0) and t.pending]
        if shared:
            raise ControlError(
                "shared migrations are pending (" + ", ".join(
                    m.filename for m in shared[0].pending) + "); tenant files may depend on "
                "them: run `pgtenant migrate apply` first")
        mine = next((t for t in plan.targets if t.row.target == org_id), None)
        if mine is None or not mine.pending:
            return []
        if target is not conn:
            await install_local_ledger(target)
        run_id: int = await conn.fetchval(
            "INSERT INTO pgtenant.migration_runs (kind, status, args, pid, host) "
            "VALUES ('apply', 'running', $1::jsonb, $2, $3) RETURNING id",
            json.dumps({"provision": slug}), os.getpid(), os.uname().nodename)
        try:
            await apply_one(target, conn, run_id, mine, opts, _Quiet())
        except BaseException:
            await conn.execute("UPDATE pgtenant.migration_runs SET status = 'failed', "
                               "finished_at = now() WHERE id = $1", run_id)
            raise
        await conn.execute("UPDATE pgtenant.migration_runs SET status = 'done', "
                           "finished_at = now() WHERE id = $1", run_id)
        return [m.version for m in mine.pending]
    finally:
        await conn.execute("SELECT pg_advisory_unlock_shared($1, $2)", *ADVISORY_LOCK_KEY)


async def _seed(target: asyncpg.Connection, org_id: UUID, context: Any, seed_sql: str,
                seed_as: SeedAs) -> bool:
    checksum = hashlib.sha256(seed_sql.encode()).hexdigest()
    async with target.transaction():
        # The marker commits with the seed: a crash mid-seed rolls both back (rerun seeds),
        # a crash after leaves the marker (rerun skips).
        done = await target.fetchval(
            "SELECT checksum FROM pgtenant.tenant_seeds WHERE target = $1 FOR UPDATE", org_id)
        if done is not None:
            return False
        path = ", ".join(quote_ident(s) for s in context.search_path) or "''"
        gucs = dict(context.gucs)
        settings = [f"SET LOCAL search_path = {path}"]
        settings += [f"SET LOCAL {name} = {quote_literal(value)}"
                     for name, value in gucs.items()]
        key = await fetch_signing_key(target)
        if key is not None:
            # The signed context, as the proxy sets it: shared tables' RLS policies call
            # pgtenant.current_tenant(), which trusts app.tenant_id only when signed.
            sig = sign_context(key, gucs["app.tenant_id"], gucs["app.tenant_type"],
                               gucs.get("app.entity_id", ""))
            settings.append(f"SET LOCAL app.tenant_sig = {quote_literal(sig)}")
        await target.execute("; ".join(settings))
        if seed_as == "tenant":
            await target.execute(f"SET LOCAL ROLE {quote_ident(context.role)}")
        try:
            await target.execute(seed_sql)
        except asyncpg.PostgresError as exc:
            raise ControlError(f"seed failed for tenant {context.identity.slug}: {exc} "
                               f"(SQLSTATE {exc.sqlstate}); nothing of it was kept") from exc
        if seed_as == "tenant":
            await target.execute("RESET ROLE")
        await target.execute("INSERT INTO pgtenant.tenant_seeds (target, checksum) "
                             "VALUES ($1, $2)", org_id, checksum)
    return True


async def drop_tenant(admin_dsn: str, *, slug: str, tenant_type: TenantTypeConfig | None,
                      other_databases: Mapping[str, str] | None = None,
                      dump: Path | None = None, hold_drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                      hold_ttl: float = DEFAULT_HOLD_TTL, listener_user: str | None = None,
                      lock_timeout_ms: int = DROP_LOCK_TIMEOUT_MS,
                      lock_attempts: int = DROP_LOCK_ATTEMPTS) -> DropResult:
    """Remove a tenant: refuse its logins, drain it at the proxies, revoke its tokens, dump
    it, drop its objects.

    Drain: once its status is 'dropping', the tenant is held at every proxy
    (migrations/holds.py, run id ``DROP_HOLD_RUN_ID``): its new transactions wait there, and
    the drop waits (up to ``hold_drain_timeout``) until every proxy reports that the tenant's
    running transactions ended, so the ``DROP`` gets its lock at once instead of queueing
    behind them. Only then are its tokens revoked (which ends its sessions, the held ones
    too: a revocation ends a session even inside a transaction, so revoking first would cut
    the running transactions). The drops run with ``lock_timeout_ms`` (``lock_attempts``
    tries); the hold is released at the end, also on failure.

    Idempotent: an unknown slug returns ``found=False``; a drop that crashed is finished.
    ``tenant_type`` (its config entry) tells whether its role is its own (templated) and
    may be dropped; None (a type no longer configured): the role is left alone.
    Returns: what was removed.
    Raises: ControlError when pg_dump fails (nothing is dropped then) or is asked for a
    shared-schema tenant (it has nothing of its own to dump).
    """
    others = dict(other_databases or {})
    result = DropResult(slug=slug, found=False)
    timer = _Timer(result.phases)
    conn = await _connect(admin_dsn)
    try:
        await conn.execute(_SLUG_LOCK_SQL, slug)
        await _ensure_status_column(conn)
        row = await conn.fetchrow(
            "SELECT id, tenant_type, schema, database FROM pgtenant.organizations "
            "WHERE slug = $1", slug)
        if row is None:
            return result
        result.found = True
        org_id, schema, database = row["id"], row["schema"], row["database"]
        remote_url = others.get(database) if database is not None else None
        own_database = remote_url is not None and schema is None and not await conn.fetchval(
            "SELECT 1 FROM pgtenant.organizations WHERE database = $1 AND id <> $2",
            database, org_id)
        if dump is not None and schema is None and not own_database:
            raise ControlError(f"tenant {slug!r} has no schema or database of its own to dump "
                               "(a shared-schema type): dump its rows with your own query; "
                               "nothing was changed")
        with timer.phase("refuse"):
            # Status first: new logins are refused from here on (57P03).
            await conn.execute("UPDATE pgtenant.organizations SET status = 'dropping' "
                               "WHERE id = $1", org_id)
        async with Holds(admin_dsn, DROP_HOLD_RUN_ID, ttl=hold_ttl,
                         drain_timeout=hold_drain_timeout,
                         listener_user=listener_user) as holds:
            with timer.phase("drain"):
                # The tenant's new transactions now wait in the proxies; its running ones
                # finish (up to hold_drain_timeout). The hold is released on exit.
                result.drain = await holds.hold(org_id)
            with timer.phase("revoke"):
                # Then the tokens: the trigger NOTIFYs every proxy, which ends the tenant's
                # sessions, the held ones too (their transactions never ran). Revoking
                # before the drain would cut the running transactions instead of waiting.
                result.revoked_tokens = int((await conn.execute(
                    "UPDATE pgtenant.tokens SET revoked_at = now() "
                    "WHERE org_id = $1 AND revoked_at IS NULL", org_id)).split()[-1])
            await _dump_and_drop(conn, org_id, slug, row["tenant_type"], schema, database,
                                 tenant_type, remote_url, own_database, admin_dsn, dump,
                                 result, timer, lock_timeout_ms, max(1, lock_attempts))
    finally:
        await conn.close()
    return result


async def _dump_and_drop(conn: asyncpg.Connection, org_id: UUID, slug: str, type_name: str,
                         schema: str | None, database: str | None,
                         tenant_type: TenantTypeConfig | None, remote_url: str | None,
                         own_database: bool, admin_dsn: str, dump: Path | None,
                         result: DropResult, timer: _Timer, lock_timeout_ms: int,
                         lock_attempts: int) -> None:
    target_url = remote_url or admin_dsn
    if dump is not None:
        with timer.phase("dump"):
            await _pg_dump(target_url, schema, dump)
            result.dumped_to = str(dump)
    role: str | None = None
    if tenant_type is not None and "{" in tenant_type.role:
        identity = TenantIdentity(org_id=org_id, slug=slug, tenant_type=type_name,
                                  token_id=uuid.UUID(int=0), schema=schema,
                                  database=database)
        try:
            role = build_context(identity, tenant_type).role
        except ContextError:
            role = None
    with timer.phase("drop"):
        if own_database and remote_url is not None:
            dbname = parse_dsn(remote_url).dbname
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname):
                await _with_lock_timeout(
                    conn, lock_timeout_ms, lock_attempts,
                    f"DROP DATABASE IF EXISTS {quote_ident(dbname)} WITH (FORCE)")
                result.dropped.append(f"database {dbname}")
        else:
            target = conn if remote_url is None else await _connect(remote_url)
            try:
                await _drop_in(target, org_id, schema, role, result,
                               lock_timeout_ms, lock_attempts)
            finally:
                if target is not conn:
                    await target.close()
        if role is not None and await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await conn.execute(f"DROP OWNED BY {quote_ident(role)}")
            await conn.execute(f"DROP ROLE {quote_ident(role)}")
            result.dropped.append(f"role {role}")
        for table in ("pgtenant.tenant_seeds", "pgtenant.schema_versions"):
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                await conn.execute(f"DELETE FROM {table} WHERE target = $1", org_id)
        await conn.execute("DELETE FROM pgtenant.organizations WHERE id = $1", org_id)
        result.dropped.append(f"organization {slug}")


async def _with_lock_timeout(conn: asyncpg.Connection, lock_timeout_ms: int, attempts: int,
                             sql: str) -> None:
    """Run ``sql`` with ``lock_timeout``; a lock timeout (55P03) is retried with backoff.

    Raises: ControlError after the last attempt timed out (nothing of ``sql`` was done).
    """
    for attempt in range(1, attempts + 1):
        await conn.execute(f"SET lock_timeout = {int(lock_timeout_ms)}")
        try:
            await conn.execute(sql)
            return
        except asyncpg.LockNotAvailableError as exc:
            if attempt == attempts:
                raise ControlError(
                    f"{sql.split(' CASCADE')[0]}: still locked after {attempts} tries of "
                    f"{lock_timeout_ms} ms (a long transaction of the tenant?); drop again "
                    "later (the tenant stays refused)") from exc
            await asyncio.sleep(min(0.2 * 2 ** attempt, 2.0))
        finally:
            await conn.execute("RESET lock_timeout")


async def _drop_in(target: asyncpg.Connection, org_id: UUID, schema: str | None,
                   role: str | None, result: DropResult,
                   lock_timeout_ms: int = DROP_LOCK_TIMEOUT_MS,
                   lock_attempts: int = DROP_LOCK_ATTEMPTS) -> None:
    if schema is not None and await target.fetchval(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
        await _with_lock_timeout(target, lock_timeout_ms, lock_attempts,
                                 f"DROP SCHEMA {quote_ident(schema)} CASCADE")
        result.dropped.append(f"schema {schema}")
    for table in ("pgtenant.tenant_seeds", "pgtenant.schema_versions"):
        if await target.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            await target.execute(f"DELETE FROM {table} WHERE target = $1", org_id)
    if role is not None and await target.fetchval(
            "SELECT 1 FROM pg_roles WHERE rolname = $1", role):
        # Its grants and default privileges in this database (a role with any left cannot
        # be dropped); the role itself is cluster-wide and dropped by the caller.
        await target.execute(f"DROP OWNED BY {quote_ident(role)}")


async def _pg_dump(url: str, schema: str | None, dump: Path) -> None:
    args = ["pg_dump", "--no-owner", "--file", str(dump)]
    if schema is not None:
        args += ["--schema", schema]
    dsn = parse_dsn(url)
    env = dict(os.environ)
    if dsn.password:
        env["PGPASSWORD"] = dsn.password  # not on the command line, where ps shows it
    args += ["--dbname", dataclasses.replace(dsn, password=None).to_url()]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError as exc:
        raise ControlError("--dump needs pg_dump on PATH (postgresql-client)") from exc
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise ControlError(f"pg_dump failed ({proc.returncode}): {err.decode().strip()}; "
                           "nothing was dropped (the tenant stays 'dropping', its tokens "
                           "revoked); fix and drop again")

