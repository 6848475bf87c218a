"""``pgtenant tenant provision`` and ``tenant drop`` (issue #12, item 6) against a real Postgres
and a real proxy: the operator's commands as subprocesses, tenants logging in with tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.control.tenants import create_tenant, issue_token

from .conftest import ROOT, ProxyProcess

# Numbered after the demo's own history (0001-0005, applied to the same database by the
# demo_env fixture): a number is one file for the whole fleet.
FILES = {
    "9001_items.sql": "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);\n",
    "9002_price.sql": "ALTER TABLE items ADD COLUMN price numeric NOT NULL DEFAULT 0;\n",
    "9003_tags.sql": "CREATE TABLE tags (item int REFERENCES items, tag text);\n"
                     "CREATE INDEX tags_item ON tags (item);\n",
}
SEED = ("INSERT INTO items (name, price) VALUES ('welcome', 1), ('starter', 2);\n"
        "INSERT INTO tags SELECT id, current_setting('app.tenant_id') FROM items;\n")


@pytest.fixture
def lifecycle(start_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> ProxyProcess:
    """A proxy whose config also names a migrations folder with FILES."""
    migs = tmp_path / "migs"
    migs.mkdir()
    for name, text in FILES.items():
        (migs / name).write_text(text)
    return start_proxy(extra='token_cache_ttl = 0.2\nauth_failure_delay = 0.0\n'
                             '[migrations]\ndir = "migs"')


def argv(proxy: ProxyProcess, action: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pgtenant", "tenant", action, "--dsn", proxy.env.admin_dsn,
            "--config", str(proxy.config_path), *args]


def cli(proxy: ProxyProcess, action: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(proxy, action, *args), cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def tenant_list(env: DemoEnv) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgtenant", "tenant", "list", "--dsn",
                           env.admin_dsn], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


_SPAWNED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_process_left() -> Iterator[None]:
    """A test that fails half-way must not leave its CLI process (and open pipes) behind
    for a later test to trip over."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def spawn(args: list[str], *, quiet: bool = False) -> subprocess.Popen[str]:
    """A CLI process in the background (output discarded when ``quiet``: it will be killed)."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=out, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _SPAWNED.append(proc)
    return proc


async def token_for(env: DemoEnv, slug: str) -> str:
    _, token = await issue_token(env.admin_dsn, tenant_slug=slug)
    return token


async def login(proxy: ProxyProcess, slug: str, token: str) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(slug, token=token), statement_cache_size=0,
                                 timeout=30)


async def org_of(env: DemoEnv, slug: str) -> str:
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        return str(await admin.fetchval(
            "SELECT id FROM pgtenant.organizations WHERE slug = $1", slug))
    finally:
        await admin.close()


async def status_of(env: DemoEnv, slug: str) -> str | None:
    conn = await asyncpg.connect(env.admin_dsn)
    try:
        value: str | None = await conn.fetchval(
            "SELECT status FROM pgtenant.organizations WHERE slug = $1", slug)
        return value
    finally:
        await conn.close()


async def test_provisioned_tenant_logs_in_and_sees_its_migrated_seeded_schema(
        lifecycle: ProxyProcess, tmp_path: Path) -> None:
    seed = tmp_path / "seed.sql"
    seed.write_text(SEED)
    done = cli(lifecycle, "provision", "--slug", "pv_alpha", "--type", "enterprise",
               "--seed", str(seed), "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[0])
    org_id = lines[-1]
    assert report["org_id"] == org_id and report["applied"] == [9001, 9002, 9003]
    assert report["seeded"] and report["status"] == "ready"
    assert set(report["phases"]) >= {"register", "schema", "migrate", "grant", "seed", "ready"}
    assert await status_of(lifecycle.env, "pv_alpha") == "ready"

    conn = await login(lifecycle, "pv_alpha", await token_for(lifecycle.env, "pv_alpha"))
    try:
        rows = await conn.fetch("SELECT name, price FROM items ORDER BY id")
        assert [(r["name"], int(r["price"])) for r in rows] == [("welcome", 1), ("starter", 2)]
        assert {r["tag"] for r in await conn.fetch("SELECT tag FROM tags")} == {org_id}
    finally:
        await conn.close()

    # Idempotent: a second run changes nothing and says so.
    again = cli(lifecycle, "provision", "--slug", "pv_alpha", "--type", "enterprise",
                "--seed", str(seed))
    assert again.returncode == 0, again.stderr
    assert "already ready" in again.stdout and again.stdout.strip().splitlines()[-1] == org_id


async def test_provision_killed_mid_seed_refuses_logins_and_a_rerun_completes_it(
        lifecycle: ProxyProcess, tmp_path: Path) -> None:
    slow = tmp_path / "slow.sql"
    slow.write_text(SEED + "SELECT pg_sleep(60);\n")
    proc = spawn(argv(lifecycle, "provision", "--slug", "pv_killed", "--type", "enterprise",
                      "--seed", str(slow)), quiet=True)
    admin = await asyncpg.connect(lifecycle.env.admin_dsn)
    try:
        deadline = time.monotonic() + 60
        while not await admin.fetchval(
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
                "AND pid <> pg_backend_pid()"):
            assert time.monotonic() < deadline, "the seed never started"
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        await admin.close()
    assert await status_of(lifecycle.env, "pv_killed") == "provisioning"
    listed = tenant_list(lifecycle.env)
    assert any(line.startswith("pv_killed") and line.rstrip().endswith("provisioning")
               for line in listed.stdout.splitlines()), listed.stdout

    # Not ready: a valid token is refused with a message that says why, SQLSTATE 57P03.
    token = await token_for(lifecycle.env, "pv_killed")
    with pytest.raises(asyncpg.CannotConnectNowError, match=r"not ready.*being provisioned"):
        await login(lifecycle, "pv_killed", token)

    fast = tmp_path / "fast.sql"
    fast.write_text(SEED)
    started = time.monotonic()
    rerun = cli(lifecycle, "provision", "--slug", "pv_killed", "--type", "enterprise",
                "--seed", str(fast), "--json")
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout.splitlines()[0])
    # the migrations committed before the kill are not run again; the seed, rolled back by
    # the kill, runs once
    assert report["resumed"] and report["applied"] == [] and report["seeded"]
    assert time.monotonic() - started < 30  # the dead provision's backend let go
    conn = await login(lifecycle, "pv_killed", token)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items") == 2
    finally:
        await conn.close()


async def test_drop_dumps_the_schema_ends_open_sessions_and_refuses_logins(
        lifecycle: ProxyProcess, tmp_path: Path) -> None:
    seed = tmp_path / "seed.sql"
    seed.write_text(SEED)
    assert cli(lifecycle, "provision", "--slug", "pv_gone", "--type", "enterprise",
               "--seed", str(seed)).returncode == 0
    token = await token_for(lifecycle.env, "pv_gone")
    conn = await login(lifecycle, "pv_gone", token)
    assert await conn.fetchval("SELECT count(*) FROM items") == 2

    dump = tmp_path / "pv_gone.sql"
    dropped = cli(lifecycle, "drop", "--slug", "pv_gone", "--dump", str(dump), "--json")
    assert dropped.returncode == 0, dropped.stderr
    report = json.loads(dropped.stdout)
    assert report["revoked_tokens"] == 1
    assert "schema t_pv_gone" in report["dropped"] and "role t_pv_gone" in report["dropped"]
    text = dump.read_text()
    assert "CREATE TABLE t_pv_gone.items" in text and "welcome" in text

    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await conn.fetchval("SELECT count(*) FROM items")  # revoked: its session is ended
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await login(lifecycle, "pv_gone", token)

    admin = await asyncpg.connect(lifecycle.env.admin_dsn)
    try:
        assert not await admin.fetchval(
            "SELECT 1 FROM pg_namespace WHERE nspname = 't_pv_gone'")
        assert not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 't_pv_gone'")
        assert not await admin.fetchval("SELECT 1 FROM pgtenant.organizations "
                                        "WHERE slug = 'pv_gone'")
    finally:
        await admin.close()
    # Idempotent: dropping it again is not an error.
    again = cli(lifecycle, "drop", "--slug", "pv_gone")
    assert again.returncode == 0 and "does not exist" in again.stdout


@pytest.fixture
def drainable(start_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> ProxyProcess:
    """A proxy whose migrations folder has one file, numbered past the demo's (whose own
    files are already applied to the shared target)."""
    migs = tmp_path / "migs"
    migs.mkdir()
    (migs / "9001_items.sql").write_text(FILES["9001_items.sql"])
    return start_proxy(extra='token_cache_ttl = 0.2\nauth_failure_delay = 0.0\n'
                             '[migrations]\ndir = "migs"')


async def test_drop_drains_an_open_transaction_at_the_proxy_then_drops(
        drainable: ProxyProcess) -> None:
    lifecycle = drainable
    # A client of the tenant is inside an explicit transaction (it read items: its lock
    # blocks DROP SCHEMA) when the drop starts: the drop holds the tenant at the proxy and
    # waits for the transaction to end instead of failing on its lock or cutting it.
    assert cli(lifecycle, "provision", "--slug", "pv_busy", "--type",
               "enterprise").returncode == 0
    token = await token_for(lifecycle.env, "pv_busy")
    busy = await login(lifecycle, "pv_busy", token)
    other = await login(lifecycle, "pv_busy", token)
    tx = busy.transaction()
    await tx.start()
    await busy.execute("INSERT INTO items (name) VALUES ('in flight')")

    drop = spawn(argv(lifecycle, "drop", "--slug", "pv_busy", "--json"))
    deadline = time.monotonic() + 30
    while await status_of(lifecycle.env, "pv_busy") != "dropping":
        assert time.monotonic() < deadline and drop.poll() is None
        await asyncio.sleep(0.05)
    org = await org_of(lifecycle.env, "pv_busy")
    while f"tenant org={org} held" not in lifecycle.log():  # the proxy heard of the hold
        assert time.monotonic() < deadline and drop.poll() is None
        await asyncio.sleep(0.05)
    # A new transaction of the tenant during the drop is held at the proxy ...
    held = asyncio.ensure_future(other.fetchval("SELECT count(*) FROM items"))
    await asyncio.sleep(1.0)
    assert not held.done()
    assert drop.poll() is None, drop.communicate()  # waiting for the open transaction
    assert await busy.fetchval("SELECT count(*) FROM items") == 1
    await tx.commit()  # ended by the client, not cut by the drop
    # ... then refused: the drained tenant's tokens are revoked, its sessions ended.
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await asyncio.wait_for(held, 30)
    other.terminate()
    busy.terminate()

    out, err = drop.communicate(timeout=60)
    assert drop.returncode == 0, err
    report = json.loads(out)
    assert report["drain"]["proxies"] >= 1
    assert report["drain"]["drained"] == report["drain"]["proxies"]
    assert report["drain"]["seconds"] >= 0.9
    assert "schema t_pv_busy" in report["dropped"]
    admin = await asyncpg.connect(lifecycle.env.admin_dsn)
    try:
        assert not await admin.fetchval("SELECT 1 FROM pgtenant.tenant_holds")
        assert not await admin.fetchval(
            "SELECT 1 FROM pg_namespace WHERE nspname = 't_pv_busy'")
    finally:
        await admin.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await login(lifecycle, "pv_busy", token)


async def test_dropping_tenant_is_refused_at_login(lifecycle: ProxyProcess) -> None:
    assert cli(lifecycle, "provision", "--slug", "pv_leaving", "--type",
               "enterprise").returncode == 0
    token = await token_for(lifecycle.env, "pv_leaving")
    admin = await asyncpg.connect(lifecycle.env.admin_dsn)
    try:
        await admin.execute("UPDATE pgtenant.organizations SET status = 'dropping' "
                            "WHERE slug = 'pv_leaving'")
    finally:
        await admin.close()
    with pytest.raises(asyncpg.CannotConnectNowError, match="being dropped"):
        await login(lifecycle, "pv_leaving", token)
    assert cli(lifecycle, "drop", "--slug", "pv_leaving").returncode == 0


async def test_two_provisions_at_once_both_succeed(lifecycle: ProxyProcess) -> None:
    procs = [spawn(argv(lifecycle, "provision", "--slug", slug, "--type", "enterprise",
                        "--json"))
             for slug in ("pv_twin_a", "pv_twin_b")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[0])["applied"] == [9001, 9002, 9003]


async def test_concurrent_create_tenant_calls_do_not_collide(demo_env: DemoEnv) -> None:
    from pgtenant.control.demo import DEMO_TENANT_TYPES

    await asyncio.gather(*(create_tenant(demo_env.admin_dsn, slug=f"pv_cc{i}",
                                         tenant_type=DEMO_TENANT_TYPES["enterprise"],
                                         proxy_role=demo_env.proxy_role)
                           for i in range(6)))


def _two_database_config(env: DemoEnv, tmp_path: Path, other: str) -> Path:
    """The demo config plus ``[databases.<other>]`` (database per tenant) and FILES."""
    migs = tmp_path / "migs"
    migs.mkdir(exist_ok=True)
    for name, text in FILES.items():
        (migs / name).write_text(text)
    proxy_dsn = env.proxy_dsn.rsplit("/", 1)[0] + f"/{other}"
    config = tmp_path / f"two-{other}.toml"
    config.write_text(env.config_toml(1, extra='[migrations]\ndir = "migs"')
                      + f'\n[databases.{other}]\ndsn = "{proxy_dsn}"\n')
    return config


def _cli_with(env: DemoEnv, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgtenant", "tenant", *args, "--dsn",
                           env.admin_dsn, "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


async def test_database_per_tenant_is_created_from_its_template_migrated_and_dropped(
        demo_env: DemoEnv, pg_cluster: Any, tmp_path: Path) -> None:
    pg_cluster.create_database("pv_tpl")
    tpl = await asyncpg.connect(pg_cluster.admin_dsn("pv_tpl"))
    try:
        await tpl.execute("CREATE TABLE public.from_template (x int)")
    finally:
        await tpl.close()
    config = _two_database_config(demo_env, tmp_path, "pv_own")
    seed = tmp_path / "seed.sql"
    seed.write_text(SEED)
    done = _cli_with(demo_env, config, "provision", "--slug", "pv_own", "--type",
                     "enterprise", "--database", "pv_own", "--template", "pv_tpl",
                     "--seed", str(seed), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[0])
    assert report["applied"] == [9001, 9002, 9003] and "database" in report["phases"]
    own = await asyncpg.connect(pg_cluster.admin_dsn("pv_own"))
    try:
        assert await own.fetchval("SELECT to_regclass('public.from_template') IS NOT NULL")
        assert await own.fetchval("SELECT count(*) FROM t_pv_own.items") == 2
        # its authoritative ledger rows live with its DDL, in its own database
        assert await own.fetchval("SELECT count(*) FROM pgtenant.schema_versions") == 3
    finally:
        await own.close()

    dropped = _cli_with(demo_env, config, "drop", "--slug", "pv_own", "--json")
    assert dropped.returncode == 0, dropped.stderr
    own = await asyncpg.connect(pg_cluster.admin_dsn("pv_own"))
    try:
        assert not await own.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = 't_pv_own'")
        assert await own.fetchval("SELECT count(*) FROM pgtenant.schema_versions") == 0
    finally:
        await own.close()


async def test_tenant_create_with_database_makes_the_schema_in_that_database(
        demo_env: DemoEnv, pg_cluster: Any, tmp_path: Path) -> None:
    pg_cluster.create_database("pv_other")
    config = _two_database_config(demo_env, tmp_path, "pv_other")
    made = _cli_with(demo_env, config, "create", "--slug", "pv_elsewhere", "--type",
                     "enterprise", "--database", "pv_other")
    assert made.returncode == 0, made.stderr
    other = await asyncpg.connect(pg_cluster.admin_dsn("pv_other"))
    control = await asyncpg.connect(demo_env.admin_dsn)
    try:
        assert await other.fetchval(
            "SELECT 1 FROM pg_namespace WHERE nspname = 't_pv_elsewhere'")
        assert not await control.fetchval(
            "SELECT 1 FROM pg_namespace WHERE nspname = 't_pv_elsewhere'")
    finally:
        await other.close()
        await control.close()


async def test_provision_refuses_to_adopt_a_schema_it_did_not_make(
        lifecycle: ProxyProcess) -> None:
    admin = await asyncpg.connect(lifecycle.env.admin_dsn)
    try:
        await admin.execute("CREATE SCHEMA t_pv_squat")
    finally:
        await admin.close()
    refused = cli(lifecycle, "provision", "--slug", "pv_squat", "--type", "enterprise")
    assert refused.returncode == 1 and "schema 't_pv_squat' already exists" in refused.stderr
    # refused before anything was registered, so no `tenant drop` can remove that schema
    assert await status_of(lifecycle.env, "pv_squat") is None


async def test_shared_schema_tenant_is_just_a_row_and_its_seed_passes_rls(
        lifecycle: ProxyProcess, tmp_path: Path) -> None:
    seed = tmp_path / "shared.sql"
    seed.write_text("INSERT INTO campaigns (name, budget) VALUES ('launch', 10);\n")
    done = cli(lifecycle, "provision", "--slug", "pv_small", "--type", "sme",
               "--seed", str(seed), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[0])
    assert report["applied"] == [] and report["seeded"]
    conn = await login(lifecycle, "pv_small", await token_for(lifecycle.env, "pv_small"))
    try:
        rows = await conn.fetch("SELECT name, org_id::text FROM campaigns")
        assert [(r["name"], r["org_id"]) for r in rows] == [("launch", report["org_id"])]
    finally:
        await conn.close()
