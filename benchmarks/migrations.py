"""Lifecycle figure (issue #12): a one-column migration across N tenant schemas, and plan.

``python -m benchmarks.migrations --tenants 200`` starts a scratch cluster, makes N
schema-per-tenant organizations with pgtenant's own ``init``/``create_tenant`` (each with a
``projects`` table from migration 0001), then times ``apply`` of one ``ADD COLUMN`` file at
each concurrency, and ``plan`` on the up-to-date fleet (wall time and its one query).
Prints one JSON object and writes it to ``benchmarks/results/migrations.json``.
Goals of the issue: 1,000 tenants in < 60 s, plan < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from pgtenant.config import TenantTypeConfig
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.init import init_database
from pgtenant.control.migrations.files import load_migrations
from pgtenant.control.migrations.runner import RolloutOptions, apply, make_plan
from pgtenant.control.tenants import create_tenant

__all__ = ["main"]

_TYPE = TenantTypeConfig(name="enterprise", role="{schema}", search_path=("{schema}",))


class _Quiet:
    def event(self, kind: str, **fields: Any) -> None:
        if kind == "target_failed":
            raise SystemExit(f"benchmark migration failed: {fields['message']}")


async def _run(cluster: PostgresCluster, tenants: int, concurrencies: list[int],
               workdir: Path) -> dict[str, Any]:
    cluster.create_database("bench_mig")
    dsn = cluster.admin_dsn("bench_mig")
    await init_database(dsn, proxy_role="bench_mig_proxy", proxy_password="p" * 20,
                        control_role="bench_mig_control", control_password="c" * 20,
                        tenant_types={"enterprise": _TYPE})
    t0 = time.perf_counter()
    for i in range(tenants):
        await create_tenant(dsn, slug=f"bm{i:05d}", tenant_type=_TYPE,
                            proxy_role="bench_mig_proxy")
    created = time.perf_counter() - t0
    mdir = workdir / "migrations"
    mdir.mkdir()
    (mdir / "0001_projects.sql").write_text(
        "CREATE TABLE projects (id bigserial PRIMARY KEY, name text NOT NULL);\n"
        "INSERT INTO projects (name) SELECT 'p' || g FROM generate_series(1, 100) g;\n")
    wide = RolloutOptions(wave_size=10_000, concurrency=8, max_failures=1)
    await apply(dsn, load_migrations(mdir), wide, _Quiet())
    result: dict[str, Any] = {"tenants": tenants, "create_tenants_s": round(created, 2),
                              "apply_one_column_s": {}}
    for n, conc in enumerate(concurrencies, start=2):
        (mdir / f"{n:04d}_col{conc}.sql").write_text(
            f"ALTER TABLE projects ADD COLUMN c{conc} numeric;\n")
        opts = RolloutOptions(wave_size=10_000, concurrency=conc, max_failures=1)
        t0 = time.perf_counter()
        summary = await apply(dsn, load_migrations(mdir), opts, _Quiet())
        elapsed = time.perf_counter() - t0
        assert len(summary.done) == tenants, summary
        result["apply_one_column_s"][str(conc)] = round(elapsed, 2)
    conn = await asyncpg.connect(dsn)
    try:
        migrations = load_migrations(mdir)
        plans = []
        for _ in range(3):
            t0 = time.perf_counter()
            plan = await make_plan(conn, migrations)
            plans.append((time.perf_counter() - t0, plan.query_seconds))
        assert not plan.pending_targets
    finally:
        await conn.close()
    best = min(plans)
    result["plan_up_to_date_s"] = round(best[0], 3)
    result["plan_query_s"] = round(best[1], 3)
    return result


def main() -> None:
    """Run the figure and print/write it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--concurrency", default="1,4,8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PostgresCluster() as cluster:
        result = asyncio.run(_run(cluster, args.tenants,
                                  [int(c) for c in args.concurrency.split(",")], Path(tmp)))
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(__file__).parent / "results" / "migrations.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
