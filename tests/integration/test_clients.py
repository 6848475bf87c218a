"""Real clients through a real pgtenant: each sees only its tenant's rows and settings."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import aiopg
import asyncpg
import psycopg
import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.protocol import codec

from .conftest import ProxyProcess

SETTINGS_SQL = (
    "SELECT current_setting('app.tenant_id'), current_setting('app.tenant_type'), "
    "current_setting('app.entity_id'), current_user, current_setting('search_path')"
)
SME_TABLES = ("public.brand_guidelines", "public.campaigns")


def expected_settings(env: DemoEnv, slug: str) -> tuple[str, str, str, str, str]:
    tenant = env.tenants[slug]
    path = ", ".join(_search_path(env, slug))
    return (str(tenant.org_id), tenant.tenant_type, "", tenant.role, path)


def _search_path(env: DemoEnv, slug: str) -> list[str]:
    tenant = env.tenants[slug]
    return [p.format(schema=tenant.schema or "", slug=slug, org_id=tenant.org_id)
            for p in env.tenant_types[tenant.tenant_type].search_path]


def psql(proxy: ProxyProcess, slug: str, *args: str, token: str | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("psql") or _cluster_tool("psql")
    assert exe, "psql not found"
    env = {**os.environ, "PGPASSWORD": token or proxy.env.tenants[slug].token,
           "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(
        [exe, "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", slug,
         "-d", "app", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )


def _cluster_tool(name: str) -> str | None:
    from pgtenant.control.cluster import find_bindir

    path = find_bindir() / name
    return str(path) if path.exists() else None


# ------------------------------------------------------------------------------ psql

def test_psql_sees_only_its_own_rows_and_settings(proxy: ProxyProcess) -> None:
    env = proxy.env
    for slug in ("acme", "initech"):
        out = psql(proxy, slug, "-F", "|", "-c", SETTINGS_SQL,
                   "-c", "SELECT name FROM campaigns ORDER BY name")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert tuple(lines[0].split("|")) == expected_settings(env, slug)
        assert lines[1:] == env.tenants[slug].rows["public.campaigns"]


def test_psql_error_positions_point_into_the_clients_own_text(proxy: ProxyProcess) -> None:
    out = psql(proxy, "acme", "-c", "SELECT 1 FROM campaigns WHERE nme = 'x'")
    assert "column \"nme\" does not exist" in out.stderr
    # psql prints the statement and a caret under the offending token, from the P field.
    assert "LINE 1: SELECT 1 FROM campaigns WHERE nme = 'x'" in out.stderr
    caret_line = next(line for line in out.stderr.splitlines() if line.strip() == "^")
    assert caret_line.index("^") == len("LINE 1: SELECT 1 FROM campaigns WHERE ")


def test_psql_script_with_transactions_and_errors(proxy: ProxyProcess) -> None:
    script = "\n".join([
        "BEGIN;",
        "INSERT INTO campaigns(org_id, name) VALUES "
        "(current_setting('app.tenant_id')::uuid, 'acme: tmp');",
        "SELECT count(*) FROM campaigns WHERE name = 'acme: tmp';",
        "SELECT 1/0;",
        "ROLLBACK;",
        "SELECT count(*) FROM campaigns WHERE name = 'acme: tmp';",
        ";",
        "SELECT current_setting('app.tenant_id');",
    ])
    out = psql(proxy, "acme", stdin=script)
    assert "division by zero" in out.stderr
    assert out.stdout.split() == ["1", "0", str(proxy.env.tenants["acme"].org_id)]


# ------------------------------------------------------------------------------ pgbench

@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_runs_every_transaction_in_its_tenant(proxy: ProxyProcess, tmp_path,
                                                      mode: str) -> None:
    exe = shutil.which("pgbench") or _cluster_tool("pgbench")
    if exe is None:
        pytest.skip("pgbench is not installed")
    tenant = proxy.env.tenants["initech"]
    n_campaigns = len(tenant.rows["public.campaigns"])
    script = tmp_path / "tenant.sql"
    # Any wrong tenant, row count or role divides by zero, which pgbench counts as a failure.
    script.write_text(
        f"SELECT 1/(current_setting('app.tenant_id') = '{tenant.org_id}')::int;\n"
        f"SELECT 1/(count(*) = {n_campaigns})::int FROM campaigns;\n"
        "BEGIN;\n"
        f"SELECT 1/(current_user = '{tenant.role}')::int;\n"
        "SELECT 1/(count(*) > 0)::int FROM brand_guidelines;\n"
        "END;\n"
    )
    out = subprocess.run(
        [exe, "-n", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "initech", "-M", mode,
         "-c", "8", "-j", "2", "-t", "50", "-f", str(script), "app"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PGPASSWORD": tenant.token},
    )
    assert out.returncode == 0, out.stderr + out.stdout
    assert "number of transactions actually processed: 400/400" in out.stdout
    assert "number of failed transactions: 0" in out.stdout


# ------------------------------------------------------------------------------ asyncpg

async def test_asyncpg_sees_only_its_rows_settings_and_privileges(proxy: ProxyProcess) -> None:
    env = proxy.env
    conn = await asyncpg.connect(proxy.dsn("umbrella"), statement_cache_size=0)
    try:
        row = await conn.fetchrow(SETTINGS_SQL)
        assert tuple(row) == expected_settings(env, "umbrella")
        names = await conn.fetch("SELECT content->>'name' AS n FROM entity_data ORDER BY 1")
        assert [r["n"] for r in names] == env.tenants["umbrella"].rows["tenant_b.entity_data"]
        async with conn.transaction():
            assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == str(
                env.tenants["umbrella"].org_id)
        # An agency cannot write SME tables.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO public.campaigns(org_id, name) VALUES ($1, 'x')",
                env.tenants["umbrella"].org_id,
            )
        # The simple protocol path (execute without args) gets the context too.
        await conn.execute("SELECT 1; SELECT 2")
        assert await conn.fetchval("SELECT count(*) FROM brand_guidelines") == 0
    finally:
        await conn.close()


async def test_sme_cannot_write_agency_tables_but_the_router_routes(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn("acme"), statement_cache_size=0)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO tenant_b.entity_data(organization_id, data_type, content) "
                "VALUES (current_setting('app.tenant_id')::uuid, 'x', '{}')"
            )
        tx = conn.transaction()
        await tx.start()
        try:
            result = await conn.fetchval(
                "SELECT save_resource_routed('acme: routed', '{\"k\": 1}'::jsonb)"
            )
            assert '"public"' in result
            seen = await conn.fetch("SELECT organization_id, source FROM resources_unified")
            assert {r["organization_id"] for r in seen} == {proxy.env.tenants["acme"].org_id}
            assert len(seen) == len(proxy.env.tenants["acme"].rows["public.brand_guidelines"]) + 1
        finally:
            await tx.rollback()  # leave the demo rows as they were
    finally:
        await conn.close()


async def test_schema_per_tenant_sees_its_own_schema_only(proxy: ProxyProcess) -> None:
    env = proxy.env
    conn = await asyncpg.connect(proxy.dsn("globex"), statement_cache_size=0)
    try:
        rows = await conn.fetch("SELECT name FROM projects ORDER BY name")
        assert [r["name"] for r in rows] == env.tenants["globex"].rows[
            f"{env.tenants['globex'].schema}.projects"]
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f"SELECT * FROM {env.tenants['hooli'].schema}.projects")
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ psycopg

def test_psycopg_sync_sees_its_rows(proxy: ProxyProcess) -> None:
    env = proxy.env
    with psycopg.connect(**proxy.conninfo("initech")) as conn:
        assert conn.execute(SETTINGS_SQL).fetchone() == expected_settings(env, "initech")
        names = [r[0] for r in conn.execute("SELECT name FROM campaigns ORDER BY 1")]
        assert names == env.tenants["initech"].rows["public.campaigns"]
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.rollback()
        assert conn.execute("SELECT %s::text", ("ok",)).fetchone() == ("ok",)
    with psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("tenant_sme",)


async def test_psycopg_async_sees_its_rows(proxy: ProxyProcess) -> None:
    env = proxy.env
    async with await psycopg.AsyncConnection.connect(**proxy.conninfo("hooli")) as conn:
        cur = await conn.execute(SETTINGS_SQL)
        assert await cur.fetchone() == expected_settings(env, "hooli")
        cur = await conn.execute("SELECT name FROM projects ORDER BY 1")
        assert [r[0] for r in await cur.fetchall()] == env.tenants["hooli"].rows[
            f"{env.tenants['hooli'].schema}.projects"]


def test_psycopg_pipeline_keeps_context_across_many_syncs(proxy: ProxyProcess) -> None:
    env = proxy.env
    org = str(env.tenants["acme"].org_id)
    # prepare_threshold=None: psycopg's server-side prepared statements (named, reused across
    # transactions) arrive with issue #4; until then a named Parse retires its server.
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True,
                         prepare_threshold=None) as conn:
        with conn.pipeline() as pipe:
            curs = []
            for i in range(30):
                curs.append(conn.execute(
                    "SELECT current_setting('app.tenant_id'), current_user, %s::int", (i,)))
                if i % 10 == 0:
                    pipe.sync()
        for i, cur in enumerate(curs):
            assert cur.fetchone() == (org, "tenant_sme", i)
    with psycopg.connect(**proxy.conninfo("acme")) as conn:  # pipeline inside a transaction
        with conn.pipeline():
            c1 = conn.execute("SELECT count(*) FROM campaigns")
            c2 = conn.execute("SELECT current_setting('app.tenant_id')")
        assert c1.fetchone() == (len(env.tenants["acme"].rows["public.campaigns"]),)
        assert c2.fetchone() == (org,)


# ------------------------------------------------------------------------------ aiopg

async def test_aiopg_sees_its_rows(proxy: ProxyProcess) -> None:
    env = proxy.env
    info = proxy.conninfo("initech")
    dsn = " ".join(f"{k}={v}" for k, v in info.items())
    async with aiopg.connect(dsn) as conn, conn.cursor() as cur:
        await cur.execute(SETTINGS_SQL)
        assert await cur.fetchone() == expected_settings(env, "initech")
        await cur.execute("SELECT name FROM campaigns ORDER BY 1")
        assert [r[0] for r in await cur.fetchall()] == env.tenants["initech"].rows[
            "public.campaigns"]


# ------------------------------------------------------------------------------ raw pipelining

async def _raw_login(proxy: ProxyProcess, slug: str) -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(codec.startup_message([("user", slug), ("database", "app")]))
    await _read_until(reader, ord("R"))
    writer.write(codec.password_message(proxy.env.tenants[slug].token.encode()))
    await _read_until(reader, ord("Z"))
    return reader, writer


async def _read_until(reader: asyncio.StreamReader, last: int,
                      count: int = 1) -> list[tuple[int, bytes]]:
    frames: list[tuple[int, bytes]] = []
    seen = 0
    while seen < count:
        header = await asyncio.wait_for(reader.readexactly(5), 10)
        length = int.from_bytes(header[1:], "big")
        body = await reader.readexactly(length - 4)
        frames.append((header[0], body))
        if header[0] == last:
            seen += 1
    return frames


def _data_row_values(body: bytes) -> list[str]:
    n = int.from_bytes(body[:2], "big")
    pos, values = 2, []
    for _ in range(n):
        size = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        values.append(body[pos : pos + size].decode())
        pos += size
    return values


async def test_pipelined_segments_in_one_write_are_each_injected(proxy: ProxyProcess) -> None:
    """Five transactions sent before any reply: each runs in the tenant's context."""
    org = str(proxy.env.tenants["acme"].org_id)
    sql = "SELECT current_setting('app.tenant_id'), current_user"
    ext = (codec.parse("", sql) + codec.bind("", "", []) + codec.execute("", 0)
           + codec.sync())
    reader, writer = await _raw_login(proxy, "acme")
    try:
        writer.write(codec.query(sql) + ext + codec.query(sql) + ext + ext
                     + codec.query("BEGIN") + codec.query(sql) + codec.query("COMMIT")
                     + codec.query(sql))
        frames = await _read_until(reader, ord("Z"), count=9)
    finally:
        writer.close()
    rows = [_data_row_values(body) for kind, body in frames if kind == ord("D")]
    assert rows == [[org, "tenant_sme"]] * 7
    statuses = [body for kind, body in frames if kind == ord("Z")]
    assert statuses == [b"I"] * 5 + [b"T", b"T", b"I", b"I"]
    assert not [body for kind, body in frames if kind == ord("E")]


def test_psycopg_pipeline_commits_and_goes_on_in_the_tenants_context(
    proxy: ProxyProcess,
) -> None:
    """BEGIN ... COMMIT and more statements in one unsynced batch (psycopg pipeline mode)."""
    org = str(proxy.env.tenants["initech"].org_id)
    with psycopg.connect(**proxy.conninfo("initech"), prepare_threshold=None) as conn:
        with conn.pipeline():
            first = conn.execute("SELECT current_setting('app.tenant_id'), current_user")
            conn.commit()
            second = conn.execute("SELECT current_setting('app.tenant_id'), current_user")
            count = conn.execute("SELECT count(*) FROM campaigns")
            conn.commit()
        assert first.fetchone() == (org, "tenant_sme")
        assert second.fetchone() == (org, "tenant_sme")
        assert count.fetchone() == (len(proxy.env.tenants["initech"].rows["public.campaigns"]),)


async def test_statements_after_commit_in_one_batch_run_in_context_or_not_at_all(
    proxy: ProxyProcess,
) -> None:
    org = str(proxy.env.tenants["acme"].org_id)
    sql = "SELECT current_setting('app.tenant_id')"

    def batch(*sqls: str) -> bytes:
        return b"".join(codec.parse("", s) + codec.bind("", "", []) + codec.execute("", 0)
                        for s in sqls) + codec.sync()

    reader, writer = await _raw_login(proxy, "acme")
    try:
        writer.write(batch("BEGIN", sql, "COMMIT", sql, "ROLLBACK", sql))
        frames = await _read_until(reader, ord("Z"))
        assert [_data_row_values(b) for k, b in frames if k == ord("D")] == [[org]] * 3
        assert [k for k, _ in frames].count(ord("Z")) == 1
        # An error before the COMMIT: Postgres skips everything up to the Sync; so do we.
        writer.write(batch("SELECT 1/0", "COMMIT", sql) + codec.query(sql))
        frames = await _read_until(reader, ord("Z"), count=2)
        kinds = [chr(k) for k, _ in frames]
        assert kinds.count("E") == 1 and kinds.count("D") == 1  # only the final Query ran
        assert frames[kinds.index("Z")][1] == b"I"
    finally:
        writer.close()


async def test_unnamed_statement_reused_across_syncs_works_after_another_tenant(
    start_proxy,
) -> None:
    """Parse of the unnamed statement in one transaction, Bind of it in a later one: in
    between another tenant used (and scrubbed) the only server."""
    proxy = start_proxy(pool_size=1)
    org = str(proxy.env.tenants["acme"].org_id)
    sql = "SELECT current_setting('app.tenant_id')"
    reader, writer = await _raw_login(proxy, "acme")
    other_reader, other_writer = await _raw_login(proxy, "initech")
    try:
        writer.write(codec.parse("", sql) + codec.sync())
        await _read_until(reader, ord("Z"))
        other_writer.write(codec.parse("", "SELECT 'initech was here'") + codec.bind("", "", [])
                           + codec.execute("", 0) + codec.sync())
        await _read_until(other_reader, ord("Z"))
        writer.write(codec.bind("", "", []) + codec.execute("", 0) + codec.sync())
        frames = await _read_until(reader, ord("Z"))
        assert [_data_row_values(b) for k, b in frames if k == ord("D")] == [[org]]
        assert not [b for k, b in frames if k == ord("E")]
    finally:
        writer.close()
        other_writer.close()


async def test_bind_of_unnamed_statement_never_parsed_cannot_use_another_tenants(
    start_proxy,
) -> None:
    """A client that never parsed an unnamed statement binds one: on the shared server the
    previous tenant's is still there, so the proxy closes it first (a fresh session's
    answer: 26000), and only then (not for every transaction)."""
    proxy = start_proxy(pool_size=1)
    reader, writer = await _raw_login(proxy, "acme")
    other_reader, other_writer = await _raw_login(proxy, "initech")
    try:
        other_writer.write(codec.parse("", "SELECT 'initech was here'") + codec.bind("", "", [])
                           + codec.execute("", 0) + codec.sync())
        await _read_until(other_reader, ord("Z"))
        writer.write(codec.bind("", "", []) + codec.execute("", 0) + codec.sync())
        frames = await _read_until(reader, ord("Z"))
        assert not [b for k, b in frames if k == ord("D")]  # nothing of initech's ran
        errors = [dict(codec.parse_error_fields(b)) for k, b in frames if k == ord("E")]
        assert [e[ord("C")] for e in errors] == [b"26000"]
    finally:
        writer.close()
        other_writer.close()
