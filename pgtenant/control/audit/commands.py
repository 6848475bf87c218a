"""The ``pgtenant audit`` command: audit a live database for tenant-isolation holes.

Owns its arguments, output and exit codes: 0 no unaccepted error, 1 at least one error the
baseline does not accept, 2 the audit could not run (bad config or baseline, database
unreachable). Every failure to run is one line on stderr: in CI a stack trace buries the
one thing to fix. The work lives in ``runner.py`` (and ``probe.py`` for ``--probe``);
``cli.py`` only calls ``add_audit_parser``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .baseline import Baseline, BaselineError, load_baseline, write_baseline
from .findings import Severity, sort_findings

if TYPE_CHECKING:
    from ...config import Config
    from .runner import AuditReport

__all__ = ["add_audit_parser"]

_DSN_HELP = ("URL of the database to audit, as its owner or a superuser, e.g. "
             "postgresql://postgres@db.example.com:5432/app (a password not in the URL comes "
             "from PGPASSWORD or ~/.pgpass)")
# Where a wildcard listen address is reached from this machine.
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class _Refusal(Exception):
    """The audit cannot run; the message is the one line to print."""


def _fail(message: str) -> int:
    print(f"pgtenant audit: {message}", file=sys.stderr)
    return 2


def _scrub(text: str, dsn: str) -> str:
    """Returns: ``text`` without the password of ``dsn`` (a driver's message may quote it)."""
    from ...config import parse_dsn
    from ...errors import ConfigError

    try:
        password = parse_dsn(dsn).password
    except ConfigError:
        return text
    return text.replace(password, "***") if password else text


def _where(dsn: str) -> str:
    from ...config import parse_dsn
    from ...errors import ConfigError

    try:
        target = parse_dsn(dsn, key="--dsn")
    except ConfigError:
        return "--dsn"
    return target.unix_socket or f"{target.host}:{target.port}"


def _load_config(path: str) -> Config:
    from ...configfile import load_config
    from ...errors import ConfigError

    if not Path(path).exists():
        raise _Refusal(f"config file {path!r} not found (pass --config PATH)")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _Refusal(f"config error: {exc.message}") from None


def _proxy_address(args: argparse.Namespace, config: Config) -> tuple[str, int]:
    """Returns: where the probe reaches pgtenant: --proxy, else the config's listen (a
    wildcard listen address is reached on loopback)."""
    from ...configfile import parse_listen
    from ...errors import ConfigError

    if args.proxy is None:
        host, port = config.listen
        return ("127.0.0.1" if host in _WILDCARDS else host), port
    try:
        return parse_listen(args.proxy, "--proxy")
    except ConfigError as exc:
        raise _Refusal(exc.message) from None


async def _audit(args: argparse.Namespace, config: Config) -> AuditReport:
    """Returns: the catalog audit's report, with the probe's findings merged in (sorted
    again, worst first) when --probe is given."""
    from .runner import run_audit

    report = await run_audit(args.dsn, config)
    if not args.probe:
        return report
    from .probe import run_probe

    host, port = _proxy_address(args, config)
    probed = await run_probe(args.dsn, config, host=host, port=port,
                               tenant_columns=config.audit.tenant_columns)
    return dataclasses.replace(report, findings=sort_findings([*report.findings, *probed]))


def _run(args: argparse.Namespace, config: Config) -> AuditReport:
    """Returns: the report. Raises: _Refusal when the database cannot be reached or
    refuses the audit's queries."""
    import asyncpg

    from ...errors import connect_failure, connect_failure_kind

    try:
        return asyncio.run(_audit(args, config))
    except OSError as exc:
        if connect_failure_kind(exc) is not None:
            raise _Refusal(f"cannot connect to PostgreSQL at {_where(args.dsn)} "
                           f"({connect_failure(exc)}); check --dsn") from None
        raise _Refusal(f"cannot audit the database: {_scrub(str(exc), args.dsn)}") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _Refusal(f"cannot audit the database at {_where(args.dsn)}: "
                       f"{_scrub(str(exc), args.dsn)}") from None


def _cmd_audit(args: argparse.Namespace) -> int:
    from .report import exit_status, render_json, render_sarif, render_text, use_color

    if args.proxy is not None and not args.probe:
        return _fail("--proxy is the address the probe uses: add --probe")
    try:
        config = _load_config(args.config)
        # The baseline before the database: a typo in it should not cost a full audit.
        # --baseline, else [audit] baseline (relative to the config file).
        path = args.baseline or (str(Path(args.config).parent / config.audit.baseline)
                                 if config.audit.baseline else None)
        baseline: Baseline | None = load_baseline(path) if path else None
        if args.probe:
            _proxy_address(args, config)
        report = _run(args, config)
    except BaselineError as exc:
        return _fail(str(exc))
    except _Refusal as exc:
        return _fail(str(exc))

    if args.write_baseline:
        try:
            count = write_baseline(args.write_baseline, report.findings, keep=baseline)
        except OSError as exc:
            return _fail(f"cannot write {args.write_baseline}: {exc.strerror or exc}")
        print(f"wrote {count} [[accept]] entr{'y' if count == 1 else 'ies'} to "
              f"{args.write_baseline}: write the reason of each (an empty reason is refused "
              "when the baseline loads), or fix the finding and delete its entry")
        return 0

    if args.json or args.sarif:
        print(render_sarif(report, baseline) if args.sarif else render_json(report, baseline))
        if baseline is not None:  # stdout is the document; stale entries go to stderr
            for entry in baseline.unused(report.findings):
                print(f"pgtenant audit: note: stale baseline: {baseline.path} entry "
                      f"{entry.number} ({entry.describe()}) matches no finding",
                      file=sys.stderr)
    else:
        sys.stdout.write(render_text(report, baseline,
                                     min_severity=Severity.parse(args.min_severity),
                                     color=use_color(sys.stdout)))
    return exit_status(report, baseline)


def add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     default_config: str) -> None:
    """Add ``audit`` to the top-level sub-parser action ``sub``."""
    p = sub.add_parser(
        "audit", help="audit a database for tenant-isolation holes (exit 1 on an error)",
        description="Read the catalogs of a live database and report every tenant-isolation "
                    "hole: missing or unscoped row-level security, cross-tenant grants, "
                    "SECURITY DEFINER functions, views, roles. Exit status: 0 no error, 1 an "
                    "error the baseline does not accept, 2 the audit could not run.")
    p.add_argument("--dsn", required=True, help=_DSN_HELP)
    p.add_argument("--config", default=default_config,
                   help="the proxy's TOML config: tenant types and their roles and schemas "
                        "(default: $PGTENANT_CONFIG, else config/pgtenant.toml)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="a JSON array of findings on stdout")
    fmt.add_argument("--sarif", action="store_true",
                     help="SARIF 2.1.0 on stdout (for code scanning)")
    p.add_argument("--baseline", metavar="FILE",
                   help="TOML of accepted findings, each with a reason: shown as accepted, "
                        "they do not fail the audit (default: [audit] baseline)")
    p.add_argument("--write-baseline", metavar="FILE",
                   help="write every finding to FILE as an entry with an empty reason, and "
                        "exit 0; the file loads once each reason is written")
    p.add_argument("--probe", action="store_true",
                   help="also sign in through a running pgtenant as real tenants and try "
                        "cross-tenant reads and writes (rolled back)")
    p.add_argument("--proxy", metavar="HOST:PORT",
                   help="where --probe reaches pgtenant (default: the config's listen)")
    p.add_argument("--min-severity", choices=("error", "warning", "info"), default="info",
                   help="hide lesser findings in the text output (default info: show all)")
    p.set_defaults(func=_cmd_audit)
