"""The demo environment: the schema-routing data model from the seed article, with tenants.

Owns the demo's tenants, rows and tokens and the proxy config that serves them. The data
model itself (SME tables in ``public``, agency tables in ``tenant_b``, the router function,
the security-invoker view, each ``enterprise`` tenant's ``projects``) is not SQL in this file:
it is the migration history in ``demo_migrations/``, applied by the migration runner as
``pgtenant migrate apply`` would, so the demo shows the runner at work. Run once per fresh
database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from ..config import TenantTypeConfig, parse_dsn
from ..identity.context import quote_ident
from . import ControlError
from .init import DEFAULT_CONTROL_ROLE, DEFAULT_PROXY_ROLE, init_database
from .tenants import create_tenant, issue_token

__all__ = [
    "DEMO_MIGRATIONS_DIR",
    "DEMO_TENANT_TYPES",
    "DemoEnv",
    "DemoTenant",
    "build_demo",
    "run_demo",
]

DEMO_TENANT_TYPES: dict[str, TenantTypeConfig] = {
    "sme": TenantTypeConfig(name="sme", role="tenant_sme", search_path=("public",)),
    "agency": TenantTypeConfig(
        name="agency", role="tenant_agency", search_path=("tenant_b", "public")
    ),
    "enterprise": TenantTypeConfig(
        name="enterprise", role="{schema}", search_path=("{schema}", "public")
    ),
}

# The demo's data model, as a numbered migration history applied through the runner (the
# seed story's shapes: 0001 SME tables in public with RLS, 0002 the agency schema tenant_b,
# 0003 the router function, 0004 the unified view, all scope=shared; 0005 each enterprise
# tenant's own projects table, scope=tenant; 0006-0008 tenant-leading indexes, which `pgtenant
# audit` asks for). Shipped inside the package so a wheel has it.
DEMO_MIGRATIONS_DIR = Path(__file__).resolve().parent / "demo_migrations"


class _Recorder:
    """A silent reporter: build_demo keeps the runner's events to summarise them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))


# Demo rows per tenant. Every row name starts with "<slug>: " so tests can assert visibility
# by prefix.
_SME_ROWS: dict[str, dict[str, list[str]]] = {
    "acme": {
        "public.brand_guidelines": ["acme: primary palette", "acme: tone of voice"],
        "public.campaigns": ["acme: spring launch", "acme: summer sale"],
    },
    "initech": {
        "public.brand_guidelines": [
            "initech: logo usage", "initech: typography", "initech: voice",
        ],
        "public.campaigns": ["initech: tps reports", "initech: q3 push"],
    },
}
_AGENCY_SLUG = "umbrella"
_AGENCY_ENTITIES = ("client_a", "client_b")
_ENTERPRISE_ROWS: dict[str, list[str]] = {
    "globex": ["globex: hammock district", "globex: magnet project"],
    "hooli": ["hooli: nucleus", "hooli: box three"],
}


@dataclass(slots=True)
class DemoTenant:
    """One demo tenant, its token(s) and the rows it should (alone) see."""

    slug: str
    org_id: UUID
    tenant_type: str
    token: str
    token_id: UUID
    role: str
    schema: str | None = None
    entity_ids: list[UUID] = field(default_factory=list)
    # entity name (client_a...) -> id, and -> a token bound to that entity.
    entities: dict[str, UUID] = field(default_factory=dict)
    entity_tokens: dict[str, str] = field(default_factory=dict)
    # qualified table name -> sorted row names (``name`` or ``content->>'name'``).
    rows: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class DemoEnv:
    """A database prepared by ``build_demo``."""

    admin_dsn: str
    proxy_dsn: str
    proxy_role: str
    proxy_password: str
    dbname: str
    tenant_types: dict[str, TenantTypeConfig]
    tenants: dict[str, DemoTenant]
    # The control role's URL (signing key, registry): the config's [control] dsn.
    control_dsn: str = ""
    control_role: str = ""
    control_password: str = ""
    # The runner's apply that built the model: its run id, and how many targets (the shared
    # schemas and each enterprise schema) it migrated.
    migration_run: int = 0
    migrated_targets: int = 0

    def config_toml(self, listen_port: int, *, pool_size: int = 4, extra: str = "",
                    tls: tuple[str, str] | None = None) -> str:
        """Render a proxy config serving this database on ``127.0.0.1:listen_port``.

        ``extra`` is inserted after ``listen`` and before the first table, so it may hold
        top-level keys (``log_level = "debug"``) and/or whole tables (``[control]``).
        A ``[control]`` table with ``control_dsn`` is added unless ``extra`` has its own.
        ``tls`` is (cert_file, key_file) for a ``[tls]`` table offering TLS to clients.

        Returns: TOML text accepted by ``pgtenant.configfile.parse_config``.
        """
        lines = [f"listen = {_toml_str(f'127.0.0.1:{listen_port}')}"]
        if extra.strip():
            lines.append(extra.strip())
        lines += [
            "",
            f"[databases.{_toml_key(self.dbname)}]",
            f"dsn = {_toml_str(self.proxy_dsn)}",
            f"pool_size = {int(pool_size)}",
        ]
        for name, tenant_type in self.tenant_types.items():
            path = ", ".join(_toml_str(p) for p in tenant_type.search_path)
            lines += [
                "",
                f"[tenant_types.{_toml_key(name)}]",
                f"role = {_toml_str(tenant_type.role)}",
                f"search_path = [{path}]",
            ]
        if tls is not None:
            lines += ["", "[tls]", f"cert_file = {_toml_str(tls[0])}",
                      f"key_file = {_toml_str(tls[1])}"]
        if self.control_dsn and not re.search(r"^\s*\[control\]", extra, re.MULTILINE):
            lines += ["", "[control]", f"dsn = {_toml_str(self.control_dsn)}"]
        return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


async def build_demo(admin_dsn: str, *, proxy_role: str = DEFAULT_PROXY_ROLE,
                     control_role: str = DEFAULT_CONTROL_ROLE) -> DemoEnv:
    """Install pgtenant and the demo data model, tenants and tokens into an existing database.

    Sets fresh passwords on the proxy and control roles (roles are cluster-wide, so a second
    demo database in the same cluster re-keys them; earlier ``proxy_dsn``/``control_dsn``
    values go stale).

    Returns: the ``DemoEnv``.
    Raises: ControlError when the database already has demo tenants;
    asyncpg.PostgresError when a statement fails.
    """
    slugs = [*_SME_ROWS, _AGENCY_SLUG, *_ENTERPRISE_ROWS]
    conn = await asyncpg.connect(admin_dsn)
    try:
        # Checked before init, which would otherwise re-key the proxy role for nothing.
        if await conn.fetchval("SELECT to_regclass('pgtenant.organizations') IS NOT NULL"):
            existing = await conn.fetch(
                "SELECT slug FROM pgtenant.organizations WHERE slug = ANY($1::text[])", slugs
            )
            if existing:
                raise ControlError(
                    f"demo tenants already exist in this database: "
                    f"{[r['slug'] for r in existing]}"
                )
        password = secrets.token_urlsafe(24)
        control_password = secrets.token_urlsafe(24)
        await init_database(
            admin_dsn, proxy_role=proxy_role, proxy_password=password,
            control_role=control_role, control_password=control_password,
            tenant_types=DEMO_TENANT_TYPES,
        )
        dbname: str = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()

    tenants: dict[str, DemoTenant] = {}
    for slug in slugs:
        type_name = (
            "sme" if slug in _SME_ROWS else "agency" if slug == _AGENCY_SLUG else "enterprise"
        )
        tenant_type = DEMO_TENANT_TYPES[type_name]
        org_id = await create_tenant(
            admin_dsn, slug=slug, tenant_type=tenant_type, proxy_role=proxy_role
        )
        schema = f"t_{slug}" if type_name == "enterprise" else None
        token_id, token = await issue_token(admin_dsn, tenant_slug=slug, label="demo")
        tenants[slug] = DemoTenant(
            slug=slug, org_id=org_id, tenant_type=type_name, token=token, token_id=token_id,
            role=schema or tenant_type.role, schema=schema,
        )

    # After the tenants exist, so the scope=tenant files reach each enterprise schema (as
    # they reach a tenant made later by `tenant create`, on the next `migrate apply`).
    run_id, migrated = await _apply_demo_migrations(admin_dsn)

    conn = await asyncpg.connect(admin_dsn)
    try:
        async with conn.transaction():
            await _insert_rows(conn, tenants)
    finally:
        await conn.close()
    umbrella = tenants[_AGENCY_SLUG]
    client_a = umbrella.entities["client_a"]
    _, bound = await issue_token(
        admin_dsn, tenant_slug=_AGENCY_SLUG, entity_id=client_a, label="demo client_a"
    )
    umbrella.entity_tokens["client_a"] = bound

    proxy_dsn = dataclasses.replace(
        parse_dsn(admin_dsn), user=proxy_role, password=password, params=()
    ).to_url()
    control_dsn = dataclasses.replace(
        parse_dsn(admin_dsn), user=control_role, password=control_password, params=()
    ).to_url()
    return DemoEnv(
        admin_dsn=admin_dsn, proxy_dsn=proxy_dsn, proxy_role=proxy_role,
        proxy_password=password, dbname=dbname, tenant_types=dict(DEMO_TENANT_TYPES),
        tenants=tenants, control_dsn=control_dsn, control_role=control_role,
        control_password=control_password, migration_run=run_id, migrated_targets=migrated,
    )


async def _apply_demo_migrations(admin_dsn: str) -> tuple[int, int]:
    """Apply ``DEMO_MIGRATIONS_DIR`` with the runner's defaults (shared files first, then
    every enterprise schema).

    Returns: (run id, targets migrated).
    Raises: ControlError when a target failed (the message names tenant, file, statement).
    """
    from .migrations.files import load_migrations
    from .migrations.runner import RolloutOptions, apply

    recorder = _Recorder()
    summary = await apply(admin_dsn, load_migrations(DEMO_MIGRATIONS_DIR), RolloutOptions(),
                          recorder, args={"dir": str(DEMO_MIGRATIONS_DIR), "by": "demo"})
    if summary.failed or summary.status not in ("done", "nothing"):
        raise ControlError(f"demo migrations: run {summary.run_id} {summary.status}: "
                           + "; ".join(summary.failed.values()))
    return summary.run_id, len(summary.done)


async def _insert_rows(conn: asyncpg.Connection, tenants: Mapping[str, DemoTenant]) -> None:
    # Runs as the admin (a superuser bypasses RLS), so org ids are written explicitly.
    for slug, tables in _SME_ROWS.items():
        tenant = tenants[slug]
        for i, name in enumerate(tables["public.brand_guidelines"]):
            await conn.execute(
                "INSERT INTO public.brand_guidelines (org_id, name, guidelines) "
                "VALUES ($1, $2, $3::jsonb)",
                tenant.org_id, name, json.dumps({"name": name, "rank": i}),
            )
        for i, name in enumerate(tables["public.campaigns"]):
            await conn.execute(
                "INSERT INTO public.campaigns (org_id, name, budget) VALUES ($1, $2, $3)",
                tenant.org_id, name, 1000 * (i + 1),
            )
        tenant.rows = {table: sorted(names) for table, names in tables.items()}

    agency = tenants[_AGENCY_SLUG]
    data_names: list[str] = []
    for entity in _AGENCY_ENTITIES:
        entity_id = await conn.fetchval(
            "INSERT INTO tenant_b.workspace_entities (organization_id, name, metadata) "
            "VALUES ($1, $2, $3::jsonb) RETURNING id",
            agency.org_id, f"{agency.slug}: {entity}", json.dumps({"client": entity}),
        )
        agency.entities[entity] = entity_id
        agency.entity_ids.append(entity_id)
        for data_type in ("brand_guidelines", "persona"):
            name = f"{agency.slug}: {entity} {data_type}"
            await conn.execute(
                "INSERT INTO tenant_b.entity_data (organization_id, entity_id, data_type, "
                "content) VALUES ($1, $2, $3, $4::jsonb)",
                agency.org_id, entity_id, data_type, json.dumps({"name": name}),
            )
            data_names.append(name)
    agency.rows = {
        "tenant_b.workspace_entities": sorted(f"{agency.slug}: {e}" for e in _AGENCY_ENTITIES),
        "tenant_b.entity_data": sorted(data_names),
    }

    for slug, names in _ENTERPRISE_ROWS.items():
        tenant = tenants[slug]
        assert tenant.schema is not None
        # The table is 0005_enterprise_projects.sql's, made by the runner in each schema.
        table = f"{quote_ident(tenant.schema)}.projects"
        await conn.executemany(f"INSERT INTO {table} (name) VALUES ($1)", [(n,) for n in names])
        tenant.rows = {f"{tenant.schema}.projects": sorted(names)}


def _pgtenant_command() -> str:
    """Returns: how to run ``pgtenant`` from a shell here: this virtualenv's script (relative
    when under the current directory, as ``.venv/bin/pgtenant``), else ``python -m pgtenant``."""
    script = Path(sys.executable).parent / "pgtenant"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m pgtenant"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _migration_lines(env: DemoEnv, admin_dsn: str, config_path: Path) -> list[str]:
    """Returns: the demo's lines about its migration history: the state, and what to try."""
    files = sorted(p.name for p in DEMO_MIGRATIONS_DIR.glob("*.sql"))
    cmd = _pgtenant_command()
    common = f'--dsn "{admin_dsn}" --config {config_path}'
    return [
        f"Migrations: the demo model is {len(files)} files in "
        f"{config_path.parent / 'migrations'} ({files[0]} ... {files[-1]}), applied by the "
        f"runner (run {env.migration_run}: {env.migrated_targets} targets, the shared schemas "
        "and each enterprise schema). The fleet's state:",
        f"  {cmd} migrate status {common}",
        "  # a tenant made by `tenant create` gets its schema from the runner:",
        f"  {cmd} tenant create {common} --slug initrode --type enterprise",
        f"  {cmd} migrate apply {common}",
        "  # your own change: migrate new, edit the file, then migrate plan and apply:",
        f"  {cmd} migrate new --config {config_path} add_budget",
    ]


def run_demo(workdir: Path, *, port: int = 6432, pool_size: int = 10,
             metrics_port: int | None = None) -> int:
    """``make demo``: a throwaway cluster with the demo tenants, and the proxy in the foreground.

    Prints one ready-to-paste ``psql`` line per tenant, the admin console's and the metrics
    URL, then serves until Ctrl-C; the cluster is stopped and deleted on the way out, and so
    is ``workdir`` (it holds tokens, the admin token's hash and a TLS key).

    Returns: the process exit code.
    """
    import hashlib
    import socket

    from ..app import serve
    from ..configfile import load_config
    from ..tls import make_self_signed
    from .cluster import PostgresCluster

    def bindable(p: int) -> OSError | None:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", p))
            except OSError as exc:
                return exc
        return None

    busy = bindable(port)  # fail before spending seconds on initdb
    if busy is not None:
        print(f"pgtenant demo: port {port} is busy ({busy.strerror}); pass --port "
              "(make demo PORT=...)", file=sys.stderr)
        return 1
    if metrics_port is None:
        metrics_port = next((p for p in (9127, *range(port + 1, port + 50))
                             if p != port and bindable(p) is None), 0)
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / "pgtenant.toml").exists():  # not ours: never delete it
            print(f"pgtenant demo: {workdir} exists and is not a demo directory; pass --dir",
                  file=sys.stderr)
            return 1
        shutil.rmtree(workdir)  # left by a demo that was killed: stale tokens and keys
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    cluster = PostgresCluster()
    print(f"pgtenant demo: starting PostgreSQL from {cluster.bindir} ...", flush=True)
    try:
        cluster.start()
        cluster.create_database("app")
        print("pgtenant demo: installing pgtenant, the demo tables and tenants ...", flush=True)
        env = asyncio.run(build_demo(cluster.admin_dsn("app")))
        config_path = workdir / "pgtenant.toml"
        # A throwaway CA per run, so the demo shows TLS with full verification too.
        ca_file, cert_file, key_file = make_self_signed(workdir.resolve() / "tls")
        admin_token = "pgta_" + secrets.token_urlsafe(32)
        # A copy of the history next to the config, so `migrate new` in the demo writes into
        # the throwaway directory and never into the installed package.
        shutil.copytree(DEMO_MIGRATIONS_DIR, workdir / "migrations")
        extra = "\n".join([
            "[admin]",
            f'token_sha256 = "{hashlib.sha256(admin_token.encode()).hexdigest()}"',
            *(["[metrics]", f'listen = "127.0.0.1:{metrics_port}"'] if metrics_port else []),
            "[migrations]",
            'dir = "migrations"',
        ])
        config_path.write_text(env.config_toml(
            port, pool_size=pool_size, extra=extra, tls=(str(cert_file), str(key_file))))
        (workdir / "tokens.json").write_text(json.dumps(
            {slug: t.token for slug, t in env.tenants.items()}, indent=2) + "\n")
        psql = "psql" if shutil.which("psql") else (cluster.tool("psql") or "psql")
        lines = [
            "",
            f"pgtenant demo: PostgreSQL {cluster.host}:{cluster.port} (database app), "
            f"proxy on 127.0.0.1:{port}, config {config_path}",
            "Paste one of these; each tenant sees only its own rows:",
        ]
        for slug, tenant in env.tenants.items():
            table = {"sme": "campaigns", "agency": "entity_data"}.get(tenant.tenant_type,
                                                                      "projects")
            lines.append(f"  # {slug} ({tenant.tenant_type}): try  TABLE {table};")
            lines.append(f'  {psql} "host=127.0.0.1 port={port} dbname=app user={slug} '
                         f'password={tenant.token}"')
        acme = env.tenants["acme"]
        lines.append("  # acme writes without naming its org (org_id defaults to the tenant):")
        lines.append(f'  {psql} "host=127.0.0.1 port={port} dbname=app user=acme '
                     f'password={acme.token}" -c "INSERT INTO campaigns (name, budget) '
                     "VALUES ('x', 1) RETURNING org_id\"")
        lines.append("  # acme again, over TLS checked against the demo's throwaway CA:")
        lines.append(f'  {psql} "host=127.0.0.1 port={port} dbname=app user=acme '
                     f'password={acme.token} sslmode=verify-full sslrootcert={ca_file}"')
        lines.append("Admin console (SHOW POOLS, SHOW TENANTS, SHOW STATS, SHOW HELP ...):")
        lines.append(f'  {psql} "host=127.0.0.1 port={port} dbname=pgtenant user=admin '
                     f'password={admin_token}" -c "SHOW POOLS"')
        if metrics_port:
            lines.append(f"Metrics: curl http://127.0.0.1:{metrics_port}/metrics "
                         f"(and /healthz, /readyz)")
        lines += _migration_lines(env, cluster.admin_dsn("app"), config_path)
        lines.append("Directly, as the superuser (bypasses pgtenant):")
        lines.append(f'  {psql} "{cluster.admin_dsn("app")}"')
        lines.append(f"Ctrl-C stops the proxy and deletes the demo cluster and {workdir} "
                     "(tokens, TLS key, config).")
        print("\n".join(lines), flush=True)
        serve(load_config(config_path))
    except KeyboardInterrupt:
        pass
    finally:
        cluster.destroy()
        # Secrets (tokens, the admin token's hash, a TLS private key) must not outlive the
        # demo in a directory nobody remembers.
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"pgtenant demo: stopped; deleted the demo cluster and {workdir}", flush=True)
    return 0
