"""The ``pgtenant`` command: serve, init, tenant, token and demo.

Owns argument parsing and exit codes only; the work lives in ``app`` and ``control``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import sys
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import asyncpg

from .config import Config, load_config
from .control import ControlError
from .errors import ConfigError, ProxyError

__all__ = ["main"]

_DEFAULT_CONFIG = os.environ.get("PGTENANT_CONFIG", "config/pgtenant.toml")


def _setup_logging(level: str, fmt: str = "text", worker: str | None = None) -> None:
    from .logs import setup_logging

    setup_logging(level, fmt, worker)


def _load(path: str) -> Config:
    return load_config(path)


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
    role, password = args.proxy_role, args.proxy_password
    control_role, control_password = args.control_role, args.control_password
    if args.config:
        config = _load(args.config)
        tenant_types = config.tenant_types
        db = next(iter(config.databases.values()))
        role = args.proxy_role or db.dsn.user
        password = password or db.dsn.password
        # Only an explicit [control] dsn names the control role: without one, control_dsn
        # falls back to the login role's dsn, which must never get the key.
        if config.control.dsn is not None:
            control_role = control_role or config.control.dsn.user
            control_password = control_password or config.control.dsn.password
    result = asyncio.run(init_database(
        args.dsn, proxy_role=role or DEFAULT_PROXY_ROLE, proxy_password=password,
        control_role=control_role or DEFAULT_CONTROL_ROLE, control_password=control_password,
        tenant_types=tenant_types,
    ))
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
    org_id = asyncio.run(create_tenant(
        args.dsn, slug=args.slug, tenant_type=tenant_type, proxy_role=db.dsn.user,
        schema=args.schema, database=args.database,
    ))
    print(org_id)
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .control.demo import run_demo

    _setup_logging("info")
    return run_demo(Path(args.dir), port=args.port)


def build_parser() -> argparse.ArgumentParser:
    """Returns: the argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="pgtenant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", default=_DEFAULT_CONFIG)
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT), under a supervisor")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "i/N": set by the supervisor
    p.add_argument("--rundir", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("--config", default=_DEFAULT_CONFIG)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("init", help="install the control schema, roles and fail-closed defaults")
    p.add_argument("--dsn", required=True, help="admin (owner/superuser) URL of the database")
    p.add_argument("--config", help="take tenant types and the proxy role from this config")
    p.add_argument("--proxy-role", help="login role the proxy uses (default pgtenant_proxy)")
    p.add_argument("--proxy-password", help="password for the proxy role (generated if new)")
    p.add_argument("--control-role", help="login role of the control plane: signing key, "
                                          "token registry (default pgtenant_control)")
    p.add_argument("--control-password",
                   help="password for the control role (generated if new)")
    p.set_defaults(func=_cmd_init)

    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(
        dest="tenant_command", required=True
    )
    p = tenant.add_parser("create", help="create an organization; prints its id")
    p.add_argument("--dsn", required=True)
    p.add_argument("--slug", required=True)
    p.add_argument("--type", required=True, help="a [tenant_types.<type>] of the config")
    p.add_argument("--schema", help="schema for schema-per-tenant types (default t_<slug>)")
    p.add_argument("--database", help="[databases.<name>] this tenant is served from "
                                      "(database per tenant; default: its type's)")
    p.add_argument("--config", default=_DEFAULT_CONFIG)
    p.set_defaults(func=_cmd_tenant_create)

    token = sub.add_parser("token", help="manage tokens").add_subparsers(
        dest="token_command", required=True
    )
    p = token.add_parser("issue", help="issue a token; prints it once (last line)")
    p.add_argument("--dsn", required=True)
    p.add_argument("--tenant", required=True, help="tenant slug")
    p.add_argument("--entity", type=UUID, help="bind the token to a workspace entity id")
    p.add_argument("--expires-in", type=int, help="lifetime in seconds")
    p.add_argument("--label")
    p.set_defaults(func=_cmd_token_issue)
    p = token.add_parser("revoke", help="revoke a token by id")
    p.add_argument("--dsn", required=True)
    p.add_argument("--token-id", required=True, type=UUID)
    p.set_defaults(func=_cmd_token_revoke)

    p = sub.add_parser("demo", help="embedded Postgres + demo tenants + proxy, in the foreground")
    p.add_argument("--dir", default=".demo", help="where the demo cluster and config live")
    p.add_argument("--port", type=int, default=6432)
    p.set_defaults(func=_cmd_demo)

    from .control.migrations.commands import add_migrate_parser

    add_migrate_parser(sub, _DEFAULT_CONFIG)

    p = sub.add_parser("admin-token", help="make an admin console token; prints its config "
                                           "line and the token (last line)")
    p.set_defaults(func=_cmd_admin_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns: the process exit code."""
    args = build_parser().parse_args(argv)
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
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"pgtenant: cannot complete the command against the database: {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
