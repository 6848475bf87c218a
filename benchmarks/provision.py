"""Provisioning figure (issue #12, item 6): a tenant from nothing to ready, phase by phase.

``python -m benchmarks.provision`` starts a scratch cluster, installs pgtenant, makes a fleet
of ``--fleet`` existing schema-per-tenant tenants (so the plan query sees a real fleet),
writes a generated 33-file migration history (the story's count: tables, indexes, column
adds and renames, a view, a function, backfills) and a seed of ``--seed-rows`` rows, then:

- provisions ``--runs`` schema-per-tenant tenants with ``provision_tenant`` and reports
  each phase's median and the total's median and max;
- one through the CLI (``pgtenant tenant provision``: Python start-up included);
- one database-per-tenant tenant (CREATE DATABASE, then the same phases there);
- drops one (with and without ``--dump``).

Prints one JSON object and writes it to ``benchmarks/results/provision.json``.
Goal of the issue: ready in < 30 s with a 33-file history.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pgtenant.config import TenantTypeConfig, parse_dsn
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.init import init_database
from pgtenant.control.migrations.files import load_migrations
from pgtenant.control.migrations.runner import RolloutOptions, apply
from pgtenant.control.provision import drop_tenant, provision_tenant
from pgtenant.control.tenants import create_tenant

__all__ = ["main", "migration_history"]

_TYPE = TenantTypeConfig(name="enterprise", role="{schema}", search_path=("{schema}",))
_PROXY = "bench_prov_proxy"
ROOT = Path(__file__).resolve().parents[1]


def migration_history(count: int = 33) -> dict[str, str]:
    """Returns: ``count`` migration files (name -> SQL) shaped like a product's history."""
    files: dict[str, str] = {}
    tables = ["projects", "members", "tasks", "comments", "labels", "budgets", "invoices",
              "events", "files", "settings", "webhooks"]
    n = 0

    def add(name: str, sql: str) -> None:
        nonlocal n
        n += 1
        if n <= count:
            files[f"{n:04d}_{name}.sql"] = sql

    for t in tables:  # 11 tables
        add(f"create_{t}", f"CREATE TABLE {t} (id bigserial PRIMARY KEY, name text NOT NULL, "
                           f"created_at timestamptz NOT NULL DEFAULT now());\n")
    for t in tables:  # 11 columns + indexes
        add(f"{t}_owner", f"ALTER TABLE {t} ADD COLUMN owner_id bigint;\n"
                          f"CREATE INDEX {t}_owner_idx ON {t} (owner_id);\n")
    add("projects_status", "ALTER TABLE projects ADD COLUMN status text NOT NULL "
                           "DEFAULT 'active';\nCREATE INDEX projects_status_idx ON projects "
                           "(status);\n")
    add("tasks_project", "ALTER TABLE tasks ADD COLUMN project_id bigint REFERENCES "
                         "projects;\nCREATE INDEX tasks_project_idx ON tasks (project_id);\n")
    add("open_tasks_view", "CREATE VIEW open_tasks AS SELECT t.* FROM tasks t "
                           "JOIN projects p ON p.id = t.project_id WHERE p.status = 'active';\n")
    add("budget_amount", "ALTER TABLE budgets ADD COLUMN amount numeric(12,2) NOT NULL "
                         "DEFAULT 0;\n")
    add("invoice_total_fn", "CREATE FUNCTION invoice_total(p bigint) RETURNS numeric "
                            "LANGUAGE sql STABLE AS $$ SELECT 0::numeric $$;\n")
    add("labels_unique", "CREATE UNIQUE INDEX labels_name_idx ON labels (name);\n")
    add("rename_files", "ALTER TABLE files RENAME COLUMN name TO filename;\n")
    add("settings_kv", "ALTER TABLE settings ADD COLUMN value jsonb NOT NULL DEFAULT '{}';\n")
    add("events_kind", "ALTER TABLE events ADD COLUMN kind text;\n"
                       "UPDATE events SET kind = 'legacy' WHERE kind IS NULL;\n")
    add("members_email", "ALTER TABLE members ADD COLUMN email text;\n"
                         "CREATE UNIQUE INDEX members_email_idx ON members (lower(email));\n")
    add("comments_body", "ALTER TABLE comments ADD COLUMN body text NOT NULL DEFAULT '';\n")
    return files


def _seed(rows: int) -> str:
    return (f"INSERT INTO projects (name) SELECT 'project ' || g "
            f"FROM generate_series(1, {rows}) g;\n"
            f"INSERT INTO tasks (name, project_id) SELECT 'task ' || g, g "
            f"FROM generate_series(1, {rows}) g;\n"
            "INSERT INTO settings (name, value) VALUES ('tenant', "
            "jsonb_build_object('id', current_setting('app.tenant_id')));\n")


def _summary(results: list[dict[str, float]]) -> dict[str, Any]:
    phases = {k: round(statistics.median(r[k] for r in results), 4) for k in results[0]}
    return {"phases_median_s": phases}


async def _run(cluster: PostgresCluster, args: argparse.Namespace, workdir: Path
               ) -> dict[str, Any]:
    cluster.create_database("bench_prov")
    dsn = cluster.admin_dsn("bench_prov")
    await init_database(dsn, proxy_role=_PROXY, proxy_password="p" * 20,
                        control_role="bench_prov_control", control_password="c" * 20,
                        tenant_types={"enterprise": _TYPE})
    mdir = workdir / "migrations"
    mdir.mkdir()
    history = migration_history(33)
    for name, sql in history.items():
        (mdir / name).write_text(sql)
    migrations = load_migrations(mdir)
    assert len(migrations) == 33
    for i in range(args.fleet):
        await create_tenant(dsn, slug=f"fleet{i:04d}", tenant_type=_TYPE, proxy_role=_PROXY)

    class _Quiet:
        def event(self, kind: str, **fields: Any) -> None:
            if kind == "target_failed":
                raise SystemExit(f"fleet migration failed: {fields['message']}")

    await apply(dsn, migrations, RolloutOptions(wave_size=10_000, concurrency=4), _Quiet())
    seed = _seed(args.seed_rows)
    runs: list[dict[str, float]] = []
    totals: list[float] = []
    for i in range(args.runs):
        res = await provision_tenant(dsn, slug=f"new{i:03d}", tenant_type=_TYPE,
                                     migrations=migrations, proxy_role=_PROXY, seed_sql=seed)
        assert len(res.applied) == 33 and res.seeded
        runs.append(res.phases)
        totals.append(res.seconds)
    result: dict[str, Any] = {
        "migration_files": 33, "fleet_tenants": args.fleet, "seed_rows": args.seed_rows,
        "schema_per_tenant": {"runs": args.runs,
                              "total_median_s": round(statistics.median(totals), 3),
                              "total_max_s": round(max(totals), 3), **_summary(runs)},
    }

    # The operator's command, Python start-up and config loading included.
    config = workdir / "pgtenant.toml"
    config.write_text(f"""\
[control]
dsn = "postgresql://bench_prov_control:{'c' * 20}@{cluster.host}:{cluster.port}/bench_prov"

[databases.bench_prov]
dsn = "postgresql://{_PROXY}:{'p' * 20}@{cluster.host}:{cluster.port}/bench_prov"

[databases.bench_dpt]
dsn = "postgresql://{_PROXY}:{'p' * 20}@{cluster.host}:{cluster.port}/bench_dpt"

[tenant_types.enterprise]
role = "{{schema}}"
search_path = ["{{schema}}"]

[migrations]
dir = "migrations"
""")
    (workdir / "seed.sql").write_text(seed)
    t0 = time.perf_counter()
    command = [sys.executable, "-m", "pgtenant", "tenant", "provision", "--dsn", dsn,
               "--config", str(config), "--slug", "cli_tenant", "--type", "enterprise",
               "--seed", str(workdir / "seed.sql"), "--json"]
    out = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True,
                                  text=True, env=dict(os.environ))
    if out.returncode != 0:
        raise SystemExit(f"tenant provision failed: {out.stderr}")
    cli_wall = time.perf_counter() - t0
    report = json.loads(out.stdout.splitlines()[0])
    result["cli"] = {"wall_s": round(cli_wall, 3), "provision_s": report["seconds"],
                     "applied": len(report["applied"]), "phases_s": report["phases"]}

    # Database per tenant: its own database, created at provision, migrated and seeded there.
    other = dataclasses.replace(parse_dsn(dsn), dbname="bench_dpt").to_url()
    res = await provision_tenant(dsn, slug="dpt", tenant_type=_TYPE, migrations=migrations,
                                 proxy_role=_PROXY, database="bench_dpt",
                                 other_databases={"bench_dpt": other}, seed_sql=seed)
    assert len(res.applied) == 33
    result["database_per_tenant"] = {"total_s": round(res.seconds, 3),
                                     "phases_s": {k: round(v, 4)
                                                  for k, v in res.phases.items()}}

    t0 = time.perf_counter()
    dropped = await drop_tenant(dsn, slug="new000", tenant_type=_TYPE,
                                dump=workdir / "new000.sql")
    result["drop_with_dump_s"] = round(time.perf_counter() - t0, 3)
    result["drop_phases_s"] = {k: round(v, 4) for k, v in dropped.phases.items()}
    return result


def main() -> None:
    """Run the figure and print/write it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fleet", type=int, default=100)
    parser.add_argument("--seed-rows", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PostgresCluster() as cluster:
        result = asyncio.run(_run(cluster, args, Path(tmp)))
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(__file__).parent / "results" / "provision.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
