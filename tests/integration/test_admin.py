"""The admin console (issue #5) through real psql: PgBouncer's SHOW commands and column
names, SHOW TENANTS, PAUSE/RESUME, RELOAD (and SIGHUP), KILL <tenant>, SHUTDOWN."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

import pgtenant

from .conftest import ProxyProcess, connect
from .helpers import ADMIN, execute_in_thread
from .helpers import ADMIN_TOKEN as TOKEN
from .helpers import admin_psql as psql
from .helpers import admin_rows as rows

# PgBouncer's own column lists (src/admin.c, src/stats.c), then pgtenant's extra column.
POOLS_COLUMNS = ("database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req "
                 "sv_active sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested "
                 "sv_login maxwait maxwait_us pool_mode load_balance_hosts").split()
SOCKET_COLUMNS = ("type user database replication state addr port local_addr local_port "
                  "connect_time request_time wait wait_us close_needed ptr link remote_pid tls "
                  "application_name prepared_statements id tenant").split()


@pytest.fixture
def admin_proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(pool_size=2, extra=ADMIN)


def test_admin_needs_its_own_configured_credential(
    start_proxy: Callable[..., ProxyProcess], admin_proxy: ProxyProcess,
) -> None:
    tenant_token = admin_proxy.env.tenants["acme"].token
    out = psql(admin_proxy, "SHOW VERSION", token=tenant_token, check=False)
    assert out.returncode != 0 and "password authentication failed" in out.stderr
    out = psql(admin_proxy, "SHOW VERSION", user="acme", check=False)
    assert out.returncode != 0 and 'user "acme" may not use the admin console' in out.stderr
    unconfigured = start_proxy()
    out = psql(unconfigured, "SHOW VERSION", check=False)
    assert "the admin console is not configured" in out.stderr
    # The proxy runs in this test's environment: the same build (compiled or pure, issue 16).
    assert rows(admin_proxy, "SHOW VERSION") == [{"version": "pgtenant 0.1.0",
                                                  "build": pgtenant.build_kind()}]
    log = admin_proxy.log_path.read_text()
    assert "admin: login refused: user=admin" in log
    assert "admin: user=admin client=127.0.0.1 command='SHOW VERSION'" in log
    assert f"pgtenant 0.1.0: protocol core {pgtenant.build_kind()}" in log  # the start line


def test_show_commands_have_pgbouncer_columns_and_see_tenants(admin_proxy: ProxyProcess) -> None:
    with psycopg.connect(**admin_proxy.conninfo("acme"), autocommit=True) as acme:
        for _ in range(3):
            acme.execute("SELECT 1")
        out = psql(admin_proxy, "SHOW POOLS").stdout.splitlines()
        assert out[0].split("|") == POOLS_COLUMNS
        (pool,) = rows(admin_proxy, "SHOW POOLS")
        assert (pool["database"], pool["cl_active"], pool["pool_mode"]) == ("app", "1",
                                                                           "transaction")
        assert int(pool["sv_idle"]) >= 1
        clients = rows(admin_proxy, "SHOW CLIENTS")
        assert list(clients[0]) == SOCKET_COLUMNS
        (mine,) = [c for c in clients if c["tenant"] == "acme"]
        assert (mine["database"], mine["state"], mine["user"]) == ("app", "active", "acme")
        servers = rows(admin_proxy, "SHOW SERVERS")
        assert servers and all(s["type"] == "S" and int(s["remote_pid"]) > 0 for s in servers)
        (stats,) = rows(admin_proxy, "SHOW STATS")
        assert int(stats["total_xact_count"]) >= 3 and int(stats["total_query_count"]) >= 3
        assert int(stats["total_received"]) > 0 and int(stats["avg_xact_count"]) >= 0
        (db,) = rows(admin_proxy, "SHOW DATABASES")
        assert (db["name"], db["pool_size"], db["paused"]) == ("app", "2", "0")
        config = {r["key"]: r for r in rows(admin_proxy, "SHOW CONFIG")}
        assert config["listen"]["changeable"] == "no"
        assert config["query_wait_timeout"]["default"] == "120.0"
        assert config["admin.token_sha256"]["value"]  # shown, it is only a hash
        tenants = {r["tenant"]: r for r in rows(admin_proxy, "SHOW TENANTS")}
        assert tenants["acme"]["cl_idle"] == "1" and int(tenants["acme"]["xact_count"]) >= 3
    out = psql(admin_proxy, "SHOW NOTHING", check=False)
    assert "unknown SHOW item 'NOTHING'" in out.stderr
    out = psql(admin_proxy, "DROP TABLE x", check=False)
    assert "unknown admin command" in out.stderr and "HINT" in out.stderr


def test_admin_console_refuses_the_extended_protocol_clearly(admin_proxy: ProxyProcess) -> None:
    with psycopg.connect(host="127.0.0.1", port=admin_proxy.port, dbname="pgtenant",
                         user="admin", password=TOKEN, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="simple query protocol"):
            conn.execute("SHOW %s", ["VERSION"])  # parameters: psycopg uses PQexecParams
        # Without parameters psycopg sends a simple Query, and the console goes on.
        assert conn.execute("SHOW VERSION").fetchone() == ("pgtenant 0.1.0",
                                                           pgtenant.build_kind())


def test_pause_holds_new_transactions_until_resume(admin_proxy: ProxyProcess) -> None:
    with psycopg.connect(**admin_proxy.conninfo("acme"), autocommit=True) as acme:
        acme.execute("SELECT 1")
        psql(admin_proxy, "PAUSE")
        (pool,) = rows(admin_proxy, "SHOW DATABASES")
        assert pool["paused"] == "1"
        worker, done = execute_in_thread(acme, "SELECT 2")
        assert not done.wait(0.7)  # waits, as under PgBouncer's PAUSE
        assert rows(admin_proxy, "SHOW POOLS")[0]["cl_waiting"] == "1"
        psql(admin_proxy, "RESUME")
        assert done.wait(10)
        worker.join()
    out = psql(admin_proxy, "RESUME", check=False)
    assert "not paused" in out.stderr


def test_kill_ends_one_tenants_connections_only(admin_proxy: ProxyProcess) -> None:
    with psycopg.connect(**admin_proxy.conninfo("acme"), autocommit=True) as acme, \
            psycopg.connect(**admin_proxy.conninfo("initech"), autocommit=True) as initech:
        acme.execute("SELECT 1")
        initech.execute("SELECT 1")
        out = psql(admin_proxy, "KILL acme")
        assert "1 client connection(s) of tenant 'acme' terminated" in out.stderr
        with pytest.raises(psycopg.OperationalError, match="KILL acme"):
            acme.execute("SELECT 1")
        assert initech.execute("SELECT 1").fetchone() == (1,)
    out = psql(admin_proxy, "KILL nobody", check=False)
    assert "no tenant 'nobody'" in out.stderr


def test_reload_applies_changeable_keys_and_names_the_others(admin_proxy: ProxyProcess) -> None:
    path = admin_proxy.config_path
    text = path.read_text()
    listen = f'listen = "127.0.0.1:{admin_proxy.port}"'
    path.write_text(text.replace("pool_size = 2", "pool_size = 5").replace(
        listen, f"{listen}\nquery_wait_timeout = 7.5\nmax_client_conn = 77"))
    out = psql(admin_proxy, "RELOAD")
    assert "databases.app changed" in out.stderr and "query_wait_timeout changed" in out.stderr
    (db,) = rows(admin_proxy, "SHOW DATABASES")
    assert (db["pool_size"], db["max_client_connections"]) == ("5", "77")
    config = {r["key"]: r["value"] for r in rows(admin_proxy, "SHOW CONFIG")}
    assert config["query_wait_timeout"] == "7.5"
    # An unchangeable key: reported, the running value kept. SIGHUP reloads as RELOAD does.
    path.write_text(path.read_text().replace(listen, 'listen = "127.0.0.1:1"'))
    admin_proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "listen changed: takes effect after a restart" not in admin_proxy.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert rows(admin_proxy, "SHOW VERSION")  # still listening where it was
    path.write_text("this is not toml [")
    out = psql(admin_proxy, "RELOAD", check=False)
    assert out.returncode != 0 and "reload failed, the running configuration stays" in out.stderr
    with psycopg.connect(**admin_proxy.conninfo("acme")) as conn:  # still serving
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_shutdown_stops_the_proxy(admin_proxy: ProxyProcess) -> None:
    psql(admin_proxy, "SHUTDOWN", check=False)
    assert admin_proxy.proc.wait(10) == 0


def _servers(proxy: ProxyProcess) -> int:
    """Returns: the server connections SHOW POOLS counts (every state)."""
    (pool,) = rows(proxy, "SHOW POOLS")
    return sum(int(pool[k]) for k in ("sv_active", "sv_idle", "sv_used", "sv_login"))


def _set_pool_size(proxy: ProxyProcess, old: int, new: int) -> None:
    path = proxy.config_path
    path.write_text(path.read_text().replace(f"pool_size = {old}", f"pool_size = {new}"))
    assert "databases.app changed" in psql(proxy, "RELOAD").stderr


async def test_lowering_pool_size_by_reload_closes_servers_as_they_are_released(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """pool_size 8 -> 2 while 8 servers are busy: nothing is cut, each server above 2 is
    closed when its transaction ends (not at server_idle_timeout); raising it works too."""
    proxy = start_proxy(pool_size=8, extra=ADMIN)
    conns = [await connect(proxy, "acme") for _ in range(8)]
    try:
        busy = asyncio.gather(*(c.fetchval("SELECT pg_sleep(0.8)::text || 'done'")
                                for c in conns))
        await asyncio.sleep(0.3)
        pids = [int(r["remote_pid"]) for r in rows(proxy, "SHOW SERVERS")]
        assert len(pids) == 8 and _servers(proxy) == 8
        _set_pool_size(proxy, 8, 2)
        (db,) = rows(proxy, "SHOW DATABASES")
        assert (db["pool_size"], db["current_connections"]) == ("2", "8")  # none cut
        assert await busy == ["done"] * 8
        for _ in range(3):  # a few transactions: at most one per server to converge
            assert await asyncio.gather(*(c.fetchval("SELECT 1") for c in conns)) == [1] * 8
        assert _servers(proxy) <= 2
        (db,) = rows(proxy, "SHOW DATABASES")
        assert int(db["current_connections"]) <= 2
        admin = await asyncpg.connect(proxy.env.admin_dsn)
        try:  # really closed on the Postgres side, not only forgotten
            deadline = time.monotonic() + 5
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity "
                                       "WHERE pid = ANY($1::int[])", pids) > 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await admin.close()
        assert "above pool_size (2)" in proxy.log()
        _set_pool_size(proxy, 2, 8)  # and back up: 8 sleeps run side by side again
        started = time.monotonic()
        busy = asyncio.gather(*(c.fetchval("SELECT pg_sleep(0.5)") for c in conns))
        await asyncio.sleep(0.3)
        assert _servers(proxy) == 8
        await busy
        assert time.monotonic() - started < 1.2  # not 4 rounds of 0.5 s on 2 servers
    finally:
        for conn in conns:
            conn.terminate()


def test_lowering_pool_size_closes_idle_servers_at_once(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(pool_size=4, extra=ADMIN)
    conns = [psycopg.connect(**proxy.conninfo("acme")) for _ in range(4)]
    try:
        for conn in conns:  # four transactions open at once: four servers
            conn.execute("SELECT 1")
        for conn in conns:
            conn.commit()
        assert _servers(proxy) == 4
        _set_pool_size(proxy, 4, 1)
        assert _servers(proxy) == 1  # idle ones above the new size: closed by the reload
    finally:
        for conn in conns:
            conn.close()
