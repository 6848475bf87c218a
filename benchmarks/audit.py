"""Audit figure (issue: "catalog queries only, no per-object round trips: audit of 1,000
tenant schemas in under 10 s").

``python -m benchmarks.audit --tenants 1000`` starts a scratch cluster, installs pgtenant
(``init_database`` with two tenant types), and builds the fleet in a few big SQL batches that
mirror what ``tenant create`` and a product's migrations leave behind: per tenant an
organizations row, a NOLOGIN role granted to the proxy, its schema with USAGE and default
privileges for that role, three tables (one with a bigserial, one with a foreign key and an
index), a view and a function; plus shared RLS tables in ``public`` for a static type
(``sme``). Then it times ``run_audit`` (``--runs`` times: min and median), the catalog read
alone (``read_snapshot``: the rest is the model and the checks), and the findings by
severity (the clean build should have no error). Prints one JSON object and writes it to
``benchmarks/results/audit.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from pgtenant.config import Config, TenantTypeConfig
from pgtenant.configfile import parse_config
from pgtenant.control.audit.catalog import read_snapshot
from pgtenant.control.audit.runner import AuditReport, run_audit
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.init import TENANT_ROLE_OPTIONS, init_database

__all__ = ["build_fleet", "main", "measure"]

ENTERPRISE = TenantTypeConfig(name="enterprise", role="{schema}",
                              search_path=("{schema}", "public"))
SME = TenantTypeConfig(name="sme", role="tenant_sme", search_path=("public",))
PROXY = "bench_audit_proxy"
_BATCH = 100  # tenants per SQL batch (one round trip each)

_SHARED_SQL = """
CREATE TABLE public.{t} (
    id      bigserial PRIMARY KEY,
    org_id  uuid NOT NULL DEFAULT pgtenant.current_tenant(),
    name    text,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {t}_org_idx ON public.{t} (org_id);
ALTER TABLE public.{t} ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.{t} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON public.{t}
    USING      (org_id = (SELECT pgtenant.current_tenant()))
    WITH CHECK (org_id = (SELECT pgtenant.current_tenant()));
GRANT SELECT, INSERT, UPDATE, DELETE ON public.{t} TO tenant_sme;
GRANT USAGE ON SEQUENCE public.{t}_id_seq TO tenant_sme;
"""

# What create_tenant does for a schema-per-tenant type, then a migration history's objects.
_TENANT_SQL = """
CREATE ROLE {s} {options};
GRANT {s} TO {proxy}{inherit};
GRANT USAGE ON SCHEMA public TO {s};
CREATE SCHEMA {s} AUTHORIZATION CURRENT_USER;
REVOKE ALL ON SCHEMA {s} FROM PUBLIC;
GRANT USAGE ON SCHEMA {s} TO {s};
ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {s};
ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE ON SEQUENCES TO {s};
CREATE TABLE {s}.projects (id bigserial PRIMARY KEY, name text NOT NULL,
                           created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE {s}.tasks (id bigserial PRIMARY KEY, project_id bigint REFERENCES {s}.projects,
                        title text, done boolean NOT NULL DEFAULT false);
CREATE INDEX tasks_project_idx ON {s}.tasks (project_id);
CREATE TABLE {s}.settings (key text PRIMARY KEY, value jsonb NOT NULL DEFAULT '{{}}');
CREATE VIEW {s}.open_tasks AS SELECT t.* FROM {s}.tasks t WHERE NOT t.done;
CREATE FUNCTION {s}.task_count(p bigint) RETURNS bigint LANGUAGE sql STABLE
    AS $$ SELECT count(*) FROM {s}.tasks WHERE project_id = p $$;
"""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def config_for(dsn: str, dbname: str) -> Config:
    """Returns: the config the audit judges the fleet by (the two tenant types)."""
    host_part = dsn.split("@", 1)[1].split("/", 1)[0]
    text = f"""\
[databases.{dbname}]
dsn = "postgresql://{PROXY}:{'p' * 20}@{host_part}/{dbname}"

[control]
dsn = "postgresql://bench_audit_control:{'c' * 20}@{host_part}/{dbname}"

[tenant_types.enterprise]
role = "{{schema}}"
search_path = ["{{schema}}", "public"]

[tenant_types.sme]
role = "tenant_sme"
search_path = ["public"]
"""
    return parse_config(tomllib.loads(text))


async def build_fleet(dsn: str, tenants: int, *, sme: int = 20,
                      prefix: str = "ba") -> dict[str, float]:
    """Install pgtenant in ``dsn``'s (empty) database and make ``tenants`` schema-per-tenant
    tenants ``t_{prefix}00000``... and ``sme`` shared-schema ones, in batches.

    Returns: seconds for init and for the fleet.
    """
    t0 = time.perf_counter()
    await init_database(dsn, proxy_role=PROXY, proxy_password="p" * 20,
                        control_role="bench_audit_control", control_password="c" * 20,
                        tenant_types={"enterprise": ENTERPRISE, "sme": SME})
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        inherit = " WITH INHERIT FALSE, SET TRUE" \
            if conn.get_server_version().major >= 16 else ""
        await conn.execute("".join(_SHARED_SQL.format(t=t)
                                   for t in ("campaigns", "brand_guidelines", "invoices")))
        await conn.execute(
            "INSERT INTO pgtenant.organizations (slug, tenant_type) "
            "SELECT $1 || 'sme' || lpad(g::text, 4, '0'), 'sme' "
            "FROM generate_series(1, $2) g", prefix, sme)
        slugs = [f"{prefix}{i:05d}" for i in range(tenants)]
        await conn.execute(
            "INSERT INTO pgtenant.organizations (slug, tenant_type, schema) "
            "SELECT s, 'enterprise', 't_' || s FROM unnest($1::text[]) s", slugs)
        for start in range(0, tenants, _BATCH):
            await conn.execute("".join(
                _TENANT_SQL.format(s=_q(f"t_{slug}"), options=TENANT_ROLE_OPTIONS,
                                   proxy=_q(PROXY), inherit=inherit)
                for slug in slugs[start:start + _BATCH]))
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return {"init_s": init_s, "fleet_s": time.perf_counter() - t0}


async def measure(dsn: str, config: Config, runs: int) -> dict[str, Any]:
    """Returns: run_audit's times (all, min, median), the catalog read's, the stats and
    the findings by severity and by check of the last run."""
    totals: list[float] = []
    report: AuditReport | None = None
    for _ in range(runs):
        t0 = time.perf_counter()
        report = await run_audit(dsn, config)
        totals.append(time.perf_counter() - t0)
    assert report is not None
    reads: list[float] = []
    for _ in range(runs):
        conn = await asyncpg.connect(dsn)
        try:
            t0 = time.perf_counter()
            await read_snapshot(conn, config.audit.tenant_columns)
            reads.append(time.perf_counter() - t0)
        finally:
            await conn.close()
    return {
        "audit_s": [round(t, 3) for t in totals],
        "audit_min_s": round(min(totals), 3),
        "audit_median_s": round(statistics.median(totals), 3),
        "catalog_read_min_s": round(min(reads), 3),
        "catalog_read_median_s": round(statistics.median(reads), 3),
        "model_and_checks_median_s": round(statistics.median(totals)
                                           - statistics.median(reads), 3),
        "stats": report.stats,
        "findings": dict(Counter(f.severity.label for f in report.findings)),
        "findings_by_check": dict(Counter(f"{f.severity.label} {f.check}"
                                          for f in report.findings)),
        "errors": len(report.errors),
        "error_lines": [f"{f.check} {f.object}: {f.message}" for f in report.errors][:10],
    }


async def _run(cluster: PostgresCluster, tenants: int, runs: int) -> dict[str, Any]:
    dbname = "bench_audit"
    cluster.create_database(dbname)
    dsn = cluster.admin_dsn(dbname)
    built = await build_fleet(dsn, tenants)
    result: dict[str, Any] = {"tenants": tenants, "runs": runs,
                              **{k: round(v, 2) for k, v in built.items()}}
    result.update(await measure(dsn, config_for(dsn, dbname), runs))
    return result


def main() -> None:
    """Run the figure and print/write it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", metavar="FILE",
                        help="also write a cProfile of one audit to FILE (pstats)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(), PostgresCluster() as cluster:
        result = asyncio.run(_run(cluster, args.tenants, args.runs))
        if args.profile:
            import cProfile

            dsn = cluster.admin_dsn("bench_audit")
            config = config_for(dsn, "bench_audit")
            cProfile.runctx("asyncio.run(run_audit(dsn, config))", globals(),
                            {"dsn": dsn, "config": config, "asyncio": asyncio,
                             "run_audit": run_audit}, args.profile)
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(__file__).parent / "results" / "audit.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
