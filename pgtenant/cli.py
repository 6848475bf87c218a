"""The ``pgtenant`` command: serve, init, tenant, token and demo.

Owns argument parsing, operator-facing messages and exit codes only; the work lives in
``app`` and ``control``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from .config import Config, parse_dsn, placeholder_passwords
from .configfile import load_config
from .control import ControlError
from .errors import ConfigError, ProxyError, connect_failure_kind

__all__ = ["main"]

_CONFIG_ENV = "PGTENANT_CONFIG"
_DEFAULT_CONFIG = os.environ.get(_CONFIG_ENV, "config/pgtenant.toml")
_CONFIG_HELP = (f"the proxy's TOML config (default: ${_CONFIG_ENV}, else config/pgtenant.toml; "
                f"now {_DEFAULT_CONFIG})")
_DSN_HELP = ("URL of the database as its owner or a superuser, e.g. "
             "postgresql://postgres@db.example.com:5432/app (a password not in the URL comes "
             "from PGPASSWORD or ~/.pgpass)")

_DESCRIPTION = """\
pgtenant: a tenant-aware, transaction-mode PostgreSQL connection proxy.

Clients connect with any Postgres driver and give a tenant token as their password;
every transaction then runs with that tenant's role, search_path and app.tenant_id, on
a small pool of shared server connections.
"""

_EPILOG = """\
getting started:
  pgtenant demo                                       throwaway Postgres + demo tenants
  pgtenant init --dsn URL --write-config pgtenant.toml
                                                      install into a database, write a config
  pgtenant tenant create --dsn URL --config pgtenant.toml --slug acme --type shared
  pgtenant token issue --dsn URL --tenant acme        prints the token (the client's password)
  pgtenant serve --config pgtenant.toml
  pgtenant audit --dsn URL --config pgtenant.toml     tenant-isolation holes (exit 1 on errors)

Run `pgtenant COMMAND --help` for a command's options. `pgtenant example-config` prints the
example config, which documents every key.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pgtenant")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown (not installed)"


def _setup_logging(level: str, fmt: str = "text", worker: str | None = None) -> None:
    from .logs import setup_logging

    setup_logging(level, fmt, worker)


def _load(path: str) -> Config:
    """Returns: the config at ``path``, refused while a dsn still holds a placeholder
    password (which ``init --config`` would otherwise make the role's real password)."""
    if not Path(path).exists():
        raise ConfigError(
            f"config file {path!r} not found. Pass --config PATH (or set {_CONFIG_ENV}); "
            "`pgtenant init --dsn URL --write-config PATH` writes one for a database, and "
            "`pgtenant example-config` prints one that documents every key"
        )
    config = load_config(path)
    problems = placeholder_passwords(config)
    if problems:
        raise ConfigError("\n".join([f"{path}:", *(f"  - {p}" for p in problems)]))
    return config


def _cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve

    config = _load(args.config)
    if args.workers > 1 and args.worker is None:
        from .workers import run_supervisor

        _setup_logging(config.log_level, config.log_format, worker="supervisor")
        return run_supervisor(config, args.config, args.workers)
    worker = None
    if args.worker is not None:
        from .workers import WorkerInfo

        index, count = (int(x) for x in args.worker.split("/"))
        worker = WorkerInfo(index, count, Path(args.rundir))
    _setup_logging(config.log_level, config.log_format,
                   worker=str(worker.index) if worker is not None else None)
    serve(config, args.config, worker)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{args.config}: ok ({len(config.databases)} database(s), "
          f"{len(config.tenant_types)} tenant type(s))")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from .control.init import DEFAULT_CONTROL_ROLE, DEFAULT_PROXY_ROLE, init_database

    tenant_types = None
    protected: tuple[str, ...] = ()
    role, password = args.proxy_role, args.proxy_password
    control_role, control_password = args.control_role, args.control_password
    write_to = Path(args.write_config) if args.write_config else None
    if write_to is not None and write_to.exists():  # checked before any role is re-keyed
        print(f"pgtenant: --write-config {str(write_to)!r} exists; it is never overwritten "
              "(name a new file)", file=sys.stderr)
        return 2
    if args.config:
        config = _load(args.config)
        tenant_types = config.tenant_types
        protected = config.protected_settings
        db = next(iter(config.databases.values()))
        role = args.proxy_role or db.dsn.user
        password = password or db.dsn.password
        # Only an explicit [control] dsn names the control role: without one, control_dsn
        # falls back to the login role's dsn, which must never get the key.
        if config.control.dsn is not None:
            control_role = control_role or config.control.dsn.user
            control_password = control_password or config.control.dsn.password
    if write_to is not None:
        from .control.starter import STARTER_TENANT_TYPES

        tenant_types = tenant_types or STARTER_TENANT_TYPES
        # The file needs both passwords, and init keeps an existing role's password (which
        # it cannot read back), so both roles get a new one unless given.
        password = password or secrets.token_urlsafe(24)
        control_password = control_password or secrets.token_urlsafe(24)
    admin = parse_dsn(args.dsn, key="--dsn")
    result = asyncio.run(init_database(
        args.dsn, proxy_role=role or DEFAULT_PROXY_ROLE, proxy_password=password,
        control_role=control_role or DEFAULT_CONTROL_ROLE, control_password=control_password,
        tenant_types=tenant_types, protected_settings=protected,
    ))
    if write_to is not None:
        from .control.starter import starter_config, write_private

        assert password is not None and control_password is not None
        write_private(write_to, starter_config(
            admin, proxy_role=result.proxy_role, proxy_password=password,
            control_role=result.control_role, control_password=control_password,
            tenant_types=tenant_types or {},
        ))
        print(f"initialised: proxy role {result.proxy_role!r}, control role "
              f"{result.control_role!r}, tenant types {', '.join(tenant_types or {})}")
        print(f"wrote {write_to} (mode 600: it holds both roles' new passwords); next:")
        print(f"  pgtenant tenant create --dsn URL --config {write_to} --slug SLUG "
              f"--type {next(iter(tenant_types or {}), 'TYPE')}")
        print(f"  pgtenant serve --config {write_to}")
        return 0
    logins = (result.proxy_role, result.control_role)
    new_tenant_roles = [r for r in result.created_roles if r not in logins]
    print(f"initialised: proxy role {result.proxy_role!r}, control role "
          f"{result.control_role!r}; tenant roles: {', '.join(new_tenant_roles) or 'none new'}")
    if result.proxy_password and not password:
        print("proxy role password (store it in the dsn of [databases.*]):")
        print(result.proxy_password)
    if result.control_password and not control_password:
        print("control role password (store it in [control] dsn; it alone reads the signing "
              "key and the token registry):")
        print(result.control_password)
    return 0


def _cmd_tenant_create(args: argparse.Namespace) -> int:
    from .control.tenants import create_tenant

    config = _load(args.config)
    tenant_type = config.tenant_types.get(args.type)
    if tenant_type is None:
        raise ConfigError(
            f"tenant type {args.type!r} is not in {args.config}; "
            f"known: {', '.join(sorted(config.tenant_types))}"
        )
    if args.database is not None and args.database not in config.databases:
        print(f"pgtenant: --database {args.database!r}: no [databases.{args.database}] in "
              f"{args.config}", file=sys.stderr)
        return 2
    db = next(iter(config.databases.values()))
    # --database X served from another database: its schema is made there, as the admin
    # of --dsn with X's dbname.
    database_dsn = (_other_databases(config, args.dsn).get(args.database)
                    if args.database is not None else None)
    org_id = asyncio.run(create_tenant(
        args.dsn, slug=args.slug, tenant_type=tenant_type, proxy_role=db.dsn.user,
        schema=args.schema, database=args.database, database_dsn=database_dsn,
    ))
    print(org_id)
    return 0


def _other_databases(config: Config, admin_dsn: str) -> dict[str, str]:
    from .control.migrations.commands import _other_databases as others

    return others(config, admin_dsn)


def _tenant_type(config: Config, args: argparse.Namespace) -> Any:
    tenant_type = config.tenant_types.get(args.type)
    if tenant_type is None:
        raise ConfigError(
            f"tenant type {args.type!r} is not in {args.config}; "
            f"known: {', '.join(sorted(config.tenant_types))}"
        )
    return tenant_type


def _phase_line(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in phases.items())


def _cmd_tenant_provision(args: argparse.Namespace) -> int:
    from .control.migrations.files import load_migrations
    from .control.migrations.runner import RolloutOptions
    from .control.provision import provision_tenant

    config = _load(args.config)
    tenant_type = _tenant_type(config, args)
    if args.database is not None and args.database not in config.databases:
        print(f"pgtenant: --database {args.database!r}: no [databases.{args.database}] in "
              f"{args.config}", file=sys.stderr)
        return 2
    migrations = load_migrations(Path(args.config).parent / config.migrations.dir)
    seed = Path(args.seed).read_text() if args.seed else None
    db = next(iter(config.databases.values()))
    others = _other_databases(config, args.dsn)
    gate = None
    if not args.no_audit:
        from .control.audit.gate import AuditGate

        gate = AuditGate(args.dsn, config, Path(args.config).parent, other_databases=others)
    result = asyncio.run(provision_tenant(
        args.dsn, slug=args.slug, tenant_type=tenant_type, migrations=migrations,
        proxy_role=db.dsn.user, schema=args.schema, database=args.database,
        other_databases=others, template=args.template,
        seed_sql=seed, seed_as=args.seed_as,
        opts=RolloutOptions(lock_timeout_ms=config.migrations.lock_timeout_ms,
                            statement_timeout_ms=config.migrations.statement_timeout_ms),
        audit=gate,
    ))
    if args.json:
        print(json.dumps(result.to_json()))
    elif result.already_ready:
        print(f"tenant {args.slug} is already ready (nothing to do)")
    else:
        print(f"tenant {args.slug} ready in {result.seconds:.3f} s"
              f"{' (resumed)' if result.resumed else ''}: "
              f"{len(result.applied)} migration(s), seed {'run' if result.seeded else 'none'}"
              f"\n  phases: {_phase_line(result.phases)}")
    print(result.org_id)
    return 0


def _cmd_tenant_drop(args: argparse.Namespace) -> int:
    from .control.provision import drop_tenant

    config = _load(args.config)
    if args.dump and Path(args.dump).exists():
        print(f"pgtenant: --dump {args.dump!r} exists; it is never overwritten",
              file=sys.stderr)
        return 2

    async def tenant_type() -> Any:
        import asyncpg as pg

        conn = await pg.connect(args.dsn)
        try:
            name = await conn.fetchval(
                "SELECT tenant_type FROM pgtenant.organizations WHERE slug = $1", args.slug)
        finally:
            await conn.close()
        return config.tenant_types.get(name) if name is not None else None

    async def run() -> Any:
        return await drop_tenant(args.dsn, slug=args.slug, tenant_type=await tenant_type(),
                                 other_databases=_other_databases(config, args.dsn),
                                 dump=Path(args.dump) if args.dump else None,
                                 hold_drain_timeout=config.migrations.hold_drain_timeout,
                                 hold_ttl=config.migrations.hold_ttl,
                                 listener_user=config.control_dsn.user,
                                 lock_timeout_ms=config.migrations.lock_timeout_ms)

    result = asyncio.run(run())
    if args.json:
        print(json.dumps({"slug": result.slug, "found": result.found,
                          "revoked_tokens": result.revoked_tokens,
                          "dumped_to": result.dumped_to, "dropped": result.dropped,
                          "drain": result.drain,
                          "phases": {k: round(v, 4) for k, v in result.phases.items()}}))
    elif not result.found:
        print(f"tenant {args.slug} does not exist (nothing to drop)")
    else:
        print(f"tenant {args.slug} dropped: {result.revoked_tokens} token(s) revoked"
              f"{f', dumped to {result.dumped_to}' if result.dumped_to else ''}; "
              f"removed {', '.join(result.dropped)}\n  phases: {_phase_line(result.phases)}")
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    def text(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, datetime):
            return value.strftime("%Y-%m-%d %H:%M:%SZ") if value.utcoffset() == timedelta(0) \
                else value.isoformat(sep=" ", timespec="seconds")
        return str(value)

    cells = [header, *(tuple(text(v) for v in row) for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cmd_tenant_list(args: argparse.Namespace) -> int:
    from .control.tenants import list_tenants

    rows = asyncio.run(list_tenants(args.dsn))
    _table(("slug", "type", "schema", "database", "created", "id", "status"),
           [(r["slug"], r["tenant_type"], r["schema"], r["database"], r["created_at"],
             r["id"], r["status"]) for r in rows])
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    from .control.tenants import list_tokens

    rows = asyncio.run(list_tokens(args.dsn, args.tenant))
    _table(("id", "label", "entity", "created", "expires", "revoked"),
           [(r["id"], r["label"], r["entity_id"], r["created_at"], r["expires_at"],
             r["revoked_at"]) for r in rows])
    return 0


def _cmd_token_issue(args: argparse.Namespace) -> int:
    from .control.tenants import issue_token

    expires = timedelta(seconds=args.expires_in) if args.expires_in else None
    token_id, token = asyncio.run(issue_token(
        args.dsn, tenant_slug=args.tenant,
        entity_id=args.entity,
        expires_in=expires, label=args.label,
    ))
    print(f"token id: {token_id} (shown once; only its hash is stored)")
    print(token)
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    from .control.tenants import revoke_token

    if asyncio.run(revoke_token(args.dsn, args.token_id)):
        print(f"revoked {args.token_id}")
        return 0
    print(f"no active token {args.token_id}", file=sys.stderr)
    return 1


def _cmd_admin_token(_args: argparse.Namespace) -> int:
    token = "pgta_" + secrets.token_urlsafe(32)
    print("# put this in the config; give the token (last line) to the operators:")
    print(f'[admin]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"')
    print(token)
    return 0


def _cmd_example_config(_args: argparse.Namespace) -> int:
    from importlib.resources import files

    sys.stdout.write((files(__package__) / "pgtenant.example.toml").read_text())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .control.demo import run_demo

    _setup_logging("info")
    return run_demo(Path(args.dir), port=args.port)


def build_parser() -> argparse.ArgumentParser:
    """Returns: the argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="pgtenant", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pgtenant {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the proxy in the foreground",
                       description="Run the proxy in the foreground until SIGTERM/SIGINT; "
                                   "SIGHUP re-reads the config.")
    p.add_argument("--config", default=_DEFAULT_CONFIG, help=_CONFIG_HELP)
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT), under a supervisor "
                        "(default 1)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "i/N": set by the supervisor
    p.add_argument("--rundir", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and exit",
                       description="Validate a config file; every problem is listed.")
    p.add_argument("--config", default=_DEFAULT_CONFIG, help=_CONFIG_HELP)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "init", help="install the control schema, roles and fail-closed defaults",
        description="Install pgtenant into one database (idempotent; run as a superuser): "
                    "the pgtenant control schema, the proxy's login role, the control role "
                    "and the tenant types' roles. New roles' passwords are printed once.")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--config", help="take tenant types, roles and passwords from this config "
                                    "(its dsns must hold real passwords, not CHANGE_ME)")
    p.add_argument("--write-config", metavar="PATH",
                   help="write a starter config for this database to PATH (mode 600), with "
                        "new passwords for the proxy and control roles in its dsns; tenant "
                        "types from --config, else 'shared' (RLS) and 'isolated' (schema per "
                        "tenant). PATH must not exist")
    p.add_argument("--proxy-role", help="login role the proxy uses (default pgtenant_proxy)")
    p.add_argument("--proxy-password", help="password for the proxy role (generated if new)")
    p.add_argument("--control-role", help="login role of the control plane: signing key, "
                                          "token registry (default pgtenant_control)")
    p.add_argument("--control-password",
                   help="password for the control role (generated if new)")
    p.set_defaults(func=_cmd_init)

    tenant = sub.add_parser(
        "tenant", help="create, provision, drop and list tenants").add_subparsers(
        dest="tenant_command", required=True, metavar="ACTION"
    )
    p = tenant.add_parser("create", help="create an organization; prints its id")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--slug", required=True,
                   help="the tenant's name: lower-case letters, digits and _ (clients may "
                        "connect with user=<slug>)")
    p.add_argument("--type", required=True, help="a [tenant_types.<type>] of the config")
    p.add_argument("--schema", help="schema for schema-per-tenant types (default t_<slug>)")
    p.add_argument("--database", help="[databases.<name>] this tenant is served from "
                                      "(database per tenant; default: its type's)")
    p.add_argument("--config", default=_DEFAULT_CONFIG, help=_CONFIG_HELP)
    p.set_defaults(func=_cmd_tenant_create)
    p = tenant.add_parser(
        "provision", help="create a tenant ready to use: row, role, schema, every migration, "
                          "seed, grants; idempotent and resumable; prints its id (last line)",
        description="Provision a tenant in phases (register, database, schema, migrate, "
                    "grant, seed, ready), each timed. Until the last, the proxy refuses its "
                    "logins (SQLSTATE 57P03). Rerun after any failure or crash to complete "
                    "it, or remove it with `tenant drop`.")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--slug", required=True, help="the tenant's name (see tenant create)")
    p.add_argument("--type", required=True, help="a [tenant_types.<type>] of the config")
    p.add_argument("--schema", help="schema for schema-per-tenant types (default t_<slug>)")
    p.add_argument("--database", help="[databases.<name>] this tenant is served from; when "
                                      "its database does not exist it is created")
    p.add_argument("--template", help="database per tenant: create the tenant's database "
                                      "from this template database")
    p.add_argument("--seed", metavar="FILE", help="SQL run once, in one transaction, with the "
                                                  "tenant's search_path and app.* settings")
    p.add_argument("--seed-as", choices=("tenant", "admin"), default="tenant",
                   help="run the seed as the tenant's role (default: its RLS and privileges "
                        "apply) or as the admin of --dsn")
    p.add_argument("--no-audit", action="store_true",
                   help="skip the audit of the tenant's schema around its migrations (by "
                        "default a new audit error, one the [audit] baseline does not "
                        "accept, fails the provision and the tenant stays 'provisioning')")
    p.add_argument("--json", action="store_true", help="one JSON object (then the id)")
    p.add_argument("--config", default=_DEFAULT_CONFIG, help=_CONFIG_HELP)
    p.set_defaults(func=_cmd_tenant_provision)
    p = tenant.add_parser(
        "drop", help="remove a tenant: refuse logins, revoke tokens, optional pg_dump, drop "
                     "its schema/database, role, ledger rows and row; idempotent")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--slug", required=True, help="the tenant to drop")
    p.add_argument("--dump", metavar="FILE", help="pg_dump its schema (or its database) here "
                                                  "first; nothing is dropped if it fails")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--config", default=_DEFAULT_CONFIG, help=_CONFIG_HELP)
    p.set_defaults(func=_cmd_tenant_drop)
    p = tenant.add_parser("list", help="list organizations: slug, type, schema, database, "
                                       "created, id, status")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.set_defaults(func=_cmd_tenant_list)

    token = sub.add_parser("token", help="issue, list and revoke tokens").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    p = token.add_parser("issue", help="issue a token; prints it once (last line)")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--tenant", required=True, help="tenant slug")
    p.add_argument("--entity", type=UUID, help="bind the token to a workspace entity id")
    p.add_argument("--expires-in", type=int, metavar="SECONDS",
                   help="lifetime in seconds (default: no expiry)")
    p.add_argument("--label", help="a note shown by `token list` (e.g. who holds it)")
    p.set_defaults(func=_cmd_token_issue)
    p = token.add_parser("list", help="list a tenant's tokens: id, label, created, expiry, "
                                      "revoked (never the token or its hash)")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--tenant", required=True, help="tenant slug")
    p.set_defaults(func=_cmd_token_list)
    p = token.add_parser("revoke", help="revoke a token by id")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--token-id", required=True, type=UUID,
                   help="the id `token issue` and `token list` print")
    p.set_defaults(func=_cmd_token_revoke)

    p = sub.add_parser("demo", help="embedded Postgres + demo tenants + proxy, in the foreground")
    p.add_argument("--dir", default=".demo",
                   help="where the demo cluster, config, tokens and TLS keys live while it "
                        "runs (default .demo; deleted on exit)")
    p.add_argument("--port", type=int, default=6432,
                   help="the proxy's port on 127.0.0.1 (default 6432)")
    p.set_defaults(func=_cmd_demo)

    from .control.migrations.commands import add_migrate_parser

    add_migrate_parser(sub, _DEFAULT_CONFIG)

    from .control.audit.commands import add_audit_parser

    add_audit_parser(sub, _DEFAULT_CONFIG)

    p = sub.add_parser("admin-token", help="make an admin console token; prints its config "
                                           "line and the token (last line)")
    p.set_defaults(func=_cmd_admin_token)
    p = sub.add_parser("example-config",
                       help="print the example config (every key, its default and why)")
    p.set_defaults(func=_cmd_example_config)
    return parser


def _scrub(text: str, args: argparse.Namespace) -> str:
    """Returns: ``text`` without the password of ``--dsn``: a driver's message may quote it."""
    dsn = getattr(args, "dsn", None)
    password = parse_dsn(dsn).password if dsn else None
    return text.replace(password, "***") if password else text


def _connection_problem(args: argparse.Namespace, exc: OSError) -> str | None:
    """Returns: a sentence for a failed connection to ``--dsn``, or None for another OSError.

    asyncpg's own text ("[Errno 111] Connect call failed ('127.0.0.1', 5432)", or several
    joined as "Multiple exceptions: ...") names no option and suggests nothing.
    """
    dsn = getattr(args, "dsn", None)
    if not dsn:
        return None
    reason = connect_failure_kind(exc)
    if reason is None:
        return None
    try:
        target = parse_dsn(dsn, key="--dsn")
    except ConfigError:
        return None
    where = target.unix_socket or f"{target.host}:{target.port}"
    return (f"cannot connect to PostgreSQL at {where} ({reason}).\n"
            "HINT: is PostgreSQL running and listening there? Check --dsn.")


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns: the process exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "dsn", None):
        # Checked here, not by asyncpg, whose errors may quote the URL, password included.
        try:
            parse_dsn(args.dsn, key="--dsn")
        except ConfigError as exc:
            print(f"pgtenant: {exc.message}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pgtenant: config error: {exc.message}", file=sys.stderr)
        return 2
    except ProxyError as exc:  # e.g. a database that is not locked down, at start
        print(f"pgtenant: {exc.message}" + (f"\nHINT: {exc.hint}" if exc.hint else ""),
              file=sys.stderr)
        return 1
    except ControlError as exc:  # operator mistakes: unknown tenant, duplicate slug...
        print(f"pgtenant: {exc}", file=sys.stderr)
        return 1
    except asyncpg.UndefinedTableError as exc:  # pgtenant.organizations, .tokens ...
        print(f"pgtenant: {exc}\nHINT: run `pgtenant init --dsn ...` on this database first.",
              file=sys.stderr)
        return 1
    except OSError as exc:
        sentence = _connection_problem(args, exc)
        print(f"pgtenant: {sentence}" if sentence else
              f"pgtenant: cannot complete the command against the database: "
              f"{_scrub(str(exc), args)}", file=sys.stderr)
        return 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"pgtenant: cannot complete the command against the database: "
              f"{_scrub(str(exc), args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
