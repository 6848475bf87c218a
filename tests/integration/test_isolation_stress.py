"""Isolation under load: 8 tenants x 50 concurrent clients on a small shared pool.

Thousands of transactions mix the simple and extended protocols, implicit and explicit
transactions, errors, and disconnects mid-transaction. Every setting and every row any client
sees must belong to that client's tenant: no context may leak across server reuse.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.control.tenants import create_tenant, issue_token

from .conftest import ProxyProcess

TENANTS_NEEDED = 8
CLIENTS_PER_TENANT = 50
OPS_PER_CLIENT = 10
EXTRA_SMES = ("stress_a", "stress_b", "stress_c")


@dataclass
class Tenant:
    slug: str
    token: str
    org_id: str
    role: str
    probe: str  # extended: returns (tenant_id, current_user, owners[])
    owners: list[str]  # what ``owners`` must be
    check: str  # simple protocol: divides by zero unless everything belongs to the tenant
    write: str  # an INSERT into a table the tenant owns rows in


def _tenant(slug: str, token: str, org_id: str, role: str, kind: str,
            schema: str | None) -> Tenant:
    head = "SELECT current_setting('app.tenant_id') AS t, current_user AS u, "
    settings_ok = f"current_setting('app.tenant_id') = '{org_id}' AND current_user = '{role}'"
    if kind == "sme":
        return Tenant(
            slug, token, org_id, role,
            head + "ARRAY(SELECT DISTINCT org_id::text FROM campaigns) AS owners", [org_id],
            f"SELECT 1/({settings_ok} AND NOT EXISTS (SELECT 1 FROM campaigns "
            f"WHERE org_id <> '{org_id}'))::int",
            f"INSERT INTO campaigns(org_id, name) VALUES ('{org_id}', '{slug}: stress')",
        )
    if kind == "agency":
        return Tenant(
            slug, token, org_id, role,
            head + "ARRAY(SELECT DISTINCT organization_id::text FROM entity_data) AS owners",
            [org_id],
            f"SELECT 1/({settings_ok} AND NOT EXISTS (SELECT 1 FROM entity_data "
            f"WHERE organization_id <> '{org_id}'))::int",
            "INSERT INTO workspace_entities(id, organization_id, name) VALUES "
            f"(gen_random_uuid(), '{org_id}', '{slug}: stress')",
        )
    assert schema is not None
    return Tenant(
        slug, token, org_id, role,
        head + "ARRAY(SELECT DISTINCT split_part(name, ':', 1) FROM projects) AS owners",
        [slug],
        f"SELECT 1/({settings_ok} AND current_schema() = '{schema}' AND NOT EXISTS "
        f"(SELECT 1 FROM projects WHERE name NOT LIKE '{slug}: %'))::int",
        f"INSERT INTO projects(name) VALUES ('{slug}: stress')",
    )


@pytest.fixture(scope="module")
async def tenants(demo_env: DemoEnv) -> list[Tenant]:
    env = demo_env
    sme_type = env.tenant_types["sme"]
    out = [_tenant(slug, t.token, str(t.org_id), t.role, t.tenant_type, t.schema)
           for slug, t in env.tenants.items()]
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        for slug in EXTRA_SMES:
            org = await create_tenant(env.admin_dsn, slug=slug, tenant_type=sme_type,
                                      proxy_role=env.proxy_role)
            await admin.execute(
                "INSERT INTO campaigns(org_id, name) VALUES ($1, $2), ($1, $3)",
                org, f"{slug}: one", f"{slug}: two",
            )
            _, token = await issue_token(env.admin_dsn, tenant_slug=slug)
            out.append(_tenant(slug, token, str(org), sme_type.role, "sme", None))
    finally:
        await admin.close()
    assert len(out) >= TENANTS_NEEDED
    return out[:TENANTS_NEEDED]


async def test_no_context_or_row_leaks_under_concurrent_mixed_load(
    start_proxy: Callable[..., ProxyProcess], tenants: list[Tenant],
) -> None:
    proxy = start_proxy(pool_size=6, extra="query_wait_timeout = 60.0")
    ops: Counter[str] = Counter()
    seen_tenant_ids: Counter[str] = Counter()

    async def connect(t: Tenant) -> asyncpg.Connection:
        return await asyncpg.connect(
            f"postgresql://{t.slug}:{t.token}@127.0.0.1:{proxy.port}/app",
            statement_cache_size=0, timeout=60, command_timeout=60,
        )

    async def verify(conn: asyncpg.Connection, t: Tenant) -> None:
        row = await conn.fetchrow(t.probe)
        assert (row["t"], row["u"], sorted(row["owners"])) == (t.org_id, t.role, t.owners), (
            f"client of {t.slug} saw {tuple(row)}"
        )
        seen_tenant_ids[row["t"]] += 1

    async def client(t: Tenant, seed: int) -> None:
        rng = random.Random(seed)
        conn = await connect(t)
        try:
            for _ in range(OPS_PER_CLIENT):
                op = rng.choice((
                    "extended", "simple", "simple_multi", "explicit", "error_in_tx",
                    "error_implicit", "write_rollback", "disconnect_mid_tx", "reconnect",
                ))
                ops[op] += 1
                if op == "extended":
                    await verify(conn, t)
                elif op == "simple":
                    await conn.execute(t.check)  # simple protocol: no parameters
                elif op == "simple_multi":
                    await conn.execute(f"BEGIN; {t.check}; {t.check}; COMMIT")
                elif op == "explicit":
                    async with conn.transaction():
                        await verify(conn, t)
                        await conn.execute(t.check)
                elif op == "error_in_tx":
                    with pytest.raises(asyncpg.DivisionByZeroError):
                        async with conn.transaction():
                            await verify(conn, t)
                            await conn.fetchval("SELECT 1/0")
                    await verify(conn, t)
                elif op == "error_implicit":
                    with pytest.raises(asyncpg.DivisionByZeroError):
                        await conn.fetchval("SELECT 1/0")
                    await conn.execute(t.check)
                elif op == "write_rollback":
                    tx = conn.transaction()
                    await tx.start()
                    await conn.execute(t.write)
                    await conn.execute(t.check)
                    await tx.rollback()
                elif op == "disconnect_mid_tx":
                    await conn.execute("BEGIN")
                    await conn.execute(t.write)
                    await verify(conn, t)
                    conn.terminate()  # vanishes with the transaction open
                    conn = await connect(t)
                    await verify(conn, t)
                else:
                    await conn.close()
                    conn = await connect(t)
                    await conn.execute(t.check)
        finally:
            conn.terminate()

    jobs = [client(t, seed=i * 1000 + j)
            for i, t in enumerate(tenants) for j in range(CLIENTS_PER_TENANT)]
    await asyncio.wait_for(asyncio.gather(*jobs), timeout=240)

    total = sum(ops.values())
    assert total == TENANTS_NEEDED * CLIENTS_PER_TENANT * OPS_PER_CLIENT
    assert min(ops.values()) > 100, ops  # every kind of operation really ran
    assert set(seen_tenant_ids) == {t.org_id for t in tenants}
    # Nothing written by a vanished client survived: rollbacks really happened.
    tables = ["public.campaigns", "tenant_b.workspace_entities"] + [
        f"{t.schema}.projects" for t in proxy.env.tenants.values() if t.schema]
    admin = await asyncpg.connect(proxy.env.admin_dsn)
    try:
        leftovers = [await admin.fetchval(f"SELECT count(*) FROM {table} WHERE name LIKE "
                                          "'%: stress'") for table in tables]
    finally:
        await admin.close()
    assert leftovers == [0] * len(tables)


async def test_set_config_context_form_isolates_tenants_on_one_server(
    start_proxy: Callable[..., ProxyProcess], tenants: list[Tenant],
) -> None:
    # context_statements = "set_config": the simple-query context is one SELECT set_config.
    proxy = start_proxy(pool_size=1, extra='context_statements = "set_config"')
    chosen = [t for t in tenants if "FROM campaigns" in t.check][:3]  # one shared table
    assert len(chosen) == 3
    conns = [await asyncpg.connect(f"postgresql://{t.slug}:{t.token}@127.0.0.1:{proxy.port}/app",
                                   statement_cache_size=0) for t in chosen]
    try:
        for _ in range(3):
            for i, (conn, t) in enumerate(zip(conns, chosen, strict=True)):
                await conn.execute(t.check)  # simple protocol: the injected SELECT form
                await conn.execute(f"BEGIN; {t.check}; COMMIT")
                with pytest.raises(asyncpg.DivisionByZeroError):  # the check can fail
                    await conn.execute(chosen[(i + 1) % len(chosen)].check)
                assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == t.org_id
    finally:
        for conn in conns:
            await conn.close()
