"""``pgtenant audit`` against real databases: every class of hole planted in a scratch
database is reported by name (check and object); a clean pgtenant database, and the demo's,
report no error (nor warning); the CLI's exit status, JSON, SARIF and baseline.

The scratch databases get roles of their own (``aud_*``, cluster-wide), so planting a hole
in a login role or a tenant role cannot disturb the demo database other tests share.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pgtenant.config import Config
from pgtenant.configfile import parse_config
from pgtenant.control.audit.runner import AuditReport, run_audit
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv
from pgtenant.control.init import init_database
from pgtenant.control.tenants import create_tenant

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]

_CONFIG = """
[databases.{db}]
dsn = "postgresql://{p}_proxy:unused-here@127.0.0.1:5432/{db}"
[control]
dsn = "postgresql://{p}_control:unused-here@127.0.0.1:5432/{db}"
[tenant_types.alpha]
role = "{p}_alpha"
search_path = ["public"]
temp_tables = false
[tenant_types.gamma]
role = "{p}_gamma"
search_path = ["{p}_g", "public"]
[tenant_types.beta]
role = "{{schema}}"
search_path = ["{{schema}}", "public"]
"""
_GHOST = """
[tenant_types.ghost]
role = "aud_ghost"
search_path = ["public"]
"""

# Each hole, planted by name; the expected (check, object) pairs are below.
_HOLES = """
CREATE SCHEMA aud_g;
GRANT USAGE ON SCHEMA aud_g TO aud_gamma;
CREATE TABLE aud_g.gdata (id serial PRIMARY KEY, org_id uuid NOT NULL DEFAULT
    pgtenant.current_tenant());
CREATE INDEX ON aud_g.gdata (org_id);
ALTER TABLE aud_g.gdata ENABLE ROW LEVEL SECURITY;
ALTER TABLE aud_g.gdata FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON aud_g.gdata USING (org_id = (SELECT pgtenant.current_tenant()));
GRANT SELECT, INSERT ON aud_g.gdata TO aud_gamma;
-- cross_type_access: alpha may write gamma's table
GRANT USAGE ON SCHEMA aud_g TO aud_alpha;
GRANT INSERT ON aud_g.gdata TO aud_alpha;

-- a sound table, the base of the view / matview / router holes
CREATE TABLE public.h_good (id serial PRIMARY KEY, org_id uuid NOT NULL);
CREATE INDEX ON public.h_good (org_id);
ALTER TABLE public.h_good ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.h_good FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_good USING (org_id = (SELECT pgtenant.current_tenant()));
GRANT SELECT, INSERT, UPDATE, DELETE ON public.h_good TO aud_alpha;
-- rls_bypass_privilege
GRANT TRUNCATE ON public.h_good TO aud_alpha;

-- rls_disabled (+ tenant_index_missing)
CREATE TABLE public.h_norls (org_id uuid);
GRANT SELECT ON public.h_norls TO aud_alpha;

-- rls_not_forced: a tenant role owns it
CREATE TABLE public.h_owned (org_id uuid);
CREATE INDEX ON public.h_owned (org_id);
ALTER TABLE public.h_owned ENABLE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_owned USING (org_id = (SELECT pgtenant.current_tenant()));
ALTER TABLE public.h_owned OWNER TO aud_alpha;

-- rls_no_policy
CREATE TABLE public.h_nopol (org_id uuid);
CREATE INDEX ON public.h_nopol (org_id);
ALTER TABLE public.h_nopol ENABLE ROW LEVEL SECURITY;
GRANT SELECT ON public.h_nopol TO aud_alpha;

-- policy_not_tenant_scoped: a permissive USING (true) next to a good one
CREATE TABLE public.h_true (org_id uuid);
CREATE INDEX ON public.h_true (org_id);
ALTER TABLE public.h_true ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.h_true FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_true USING (org_id = (SELECT pgtenant.current_tenant()));
CREATE POLICY everyone ON public.h_true FOR SELECT USING (true);
GRANT SELECT ON public.h_true TO aud_alpha;

-- policy_not_tenant_scoped: the wrong column, and an OR that lets everything through
CREATE TABLE public.h_wrongcol (id uuid, org_id uuid);
CREATE INDEX ON public.h_wrongcol (org_id);
ALTER TABLE public.h_wrongcol ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.h_wrongcol FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_wrongcol USING (id = (SELECT pgtenant.current_tenant()));
GRANT SELECT ON public.h_wrongcol TO aud_alpha;
CREATE TABLE public.h_or (org_id uuid, shared boolean);
CREATE INDEX ON public.h_or (org_id);
ALTER TABLE public.h_or ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.h_or FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_or
    USING (org_id = (SELECT pgtenant.current_tenant()) OR shared);
GRANT SELECT ON public.h_or TO aud_alpha;

-- policy_write_unchecked: an INSERT policy with no WITH CHECK
CREATE TABLE public.h_insert (org_id uuid);
CREATE INDEX ON public.h_insert (org_id);
ALTER TABLE public.h_insert ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.h_insert FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_insert FOR SELECT
    USING (org_id = (SELECT pgtenant.current_tenant()));
CREATE POLICY ins ON public.h_insert FOR INSERT WITH CHECK (true);
GRANT SELECT, INSERT ON public.h_insert TO aud_alpha;

-- policy_unsigned_setting and policy_per_row_call
CREATE TABLE public.h_raw (org_id uuid);
CREATE INDEX ON public.h_raw (org_id);
ALTER TABLE public.h_raw ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.h_raw FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_raw USING (org_id = current_setting('app.tenant_id')::uuid);
GRANT SELECT ON public.h_raw TO aud_alpha;

-- view_bypasses_rls (owned by the superuser, no security_invoker) and a matview
CREATE VIEW public.h_view AS SELECT * FROM public.h_good;
GRANT SELECT ON public.h_view TO aud_alpha;
CREATE MATERIALIZED VIEW public.h_mat AS SELECT * FROM public.h_good;
GRANT SELECT ON public.h_mat TO aud_alpha;

-- definer_search_path_mutable
CREATE FUNCTION public.h_definer() RETURNS int LANGUAGE sql SECURITY DEFINER
    AS 'SELECT 1';
-- definer_writes_unchecked: the seed story's router takes the org from its argument
CREATE FUNCTION public.h_router(p_org uuid) RETURNS void LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO h_good (org_id) VALUES (p_org);
END $$;
GRANT EXECUTE ON FUNCTION public.h_router(uuid) TO aud_alpha;

-- shared_writable_table: no tenant column, written by every alpha tenant
CREATE TABLE public.h_common (note text);
GRANT INSERT, SELECT ON public.h_common TO aud_alpha;

-- cross_type_write: two tenant types write one table
CREATE TABLE public.h_both (org_id uuid);
CREATE INDEX ON public.h_both (org_id);
ALTER TABLE public.h_both ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.h_both FORCE ROW LEVEL SECURITY;
CREATE POLICY iso ON public.h_both USING (org_id = (SELECT pgtenant.current_tenant()));
GRANT SELECT, INSERT ON public.h_both TO aud_alpha, aud_gamma;

-- the matrix between two beta tenants
CREATE TABLE t_audb_two.secrets (note text);
GRANT USAGE ON SCHEMA t_audb_two TO t_audb_one;
GRANT SELECT ON t_audb_two.secrets TO t_audb_one;
CREATE TABLE t_audb_two.pub (note text);
GRANT SELECT ON t_audb_two.pub TO PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA t_audb_one GRANT SELECT ON TABLES TO t_audb_two;
CREATE ROLE aud_bridge NOLOGIN;
GRANT aud_bridge TO t_audb_one;
GRANT t_audb_two TO aud_bridge;

-- roles and database privileges
CREATE ROLE aud_bypass NOLOGIN BYPASSRLS;
GRANT aud_bypass TO aud_proxy;
ALTER ROLE aud_gamma CREATEDB;
GRANT CREATE ON SCHEMA public TO aud_alpha;
GRANT TEMPORARY ON DATABASE {db} TO aud_alpha;
GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC;
"""

EXPECTED = [
    ("cross_type_access", "aud_g.gdata", "aud_alpha"),
    ("cross_type_write", "aud_g.gdata", ""),
    ("rls_bypass_privilege", "public.h_good", "aud_alpha"),
    ("rls_disabled", "public.h_norls", ""),
    ("tenant_index_missing", "public.h_norls", ""),
    ("rls_not_forced", "public.h_owned", ""),
    ("rls_no_policy", "public.h_nopol", ""),
    ("policy_not_tenant_scoped", "public.h_true", "aud_alpha"),
    ("policy_not_tenant_scoped", "public.h_wrongcol", "aud_alpha"),
    ("policy_not_tenant_scoped", "public.h_or", "aud_alpha"),
    ("policy_write_unchecked", "public.h_insert", "aud_alpha"),
    ("policy_unsigned_setting", "policy iso on public.h_raw", ""),
    ("policy_per_row_call", "policy iso on public.h_raw", ""),
    ("view_bypasses_rls", "public.h_view", ""),
    ("matview_exposes_tenant_data", "public.h_mat", ""),
    ("definer_search_path_mutable", "public.h_definer()", ""),
    ("definer_writes_unchecked", "public.h_router(p_org uuid)", ""),
    ("shared_writable_table", "public.h_common", ""),
    ("cross_type_write", "public.h_both", ""),
    ("cross_tenant_access", "t_audb_two.secrets", "t_audb_one"),
    ("cross_tenant_schema_usage", "t_audb_two", "t_audb_one"),
    ("public_grant_in_tenant_schema", "t_audb_two.pub", ""),
    ("default_privileges_leak",
     "default privileges of postgres in schema t_audb_one on tables", "t_audb_two"),
    ("cross_tenant_access", "t_audb_two", "t_audb_one"),
    ("login_role_reaches_bypass", "aud_bypass", ""),
    ("tenant_role_privileged", "aud_gamma", ""),
    ("tenant_create_on_shared_schema", "public", "aud_alpha"),
    ("tenant_temp", "database audit_holes", "alpha"),
    ("tenant_role_missing", "aud_ghost", ""),
]


def _config(db: str, prefix: str, extra: str = "") -> Config:
    return parse_config(tomllib.loads(_CONFIG.format(db=db, p=prefix) + extra))


async def _scratch(cluster: PostgresCluster, db: str, config: Config, prefix: str) -> str:
    """A new database with pgtenant installed for ``config``'s types, two beta tenants and
    one of each static type; every role's name starts with ``prefix`` (roles are
    cluster-wide: the holes planted in one scratch database must not reach another).
    Returns: its admin URL."""
    cluster.create_database(db)
    dsn = cluster.admin_dsn(db)
    types = {k: v for k, v in config.tenant_types.items() if k != "ghost"}
    await init_database(dsn, proxy_role=f"{prefix}_proxy", control_role=f"{prefix}_control",
                        proxy_password="aud-proxy-pw", control_password="aud-control-pw",
                        tenant_types=types)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {prefix}_g")
    finally:
        await conn.close()
    for slug, type_name in ((f"{prefix}a_one", "alpha"), (f"{prefix}g_one", "gamma"),
                            (f"{prefix}b_one", "beta"), (f"{prefix}b_two", "beta")):
        await create_tenant(dsn, slug=slug, tenant_type=types[type_name],
                            proxy_role=f"{prefix}_proxy")
    return dsn


@pytest.fixture(scope="module")
async def holes(pg_cluster: PostgresCluster) -> AsyncIterator[tuple[str, Config]]:
    config = _config("audit_holes", "aud", _GHOST)
    dsn = await _scratch(pg_cluster, "audit_holes", config, "aud")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA aud_g")
        await conn.execute(_HOLES.format(db="audit_holes"))
    finally:
        await conn.close()
    yield dsn, config


def _keys(report: AuditReport) -> set[tuple[str, str, str]]:
    return {f.key for f in report.findings}


async def test_every_planted_hole_is_reported_by_name(holes: tuple[str, Config]) -> None:
    dsn, config = holes
    report = await run_audit(dsn, config)
    found = _keys(report)
    missing = [key for key in EXPECTED if key not in found]
    assert not missing, "not reported: " + repr(missing) + "\nfound:\n" + "\n".join(
        f"{f.check} | {f.object} | {f.subject} | {f.message}" for f in report.findings)
    lockdown = [f for f in report.findings if f.check == "lockdown"]
    assert any("set_config" in f.object for f in lockdown), lockdown
    # The sound tables are not reported as leaking.
    for f in report.findings:
        if f.object in ("public.h_good", "aud_g.gdata"):
            assert f.check in ("rls_bypass_privilege", "cross_type_access",
                               "cross_type_write"), f


async def test_scoped_audit_reads_only_those_schemas(holes: tuple[str, Config]) -> None:
    dsn, config = holes
    report = await run_audit(dsn, config, schemas=["t_audb_two"])
    objects = {f.object for f in report.findings if f.kind in ("table", "view", "function")}
    assert objects and all(o.startswith("t_audb_two.") for o in objects), objects
    assert ("cross_tenant_access", "t_audb_two.secrets", "t_audb_one") in _keys(report)


async def test_clean_pgtenant_database_reports_no_error_nor_warning(
        pg_cluster: PostgresCluster) -> None:
    config = _config("audit_clean", "auc")
    dsn = await _scratch(pg_cluster, "audit_clean", config, "auc")
    conn = await asyncpg.connect(dsn)
    try:
        # Beta (schema per tenant) tenants share public.notes, alpha has its own table,
        # gamma its own schema.
        await conn.execute("""
            GRANT USAGE ON SCHEMA auc_g TO auc_gamma;
            CREATE TABLE public.notes (id bigserial PRIMARY KEY, org_id uuid NOT NULL
                DEFAULT pgtenant.current_tenant(), body text);
            CREATE INDEX ON public.notes (org_id, id);
            ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
            ALTER TABLE public.notes FORCE ROW LEVEL SECURITY;
            CREATE POLICY iso ON public.notes
                USING (org_id = (SELECT pgtenant.current_tenant()))
                WITH CHECK (org_id = (SELECT pgtenant.current_tenant()));
            CREATE POLICY readonly_mine ON public.notes AS RESTRICTIVE FOR SELECT
                USING (org_id = (SELECT pgtenant.current_tenant()));
            GRANT SELECT, INSERT, UPDATE, DELETE ON public.notes TO t_aucb_one, t_aucb_two;
            GRANT USAGE ON SEQUENCE public.notes_id_seq TO t_aucb_one, t_aucb_two;
            CREATE VIEW public.notes_v WITH (security_invoker = on) AS
                SELECT * FROM public.notes;
            GRANT SELECT ON public.notes_v TO t_aucb_one, t_aucb_two;
            CREATE TABLE public.alpha_items (org_id uuid NOT NULL, item text,
                PRIMARY KEY (org_id, item));
            ALTER TABLE public.alpha_items ENABLE ROW LEVEL SECURITY;
            ALTER TABLE public.alpha_items FORCE ROW LEVEL SECURITY;
            CREATE POLICY iso ON public.alpha_items
                USING (org_id = (SELECT pgtenant.current_tenant()))
                WITH CHECK (org_id = (SELECT pgtenant.current_tenant()));
            GRANT SELECT, INSERT, UPDATE, DELETE ON public.alpha_items TO auc_alpha;
            CREATE TABLE t_aucb_one.private (id serial PRIMARY KEY, body text);
            CREATE TABLE auc_g.things (id serial PRIMARY KEY, org_id uuid NOT NULL);
            CREATE INDEX ON auc_g.things (org_id);
            ALTER TABLE auc_g.things ENABLE ROW LEVEL SECURITY;
            ALTER TABLE auc_g.things FORCE ROW LEVEL SECURITY;
            CREATE POLICY iso ON auc_g.things
                USING (org_id = (SELECT pgtenant.current_tenant()));
            GRANT SELECT, INSERT ON auc_g.things TO auc_gamma;
        """)
    finally:
        await conn.close()
    report = await run_audit(dsn, config)
    bad = [f for f in report.findings if f.severity >= 1]
    assert not bad, "\n".join(f"{f.check} | {f.object} | {f.message}" for f in bad)
    assert report.stats["tenant_roles"] == 4 and report.stats["tenant_tables"] >= 2


async def test_demo_database_audits_clean(demo_env: DemoEnv) -> None:
    config = parse_config(tomllib.loads(demo_env.config_toml(6432)))
    report = await run_audit(demo_env.admin_dsn, config)
    bad = [f for f in report.findings if f.severity >= 1]
    assert not bad, "\n".join(f"{f.check} | {f.object} | {f.message}" for f in bad)
    # The one cross-type read the unified view needs is reported, as info.
    assert ("cross_type_access", "tenant_b.entity_data", "tenant_sme") in _keys(report)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgtenant", "audit", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


async def test_cli_exit_status_json_sarif_and_baseline(holes: tuple[str, Config],
                                                        tmp_path: Path) -> None:
    dsn, _ = holes
    config = tmp_path / "audit.toml"
    config.write_text(_CONFIG.format(db="audit_holes", p="aud") + _GHOST)
    done = _cli("--dsn", dsn, "--config", str(config), "--json")
    assert done.returncode == 1, done.stderr
    findings = json.loads(done.stdout)
    assert isinstance(findings, list)
    for item in findings:
        assert {"check", "severity", "object", "message", "fix"} <= item.keys()
    assert any(f["check"] == "rls_disabled" and f["object"] == "public.h_norls"
               for f in findings)

    sarif = json.loads(_cli("--dsn", dsn, "--config", str(config), "--sarif").stdout)
    assert sarif["version"] == "2.1.0"
    assert len(sarif["runs"][0]["results"]) == len(findings)

    text = _cli("--dsn", dsn, "--config", str(config))
    assert text.returncode == 1
    assert "ERRORS" in text.stdout and "ALTER TABLE public.h_norls ENABLE ROW LEVEL" \
        in text.stdout

    baseline = tmp_path / "baseline.toml"
    written = _cli("--dsn", dsn, "--config", str(config), "--write-baseline", str(baseline))
    assert written.returncode == 0, written.stderr
    refused = _cli("--dsn", dsn, "--config", str(config), "--baseline", str(baseline))
    assert refused.returncode == 2 and "reason" in refused.stderr
    baseline.write_text(baseline.read_text().replace('reason = ""',
                                                     'reason = "planted by the test"'))
    accepted = _cli("--dsn", dsn, "--config", str(config), "--baseline", str(baseline))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
