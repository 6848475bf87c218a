"""The tenant migration runner (issue #12) against a real Postgres and many real tenant schemas.

Each test gets its own database with ``pgtenant init`` and a fleet of schema-per-tenant
organizations made by ``create_tenant`` (the code ``tenant create`` runs), and drives
``pgtenant migrate`` as an operator does: a subprocess, JSON lines on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pgtenant.control.cluster import PostgresCluster

from .conftest import ROOT
from .fleet import (
    Fleet,
    FleetFactory,
    events,
    make_fleet,
    spawn,
    status_by_tenant,
)

BASE_FILES = {
    "0001_projects.sql": """\
-- pgtenant: scope=tenant
CREATE TABLE projects (id serial PRIMARY KEY, name text NOT NULL);
-- pgtenant: down
DROP TABLE projects;
""",
    "0002_budget.sql": """\
ALTER TABLE projects ADD COLUMN budget numeric;
CREATE TABLE hits (n int);
INSERT INTO hits VALUES (1);
-- pgtenant: down
DROP TABLE hits;
ALTER TABLE projects DROP COLUMN budget;
""",
}


@pytest.fixture
async def fleet_of(pg_cluster: PostgresCluster, tmp_path: Path) -> AsyncIterator[FleetFactory]:
    async def make(n: int) -> Fleet:
        return await make_fleet(pg_cluster, tmp_path, n)
    yield make


# ------------------------------------------------------------------------------ files

def test_migrate_new_writes_the_next_numbered_file_with_a_header(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[databases.d]\ndsn = "postgresql://u@localhost/d"\n'
                      '[tenant_types.e]\nrole = "{schema}"\nsearch_path = ["{schema}"]\n')
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "0033_old.sql").write_text("SELECT 1;\n")
    out = subprocess.run([sys.executable, "-m", "pgtenant", "migrate", "new", "--config",
                          str(config), "Add budget"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path == tmp_path / "migrations" / "0034_add_budget.sql"
    assert "-- pgtenant: scope=tenant" in path.read_text()
    assert "-- pgtenant: down" in path.read_text()


# ------------------------------------------------------------------------------ plan

async def test_plan_shows_pending_per_tenant_and_warns_about_rewrites(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(30)
    fleet.write({**BASE_FILES, "0003_ids.sql": """\
ALTER TABLE projects ADD COLUMN ext uuid DEFAULT gen_random_uuid();
CREATE INDEX projects_name ON projects (name);
""", "0004_shared.sql": "-- pgtenant: scope=shared\nCREATE TABLE IF NOT EXISTS public.plans "
                         "(id int);\n"})
    out = fleet.cli("plan", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    pending = {t["tenant"]: t["pending"] for t in plan["targets"]}
    assert pending.pop(":shared") == [4]
    assert pending == {slug: [1, 2, 3] for slug in fleet.slugs}
    messages = [(w["file"], w["message"].split(" ")[0]) for w in plan["warnings"]]
    assert ("0003_ids.sql", "ADD") in messages  # volatile default: rewrite
    assert ("0003_ids.sql", "CREATE") in messages  # index without CONCURRENTLY
    assert not any(w["file"] == "0001_projects.sql" for w in plan["warnings"])
    text = fleet.cli("plan")
    assert "30 target(s) would run: 0001_projects.sql, 0002_budget.sql, 0003_ids.sql" \
        in text.stdout
    assert "WARNING 0003_ids.sql: ADD COLUMN with a volatile default" in text.stdout


# ------------------------------------------------------------------------------ apply

async def test_apply_runs_canary_first_then_waves_and_reaches_every_tenant(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(30)
    fleet.write(BASE_FILES)
    fleet.write({"0003_idx.sql": "-- pgtenant: transaction=off\n"
                                 "CREATE INDEX CONCURRENTLY IF NOT EXISTS projects_name "
                                 "ON projects (name);\n"})
    canary = fleet.slugs[17]
    out = fleet.cli("apply", "--canary", canary, "--wave-size", "10", "--concurrency", "4",
                    "--json")
    assert out.returncode == 0, out.stderr
    evs = events(out.stdout)
    waves = [e["wave"] for e in evs if e["event"] == "wave_started"]
    assert waves == ["canary", "wave 2", "wave 3", "wave 4"]
    done = [e["tenant"] for e in evs if e["event"] == "target_done"]
    assert done[0] == canary and sorted(done) == sorted(fleet.slugs)
    assert evs[-1]["event"] == "run_finished" and evs[-1]["status"] == "done"
    # Every tenant: the three versions, the column, one row in hits, the concurrent index.
    state = status_by_tenant(fleet)
    assert {state[s]["version"] for s in fleet.slugs} == {3}
    assert {state[s]["status"] for s in fleet.slugs} == {"ok"}
    rows = await fleet.fetch(
        "SELECT table_schema, count(*) FROM information_schema.columns "
        "WHERE table_name = 'projects' AND column_name = 'budget' GROUP BY 1")
    assert len(rows) == 30
    indexes = await fleet.fetch("SELECT count(*) FROM pg_indexes WHERE indexname = "
                                "'projects_name'")
    assert indexes[0][0] == 30
    # Nothing left: a second apply is a no-op.
    again = fleet.cli("apply", "--json")
    assert again.returncode == 0 and events(again.stdout)[-1]["status"] == "nothing"


async def test_a_failing_tenant_stays_at_its_version_others_proceed_until_max_failures(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(30)
    fleet.write(BASE_FILES)
    assert fleet.cli("apply", "--json").returncode == 0
    bad1, bad2 = f"t_{fleet.slugs[8]}", f"t_{fleet.slugs[18]}"
    for schema in (bad1, bad2):  # planted: the column 0003 adds already exists there
        await fleet.fetch(f'ALTER TABLE "{schema}".projects ADD COLUMN owner text')
    fleet.write({"0003_owner.sql": "CREATE TABLE audit (id int);\n"
                                   "ALTER TABLE projects ADD COLUMN owner text;\n"})
    out = fleet.cli("apply", "--wave-size", "10", "--concurrency", "2", "--max-failures", "2",
                    "--json")
    assert out.returncode == 1
    evs = events(out.stdout)
    failed = [e for e in evs if e["event"] == "target_failed"]
    assert [e["tenant"] for e in failed] == [fleet.slugs[8], fleet.slugs[18]]
    assert failed[0]["file"] == "0003_owner.sql" and failed[0]["sqlstate"] == "42701"
    assert "ADD COLUMN owner" in failed[0]["statement"]
    assert evs[-1]["status"] == "stopped"
    state = status_by_tenant(fleet)
    # The failed tenants: exactly at 2, and the file's first statement rolled back too.
    for slug in (fleet.slugs[8], fleet.slugs[18]):
        assert state[slug]["version"] == 2 and state[slug]["status"] == "failed"
        assert "already exists" in state[slug]["error"]
    audit = await fleet.fetch("SELECT table_schema FROM information_schema.tables "
                              "WHERE table_name = 'audit'")
    assert {r[0] for r in audit}.isdisjoint({bad1, bad2})
    # Tenants between the two failures proceeded; the last wave was never started.
    assert all(state[s]["version"] == 3 for s in fleet.slugs[9:18])
    assert all(state[s]["status"] == "behind" for s in fleet.slugs[21:])
    # Fixed: the rerun completes the fleet, applying nothing twice.
    for schema in (bad1, bad2):
        await fleet.fetch(f'ALTER TABLE "{schema}".projects DROP COLUMN owner')
    assert fleet.cli("apply", "--json").returncode == 0
    assert {r["version"] for r in status_by_tenant(fleet).values()
            if r["tenant"] != ":shared"} == {3}
    twice = await fleet.fetch("SELECT target, version FROM pgtenant.migration_log "
                              "WHERE status = 'applied' GROUP BY 1, 2 HAVING count(*) > 1")
    assert twice == []


async def test_a_failing_canary_stops_everything(fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(6)
    fleet.write({"0001_bad.sql": "CREATE TABLE x (id int);\nSELECT 1/0;\n"})
    out = fleet.cli("apply", "--canary", fleet.slugs[3], "--max-failures", "10", "--json")
    assert out.returncode == 1
    evs = events(out.stdout)
    assert [e["tenant"] for e in evs if e["event"] == "target_failed"] == [fleet.slugs[3]]
    assert not [e for e in evs if e["event"] == "target_done"]
    assert "canary failed" in next(e for e in evs if e["event"] == "stopped")["reason"]
    assert (await fleet.fetch("SELECT count(*) FROM pgtenant.schema_versions"))[0][0] == 0


async def test_lock_timeout_is_retried_with_backoff_then_succeeds(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(2)
    fleet.write(BASE_FILES)
    assert fleet.cli("apply", "--json").returncode == 0
    # two steps per tenant: 0003 commits, then 0004 (alone) waits for the lock; the retry
    # must redo 0004 only
    fleet.write({"0003_hits.sql": "ALTER TABLE hits ADD COLUMN m int;\n",
                 "0004_col.sql": "-- pgtenant: transaction=off\n"
                                 "ALTER TABLE projects ADD COLUMN c int;\n"})
    holder = await asyncpg.connect(fleet.admin_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(f'LOCK TABLE "t_{fleet.slugs[0]}".projects IN ACCESS SHARE MODE')
        proc = spawn(fleet.argv("apply", "--lock-timeout", "200", "--json"))
        # Release only once the runner reported its first lock-timeout retry (its JSON lines
        # are flushed as they happen): a fixed sleep raced the CLI's start on a busy machine.
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            if not line:
                break
            seen.append(line)
            if '"event": "retry"' in line or '"event":"retry"' in line:
                break
        await tx.rollback()
        rest, _ = proc.communicate(timeout=60)
        stdout = "".join(seen) + rest
    finally:
        await holder.close()
    evs = events(stdout)
    assert proc.returncode == 0, stdout
    retries = [e for e in evs if e["event"] == "retry"]
    assert retries and retries[0]["tenant"] == fleet.slugs[0]
    assert "lock timeout" in retries[0]["reason"]
    assert {status_by_tenant(fleet)[s]["version"] for s in fleet.slugs} == {4}


# ------------------------------------------------------------------- ledger and safety

async def test_an_edited_applied_file_is_refused_by_name(fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(3)
    fleet.write(BASE_FILES)
    assert fleet.cli("apply", "--json").returncode == 0
    fleet.write({"0001_projects.sql": BASE_FILES["0001_projects.sql"].replace(
        "name text NOT NULL", "name text")})
    plan = fleet.cli("plan")
    assert plan.returncode == 1 and "REFUSED: 0001_projects.sql was edited" in plan.stdout
    out = fleet.cli("apply", "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "0001_projects.sql was edited after it was applied" in out.stderr


async def test_second_runner_refused_and_kill9_mid_wave_resumes_without_doing_anyone_twice(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(12)
    fleet.write(BASE_FILES)
    fleet.write({"0003_slow.sql": "INSERT INTO hits VALUES (3);\nSELECT pg_sleep(0.4);\n"})
    proc = spawn(fleet.argv("apply", "--concurrency", "2", "--wave-size", "4", "--json"))
    assert proc.stdout is not None
    done = 0
    run_id = None
    while done < 3:  # some tenants committed, others mid-transaction
        ev = json.loads(proc.stdout.readline())
        run_id = ev.get("run_id", run_id)
        done += ev["event"] == "target_done"
    started = time.monotonic()
    second = fleet.cli("apply", "--json")
    assert time.monotonic() - started < 10  # refused at once, not queued
    assert second.returncode == 1
    assert f"another migration runner is active: run {run_id} (apply" in second.stderr
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    resumed = fleet.cli("apply", "--concurrency", "4", "--json")
    assert resumed.returncode == 0, resumed.stderr
    evs = events(resumed.stdout)
    assert len([e for e in evs if e["event"] == "target_done"]) <= 12 - done
    runs = await fleet.fetch("SELECT id, status FROM pgtenant.migration_runs ORDER BY id")
    assert [r["status"] for r in runs] == ["interrupted", "done"]
    # Every tenant ran each file exactly once: one row per version in hits.
    for slug in fleet.slugs:
        rows = await fleet.fetch(f'SELECT n, count(*) FROM "t_{slug}".hits GROUP BY n ORDER BY n')
        assert [tuple(r) for r in rows] == [(1, 1), (3, 1)], slug
    assert {status_by_tenant(fleet)[s]["version"] for s in fleet.slugs} == {3}


async def test_rollback_undoes_only_what_that_run_migrated_newest_first(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(8)
    fleet.write({"0001_projects.sql": BASE_FILES["0001_projects.sql"]})
    first = fleet.cli("apply", "--json")
    assert first.returncode == 0
    late = f"t_{fleet.slugs[7]}"
    # the last tenant gets its schema broken so run 2 misses it
    await fleet.fetch(f'ALTER TABLE "{late}".projects ADD COLUMN budget int')
    fleet.write({"0002_budget.sql": BASE_FILES["0002_budget.sql"]})
    second = fleet.cli("apply", "--max-failures", "5", "--json")
    run2 = events(second.stdout)[-1]["run_id"]
    state = status_by_tenant(fleet)
    assert state[fleet.slugs[7]]["version"] == 1 and state[fleet.slugs[0]]["version"] == 2
    out = fleet.cli("rollback", "--run", str(run2), "--json")
    assert out.returncode == 0, out.stderr
    done = sorted(e["tenant"] for e in events(out.stdout) if e["event"] == "target_done")
    assert done == sorted(fleet.slugs[:7])  # not the tenant run 2 did not migrate
    state = status_by_tenant(fleet)
    assert {state[s]["version"] for s in fleet.slugs} == {1}
    hits = await fleet.fetch("SELECT count(*) FROM information_schema.tables "
                             "WHERE table_name = 'hits'")
    assert hits[0][0] == 0
    # the planted column stays: that tenant was not touched
    cols = await fleet.fetch("SELECT count(*) FROM information_schema.columns "
                             "WHERE column_name = 'budget'")
    assert cols[0][0] == 1
    logged = await fleet.fetch("SELECT count(*) FROM pgtenant.migration_log "
                               "WHERE status = 'rolled_back'")
    assert logged[0][0] == 7


async def test_status_summarises_the_fleet_and_json_has_one_object_per_tenant(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(5)
    fleet.write({"0001_projects.sql": BASE_FILES["0001_projects.sql"]})
    assert fleet.cli("apply", "--json").returncode == 0
    fleet.write({"0002_budget.sql": BASE_FILES["0002_budget.sql"]})
    text = fleet.cli("status")
    assert text.returncode == 0
    assert "5 tenant(s); latest file version 0002" in text.stdout
    assert "at 0001: 5" in text.stdout and "behind (5)" in text.stdout
    rows = events(fleet.cli("status", "--json").stdout)
    tenants = [r for r in rows if r["tenant"] != ":shared"]
    assert sorted(r["tenant"] for r in tenants) == fleet.slugs
    assert all(r["version"] == 1 and r["status"] == "behind" and r["pending"] == [2]
               for r in tenants)


async def test_canary_percent_takes_the_smallest_and_the_biggest_and_biggest_go_last(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(10)
    fleet.write({"0001_projects.sql": BASE_FILES["0001_projects.sql"]})
    assert fleet.cli("apply", "--json").returncode == 0
    big, bigger = fleet.slugs[2], fleet.slugs[5]
    for slug, rows in ((big, 20_000), (bigger, 60_000)):
        await fleet.fetch(f'INSERT INTO "t_{slug}".projects (name) '
                          f"SELECT 'p' || g FROM generate_series(1, {rows}) g")
    fleet.write({"0002_budget.sql": BASE_FILES["0002_budget.sql"]})
    out = fleet.cli("apply", "--canary-percent", "20", "--concurrency", "1", "--json")
    assert out.returncode == 0, out.stderr
    evs = events(out.stdout)
    assert next(e for e in evs if e["event"] == "wave_started")["size"] == 2
    done = [e["tenant"] for e in evs if e["event"] == "target_done"]
    assert done[1] == bigger  # canaries: the smallest tenant, then the biggest
    assert done[-1] == big  # after the canaries, size order: the big one last


async def test_shared_files_run_once_first_pause_spaces_waves_and_rollback_ends_with_shared(
        fleet_of: FleetFactory) -> None:
    fleet = await fleet_of(4)
    fleet.write({
        "0001_plans.sql": "-- pgtenant: scope=shared\n"
                          "CREATE TABLE public.plans (id int PRIMARY KEY);\n"
                          "INSERT INTO public.plans VALUES (1);\n"
                          "-- pgtenant: down\nDROP TABLE public.plans;\n",
        "0002_subs.sql": "CREATE TABLE subs (plan int REFERENCES public.plans (id));\n"
                         "-- pgtenant: down\nDROP TABLE subs;\n",
        "0003_idx.sql": "-- pgtenant: transaction=off\n"
                        "CREATE INDEX CONCURRENTLY subs_plan ON subs (plan);\n"
                        "-- pgtenant: down\nDROP INDEX CONCURRENTLY subs_plan;\n",
    })
    out = fleet.cli("apply", "--wave-size", "2", "--pause", "0.7", "--json")
    assert out.returncode == 0, out.stderr
    evs = events(out.stdout)
    waves = [e for e in evs if e["event"] == "wave_started"]
    assert [w["wave"] for w in waves] == ["shared", "wave 2", "wave 3"]
    assert waves[2]["ts"] - waves[1]["ts"] >= 0.7
    state = status_by_tenant(fleet)
    assert state[":shared"]["version"] == 1
    assert {state[s]["version"] for s in fleet.slugs} == {3}
    run = evs[-1]["run_id"]
    back = fleet.cli("rollback", "--run", str(run), "--concurrency", "2", "--json")
    assert back.returncode == 0, back.stderr
    done = [e["tenant"] for e in events(back.stdout) if e["event"] == "target_done"]
    assert done[-1] == ":shared" and sorted(done[:-1]) == fleet.slugs
    left = await fleet.fetch("SELECT count(*) FROM pg_class WHERE relname IN "
                             "('plans', 'subs', 'subs_plan')")
    assert left[0][0] == 0


async def test_database_per_tenant_is_migrated_in_its_own_database_with_its_own_ledger(
        fleet_of: FleetFactory, pg_cluster: PostgresCluster) -> None:
    fleet = await fleet_of(2)
    fleet.write({"0001_projects.sql": BASE_FILES["0001_projects.sql"],
                 "0002_budget.sql": BASE_FILES["0002_budget.sql"]})
    own_db = f"{fleet.dbname}_dpt"
    pg_cluster.create_database(own_db)
    await fleet.fetch("INSERT INTO pgtenant.organizations (slug, tenant_type, database) "
                      "VALUES ('dpt_one', 'enterprise', 'elsewhere')")
    await fleet.fetch("INSERT INTO pgtenant.organizations (slug, tenant_type) "
                      "VALUES ('sme_one', 'sme')")  # shared schema: not a target
    login = fleet.config.read_text().split('dsn = "')[1].split('"')[0]
    with fleet.config.open("a") as f:
        f.write(f'\n[control]\ndsn = "{login}"\n\n[databases.elsewhere]\n'
                f'dsn = "{login.rsplit("/", 1)[0]}/{own_db}"\n')
    state = status_by_tenant(fleet)
    assert state["dpt_one"]["status"] == "behind" and "sme_one" not in state
    out = fleet.cli("apply", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(e["tenant"] for e in events(out.stdout) if e["event"] == "target_done") \
        == sorted([*fleet.slugs, "dpt_one"])
    own = await asyncpg.connect(pg_cluster.admin_dsn(own_db))
    try:  # the DDL ran there, and that database's ledger committed with it
        assert await own.fetchval("SELECT count(*) FROM public.hits") == 1
        assert await own.fetchval("SELECT array_agg(version ORDER BY version) "
                                  "FROM pgtenant.schema_versions") == [1, 2]
        assert await own.fetchval("SELECT to_regclass('public.projects') IS NOT NULL")
    finally:
        await own.close()
    assert status_by_tenant(fleet)["dpt_one"]["version"] == 2
    again = fleet.cli("apply", "--json")
    assert events(again.stdout)[-1]["status"] == "nothing"
    # rollback of that run undoes it there too
    run = events(out.stdout)[-1]["run_id"]
    assert fleet.cli("rollback", "--run", str(run), "--json").returncode == 0
    own = await asyncpg.connect(pg_cluster.admin_dsn(own_db))
    try:
        assert not await own.fetchval("SELECT to_regclass('public.projects') IS NOT NULL")
        assert await own.fetchval("SELECT count(*) FROM pgtenant.schema_versions") == 0
    finally:
        await own.close()
    assert status_by_tenant(fleet)["dpt_one"]["version"] == 0
