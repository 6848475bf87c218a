"""Tenant holds (issue #12, "the pooler helps"): a real proxy, a real Postgres, a real runner.

While ``pgtenant migrate apply`` changes a tenant's schema, the proxy holds that tenant's
new transactions (clients see latency, not errors, and the DDL never queues behind them),
lets its running transactions finish, and leaves other tenants alone. A hold whose runner
was killed expires. Each test builds the demo in a database of its own (with roles of its
own, so the session's demo keeps its passwords).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv, build_demo

from .conftest import ROOT, ProxyProcess

_names = itertools.count()
HOLD_TTL = 2.0


async def connect(proxy: ProxyProcess, slug: str) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(slug, dbname=proxy.env.dbname),
                                 statement_cache_size=0, timeout=30)


@dataclass
class Loop:
    """A client looping on its tenant's table: every transaction's latency, every error."""

    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    errors: list[str] = field(default_factory=list)

    def slow(self, seconds: float) -> int:
        return sum(1 for _, took in self.latencies if took >= seconds)

    @property
    def worst(self) -> float:
        return max((took for _, took in self.latencies), default=0.0)


async def loop_on(proxy: ProxyProcess, slug: str, stop: asyncio.Event, out: Loop, *,
                  explicit: bool = False) -> None:
    conn = await connect(proxy, slug)
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                if explicit:
                    # a transaction holding its lock on projects longer than the DDL's
                    # lock_timeout (300 ms): without the drain the DDL would time out
                    async with conn.transaction():
                        await conn.fetchval("SELECT count(*) FROM projects")
                        await conn.execute("SELECT pg_sleep(0.5)")
                else:
                    await conn.fetchval("SELECT count(*) FROM projects")
            except (asyncpg.PostgresError, OSError) as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
            out.latencies.append((started, time.monotonic() - started))
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


@pytest.fixture
async def hold_env(pg_cluster: PostgresCluster) -> DemoEnv:
    index = next(_names)
    dbname = f"holds_{index}"
    pg_cluster.create_database(dbname)
    return await build_demo(pg_cluster.admin_dsn(dbname), proxy_role=f"pgt_hold_proxy{index}",
                            control_role=f"pgt_hold_control{index}")


@pytest.fixture
def hold_proxy(hold_env: DemoEnv, tmp_path: Path) -> Any:
    (tmp_path / "migs").mkdir()
    proxy = ProxyProcess(hold_env, tmp_path, pool_size=4, extra=f"""\
query_wait_timeout = 30.0
[migrations]
dir = "migs"
hold_ttl = {HOLD_TTL}
""")
    yield proxy
    proxy.check_invariants(proxy.stop())


def runner_argv(proxy: ProxyProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "pgtenant", "migrate", "apply", "--config",
            str(proxy.config_path), "--dsn", proxy.env.admin_dsn, "--json", *args]


async def run_runner(proxy: ProxyProcess, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        *runner_argv(proxy, *args), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    evs = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert proc.returncode is not None
    return proc.returncode, evs, err.decode()


async def test_a_client_looping_on_its_table_during_its_migration_sees_latency_not_errors(
        hold_proxy: ProxyProcess) -> None:
    migs = hold_proxy.config_path.parent / "migs"
    # hooli's DDL keeps its ACCESS EXCLUSIVE lock 1.5 s; globex's (the other schema tenant)
    # is instant, so globex is held only for a moment, after hooli (canary) is done.
    (migs / "9101_hold_probe.sql").write_text("""\
-- pgtenant: scope=tenant
ALTER TABLE projects ADD COLUMN hold_probe int;
SELECT pg_sleep(CASE WHEN current_schema() = 't_hooli' THEN 1.5 ELSE 0 END);
""")
    stop = asyncio.Event()
    hooli, hooli_txn, globex = Loop(), Loop(), Loop()
    loops = [asyncio.ensure_future(loop_on(hold_proxy, "hooli", stop, hooli)),
             asyncio.ensure_future(loop_on(hold_proxy, "hooli", stop, hooli)),
             asyncio.ensure_future(loop_on(hold_proxy, "hooli", stop, hooli_txn,
                                           explicit=True)),
             asyncio.ensure_future(loop_on(hold_proxy, "globex", stop, globex))]
    await asyncio.sleep(0.5)  # the loops are running
    # --lock-timeout 300: without the hold, the DDL would queue behind the looping clients
    # and time out; with it, it gets its lock at once
    code, evs, err = await run_runner(hold_proxy, "--canary", "hooli", "--concurrency", "1",
                                      "--lock-timeout", "300")
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*loops)

    assert code == 0, err
    assert [e["tenant"] for e in evs if e["event"] == "target_done"] == ["hooli", "globex"]
    assert not [e for e in evs if e["event"] == "retry"], evs  # no lock timeout at all
    held = {e["tenant"]: e for e in evs if e["event"] == "held"}
    assert held["hooli"]["proxies"] == 1 and held["hooli"]["drained"] == 1, held
    assert hooli.errors == [] and hooli_txn.errors == [] and globex.errors == []
    # hooli's transactions waited out the 1.5 s DDL in the proxy, then all ran
    assert 1.0 <= hooli.worst < 5.0, hooli.worst
    held_count = hooli.slow(0.5)
    assert held_count >= 2  # both plain loopers were held
    # the other tenant was served as usual meanwhile
    assert globex.worst < 0.5, globex.worst
    print(f"\nhold: hooli max latency {hooli.worst:.3f}s, {held_count} held transaction(s) "
          f"of {len(hooli.latencies)}; explicit-transaction client max "
          f"{hooli_txn.worst:.3f}s; drain wait {held['hooli']['seconds']}s; "
          f"globex max latency {globex.worst:.3f}s over {len(globex.latencies)} transactions")
    log = hold_proxy.log()
    assert "held: migration run" in log and "no longer held: released" in log
    conn = await asyncpg.connect(hold_proxy.env.admin_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pgtenant.tenant_holds") == 0
    finally:
        await conn.close()


async def test_a_hold_whose_runner_was_killed_expires_and_the_next_run_clears_it(
        hold_proxy: ProxyProcess) -> None:
    migs = hold_proxy.config_path.parent / "migs"
    probe = migs / "9102_slow.sql"
    # No lock on projects: only the hold can delay hooli's clients.
    probe.write_text("-- pgtenant: scope=tenant\nSELECT pg_sleep(60);\n")
    runner = await asyncio.create_subprocess_exec(
        *runner_argv(hold_proxy, "--canary", "hooli", "--concurrency", "1"), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert runner.stdout is not None
    while True:
        line = await asyncio.wait_for(runner.stdout.readline(), 30)
        assert line, "the runner ended before holding hooli"
        if json.loads(line).get("event") == "held":
            break
    runner.send_signal(signal.SIGKILL)
    await runner.wait()
    killed_at = time.monotonic()
    admin = await asyncpg.connect(hold_proxy.env.admin_dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pgtenant.tenant_holds") == 1
        conn = await connect(hold_proxy, "hooli")
        try:
            assert await conn.fetchval("SELECT count(*) FROM projects") == 2
        finally:
            await conn.close()
        waited = time.monotonic() - killed_at
        # held until the hold expired (nobody refreshes it), then served, without error
        assert 0.5 <= waited <= HOLD_TTL + 2.0, waited
        assert "expired (its migration runner stopped refreshing it)" in hold_proxy.log()
        # the next run ends the killed run's backend and deletes its stale hold
        probe.write_text("-- pgtenant: scope=tenant\nSELECT 1;\n")
        code, evs, err = await run_runner(hold_proxy)
        assert code == 0, err
        assert "hooli" in [e["tenant"] for e in evs if e["event"] == "target_done"]
        assert await admin.fetchval("SELECT count(*) FROM pgtenant.tenant_holds") == 0
        print(f"\nstale hold: hooli served {waited:.2f}s after the runner was killed "
              f"(hold_ttl {HOLD_TTL}s)")
    finally:
        await admin.close()
