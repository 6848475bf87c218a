"""Tenant-scoped LISTEN/NOTIFY through a real pgtenant (protocol/listen.py, notify.py).

Channel names are private to a tenant: two tenants listening to the same name each hear only
their own tenant's notifications; LISTEN and NOTIFY follow Postgres's transaction rules; the
listener connection comes back after it is killed; a LISTEN the guard cannot see (inside a
function, on a pooled server) never delivers anything to a client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from pgtenant.control.hardening import check_lockdown, sign_context
from pgtenant.protocol.listen import channel_name

from .conftest import ProxyProcess, connect, free_port
from .helpers import ADMIN, admin_rows, metric_value, scrape

Received = list[tuple[int, str, str]]


def _collector() -> tuple[Received, Callable[..., None]]:
    got: Received = []

    def on_notify(_conn: object, pid: int, channel: str, payload: str) -> None:
        got.append((pid, channel, payload))

    return got, on_notify


async def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _psycopg(proxy: ProxyProcess, slug: str) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(slug), autocommit=True)  # type: ignore[arg-type]


async def _key(proxy: ProxyProcess) -> bytes:
    admin = await asyncpg.connect(proxy.env.admin_dsn)
    try:
        return bytes(await admin.fetchval("SELECT key FROM pgtenant.signing_keys WHERE id = 1"))
    finally:
        await admin.close()


async def test_two_tenants_on_one_channel_name_hear_only_their_own(proxy: ProxyProcess) -> None:
    acme, initech = await connect(proxy, "acme"), await connect(proxy, "initech")
    acme2, initech2 = await connect(proxy, "acme"), await connect(proxy, "initech")
    try:
        got_acme, cb_acme = _collector()
        got_initech, cb_initech = _collector()
        await acme.add_listener("news", cb_acme)
        await initech.add_listener("news", cb_initech)
        await acme2.execute("NOTIFY news, 'acme 1'")
        await initech2.execute("NOTIFY news, 'initech 1'")
        await acme2.execute("SELECT pgtenant.pg_notify('news', 'acme 2')")
        await _eventually(lambda: len(got_acme) == 2 and len(got_initech) == 1)
        await asyncio.sleep(0.2)  # nothing else comes
        # The NOTIFY statement's pid is the notifying client's; pg_notify's is 0 (its
        # backend is a pooled server, not a client).
        assert got_acme == [(acme2.get_server_pid(), "news", "acme 1"), (0, "news", "acme 2")]
        assert got_initech == [(initech2.get_server_pid(), "news", "initech 1")]
        # Still usable, and the channel goes with remove_listener (UNLISTEN).
        await acme.remove_listener("news", cb_acme)
        await acme2.execute("NOTIFY news, 'acme 3'")
        await asyncio.sleep(0.3)
        assert len(got_acme) == 2
    finally:
        for conn in (acme, initech, acme2, initech2):
            await conn.close()


def test_psycopg_notifies_generator_and_own_notifications(proxy: ProxyProcess) -> None:
    with _psycopg(proxy, "acme") as conn, _psycopg(proxy, "initech") as other, \
            _psycopg(proxy, "acme") as same:
        handled: list[psycopg.Notify] = []
        conn.add_notify_handler(handled.append)
        conn.execute("LISTEN jobs")
        # Its own notification arrives before its NOTIFY returns, with its own pid, as
        # from Postgres (psycopg's test_notify_handlers relies on it).
        conn.execute("NOTIFY jobs, 'mine'")
        assert [(n.channel, n.payload, n.pid) for n in handled] == [
            ("jobs", "mine", conn.pgconn.backend_pid)]
        conn.remove_notify_handler(handled.append)
        other.execute("NOTIFY jobs, 'from initech'")
        same.execute("NOTIFY jobs, 'from acme'")
        got = [(n.channel, n.payload, n.pid) for n in conn.notifies(timeout=1.0, stop_after=1)]
        assert got == [("jobs", "from acme", same.pgconn.backend_pid)]
        assert list(conn.notifies(timeout=0.3)) == []


def test_listen_follows_the_transaction(proxy: ProxyProcess) -> None:
    with _psycopg(proxy, "acme") as conn, _psycopg(proxy, "acme") as notifier:
        conn.execute("BEGIN")
        conn.execute("LISTEN txn_chan")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("ROLLBACK")
        notifier.execute("NOTIFY txn_chan, 'after rollback'")
        assert list(conn.notifies(timeout=0.5)) == []
        # In a failed block: Postgres's own error, and nothing registered.
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("LISTEN txn_chan")
        conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        conn.execute("LISTEN txn_chan")
        conn.execute("COMMIT")
        # The listener hears the channel a moment after COMMIT (it is not waited for).
        deadline = time.monotonic() + 5
        got: list[str] = []
        while not got and time.monotonic() < deadline:
            notifier.execute("NOTIFY txn_chan, 'after commit'")
            got = [n.payload for n in conn.notifies(timeout=0.2, stop_after=1)]
        assert got == ["after commit"]
        conn.execute("UNLISTEN *")
        notifier.execute("NOTIFY txn_chan, 'after unlisten'")
        assert list(conn.notifies(timeout=0.5)) == []


def test_notify_in_a_rolled_back_transaction_delivers_nothing(proxy: ProxyProcess) -> None:
    with _psycopg(proxy, "acme") as conn, _psycopg(proxy, "acme") as notifier:
        conn.execute("LISTEN rb_chan")
        with notifier.transaction(force_rollback=True):
            notifier.execute("NOTIFY rb_chan, 'rolled back'")
            notifier.execute("SELECT pgtenant.pg_notify('rb_chan', 'rolled back too')")
        # A NOTIFY that fails (payload too long) delivers nothing either.
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            notifier.execute("NOTIFY rb_chan, '" + "x" * 9000 + "'")
        with notifier.transaction():
            notifier.execute("NOTIFY rb_chan, 'committed'")
            notifier.execute("NOTIFY rb_chan, 'committed'")  # folded, as Postgres does
        got = [n.payload for n in conn.notifies(timeout=1.0)]
        assert got == ["committed"]
        # Through Parse (psycopg prepares it): rewritten the same way.
        notifier.execute("NOTIFY rb_chan, 'prepared'", prepare=True)
        notifier.execute("NOTIFY rb_chan, 'prepared 2'", prepare=True)
        assert [n.payload for n in conn.notifies(timeout=1.0, stop_after=2)] == [
            "prepared", "prepared 2"]
        # LISTEN/UNLISTEN through Parse, in a prepared statement run twice.
        conn.execute("LISTEN parsed_chan", prepare=True)
        conn.execute("LISTEN parsed_chan", prepare=True)
        notifier.execute("NOTIFY parsed_chan, 'heard'")
        assert [n.payload for n in conn.notifies(timeout=1.0, stop_after=1)] == ["heard"]
        conn.execute("UNLISTEN parsed_chan", prepare=True)
        notifier.execute("NOTIFY parsed_chan, 'not heard'")
        assert list(conn.notifies(timeout=0.4)) == []


def test_unsupported_forms_are_refused_clearly(proxy: ProxyProcess) -> None:
    with _psycopg(proxy, "acme") as conn:
        for sql in ("SELECT 1; LISTEN x", "LISTEN x; LISTEN y", "SELECT 1; NOTIFY x"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="only statement of"):
                conn.execute(sql)
        # pg_notify() is not refused: it runs as pgtenant.pg_notify (the tenant's channels).
        assert conn.execute("SELECT pg_notify('x', 'y')").fetchone() == ("",)
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_pg_notify_needs_a_verified_tenant_and_matches_the_proxy_mapping(
    proxy: ProxyProcess,
) -> None:
    """pgtenant.pg_notify's SQL mapping is the proxy's Python one (channel_name), including
    non-ASCII names, and refuses a caller with no verified tenant context."""
    env = proxy.env
    key = await _key(proxy)
    tenant = env.tenants["acme"]
    admin = await asyncpg.connect(env.admin_dsn)
    listener = await asyncpg.connect(env.admin_dsn)
    login = await asyncpg.connect(env.proxy_dsn)  # the proxy's login role, no context
    try:
        got, cb = _collector()
        for channel in ("news", "café ☕", "X" * 63):
            mapped = channel_name(key, str(tenant.org_id), tenant.tenant_type, channel)
            await listener.add_listener(mapped, cb)
            sig = sign_context(key, str(tenant.org_id), tenant.tenant_type, "")
            async with admin.transaction():
                for name, value in (("app.tenant_id", str(tenant.org_id)),
                                    ("app.tenant_type", tenant.tenant_type),
                                    ("app.entity_id", ""), ("app.tenant_sig", sig)):
                    await admin.execute("SELECT set_config($1, $2, true)", name, value)
                await admin.execute("SELECT pgtenant.pg_notify($1, 'p')", channel)
            await _eventually(lambda mapped=mapped: any(c == mapped for _, c, _ in got))  # type: ignore[misc]
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no verified tenant"):
            await login.execute("SELECT pgtenant.pg_notify('news', 'spoof')")
        async with admin.transaction():  # a forged signature is no tenant either
            await admin.execute("SELECT set_config('app.tenant_id', $1, true)",
                                str(tenant.org_id))
            await admin.execute("SELECT set_config('app.tenant_type', $1, true)",
                                tenant.tenant_type)
            await admin.execute("SELECT set_config('app.tenant_sig', 'forged', true)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await admin.execute("SELECT pgtenant.pg_notify('news', 'spoof')")
        with pytest.raises(asyncpg.InvalidParameterValueError):
            async with admin.transaction():
                sig = sign_context(key, str(tenant.org_id), tenant.tenant_type, "")
                for name, value in (("app.tenant_id", str(tenant.org_id)),
                                    ("app.tenant_type", tenant.tenant_type),
                                    ("app.entity_id", ""), ("app.tenant_sig", sig)):
                    await admin.execute("SELECT set_config($1, $2, true)", name, value)
                await admin.execute("SELECT pgtenant.pg_notify($1, 'p')", "Y" * 64)
    finally:
        for conn in (admin, listener, login):
            await conn.close()


async def test_raw_listen_on_another_tenants_server_channel_hears_nothing(
    proxy: ProxyProcess,
) -> None:
    """Even knowing another tenant's server channel (it cannot: an HMAC under the key),
    a tenant's LISTEN of that name is mapped again, into its own namespace."""
    key = await _key(proxy)
    victim = proxy.env.tenants["initech"]
    victim_channel = channel_name(key, str(victim.org_id), victim.tenant_type, "secrets")
    attacker = await connect(proxy, "acme")
    notifier = await connect(proxy, "initech")
    try:
        got, cb = _collector()
        await attacker.add_listener(victim_channel, cb)
        await attacker.add_listener("secrets", cb)
        await notifier.execute("NOTIFY secrets, 'initech only'")
        await notifier.execute("SELECT pgtenant.pg_notify('secrets', 'initech only 2')")
        await notifier.execute(f'NOTIFY "{victim_channel}", \'spoof\'')
        await asyncio.sleep(0.5)
        assert got == []
    finally:
        await attacker.close()
        await notifier.close()


async def test_listen_hidden_in_a_function_never_reaches_a_client(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """A LISTEN the guard cannot see (dynamic SQL in a function) runs on a pooled server:
    the notifications that server then receives are dropped, never forwarded (counted)."""
    port = free_port()
    proxy = start_proxy(pool_size=2, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"')
    env = proxy.env
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        await admin.execute(
            "CREATE OR REPLACE FUNCTION public.sneaky_subscribe(ch text) RETURNS void "
            "LANGUAGE plpgsql AS $$ BEGIN EXECUTE format('LISTEN %I', ch); END $$")
        await admin.execute("GRANT EXECUTE ON FUNCTION public.sneaky_subscribe(text) TO PUBLIC")
        with _psycopg(proxy, "acme") as conn:
            seen: list[psycopg.Notify] = []
            conn.add_notify_handler(seen.append)
            conn.execute("SELECT pg_advisory_lock(4711)")  # pins its server to it
            conn.execute("SELECT public.sneaky_subscribe('raw_leak')")
            conn.execute("LISTEN raw_leak")  # the proxy's, mapped: hears nothing raw
            await admin.execute("NOTIFY raw_leak, 'leak'")
            await asyncio.sleep(0.3)
            conn.execute("SELECT 1")
            await admin.execute("NOTIFY raw_leak, 'leak 2'")
            assert conn.execute("SELECT pg_sleep(0.3), 1").fetchone() == ("", 1)
            assert seen == []
            conn.remove_notify_handler(seen.append)
            assert list(conn.notifies(timeout=0.3)) == []
            conn.execute("SELECT pg_advisory_unlock(4711)")
        samples = scrape(port)
        assert metric_value(samples, "pgtenant_notifications_dropped_total",
                            reason="pooled_server") == 2
        assert metric_value(samples, "pgtenant_notify_channels") == 0  # it left
    finally:
        await admin.execute("DROP FUNCTION IF EXISTS public.sneaky_subscribe(text)")
        await admin.close()


async def test_listener_reconnects_after_its_backend_is_terminated(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    port = free_port()
    proxy = start_proxy(pool_size=2, extra=f'{ADMIN}\n[metrics]\nlisten = "127.0.0.1:{port}"')
    listener = await connect(proxy, "acme")
    notifier = await connect(proxy, "acme")
    admin = await asyncpg.connect(proxy.env.admin_dsn)
    try:
        got, cb = _collector()
        await listener.add_listener("reconnect", cb)
        await notifier.execute("NOTIFY reconnect, 'before'")
        await _eventually(lambda: [p for _, _, p in got] == ["before"])
        pids = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN \"pgtenant\\_%'")
        assert len(pids) == 1, pids
        await admin.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
        await _eventually(lambda: "listener connection lost" in proxy.log())
        deadline = time.monotonic() + 10
        while "after" not in [p for _, _, p in got]:
            assert time.monotonic() < deadline, "no notification after the reconnect"
            await notifier.execute("NOTIFY reconnect, 'after'")
            await asyncio.sleep(0.2)
        assert "listener connected" in proxy.log()
        samples = scrape(port)
        assert metric_value(samples, "pgtenant_notify_listener_losses_total") == 1
        assert metric_value(samples, "pgtenant_notify_listeners") == 1
        assert metric_value(samples, "pgtenant_notify_channels") == 1
        assert metric_value(samples, "pgtenant_notifications_delivered_total") >= 2
        (row,) = admin_rows(proxy, "SHOW LISTENERS")
        new_pid = (await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN \"pgtenant\\_%'"))
        assert row["database"] == "app" and row["connected"] == "1"
        assert row["channels"] == row["subscriptions"] == row["listener_losses"] == "1"
        assert [r["pid"] for r in new_pid] == [int(row["backend_pid"])] != [pids[0]["pid"]]
    finally:
        for conn in (listener, notifier, admin):
            await conn.close()


def test_notification_during_a_query_comes_before_its_ready_for_query(
    proxy: ProxyProcess,
) -> None:
    """As from Postgres: a notification that arrives while the client's query runs is sent
    between that query's replies and its ReadyForQuery, never inside a reply (psycopg's
    test_notify_query_notify, sleep_on="server")."""
    with _psycopg(proxy, "acme") as conn, _psycopg(proxy, "acme") as notifier:
        seen: list[str] = []
        conn.add_notify_handler(lambda n: seen.append(n.payload))
        conn.execute("LISTEN during")
        done = threading.Event()

        def notify_soon() -> None:
            time.sleep(0.1)
            notifier.execute("SELECT pgtenant.pg_notify('during', 'mid-query')")
            done.set()

        worker = threading.Thread(target=notify_soon)
        worker.start()
        assert conn.execute("SELECT pg_sleep(0.4), 7").fetchone() == ("", 7)
        worker.join()
        assert done.is_set() and seen == ["mid-query"]  # before execute() returned
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        notifier.execute("SELECT pgtenant.pg_notify('during', 'in a block')")
        time.sleep(0.2)
        conn.execute("SELECT 2")
        assert seen == ["mid-query"]  # kept while the client is in a transaction block
        conn.execute("COMMIT")
        assert seen == ["mid-query", "in a block"]


async def test_check_lockdown_notices_a_missing_pg_notify(proxy: ProxyProcess) -> None:
    env = proxy.env
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        assert await check_lockdown(admin, env.proxy_role, []) == []
        tx = admin.transaction()
        await tx.start()
        try:  # an install from before LISTEN/NOTIFY; rolled back
            await admin.execute("DROP FUNCTION pgtenant.pg_notify(text, text)")
            problems = await check_lockdown(admin, env.proxy_role, [])
        finally:
            await tx.rollback()
    finally:
        await admin.close()
    assert problems == ["pgtenant.pg_notify(text, text) is missing (run pgtenant init): "
                        "tenants' pg_notify needs it"]


def test_without_a_signing_key_listen_and_notify_are_refused(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """No key, no private channel names: refused (fail closed), the session goes on."""
    proxy = start_proxy(pool_size=1, extra='context_signing = "off"')
    with _psycopg(proxy, "acme") as conn:
        for sql in ("LISTEN news", "NOTIFY news, 'x'", "UNLISTEN *"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="context-signing key"):
                conn.execute(sql)
        assert conn.execute("SELECT 1").fetchone() == (1,)
