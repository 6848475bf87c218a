"""The migration runner: apply (canaries, waves, concurrency) and rollback.

Theory of operation. ``plan.make_plan`` reads the whole fleet in one catalog query and
compares it with the files (re-exported here with ``Plan``, ``TargetPlan`` and ``status``,
what callers of the runner use). ``apply`` takes a session advisory
lock (a second runner is refused at once, naming the run in progress), opens a run, and
rolls out: the ``:shared`` target first (a failure stops everything), then the canary slugs
(a failing canary stops everything), then the other tenants smallest first in waves of
``wave_size``, ``concurrency`` at once per database server (host:port), stopping once
``max_failures`` tenants failed (running ones finish; none start). Each tenant's pending
files run in ONE transaction with ``SET LOCAL search_path`` = the tenant's schema,
``lock_timeout`` and ``statement_timeout``, and its ledger rows are written in that same
transaction: a tenant is either at its old version or at the new one, never between, and a
kill -9 at any moment leaves nothing a rerun would apply twice. A ``transaction=off`` file
runs alone, outside a transaction, after the files before it committed. A lock timeout
(55P03) is retried with backoff. With ``opts.audit`` (``audit/gate.py``), the audit runs
before the rollout and after each wave on what it migrated; a new error stops the rollout
like a failed wave (event ``audit_failed``, run status 'stopped' or 'failed').

Owns the rollout policy and the per-target SQL execution. Does not own the files
(``files.py``), the ledger DDL (``ledger.py``), or how events are shown (``progress.py``).
Database per tenant: an organization whose ``database`` names another ``[databases.*]``
is migrated in that database (admin URL: ``--dsn``'s credentials with that database's
name), in its schema if it has one, else in that database's default search_path. Its DDL
and its ledger row commit together in *that* database's ``pgtenant.schema_versions`` (the
truth ``plan`` reads); the control database's copy and log follow right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeAlias, TypeVar
from uuid import UUID

import asyncpg

from ...config import parse_dsn
from ...errors import ConfigError
from ...identity.context import quote_ident
from .. import ControlError
from .files import Migration, split_statements
from .holds import DEFAULT_DRAIN_TIMEOUT, DEFAULT_HOLD_TTL, Holds, clear_stale_holds
from .ledger import (
    ADVISORY_LOCK_KEY,
    APP_NAME_PREFIX,
    SHARED_TARGET,
    fetch_fleet,
    finish_run,
    install_ledger,
    install_local_ledger,
    running_run,
    start_run,
)
from .plan import Plan, TargetPlan, make_plan, status

# A plain connection or one lent by the run's pool.
Conn: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_MS",
    "DEFAULT_STATEMENT_TIMEOUT_MS",
    "Plan",
    "Reporter",
    "RolloutOptions",
    "RunSummary",
    "TargetPlan",
    "WaveAudit",
    "apply",
    "apply_one",
    "make_plan",
    "rollback",
    "status",
]

# Defaults a team can live with: a DDL that cannot get its lock in 2 s gives up (and is
# retried) instead of queueing every query of the table behind it; one that runs 5 min on
# one tenant is not the "small change" a fleet-wide rollout is for.
DEFAULT_LOCK_TIMEOUT_MS = 2_000
DEFAULT_STATEMENT_TIMEOUT_MS = 300_000
LOCK_RETRIES = 3
LOCK_BACKOFF_S = 0.5


class WaveAudit(Protocol):
    """The audit of ``apply`` (``audit/gate.py``'s ``MigrateAudit``): ``before`` the rollout
    changes anything, and after each wave on the targets it migrated."""

    async def before(self, targets: Sequence[TargetPlan]) -> None:
        """Remember what the audit finds before the rollout (errors already there)."""

    async def after_wave(self, wave: str, targets: Sequence[TargetPlan]) -> list[str]:
        """Returns: one line per new audit error (none: the rollout goes on)."""
        return []


class Reporter(Protocol):
    """Receives the run's events (``progress.py`` shows them)."""

    def event(self, kind: str, **fields: Any) -> None:
        """One event: run_started, wave_started, target_done, target_failed, retry,
        stopped, run_finished."""


@dataclass(frozen=True, slots=True)
class RolloutOptions:
    """How ``apply``/``rollback`` roll out over the fleet."""

    canary: tuple[str, ...] = ()
    # Also this share of the tenants as canaries, spread evenly over the size order (the
    # smallest, the biggest and between), so the canary wave sees the fleet's shapes.
    canary_percent: float = 0.0
    wave_size: int = 50
    concurrency: int = 4
    max_failures: int = 1
    pause: float = 0.0
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS
    lock_retries: int = LOCK_RETRIES
    # Tenant holds (holds.py): proxies hold a tenant's new transactions while its DDL runs.
    hold: bool = True
    hold_ttl: float = DEFAULT_HOLD_TTL
    hold_drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    # the role proxies' listeners log in as ([control] dsn's user); None: any
    listener_user: str | None = None
    # apply only: audited after each wave; a new error stops the rollout (None: no audit)
    audit: WaveAudit | None = None

    def check(self) -> None:
        """Raises: ControlError for a value out of range."""
        for name in ("wave_size", "concurrency", "max_failures", "lock_timeout_ms",
                     "statement_timeout_ms"):
            if getattr(self, name) < 1:
                raise ControlError(f"{name.replace('_', '-')}: must be at least 1")
        if not 0 <= self.canary_percent <= 100:
            raise ControlError("canary-percent: must be between 0 and 100")
        if self.pause < 0 or self.lock_retries < 0:
            raise ControlError("pause and lock retries must not be negative")
        if self.hold_ttl <= 0 or self.hold_drain_timeout < 0:
            raise ControlError("hold-ttl must be positive, hold-drain-timeout not negative")


@dataclass(slots=True)
class RunSummary:
    """How a run ended."""

    run_id: int
    status: str  # done | failed | stopped | nothing
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # slug -> reason
    not_started: list[str] = field(default_factory=list)
    seconds: float = 0.0
    audit: list[str] = field(default_factory=list)  # the new audit errors that stopped it


class _Failed(Exception):
    def __init__(self, mig: Migration | None, statement: str, exc: BaseException) -> None:
        self.mig, self.statement, self.exc = mig, statement, exc
        self.sqlstate = getattr(exc, "sqlstate", None)
        super().__init__(str(exc))

    def describe(self, slug: str) -> str:
        where = self.mig.filename if self.mig is not None else "?"
        stmt = " ".join(self.statement.split())[:160]
        return (f"tenant {slug}: {where}: {self.exc} (SQLSTATE {self.sqlstate}) "
                f"in statement: {stmt}")


def _groups(pending: Sequence[Migration]) -> list[list[Migration]]:
    # Consecutive transactional files share one transaction; transaction=off files run alone.
    out: list[list[Migration]] = []
    for mig in pending:
        if mig.transactional and out and out[-1][0].transactional:
            out[-1].append(mig)
        else:
            out.append([mig])
    return out


def _settings_sql(schema: str | None, opts: RolloutOptions, *, local: bool) -> str:
    scope = "LOCAL " if local else ""
    parts = [f"SET {scope}lock_timeout = {opts.lock_timeout_ms}",
             f"SET {scope}statement_timeout = {opts.statement_timeout_ms}"]
    if schema is not None:
        # The tenant's schema alone: an unqualified name can never reach a shared table.
        parts.append(f"SET {scope}search_path = {quote_ident(schema)}")
    return "; ".join(parts)


_LOG_SQL = """
INSERT INTO pgtenant.migration_log (run_id, target, tenant, version, checksum, status,
    started_at, finished_at, duration_ms, error, sqlstate, statement)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
"""


async def _run_statements(conn: Conn, mig: Migration, sql: str) -> None:
    for stmt in split_statements(sql):
        try:
            await conn.execute(stmt)
        except asyncpg.PostgresError as exc:
            raise _Failed(mig, stmt, exc) from exc


async def _apply_group(conn: Conn, central: Conn, run_id: int, target: TargetPlan,
                       group: list[Migration], opts: RolloutOptions) -> None:
    row = target.row
    timings: list[tuple[Migration, datetime, datetime, float]] = []

    async def run_all() -> None:
        for mig in group:
            started, t0 = datetime.now(UTC), time.perf_counter()
            await _run_statements(conn, mig, mig.up)
            timings.append((mig, started, datetime.now(UTC),
                            (time.perf_counter() - t0) * 1000))

    versions = [(row.target, m.version, m.name, m.checksum, run_id) for m in group]

    async def record() -> None:
        await conn.executemany(_VERSION_SQL, versions)
        if conn is central:
            await conn.executemany(_LOG_SQL, [
                (run_id, row.target, row.slug, m.version, m.checksum, "applied", s, f, ms,
                 None, None, None) for m, s, f, ms in timings])

    async def mirror() -> None:
        # Another database: its own ledger (written above, with the DDL) is the truth; the
        # central copy follows after its commit (a crash in between: plan reads the local
        # one, so nothing runs twice; only status' last error and rollback lag behind).
        if conn is not central:
            await central.executemany(_VERSION_SQL + " ON CONFLICT DO NOTHING", versions)
            await central.executemany(_LOG_SQL, [
                (run_id, row.target, row.slug, m.version, m.checksum, "applied", s, f, ms,
                 None, None, None) for m, s, f, ms in timings])

    if group[0].transactional:
        async with conn.transaction():
            await conn.execute(_settings_sql(row.schema, opts, local=True))
            await run_all()
            await record()  # same transaction as the DDL: all of it or none
        await mirror()
        return
    # transaction=off: the file alone, then its ledger rows. A kill between the two reruns
    # the file, which is why plan asks such files to be idempotent.
    await conn.execute(_settings_sql(row.schema, opts, local=False))
    try:
        await run_all()
        await record()
    finally:
        await conn.execute("RESET ALL")
    await mirror()


_VERSION_SQL = ("INSERT INTO pgtenant.schema_versions (target, version, name, checksum, run_id) "
                "VALUES ($1, $2, $3, $4, $5)")
_UNVERSION_SQL = "DELETE FROM pgtenant.schema_versions WHERE target = $1 AND version = $2"


async def _rollback_group(conn: Conn, central: Conn, run_id: int, target: TargetPlan,
                          group: list[Migration], opts: RolloutOptions) -> None:
    row = target.row
    logs: list[tuple[Any, ...]] = []

    async def run_all() -> None:
        for mig in group:
            started, t0 = datetime.now(UTC), time.perf_counter()
            assert mig.down is not None
            await _run_statements(conn, mig, mig.down)
            await conn.execute(_UNVERSION_SQL, row.target, mig.version)
            logs.append((run_id, row.target, row.slug, mig.version, mig.checksum,
                         "rolled_back", started, datetime.now(UTC),
                         (time.perf_counter() - t0) * 1000, None, None, None))
            if conn is central:
                await conn.execute(_LOG_SQL, *logs[-1])

    async def mirror() -> None:
        if conn is not central:
            for log in logs:
                await central.execute(_UNVERSION_SQL, row.target, log[3])
                await central.execute(_LOG_SQL, *log)

    if group[0].transactional:
        async with conn.transaction():
            await conn.execute(_settings_sql(row.schema, opts, local=True))
            await run_all()
        await mirror()
        return
    # the down of a transaction=off file (DROP INDEX CONCURRENTLY) runs alone too
    await conn.execute(_settings_sql(row.schema, opts, local=False))
    try:
        await run_all()
    finally:
        await conn.execute("RESET ALL")
    await mirror()


async def _record_failure(conn: Conn, run_id: int, target: TargetPlan,
                          failure: _Failed, started: datetime) -> None:
    mig = failure.mig or target.pending[0]
    finished = datetime.now(UTC)
    try:
        await conn.execute(
            _LOG_SQL, run_id, target.row.target, target.slug, mig.version, mig.checksum,
            "failed", started, finished, (finished - started).total_seconds() * 1000,
            str(failure.exc), failure.sqlstate, failure.statement[:2000],
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        pass  # the ledger still shows the tenant at its old version; the event says why


Work = Callable[[Conn, Conn, TargetPlan], Awaitable[None]]  # (target's db, control db, ..)


@contextlib.asynccontextmanager
async def _held(holds: Holds | None, target: TargetPlan,
                reporter: Reporter) -> AsyncIterator[None]:
    # The tenant's new transactions wait in every proxy while its DDL runs (holds.py); the
    # hold covers the lock-timeout retries too, and ends whether the tenant commits or fails.
    if holds is None or target.row.target == SHARED_TARGET:
        yield
        return
    try:
        drained = await holds.hold(target.row.target)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise _Failed(None, "(hold the tenant at the proxies)", exc) from exc
    reporter.event("held", tenant=target.slug, **drained)
    try:
        yield
    finally:
        await holds.release(target.row.target)


@contextlib.asynccontextmanager
async def _run_holds(admin_dsn: str, run_id: int,
                     opts: RolloutOptions) -> AsyncIterator[Holds | None]:
    if not opts.hold:
        yield None
        return
    async with Holds(admin_dsn, run_id, ttl=opts.hold_ttl,
                     drain_timeout=opts.hold_drain_timeout,
                     listener_user=opts.listener_user) as holds:
        yield holds


async def _retry_locks(target: TargetPlan, opts: RolloutOptions, reporter: Reporter,
                       step: Callable[[], Awaitable[None]]) -> None:
    # Per transaction, not per tenant: a step that committed is never run again.
    attempt = 0
    while True:
        try:
            await step()
            return
        except _Failed as failure:
            if not isinstance(failure.exc, asyncpg.LockNotAvailableError) \
                    or attempt >= opts.lock_retries:
                raise
            attempt += 1
            delay = LOCK_BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random())
            reporter.event("retry", tenant=target.slug, attempt=attempt,
                           delay=round(delay, 2), reason=str(failure.exc))
            await asyncio.sleep(delay)


def _server_key(url: str) -> str:
    """Returns: ``host:port`` of the database server ``url`` reaches (the unit of
    ``--concurrency``); the URL itself when it cannot be parsed."""
    try:
        dsn = parse_dsn(url)
    except ConfigError:
        return url
    return f"{dsn.host}:{dsn.port}"


def _servers(admin_dsn: str, others: Mapping[str, str]) -> dict[str | None, str]:
    """Returns: database (None: the control database, else a ``[databases.*]`` name) ->
    the server key of the URL the runner uses for it. Today every other database is
    reached with ``--dsn``'s host and port, so they all share one key."""
    return {None: _server_key(admin_dsn),
            **{name: _server_key(url) for name, url in others.items()}}


_T = TypeVar("_T")


async def _run_wave(wave: Sequence[_T], server_of: Callable[[_T], str], concurrency: int,
                    run_one: Callable[[_T], Awaitable[None]], stop: list[str]) -> list[_T]:
    """Run one wave with at most ``concurrency`` targets at once *per server*.

    The wave is split by server (order kept, so smallest first still holds within each
    server), and each server gets ``min(concurrency, its targets)`` workers pulling from its
    own queue. With one server this is exactly one queue and ``concurrency`` workers. A
    worker starts no new target once ``stop`` is non-empty (``run_one`` fills it); running
    ones finish.
    Returns: the targets never started, in wave order.
    """
    queues: dict[str, list[_T]] = {}
    for target in wave:
        queues.setdefault(server_of(target), []).append(target)
    for queue in queues.values():
        queue.reverse()  # pop() takes them in wave order

    async def worker(queue: list[_T]) -> None:
        while queue and not stop:
            await run_one(queue.pop())

    await asyncio.gather(*(worker(queue) for queue in queues.values()
                           for _ in range(min(concurrency, len(queue)))))
    left = {id(t) for queue in queues.values() for t in queue}
    return [t for t in wave if id(t) in left]


async def _rollout(pools: Mapping[str | None, asyncpg.Pool], run_id: int,
                   targets: list[TargetPlan],
                   opts: RolloutOptions, reporter: Reporter, work: Work, *,
                   shared_first: bool, servers: Mapping[str | None, str],
                   audit: WaveAudit | None = None) -> RunSummary:
    # servers: target.remote (None: the control database) -> its server key (_servers)
    summary = RunSummary(run_id=run_id, status="done")
    started = time.perf_counter()
    shared = [t for t in targets if t.row.target == SHARED_TARGET]
    tenants = [t for t in targets if t.row.target != SHARED_TARGET]
    by_slug = {t.slug: t for t in tenants}
    by_size = sorted(tenants, key=lambda t: (t.row.size, t.slug))
    chosen = [s for s in opts.canary if s in by_slug]
    if opts.canary_percent and by_size:
        count = min(len(by_size), max(1, round(len(by_size) * opts.canary_percent / 100)))
        step = (len(by_size) - 1) / max(count - 1, 1)
        for i in range(count):
            slug = by_size[round(i * step)].slug
            if slug not in chosen:
                chosen.append(slug)
    canaries = [by_slug[s] for s in chosen]
    rest = [t for t in by_size if t.slug not in chosen]  # biggest tenants last
    waves: list[tuple[str, list[TargetPlan]]] = []
    if shared and shared_first:
        waves.append(("shared", shared))
    if canaries:
        waves.append(("canary", canaries))
    for i in range(0, len(rest), opts.wave_size):
        waves.append((f"wave {len(waves) + 1}", rest[i:i + opts.wave_size]))
    if shared and not shared_first:
        waves.append(("shared", shared))
    reporter.event("run_started", run_id=run_id, targets=len(targets), waves=len(waves),
                   wave_names=[name for name, _ in waves])
    async def one(target: TargetPlan) -> None:
        t_started = datetime.now(UTC)
        t0 = time.perf_counter()
        async with contextlib.AsyncExitStack() as stack:
            # the control database's connection (ledger, failure rows) and, for a tenant
            # in another database, that database's; one worker holds at most one of each
            conn = central = await stack.enter_async_context(pools[None].acquire())
            try:
                try:
                    if target.remote is not None:
                        conn = await stack.enter_async_context(pools[target.remote].acquire())
                    await work(conn, central, target)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    # the ledger insert (e.g. another runner's orphan got there first) or
                    # a lost connection: the transaction did not commit
                    raise _Failed(None, "", exc) from exc
            except _Failed as failure:
                await _record_failure(central, run_id, target, failure, t_started)
                summary.failed[target.slug] = failure.describe(target.slug)
                reporter.event(
                    "target_failed", tenant=target.slug,
                    file=failure.mig.filename if failure.mig else None,
                    statement=" ".join(failure.statement.split())[:500],
                    sqlstate=failure.sqlstate, error=str(failure.exc),
                    message=failure.describe(target.slug))
                return
        summary.done.append(target.slug)
        reporter.event("target_done", tenant=target.slug,
                       versions=[m.version for m in target.pending],
                       seconds=round(time.perf_counter() - t0, 4))

    stop: list[str] = []  # the reason, once the rollout must not start anyone else

    async def run_one(name: str, target: TargetPlan) -> None:
        await one(target)
        if name in ("shared", "canary") and summary.failed:
            stop.append(f"{name} failed: no other tenant is touched")
        elif len(summary.failed) >= opts.max_failures:
            stop.append(f"max-failures reached ({len(summary.failed)} failed)")

    for index, (name, wave) in enumerate(waves):
        if stop:
            summary.not_started.extend(t.slug for t in wave)
            continue
        if index and opts.pause and name.startswith("wave"):
            await asyncio.sleep(opts.pause)
        reporter.event("wave_started", wave=name, index=index + 1, size=len(wave))
        before = len(summary.done)
        left = await _run_wave(wave, lambda t: servers[t.remote], opts.concurrency,
                               functools.partial(run_one, name), stop)
        migrated = set(summary.done[before:])
        if audit is not None and migrated:
            problems = await audit.after_wave(name, [t for t in wave if t.slug in migrated])
            if problems:
                summary.audit.extend(problems)
                reporter.event("audit_failed", wave=name, findings=problems)
                stop.append(f"audit after {name}: {len(problems)} new error(s)")
        if stop:
            summary.not_started.extend(t.slug for t in left)
            reporter.event("stopped", reason=stop[0], not_started=len(left))
    if summary.failed or summary.audit:
        summary.status = "stopped" if summary.not_started else "failed"
    summary.seconds = time.perf_counter() - started
    return summary


async def _locked_run(admin_dsn: str, kind: str, args: dict[str, Any],
                      body: Callable[[asyncpg.Connection, int], Awaitable[RunSummary]]
                      ) -> RunSummary:
    lock_conn = await asyncpg.connect(admin_dsn)
    try:
        await install_ledger(lock_conn)
        if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1, $2)",
                                        *ADVISORY_LOCK_KEY):
            info = await running_run(lock_conn)
            held = info.describe() if info is not None else "a run that has not started yet"
            raise ControlError(f"another migration runner is active: {held}; "
                               "wait for it or stop it (its run resumes on the next apply)")
        run_id = await start_run(lock_conn, kind, args)
        # an interrupted run's holds: expired already or soon, but release them now
        await clear_stale_holds(lock_conn)
        try:
            summary = await body(lock_conn, run_id)
        except BaseException:
            await finish_run(lock_conn, run_id, "failed")
            raise
        await finish_run(lock_conn, run_id, summary.status)
        return summary
    finally:
        await lock_conn.close()  # also releases the advisory lock


@contextlib.asynccontextmanager
async def _pools(admin_dsn: str, others: Mapping[str, str], targets: Sequence[TargetPlan],
                 run_id: int, size: int) -> AsyncIterator[dict[str | None, asyncpg.Pool]]:
    # One pool for this database (None) and one per other database a target lives in.
    # --concurrency (`size`) is per database server, and one server runs at most `size`
    # targets, so `size` connections suffice for each other database; but every running
    # target also holds a control-database connection, so that pool is `size` per server
    # the targets live on. Named for the run, so the next runner can end what a killed one
    # left running.
    servers = _servers(admin_dsn, others)
    remotes = sorted({t.remote for t in targets if t.remote is not None})
    central = size * len({servers[t.remote] for t in targets} or {servers[None]})
    pools: dict[str | None, asyncpg.Pool] = {}
    try:
        for name in (None, *remotes):
            url = admin_dsn if name is None else others[name]
            width = central if name is None else size
            pool = await asyncpg.create_pool(
                url, min_size=min(width, 2), max_size=width, statement_cache_size=0,
                server_settings={"application_name": f"{APP_NAME_PREFIX}{run_id}"},
            )
            assert pool is not None
            pools[name] = pool
            if name is not None:
                async with pool.acquire() as conn:
                    await install_local_ledger(conn)
        yield pools
    finally:
        for pool in pools.values():
            await pool.close()


async def apply(admin_dsn: str, migrations: Sequence[Migration], opts: RolloutOptions,
                reporter: Reporter, *, other_databases: Mapping[str, str] | None = None,
                args: Mapping[str, Any] | None = None) -> RunSummary:
    """Apply every pending migration to every target, as a controlled rollout.

    Returns: the summary (status done, failed or stopped).
    Raises: ControlError when another runner is active, an applied file was edited, or a
    canary slug is unknown.
    """
    opts.check()
    others = dict(other_databases or {})

    async def body(conn: asyncpg.Connection, run_id: int) -> RunSummary:
        plan = await make_plan(conn, migrations, other_databases=others)
        if plan.edited:
            raise ControlError("; ".join(plan.edited))
        known = {t.slug for t in plan.targets}
        unknown = [s for s in opts.canary if s not in known]
        if unknown:
            raise ControlError(f"--canary: unknown tenant(s) {', '.join(unknown)}")
        for t in plan.targets:
            if t.skipped and t.pending:
                reporter.event("skipped", tenant=t.slug, reason=t.skipped)
        targets = plan.pending_targets
        if not targets:
            reporter.event("run_started", run_id=run_id, targets=0, waves=0, wave_names=[])
            return RunSummary(run_id=run_id, status="nothing")
        if opts.audit is not None:
            await opts.audit.before(targets)

        async def work(c: Conn, central: Conn, target: TargetPlan) -> None:
            async with _held(holds, target, reporter):
                for group in _groups(target.pending):
                    await _retry_locks(target, opts, reporter, functools.partial(
                        _apply_group, c, central, run_id, target, group, opts))

        async with _pools(admin_dsn, others, targets, run_id, opts.concurrency) as pools, \
                _run_holds(admin_dsn, run_id, opts) as holds:
            return await _rollout(pools, run_id, targets, opts, reporter, work,
                                  shared_first=True, servers=_servers(admin_dsn, others),
                                  audit=opts.audit)

    summary = await _locked_run(admin_dsn, "apply", dict(args or {}), body)
    reporter.event("run_finished", run_id=summary.run_id, status=summary.status,
                   done=len(summary.done), failed=len(summary.failed),
                   not_started=len(summary.not_started), seconds=round(summary.seconds, 3))
    return summary


async def rollback(admin_dsn: str, migrations: Sequence[Migration], run: int,
                   opts: RolloutOptions, reporter: Reporter, *,
                   other_databases: Mapping[str, str] | None = None) -> RunSummary:
    """Apply the ``down`` sections of what run ``run`` applied, newest first, per target.

    Only targets that run migrated and that still have those versions are touched. A target
    with a later version on top (from another run) is refused, as is a file with no down.
    Returns: the summary of the rollback run.
    Raises: ControlError (unknown run, missing down section, later versions on top).
    """
    opts.check()
    by_version = {m.version: m for m in migrations}
    others = dict(other_databases or {})

    async def body(conn: asyncpg.Connection, run_id: int) -> RunSummary:
        rows = await conn.fetch(
            """
            SELECT v.target, v.version, v.checksum,
                   (SELECT max(w.version) FROM pgtenant.schema_versions w
                     WHERE w.target = v.target) AS top
              FROM pgtenant.schema_versions v WHERE v.run_id = $1
            """, run)
        if not await conn.fetchval("SELECT 1 FROM pgtenant.migration_runs WHERE id = $1 "
                                   "AND kind = 'apply'", run):
            raise ControlError(f"no apply run {run}")
        fleet = {r.target: r for r in await fetch_fleet(conn)}
        versions: dict[UUID, list[int]] = {}
        problems: list[str] = []
        for r in rows:
            if r["target"] not in fleet:
                continue  # tenant dropped since
            versions.setdefault(r["target"], []).append(r["version"])
        for target, vs in versions.items():
            if fleet[target].versions and max(fleet[target].versions) > max(vs):
                problems.append(f"{fleet[target].slug} has later versions on top "
                                f"({max(fleet[target].versions)})")
        needed = sorted({v for vs in versions.values() for v in vs})
        for v in needed:
            mig = by_version.get(v)
            if mig is None or mig.down is None:
                name = mig.filename if mig else f"{v:04d}_*.sql (file missing)"
                problems.append(f"{name} has no '-- pgtenant: down' section")
        if problems:
            raise ControlError(f"cannot roll back run {run}: " + "; ".join(problems[:10]))
        targets = [TargetPlan(row=fleet[t], pending=[by_version[v] for v in
                                                      sorted(vs, reverse=True)],
                              remote=fleet[t].database if fleet[t].database in others
                              else None)
                   for t, vs in versions.items()]
        if not targets:
            return RunSummary(run_id=run_id, status="nothing")

        async def work(c: Conn, central: Conn, target: TargetPlan) -> None:
            async with _held(holds, target, reporter):
                for group in _groups(target.pending):  # pending is newest first here
                    await _retry_locks(target, opts, reporter, functools.partial(
                        _rollback_group, c, central, run_id, target, group, opts))

        async with _pools(admin_dsn, others, targets, run_id, opts.concurrency) as pools, \
                _run_holds(admin_dsn, run_id, opts) as holds:
            # Tenants first, the shared target last: tenant objects may depend on it.
            return await _rollout(pools, run_id, targets, opts, reporter, work,
                                  shared_first=False, servers=_servers(admin_dsn, others))

    summary = await _locked_run(admin_dsn, "rollback", {"run": run}, body)
    reporter.event("run_finished", run_id=summary.run_id, status=summary.status,
                   done=len(summary.done), failed=len(summary.failed),
                   not_started=len(summary.not_started), seconds=round(summary.seconds, 3))
    return summary


async def apply_one(conn: Conn, central: Conn, run_id: int, target: TargetPlan,
                    opts: RolloutOptions, reporter: Reporter) -> None:
    """Apply one target's pending files outside a rollout (``tenant provision``): the same
    groups, transactions, ledger rows and lock retries as ``apply``. ``conn`` is the
    target's database (``central`` itself when it lives in the control database).

    Raises: ControlError naming the file, statement and SQLSTATE of a failure (recorded in
    the log; the target stays at its previous version).
    """
    started = datetime.now(UTC)
    try:
        for group in _groups(target.pending):
            await _retry_locks(target, opts, reporter, functools.partial(
                _apply_group, conn, central, run_id, target, group, opts))
    except _Failed as failure:
        await _record_failure(central, run_id, target, failure, started)
        raise ControlError(failure.describe(target.slug)) from failure
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        lost = _Failed(None, "", exc)
        await _record_failure(central, run_id, target, lost, started)
        raise ControlError(lost.describe(target.slug)) from exc
