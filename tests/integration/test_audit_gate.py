"""The audit gate of the lifecycle: ``migrate apply`` audits what each wave migrated and
``tenant provision`` the tenant's schema, and a NEW audit error stops them (issue: "a
migration that adds a table without RLS is caught before the rollout goes on").

The migrate tests get a database of their own each (``make_fleet`` of test_migrations); the
provision test runs on the session's demo database, numbers its files after the demo's
(>= 9001) and drops what it made.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg

from proxy.control.cluster import PostgresCluster

from .conftest import ROOT, ProxyProcess
from .test_migrations import events, make_fleet, status_by_tenant

# A shared table with a tenant column, readable by two tenants' roles, no row-level
# security: every tenant reads every tenant's rows.
LEAK = """\
-- pgtenant: scope=shared
CREATE TABLE public.gate_leak (id int PRIMARY KEY, org_id uuid NOT NULL);
GRANT SELECT ON public.gate_leak TO {roles};
-- pgtenant: down
DROP TABLE public.gate_leak;
"""
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
    # Only NEW errors stop a run: a rerun finds the hole already there and goes on (which
    # is why the message says to fix it first).
    again = fleet.cli("apply", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert events(again.stdout)[-1]["done"] == 4


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
    audit = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "--dsn", fleet.admin_dsn, "--config",
         str(fleet.config), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
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
