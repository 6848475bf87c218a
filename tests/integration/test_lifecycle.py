"""Process lifecycle (issue #5): SIGTERM drains (running transactions finish, up to
shutdown_timeout), SIGINT stops at once. (SIGHUP reloads: see test_admin.)"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from .conftest import ProxyProcess, connect


def test_sigterm_lets_running_transactions_finish_and_ends_idle_clients(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="shutdown_timeout = 20.0")
    running = psycopg.connect(**proxy.conninfo("acme"))
    idle = psycopg.connect(**proxy.conninfo("initech"), autocommit=True)
    idle.execute("SELECT 1")
    results: list[object] = []

    def transaction() -> None:
        try:
            running.execute("SELECT pg_sleep(1.0)")
            results.append(running.execute("SELECT 42").fetchone())
            running.commit()
            results.append("committed")
        except psycopg.Error as exc:
            results.append(exc)

    worker = threading.Thread(target=transaction)
    worker.start()
    time.sleep(0.3)  # the transaction is running
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(psycopg.Error, match="shutting down"):
        idle.execute("SELECT 1")  # idle: ended at once
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**proxy.conninfo("acme"), connect_timeout=2)  # not accepting
    worker.join(10)
    assert results == [(42,), "committed"]  # the running transaction finished
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 10  # left as soon as it was drained
    running.close()
    idle.close()
    assert "draining" in proxy.log()


def test_sigterm_gives_up_after_shutdown_timeout(start_proxy: Callable[..., ProxyProcess]
                                                  ) -> None:
    proxy = start_proxy(extra="shutdown_timeout = 1.0")
    stuck = psycopg.connect(**proxy.conninfo("acme"))
    stuck.execute("SELECT 1")  # a transaction left open, idle
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert 0.9 < time.monotonic() - started < 5
    stuck.close()
    assert "shutdown_timeout reached with 1 transaction(s) still running" in proxy.log()


def test_sigint_stops_at_once(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(extra="shutdown_timeout = 30.0")
    stuck = psycopg.connect(**proxy.conninfo("acme"))
    stuck.execute("SELECT 1")
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGINT)
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 3
    stuck.close()


async def test_sigterm_ends_busy_clients_at_transaction_boundaries_and_exits_when_done(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """8 clients run transactions back to back and one an autocommit pg_sleep(2) when
    SIGTERM arrives: every transaction that began commits, the next one of each client
    gets 57P01 (or finds the connection closed) before it starts, nothing is cut
    mid-flight, and the proxy exits once the sleep is done, long before shutdown_timeout."""
    proxy = start_proxy(pool_size=8, extra="shutdown_timeout = 30.0")
    tag = f"drain-{proxy.port}"
    conns = [await psycopg.AsyncConnection.connect(**proxy.conninfo("acme"), autocommit=True)
             for _ in range(8)]
    sleeper = await connect(proxy, "acme")
    committed: list[str] = []
    ended_at_boundary: list[str] = []  # the exception ending each loop, between transactions
    cut: list[str] = []  # an error after BEGIN was acknowledged: must stay empty

    async def loop(i: int, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        n = 0
        while True:
            name = f"{tag}:{i}:{n}"
            try:
                await conn.execute("BEGIN")
            except psycopg.Error as exc:
                ended_at_boundary.append(f"{type(exc).__name__} {exc.sqlstate} {exc}")
                return
            try:
                await conn.execute("INSERT INTO campaigns(org_id, name) VALUES "
                                   "(current_setting('app.tenant_id')::uuid, %s)", (name,))
                await conn.execute("SELECT count(*) FROM campaigns WHERE name = %s", (name,))
                await conn.execute("SELECT pg_sleep(0.05)")
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                cut.append(f"{name}: {type(exc).__name__} {exc.sqlstate} {exc}")
                return
            committed.append(name)
            n += 1

    loops = [asyncio.ensure_future(loop(i, c)) for i, c in enumerate(conns)]
    sleep = asyncio.ensure_future(sleeper.fetchval("SELECT pg_sleep(2)::text || 'slept'"))
    # The same from psycopg (autocommit, its own protocol flow), in a thread.
    sync_sleeper = psycopg.connect(**proxy.conninfo("acme"), autocommit=True)
    sync_sleep = asyncio.get_running_loop().run_in_executor(
        None, lambda: sync_sleeper.execute("SELECT 'slept' FROM pg_sleep(2)").fetchone())
    await asyncio.sleep(0.5)  # every loop is busy, the autocommit sleep is in flight
    assert committed and not cut
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    try:
        assert await sleep == "slept"  # an autocommit statement in flight is not cut
        assert await sync_sleep == ("slept",)
        await asyncio.wait_for(asyncio.gather(*loops), 5)
        code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 5)
        elapsed = time.monotonic() - started
    finally:
        for task in loops:
            task.cancel()
        for conn in conns:
            await conn.close()
        sleeper.terminate()
        sync_sleeper.close()
    print(f"drained in {elapsed:.2f}s after SIGTERM; {len(committed)} transactions "
          f"committed; loops ended by: {sorted(set(e[:60] for e in ended_at_boundary))}")
    assert not cut, cut
    assert code == 0
    assert len(ended_at_boundary) == 8, ended_at_boundary
    # 57P01 with our message, or libpq finding the socket closed after it (a clean close).
    assert all("57P01" in e or "server closed the connection" in e
               for e in ended_at_boundary), ended_at_boundary
    assert 1.4 < elapsed < 3.5, elapsed  # the sleep's end, not shutdown_timeout (30 s)
    admin = await asyncpg.connect(proxy.env.admin_dsn)
    try:
        rows = await admin.fetch("SELECT name FROM campaigns WHERE name LIKE $1", f"{tag}:%")
        await admin.execute("DELETE FROM campaigns WHERE name LIKE $1", f"{tag}:%")
    finally:
        await admin.close()
    assert sorted(r["name"] for r in rows) == sorted(committed)
    assert "shutdown_timeout reached" not in proxy.log()
