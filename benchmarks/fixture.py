"""The benchmark's database: one scratch cluster, one database per tenant count.

Each ``bench_<n>`` database holds ``n`` tenants in each layout (issue #6):

- **filtered**: one shared ``public.items`` with ``tenant_id`` on every row, a
  tenant-leading primary key and an RLS policy on ``current_setting('app.tenant_id')``
  (what both pgtenant and the application-side ``SET LOCAL`` baseline set);
- **routed**: a schema ``t_<slug>`` per tenant with its own ``items``, reached through the
  injected ``search_path``;
- **database per tenant** (10 tenants, full runs): each in a database of its own, routed
  there by its organization row;
- **by type** (the story's design, at every count): tenants of two types whose rows live in
  ``public.items_a`` and ``tenant_b.items_b``, read through a ``security_invoker`` UNION ALL
  view ``public.all_items`` and written through a router function.

Tenant sizes are skewed: tenant 0 of each layout has 100x the median row count. pgtenant's
control schema, lockdown and tokens come from pgtenant's own ``init``/``tenant create``.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import asyncpg

from pgtenant.config import TenantTypeConfig
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.init import init_database
from pgtenant.control.tenants import create_tenant, issue_token

__all__ = ["APP_PASSWORD", "APP_ROLE", "BenchDb", "Tenant", "add_database_per_tenant",
           "build_database"]

APP_ROLE = "bench_app"  # the baseline application's login role (PgBouncer / direct)
APP_PASSWORD = "bench-app-secret"
PROXY_ROLE = "bench_proxy"
PROXY_PASSWORD = "bench-proxy-secret"
# The control role: the registry and the signing keys ([control] dsn), never the login role.
CONTROL_ROLE = "bench_control"
CONTROL_PASSWORD = "bench-control-secret"
HEAVY = 100  # tenant 0's size, as a multiple of the median

TENANT_TYPES = {
    "flt": TenantTypeConfig(name="flt", role="bench_flt", search_path=("public",)),
    "rtd": TenantTypeConfig(name="rtd", role="{schema}", search_path=("{schema}",)),
    "typ_a": TenantTypeConfig(name="typ_a", role="bench_typ", search_path=("public",)),
    "typ_b": TenantTypeConfig(name="typ_b", role="bench_typ",
                              search_path=("tenant_b", "public")),
}


@dataclass
class Tenant:
    slug: str
    layout: str  # filtered | routed | by_type
    org_id: uuid.UUID
    rows: int
    schema: str | None = None
    token: str = ""
    database: str | None = None  # pgtenant's [databases.<name>] of its own (db per tenant)


@dataclass
class BenchDb:
    name: str
    count: int
    tenants: dict[str, list[Tenant]] = field(default_factory=dict)  # by layout

    def tenant(self, layout: str, index: int) -> Tenant:
        return self.tenants[layout][index % len(self.tenants[layout])]


async def _new_database(cluster: PostgresCluster, name: str) -> str:
    """Create database ``name`` with pgtenant's control schema and lockdown.

    Returns: its admin DSN.
    """
    cluster.create_database(name)
    dsn = cluster.admin_dsn(name)
    await init_database(dsn, proxy_role=PROXY_ROLE, proxy_password=PROXY_PASSWORD,
                        control_role=CONTROL_ROLE, control_password=CONTROL_PASSWORD,
                        tenant_types=TENANT_TYPES)
    return dsn


def _rows(index: int, median: int) -> int:
    return median * HEAVY if index == 0 else median


async def build_database(cluster: PostgresCluster, count: int, median_rows: int,
                         tokens_per_layout: int) -> BenchDb:
    """Create ``bench_<count>`` with ``count`` tenants per layout; issue tokens for the
    first ``tokens_per_layout`` of each.

    Returns: the database's description.
    """
    name = f"bench_{count}"
    dsn = await _new_database(cluster, name)
    db = BenchDb(name, count)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"""
            DO $$ BEGIN
              IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}';
              END IF;
            END $$;
            GRANT CONNECT ON DATABASE {name} TO {APP_ROLE};
            GRANT USAGE ON SCHEMA public TO {APP_ROLE};
            CREATE TABLE IF NOT EXISTS public.items (
                tenant_id uuid NOT NULL, id int NOT NULL, v int NOT NULL DEFAULT 0,
                payload text NOT NULL, PRIMARY KEY (tenant_id, id));
            ALTER TABLE public.items ENABLE ROW LEVEL SECURITY;
            DROP POLICY IF EXISTS tenant_rows ON public.items;
            CREATE POLICY tenant_rows ON public.items
                USING (tenant_id = current_setting('app.tenant_id', true)::uuid);
            GRANT SELECT, UPDATE ON public.items TO bench_flt, {APP_ROLE};
            CREATE SCHEMA IF NOT EXISTS tenant_b;
            CREATE TABLE IF NOT EXISTS public.items_a (LIKE public.items INCLUDING ALL);
            CREATE TABLE IF NOT EXISTS tenant_b.items_b (LIKE public.items INCLUDING ALL);
            ALTER TABLE public.items_a ENABLE ROW LEVEL SECURITY;
            ALTER TABLE tenant_b.items_b ENABLE ROW LEVEL SECURITY;
            DROP POLICY IF EXISTS tenant_rows ON public.items_a;
            DROP POLICY IF EXISTS tenant_rows ON tenant_b.items_b;
            CREATE POLICY tenant_rows ON public.items_a
                USING (tenant_id = current_setting('app.tenant_id', true)::uuid);
            CREATE POLICY tenant_rows ON tenant_b.items_b
                USING (tenant_id = current_setting('app.tenant_id', true)::uuid);
            CREATE OR REPLACE VIEW public.all_items WITH (security_invoker = true) AS
                SELECT * FROM public.items_a UNION ALL SELECT * FROM tenant_b.items_b;
            CREATE OR REPLACE FUNCTION public.bump_item(p_id int) RETURNS void
            LANGUAGE plpgsql SECURITY INVOKER AS $fn$
            BEGIN
              IF current_setting('app.tenant_type', true) = 'typ_b' THEN
                UPDATE tenant_b.items_b SET v = v + 1 WHERE id = p_id;
              ELSE
                UPDATE public.items_a SET v = v + 1 WHERE id = p_id;
              END IF;
            END $fn$;
            GRANT USAGE ON SCHEMA tenant_b TO bench_typ, {APP_ROLE};
            GRANT SELECT, UPDATE ON public.items_a, tenant_b.items_b, public.all_items
                TO bench_typ, {APP_ROLE};
        """)
    finally:
        await conn.close()

    sem = asyncio.Semaphore(1)  # concurrent GRANTs on one schema conflict in Postgres

    async def make(layout: str, index: int) -> Tenant:
        slug = f"n{count}_{layout[:3]}_{index:04d}"
        ttype = {"filtered": "flt", "routed": "rtd"}.get(
            layout, "typ_a" if index % 2 == 0 else "typ_b")
        async with sem:
            org = await create_tenant(dsn, slug=slug, tenant_type=TENANT_TYPES[ttype],
                                      proxy_role=PROXY_ROLE)
        schema = f"t_{slug}" if layout == "routed" else None
        return Tenant(slug, layout, org, _rows(index, median_rows), schema)

    for layout in ("filtered", "routed", "by_type"):
        db.tenants[layout] = list(await asyncio.gather(
            *(make(layout, i) for i in range(count))))
    conn = await asyncpg.connect(dsn)
    try:
        for tenant in db.tenants["routed"]:
            await conn.execute(f"""
                CREATE TABLE {tenant.schema}.items (
                    id int PRIMARY KEY, v int NOT NULL DEFAULT 0, payload text NOT NULL);
                GRANT USAGE ON SCHEMA {tenant.schema} TO {APP_ROLE};
                GRANT SELECT, UPDATE ON {tenant.schema}.items TO {tenant.schema}, {APP_ROLE};
                INSERT INTO {tenant.schema}.items (id, payload)
                    SELECT g, md5(g::text) FROM generate_series(1, {tenant.rows}) AS g;
            """)
        for tenant in db.tenants["filtered"]:
            await conn.execute(
                "INSERT INTO public.items (tenant_id, id, payload) SELECT $1, g, md5(g::text) "
                "FROM generate_series(1, $2) AS g", tenant.org_id, tenant.rows)
        for i, tenant in enumerate(db.tenants["by_type"]):
            table = "public.items_a" if i % 2 == 0 else "tenant_b.items_b"
            await conn.execute(
                f"INSERT INTO {table} (tenant_id, id, payload) SELECT $1, g, md5(g::text) "
                "FROM generate_series(1, $2) AS g", tenant.org_id, tenant.rows)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    for tenants in db.tenants.values():
        for tenant in tenants[:tokens_per_layout]:
            _, tenant.token = await issue_token(dsn, tenant_slug=tenant.slug, label="bench")
    return db


async def add_database_per_tenant(cluster: PostgresCluster, db: BenchDb, count: int,
                                  median_rows: int) -> dict[str, str]:
    """Database per tenant: ``count`` more tenants in ``db``'s control schema, each served
    from a database of its own (``bench_dbt_<i>``, pgtenant name ``dbt_<i>``) through its
    organization row.

    Returns: pgtenant database name -> Postgres database name.
    """
    routes: dict[str, str] = {}
    tenants = []
    control = cluster.admin_dsn(db.name)
    for i in range(count):
        name, dbname = f"dbt_{i}", f"bench_dbt_{i}"
        dsn = await _new_database(cluster, dbname)
        rows = _rows(i, median_rows)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"""
                GRANT CONNECT ON DATABASE {dbname} TO {APP_ROLE};
                GRANT USAGE ON SCHEMA public TO {APP_ROLE}, bench_flt;
                CREATE TABLE IF NOT EXISTS public.items (
                    id int PRIMARY KEY, v int NOT NULL DEFAULT 0, payload text NOT NULL);
                TRUNCATE public.items;
                INSERT INTO public.items (id, payload)
                    SELECT g, md5(g::text) FROM generate_series(1, {rows}) AS g;
                GRANT SELECT, UPDATE ON public.items TO bench_flt, {APP_ROLE};
                ANALYZE public.items;
            """)
        finally:
            await conn.close()
        slug = f"n{db.count}_dbt_{i:04d}"
        org = await create_tenant(control, slug=slug, tenant_type=TENANT_TYPES["flt"],
                                  proxy_role=PROXY_ROLE, database=name)
        tenant = Tenant(slug, "db_per_tenant", org, rows, database=name)
        _, tenant.token = await issue_token(control, tenant_slug=slug, label="bench")
        tenants.append(tenant)
        routes[name] = dbname
    db.tenants["db_per_tenant"] = tenants
    return routes


def pgbench_init(cluster: PostgresCluster, db: BenchDb) -> None:
    """pgbench's own tables (scale 1) for ``pgbench -S``, readable by tenants and the app."""
    import subprocess

    pgbench = cluster.tool("pgbench")
    assert pgbench is not None
    subprocess.run([pgbench, "-i", "-q", "-s", "1", "-d", cluster.admin_dsn(db.name)],
                   check=True, capture_output=True)
    cluster.psql("GRANT SELECT ON pgbench_accounts, pgbench_branches, pgbench_tellers, "
                 f"pgbench_history TO bench_flt, {APP_ROLE}", dbname=db.name)
