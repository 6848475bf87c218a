"""``pgtenant demo`` as a newcomer runs it: every line it prints works, Ctrl-C leaves no secret.

Runs the real command in a subprocess (its own throwaway cluster), pastes what it printed,
then interrupts it as a terminal would. The demo's data model is a migration history applied
through the runner: the fleet it leaves is at the latest version, and the printed
``migrate`` lines work as pasted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgtenant.control.demo import DEMO_MIGRATIONS_DIR, DemoEnv
from pgtenant.control.migrations.files import lint, load_migrations
from pgtenant.control.migrations.ledger import SHARED_SLUG, SHARED_TARGET
from pgtenant.control.migrations.runner import make_plan, status

from .conftest import ROOT, free_port

__all__: list[str] = []


def _conninfo(printed: str) -> str:
    """Returns: the libpq conninfo of a printed ``psql "..." [-c ...]`` line."""
    return shlex.split(printed)[1]


def _run_printed(line: str) -> subprocess.CompletedProcess[str]:
    """Run a printed ``pgtenant ...`` line as a shell would (from the repository root)."""
    return subprocess.run(shlex.split(line), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _check_migration_lines(lines: list[str], workdir: Path) -> None:
    """The printed migrate lines: status shows the fleet at the latest file, and a tenant
    made by the printed ``tenant create`` is brought there by the printed ``migrate apply``."""
    history = load_migrations(DEMO_MIGRATIONS_DIR)
    latest = max(m.version for m in history)
    # A tenant's version is its own files' (scope=tenant); the shared ones are the shared
    # target's (the demo's last files are shared: the tenant-leading indexes).
    latest_tenant = max(m.version for m in history if m.scope == "tenant")
    status_line = next(line for line in lines if " migrate status " in line)
    done = _run_printed(status_line)
    assert done.returncode == 0, done.stderr
    assert f"latest file version {latest:04d}" in done.stdout, done.stdout
    assert f"at {latest_tenant:04d}: 2" in done.stdout, done.stdout  # globex and hooli
    assert "behind" not in done.stdout and "FAILED" not in done.stdout, done.stdout

    create = _run_printed(next(line for line in lines if " tenant create " in line))
    assert create.returncode == 0, create.stderr
    apply = _run_printed(next(line for line in lines if " migrate apply " in line))
    assert apply.returncode == 0, apply.stdout + apply.stderr
    finished = [json.loads(x) for x in apply.stdout.splitlines() if x.startswith("{")][-1]
    assert finished["event"] == "run_finished" and finished["done"] == 1, apply.stdout
    fleet = _run_printed(status_line.replace(" migrate status ", " migrate status --json "))
    rows = {r["tenant"]: r for r in map(json.loads, fleet.stdout.splitlines())}
    assert rows["initrode"]["version"] == latest_tenant, rows
    assert rows["initrode"]["status"] == "ok", rows

    new = _run_printed(next(line for line in lines if " migrate new " in line))
    assert new.returncode == 0, new.stderr
    written = Path(new.stdout.strip())
    # into the demo's throwaway copy, never into the package's history
    assert (ROOT / written).resolve().parent == (workdir / "migrations").resolve()
    assert written.name == f"{latest + 1:04d}_add_budget.sql"


@pytest.mark.timeout(180)
def test_demo_prints_lines_that_work_migrate_lines_included_and_ctrl_c_deletes_its_secrets(
        tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    port = free_port()
    log = (tmp_path / "demo.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgtenant", "demo", "--dir", str(workdir), "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        text = ""
        while "listening on" not in text:
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
            text = (tmp_path / "demo.log").read_text()
        lines = [line.strip() for line in text.splitlines()]

        insert = next(line for line in lines if "INSERT INTO campaigns (name, budget)" in line)
        with psycopg.connect(_conninfo(insert), autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO campaigns (name, budget) VALUES ('x', 1) RETURNING org_id"
            ).fetchone()
            assert row is not None and row[0] is not None

        admin = next(line for line in lines if "user=admin" in line)
        assert "SHOW POOLS" in admin
        with psycopg.connect(_conninfo(admin), autocommit=True) as conn:
            cur = conn.execute("SHOW POOLS")
            assert cur.description is not None and cur.description[0].name == "database"

        metrics = next(line for line in lines if line.startswith("Metrics:"))
        url = re.search(r"http://\S+/metrics", metrics)
        assert url, metrics
        with urllib.request.urlopen(url.group(0), timeout=10) as answer:
            assert b"pgtenant_client_connections" in answer.read()

        _check_migration_lines(lines, workdir)

        assert (workdir / "tokens.json").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not workdir.exists()
        assert "deleted the demo cluster" in (tmp_path / "demo.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_make_demo_installs_without_test_tools_and_takes_a_port() -> None:
    out = subprocess.run(
        ["make", "-n", "-B", "demo", "PORT=7432"], cwd=ROOT, capture_output=True, text=True,
        timeout=30, check=True,
    ).stdout
    assert "-m pgtenant demo --port 7432" in out
    installs = [line for line in out.splitlines() if "pip install" in line]
    assert installs and not any(".[test]" in line for line in installs), installs
    assert not any("--quiet" in line for line in installs if "-e" in line), installs


async def test_the_demo_model_is_applied_from_scratch_by_the_runner_every_tenant_at_latest(
        demo_env: DemoEnv) -> None:
    migrations = load_migrations(DEMO_MIGRATIONS_DIR)
    latest_shared = max(m.version for m in migrations if m.scope == "shared")
    latest_tenant = max(m.version for m in migrations if m.scope == "tenant")
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    # the demo teaches migration files: its own raise no lock or rewrite warning
    assert [w for m in migrations for w in lint(m)] == []
    conn = await asyncpg.connect(demo_env.admin_dsn)
    try:
        # every version of the demo was written by the one run build_demo started
        rows = await conn.fetch(
            "SELECT o.slug, v.version, v.run_id FROM pgtenant.schema_versions v "
            "LEFT JOIN pgtenant.organizations o ON o.id = v.target "
            "WHERE v.run_id = $1 ORDER BY 1, 2", demo_env.migration_run)
        by_target: dict[str, list[int]] = {}
        for r in rows:
            by_target.setdefault(r["slug"] or SHARED_SLUG, []).append(r["version"])
        assert by_target == {
            SHARED_SLUG: [m.version for m in migrations if m.scope == "shared"],
            "globex": [m.version for m in migrations if m.scope == "tenant"],
            "hooli": [m.version for m in migrations if m.scope == "tenant"],
        }
        assert demo_env.migrated_targets == 3
        shared_versions = await conn.fetchval(
            "SELECT count(*) FROM pgtenant.schema_versions WHERE target = $1", SHARED_TARGET)
        assert shared_versions == sum(1 for m in migrations if m.scope == "shared")
        plan = await make_plan(conn, migrations)
    finally:
        await conn.close()
    assert plan.edited == [] and plan.missing == []
    fleet = {row["tenant"]: row for row in status(plan)}
    # SME and agency tenants live in shared schemas: only the shared target stands for them
    assert "acme" not in fleet and "umbrella" not in fleet
    assert fleet[SHARED_SLUG]["version"] == latest_shared
    for slug in (SHARED_SLUG, "globex", "hooli"):
        assert fleet[slug]["status"] == "ok" and fleet[slug]["pending"] == [], fleet[slug]
    for slug in ("globex", "hooli"):
        assert fleet[slug]["version"] == latest_tenant
