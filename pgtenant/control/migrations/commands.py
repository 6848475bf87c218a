"""The ``pgtenant migrate`` sub-commands: new, plan, apply, status, rollback.

Owns their arguments, output and exit codes (0 ok, 1 a failure or refusal, 2 usage/config);
the work lives in ``runner.py``. ``cli.py`` only calls ``add_migrate_parser``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["add_migrate_parser"]


def _config(args: argparse.Namespace) -> tuple[Any, Path]:
    from ...configfile import load_config

    config = load_config(args.config)
    return config, (Path(args.config).parent / config.migrations.dir)


def _other_databases(config: Any, admin_dsn: str) -> dict[str, str]:
    """Returns: [databases.*] name -> admin URL, for each database that is not --dsn's: the
    same credentials with that database's name (database per tenant)."""
    import dataclasses

    from ...config import parse_dsn

    admin = parse_dsn(admin_dsn, key="--dsn")
    return {name: dataclasses.replace(admin, dbname=db.dsn.dbname).to_url()
            for name, db in config.databases.items() if db.dsn.dbname != admin.dbname}


def _cmd_new(args: argparse.Namespace) -> int:
    from .files import new_migration

    _, directory = _config(args)
    path = new_migration(directory, args.name, scope=args.scope)
    print(path)
    return 0


async def _plan(args: argparse.Namespace) -> Any:
    import asyncpg

    from .files import load_migrations
    from .runner import make_plan

    config, directory = _config(args)
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(args.dsn)
    try:
        return await make_plan(conn, migrations,
                               other_databases=_other_databases(config, args.dsn))
    finally:
        await conn.close()


def _cmd_plan(args: argparse.Namespace) -> int:
    plan = asyncio.run(_plan(args))
    if args.json:
        print(json.dumps({**plan.to_json(), "query_seconds": round(plan.query_seconds, 4)}))
        return 1 if plan.edited else 0
    for line in plan.edited:
        print(f"REFUSED: {line}")
    for v in plan.missing:
        print(f"note: version {v} is applied somewhere but has no file")
    pending = plan.pending_targets
    print(f"{len(plan.migrations)} migration file(s); {len(plan.targets)} target(s): "
          f"{len(pending)} with pending migrations, "
          f"{sum(1 for t in plan.targets if not t.pending and not t.skipped)} up to date "
          f"(fleet read in {plan.query_seconds * 1000:.0f} ms)")
    groups = Counter(tuple(m.filename for m in t.pending) for t in pending)
    for files, count in groups.most_common():
        print(f"  {count} target(s) would run: {', '.join(files)}")
    for t in plan.targets:
        if t.skipped:
            print(f"  skipped {t.slug}: {t.skipped}")
    for w in plan.warnings:
        print(f"WARNING {w.filename}: {w.message}" + (f"\n    {w.statement}" if w.statement
                                                        else ""))
    return 1 if plan.edited else 0


def _options(args: argparse.Namespace, config: Any) -> Any:
    from .runner import RolloutOptions

    return RolloutOptions(
        canary=tuple(s.strip() for s in (args.canary or "").split(",") if s.strip()),
        canary_percent=getattr(args, "canary_percent", 0.0) or 0.0,
        wave_size=args.wave_size, concurrency=args.concurrency,
        max_failures=args.max_failures, pause=args.pause,
        lock_timeout_ms=args.lock_timeout or config.migrations.lock_timeout_ms,
        statement_timeout_ms=args.statement_timeout or config.migrations.statement_timeout_ms,
        hold=config.migrations.hold, hold_ttl=config.migrations.hold_ttl,
        hold_drain_timeout=config.migrations.hold_drain_timeout,
        listener_user=config.control_dsn.user,
    )


def _cmd_apply(args: argparse.Namespace) -> int:
    from .files import load_migrations
    from .progress import make_reporter
    from .runner import apply

    config, directory = _config(args)
    opts = _options(args, config)
    others = _other_databases(config, args.dsn)
    if not args.no_audit:
        import dataclasses

        from ..audit.gate import AuditGate, MigrateAudit

        gate = AuditGate(args.dsn, config, Path(args.config).parent, other_databases=others)
        opts = dataclasses.replace(opts, audit=MigrateAudit(gate))
    summary = asyncio.run(apply(
        args.dsn, load_migrations(directory), opts, make_reporter(args.json),
        other_databases=others,
        args={"canary": list(opts.canary), "canary_percent": opts.canary_percent,
              "wave_size": opts.wave_size,
              "concurrency": opts.concurrency, "max_failures": opts.max_failures,
              "pause": opts.pause, "lock_timeout_ms": opts.lock_timeout_ms,
              "statement_timeout_ms": opts.statement_timeout_ms, "dir": str(directory),
              "audit": not args.no_audit},
    ))
    if summary.failed and not args.json:
        for message in summary.failed.values():
            print(message, file=sys.stderr)
    if summary.audit and not args.json:
        print(f"stopped by the audit: {len(summary.audit)} new error(s) in what was "
              "migrated (fix them in a new migration, accept them in [audit] baseline, or "
              "rerun with --no-audit):", file=sys.stderr)
        for line in summary.audit:
            print(f"  {line}", file=sys.stderr)
    return 0 if summary.status in ("done", "nothing") else 1


def _cmd_rollback(args: argparse.Namespace) -> int:
    from .files import load_migrations
    from .progress import make_reporter
    from .runner import rollback

    config, directory = _config(args)
    summary = asyncio.run(rollback(args.dsn, load_migrations(directory), args.run,
                                   _options(args, config), make_reporter(args.json),
                                   other_databases=_other_databases(config, args.dsn)))
    return 0 if summary.status in ("done", "nothing") else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from .runner import status

    plan = asyncio.run(_plan(args))
    rows = status(plan)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    latest = max((m.version for m in plan.migrations), default=0)
    tenants = [r for r in rows if r["tenant"] != ":shared"]
    print(f"{len(tenants)} tenant(s); latest file version {latest:04d}")
    for version, count in sorted(Counter(r["version"] for r in tenants).items()):
        print(f"  at {version:04d}: {count}")
    for r in rows:
        if r["status"] == "failed":
            print(f"FAILED {r['tenant']} at {r['failed_version']:04d}: {r['error']}")
    behind = [r["tenant"] for r in rows if r["status"] in ("behind", "failed")]
    if behind:
        print(f"behind ({len(behind)}): {', '.join(behind[:50])}"
              + (" ..." if len(behind) > 50 else ""))
    for r in rows:
        if r["status"] == "skipped":
            print(f"skipped {r['tenant']}")
    return 0


def add_migrate_parser(sub: Any, default_config: str) -> None:
    """Add ``migrate`` and its sub-commands to the top-level sub-parser action ``sub``."""
    group = sub.add_parser(
        "migrate", help="migrate every tenant schema: plan, apply (canaries, waves), status, "
                        "rollback"
    ).add_subparsers(dest="migrate_command", required=True)

    def common(p: argparse.ArgumentParser, *, dsn: bool = True) -> None:
        p.add_argument("--config", default=default_config,
                       help="config file; [migrations] dir is relative to it (default: "
                            "$PGTENANT_CONFIG, else config/pgtenant.toml)")
        if dsn:
            p.add_argument("--dsn", required=True,
                           help="admin (owner/superuser) URL of the control database")

    p = group.add_parser("new", help="write the next NNNN_name.sql with a header template")
    common(p, dsn=False)
    p.add_argument("name", help="what the migration does, e.g. add_budget (the file name)")
    p.add_argument("--scope", choices=("tenant", "shared"), default="tenant",
                   help="tenant: once per tenant schema (default); shared: once, for the "
                        "shared schemas")
    p.set_defaults(func=_cmd_new)

    p = group.add_parser("plan", help="dry run: what would run where, and lock warnings")
    common(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_plan)

    def rollout(p: argparse.ArgumentParser) -> None:
        p.add_argument("--concurrency", type=int, default=4,
                       help="tenants at once per database server, host:port (4)")
        p.add_argument("--wave-size", type=int, default=50, help="tenants per wave (50)")
        p.add_argument("--max-failures", type=int, default=1,
                       help="stop starting tenants once this many failed (1)")
        p.add_argument("--pause", type=float, default=0.0, help="seconds between waves")
        p.add_argument("--lock-timeout", type=int,
                       help="ms per statement waiting for a lock (default [migrations] "
                            "lock_timeout_ms, 2000); retried 3 times with backoff")
        p.add_argument("--statement-timeout", type=int,
                       help="ms per statement (default [migrations] statement_timeout_ms, "
                            "300000)")
        p.add_argument("--json", action="store_true",
                       help="one JSON line per event (the default when not on a terminal)")

    p = group.add_parser("apply", help="apply pending migrations as a controlled rollout")
    common(p)
    p.add_argument("--canary", help="comma-separated slugs migrated first; if one fails "
                                    "no other tenant is touched")
    p.add_argument("--canary-percent", type=float, default=0.0,
                   help="also this percentage of tenants as canaries, spread over sizes")
    p.add_argument("--no-audit", action="store_true",
                   help="skip the audit after each wave (by default the audit runs on what "
                        "each wave migrated, and a new error, one that was not there before "
                        "the run and that [audit] baseline does not accept, stops the "
                        "rollout like a failed wave)")
    rollout(p)
    p.set_defaults(func=_cmd_apply)

    p = group.add_parser("status", help="the fleet: tenants per version, failures, behind")
    common(p)
    p.add_argument("--json", action="store_true", help="one JSON object per tenant")
    p.set_defaults(func=_cmd_status)

    p = group.add_parser("rollback", help="run the down sections of what one run applied")
    common(p)
    p.add_argument("--run", type=int, required=True, help="the apply run id to undo")
    p.set_defaults(canary=None)
    rollout(p)
    p.set_defaults(func=_cmd_rollback)
