"""The audit gate of the lifecycle: ``migrate apply`` audits what each wave migrated and
``tenant provision`` the tenant's schema, and a NEW audit error stops them (issue: "a
migration that adds a table without RLS is caught before the rollout goes on").

The migrate tests get a database of their own each (``make_fleet`` of test_migrations); the
provision test runs on the session's demo database, numbers its files after the demo's
(>= 9001) and drops what it made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg

from pgtenant.control.cluster import PostgresCluster

from .conftest import ROOT, ProxyProcess
from .fleet import events, make_fleet, status_by_tenant

# A shared table with a tenant column, readable by two tenants' roles, no row-level
# security: every tenant reads every tenant's rows.
LEAK = """\
-- pgtenant: scope=shared
CREATE TABLE public.gate_leak (id int PRIMARY KEY, org_id uuid NOT NULL);
GRANT SELECT ON public.gate_leak TO {roles};
-- pgtenant: down
DROP TABLE public.gate_leak;
"""
def _pgtenant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgtenant", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


TENANT_FILE = """\
CREATE TABLE notes (id serial PRIMARY KEY, body text);
-- pgtenant: down
DROP TABLE notes;
"""


async def test_a_new_rls_hole_stops_the_rollout_after_the_wave_that_made_it(
        pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    fleet = await make_fleet(pg_cluster, tmp_path, 4)
    roles = ", ".join(f'"t_{s}"' for s in fleet.slugs[:2])
    fleet.write({"0001_leak.sql": LEAK.format(roles=roles), "0002_notes.sql": TENANT_FILE})
    # Not a terminal: JSON lines on stdout; without --json the findings go to stderr too.
    out = fleet.cli("apply", "--wave-size", "2")
    assert out.returncode == 1, out.stdout + out.stderr
    evs = events(out.stdout)
    assert [e["wave"] for e in evs if e["event"] == "wave_started"] == ["shared"]
    failed = next(e for e in evs if e["event"] == "audit_failed")
    assert failed["wave"] == "shared"
    assert any(line.startswith("rls_disabled public.gate_leak") for line in failed["findings"])
    assert all("fix: " in line for line in failed["findings"])
    stopped = next(e for e in evs if e["event"] == "stopped")
    assert "audit after shared" in stopped["reason"]
    assert evs[-1]["event"] == "run_finished" and evs[-1]["status"] == "stopped"
    assert evs[-1]["not_started"] == 4
    assert "stopped by the audit: " in out.stderr
    assert "rls_disabled public.gate_leak" in out.stderr
    assert "ENABLE ROW LEVEL SECURITY" in out.stderr  # the fix
    # The shared file committed (the audit judges what a wave did); no tenant was touched.
    state = status_by_tenant(fleet)
    assert state[":shared"]["version"] == 1
    assert {state[s]["version"] for s in fleet.slugs} == {0}
    # The error that stopped it is remembered: a rerun refuses to start while it is
    # still there (though it is not "new" any more, and no wave of the rerun touches it).
    again = fleet.cli("apply", "--json")
    assert again.returncode != 0, again.stdout + again.stderr
    assert "an earlier run stopped on these audit errors" in again.stdout + again.stderr
    assert "rls_disabled public.gate_leak" in again.stdout + again.stderr
    assert {status_by_tenant(fleet)[s]["version"] for s in fleet.slugs} == {0}
    # Fixed, it is forgotten and the rollout goes on.
    conn = await asyncpg.connect(fleet.admin_dsn)
    try:
        await conn.execute("ALTER TABLE public.gate_leak ENABLE ROW LEVEL SECURITY; "
                           "ALTER TABLE public.gate_leak FORCE ROW LEVEL SECURITY; "
                           "CREATE POLICY iso ON public.gate_leak USING "
                           "(org_id = (SELECT pgtenant.current_tenant())); "
                           "CREATE INDEX ON public.gate_leak (org_id)")
        fixed = fleet.cli("apply", "--json")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert events(fixed.stdout)[-1]["done"] == 4
        assert await conn.fetchval("SELECT count(*) FROM pgtenant.audit_stops") == 0
    finally:
        await conn.close()


async def test_no_audit_lets_the_same_rollout_through(
        pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    fleet = await make_fleet(pg_cluster, tmp_path, 4)
    roles = ", ".join(f'"t_{s}"' for s in fleet.slugs[:2])
    fleet.write({"0001_leak.sql": LEAK.format(roles=roles), "0002_notes.sql": TENANT_FILE})
    out = fleet.cli("apply", "--wave-size", "2", "--no-audit", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    evs = events(out.stdout)
    assert not [e for e in evs if e["event"] == "audit_failed"]
    assert evs[-1]["status"] == "done"
    assert {r["version"] for r in status_by_tenant(fleet).values()} >= {1, 2}


async def test_a_pre_existing_error_elsewhere_does_not_block_a_clean_migration(
        pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    fleet = await make_fleet(pg_cluster, tmp_path, 4)
    roles = ", ".join(f'"t_{s}"' for s in fleet.slugs[:2])
    # The same hole, made before the run (not by it).
    await fleet.fetch("CREATE TABLE public.gate_leak (id int PRIMARY KEY, org_id uuid)")
    await fleet.fetch(f"GRANT SELECT ON public.gate_leak TO {roles}")
    audit = _pgtenant("audit", "--dsn", fleet.admin_dsn, "--config", str(fleet.config),
                      "--json")
    assert audit.returncode == 1 and "rls_disabled" in audit.stdout
    fleet.write({"0001_notes.sql": TENANT_FILE,
                 "0002_shared.sql": "-- pgtenant: scope=shared\n"
                                    "CREATE TABLE public.gate_plans (id int PRIMARY KEY);\n"})
    out = fleet.cli("apply", "--wave-size", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    evs = events(out.stdout)
    assert not [e for e in evs if e["event"] == "audit_failed"]
    assert [e["wave"] for e in evs if e["event"] == "wave_started"] == \
        ["shared", "wave 2", "wave 3"]
    assert evs[-1]["status"] == "done"


# Numbered after the demo's files and test_provision's (9001-9003, whose tenants stay in the
# shared demo database with those checksums): a number is one file for the whole fleet.
HOLE = """\
CREATE TABLE gate_open (id int PRIMARY KEY, body text);
GRANT SELECT ON TABLE gate_open TO PUBLIC;
DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO PUBLIC', current_schema()); END $$;
"""


def _provision(config: Path, admin_dsn: str, action: str,
               *args: str) -> subprocess.CompletedProcess[str]:
    return _pgtenant("tenant", action, "--dsn", admin_dsn, "--config", str(config), *args)


async def test_provision_fails_on_a_migration_that_opens_the_tenant_schema_to_everyone(
        start_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    migs = tmp_path / "migs"
    migs.mkdir()
    (migs / "9101_gate_open.sql").write_text(HOLE)
    proxy = start_proxy(extra='[migrations]\ndir = "migs"')
    env, config, slug = proxy.env, proxy.config_path, "gate_hole"
    try:
        out = _provision(config, env.admin_dsn, "provision", "--slug", slug,
                         "--type", "enterprise")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "the audit after its migrations found" in out.stderr
        assert f"t_{slug}.gate_open" in out.stderr
        assert "cross_tenant_access" in out.stderr or "public_grant_in_tenant_schema" \
            in out.stderr
        assert "stays in status 'provisioning'" in out.stderr
        assert await _status(env.admin_dsn, slug) == "provisioning"
        # A rerun stops again: nothing in the tenant's own schema counts as pre-existing.
        rerun = _provision(config, env.admin_dsn, "provision", "--slug", slug,
                           "--type", "enterprise")
        assert rerun.returncode == 1 and f"t_{slug}.gate_open" in rerun.stderr
        assert await _status(env.admin_dsn, slug) == "provisioning"
        # --no-audit completes it.
        done = _provision(config, env.admin_dsn, "provision", "--slug", slug,
                          "--type", "enterprise", "--no-audit")
        assert done.returncode == 0, done.stderr
        assert await _status(env.admin_dsn, slug) == "ready"
    finally:
        drop = _provision(config, env.admin_dsn, "drop", "--slug", slug)
        assert drop.returncode == 0, drop.stderr
    assert await _status(env.admin_dsn, slug) is None


async def test_provision_with_a_clean_migration_passes_the_audit(
        start_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    migs = tmp_path / "migs"
    migs.mkdir()
    (migs / "9102_gate_clean.sql").write_text(TENANT_FILE)
    proxy = start_proxy(extra='[migrations]\ndir = "migs"')
    env, config, slug = proxy.env, proxy.config_path, "gate_clean"
    try:
        out = _provision(config, env.admin_dsn, "provision", "--slug", slug,
                         "--type", "enterprise", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        assert '"audit"' in out.stdout  # the phase, timed
        assert await _status(env.admin_dsn, slug) == "ready"
    finally:
        drop = _provision(config, env.admin_dsn, "drop", "--slug", slug)
        assert drop.returncode == 0, drop.stderr


async def _status(admin_dsn: str, slug: str) -> str | None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        value: str | None = await conn.fetchval(
            "SELECT status FROM pgtenant.organizations WHERE slug = $1", slug)
        return value
    finally:
        await conn.close()
