"""Tenant holds: while a tenant's DDL runs, every pgtenant proxy holds its NEW transactions.

Why. A migration's ``ALTER TABLE`` needs an ACCESS EXCLUSIVE lock. While it waits for the
transactions already reading the table, every new transaction of that table queues behind
it in Postgres's lock queue, and after ``lock_timeout`` the DDL gives up while the queue
has already stalled the tenant. The proxies are in front of every connection, so they can
stop the queue from forming: a held tenant's new transactions wait in the proxy (like in a
full pool, up to ``query_wait_timeout``), its running transactions finish, the DDL gets its
lock at once, and the waiting transactions run the moment the tenant is released. Clients
see latency, not errors.

Protocol (one run, one connection of its own to the control database):

1. ``hold``: upsert ``pgtenant.tenant_holds(org_id, run_id, since, expires_at)`` and NOTIFY
   ``pgtenant_holds``. The row is the truth; the NOTIFY only tells proxies to re-read it
   (through ``pgtenant.active_holds()``), so a proxy that (re)connects late learns the hold
   too, and a forged NOTIFY (any role may send one) holds nobody.
2. Drain: the runner waits (up to ``drain_timeout``) until every proxy listening on the
   control database (their listener connections, by application_name) has answered on
   ``pgtenant_hold_acks`` that it has no transaction of that tenant in flight any more.
   Past the timeout it goes on anyway: the DDL's ``lock_timeout`` and retries still bound
   the damage (a proxy that never answers is an old version, or is stuck).
3. The tenant's migration transaction runs (``runner.py``); meanwhile one refresher task
   pushes ``expires_at`` forward for all of this run's holds.
4. ``release`` (after commit or failure): delete the row, NOTIFY. Proxies resume at once.

A runner killed -9 cannot hold a tenant forever: its rows stop being refreshed and expire
after ``ttl`` (proxies ignore expired rows, and expire their own copy by their clock too), and
the next runner, which holds the advisory lock and so is the only one, deletes every row
left (``clear_stale``). Shared-schema tenants have no DDL of their own and are never held;
``scope=shared`` files hold nobody (documented: they should only add things).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from uuid import UUID

import asyncpg

from ..schema import HOLD_ACK_CHANNEL, HOLD_CHANNEL, HOLDS_TABLE_DDL
from .ledger import APP_NAME_PREFIX

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "DEFAULT_HOLD_TTL", "LISTENER_APP_NAME", "Holds",
           "clear_stale_holds"]

log = logging.getLogger("pgtenant.migrate.holds")

# A hold lives this long unless refreshed (every ttl/3): long enough for a loaded database
# to answer a refresh, short enough that a killed runner's holds end within seconds.
DEFAULT_HOLD_TTL = 15.0
# How long the runner waits for the proxies to finish the tenant's running transactions.
DEFAULT_DRAIN_TIMEOUT = 5.0
# application_name of a proxy's listener connection (identity/registry.py).
LISTENER_APP_NAME = "pgtenant-revocations"

_UPSERT_SQL = """
INSERT INTO pgtenant.tenant_holds (org_id, run_id, expires_at)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (org_id) DO UPDATE SET run_id = EXCLUDED.run_id, since = now(),
    expires_at = EXCLUDED.expires_at
"""


async def clear_stale_holds(conn: asyncpg.Connection) -> int:
    """Delete every hold left by an interrupted run and tell the proxies.

    Call only while holding the runner's advisory lock: then no other run is alive, so
    every row is stale. Returns: how many holds were cleared.
    """
    await _install(conn)
    async with conn.transaction():
        cleared = await conn.fetch("DELETE FROM pgtenant.tenant_holds RETURNING org_id")
        if cleared:
            await conn.execute("SELECT pg_notify($1, 'cleared')", HOLD_CHANNEL)
    return len(cleared)


async def _install(conn: Any) -> None:
    # Older installs (init before holds existed): the table only; the proxies' read
    # function needs `pgtenant init` again (it grants it to the control role).
    if not await conn.fetchval("SELECT to_regclass('pgtenant.tenant_holds') IS NOT NULL"):
        for stmt in HOLDS_TABLE_DDL:
            await conn.execute(stmt)


class Holds:
    """This run's holds on one connection of its own; see the module docstring."""

    def __init__(self, admin_dsn: str, run_id: int, *, ttl: float = DEFAULT_HOLD_TTL,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 listener_user: str | None = None) -> None:
        self.admin_dsn = admin_dsn
        self.run_id = run_id
        self.ttl = ttl
        self.drain_timeout = drain_timeout
        # Only listeners logged in as this role count as proxies (a client could name its
        # session like a listener; it would only make the runner wait drain_timeout).
        self.listener_user = listener_user
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one query at a time on the shared connection
        self._held: set[UUID] = set()
        self._acks: dict[UUID, tuple[set[int], asyncio.Event]] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Holds:
        # Named for the run: the next runner ends it with the run's other backends.
        self._conn = await asyncpg.connect(
            self.admin_dsn, server_settings={"application_name":
                                             f"{APP_NAME_PREFIX}{self.run_id}"})
        await _install(self._conn)
        await self._conn.add_listener(HOLD_ACK_CHANNEL, self._on_ack)
        self._refresher = asyncio.ensure_future(self._refresh_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            for org in list(self._held):
                await self.release(org, conn=conn)
        if conn.is_closed():
            conn.terminate()
        else:
            await conn.close()

    def _on_ack(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # "<org> <run>": a proxy's listener (pid) has no transaction of org in flight.
        try:
            org_text, run_text = str(payload).split()
            org, run = UUID(org_text), int(run_text)
        except ValueError:
            return
        waiting = self._acks.get(org)
        if run != self.run_id or waiting is None:
            return
        pids, done = waiting
        pids.discard(pid)
        if not pids:
            done.set()

    async def hold(self, org: UUID) -> dict[str, Any]:
        """Hold ``org``'s new transactions on every proxy; wait until they drained.

        Returns: what happened: proxies asked, proxies that answered, seconds waited.
        Raises: asyncpg errors when the control database fails (the caller treats the
        tenant as failed: nothing ran).
        """
        assert self._conn is not None
        started = time.perf_counter()
        pids: set[int] = set()
        done = asyncio.Event()
        self._acks[org] = (pids, done)
        try:
            async with self._lock, self._conn.transaction():
                await self._conn.execute(_UPSERT_SQL, org, self.run_id, self.ttl)
                self._held.add(org)
                # The proxies to wait for, read in the same transaction as the NOTIFY
                # (sent at commit): a listener that connects later reads the row itself.
                rows = await self._conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                    "AND datname = current_database() AND ($2::text IS NULL OR usename = $2)",
                    LISTENER_APP_NAME, self.listener_user)
                pids.update(r["pid"] for r in rows)
                await self._conn.execute("SELECT pg_notify($1, $2)", HOLD_CHANNEL,
                                         f"hold {org} {self.run_id}")
            asked = len(pids)
            if pids:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), self.drain_timeout)
            return {"proxies": asked, "drained": asked - len(pids),
                    "seconds": round(time.perf_counter() - started, 4)}
        finally:
            self._acks.pop(org, None)

    async def release(self, org: UUID, *, conn: asyncpg.Connection | None = None) -> None:
        """Release ``org`` (its migration committed or failed): proxies resume at once.

        Returns: None; a failure is logged, the hold then expires after ``ttl``.
        """
        conn = conn or self._conn
        if conn is None or org not in self._held:
            return
        try:
            async with self._lock, conn.transaction():
                await conn.execute("DELETE FROM pgtenant.tenant_holds WHERE org_id = $1 "
                                   "AND run_id = $2", org, self.run_id)
                await conn.execute("SELECT pg_notify($1, $2)", HOLD_CHANNEL,
                                   f"release {org} {self.run_id}")
            self._held.discard(org)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("could not release the hold of %s (it expires in %gs): %s",
                        org, self.ttl, exc)

    async def _refresh_forever(self) -> None:
        # One UPDATE for all of this run's holds; the NOTIFY lets proxies extend their own
        # expiry too (they re-read the rows).
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self._held or self._conn is None:
                continue
            try:
                async with self._lock, self._conn.transaction():
                    await self._conn.execute(
                        "UPDATE pgtenant.tenant_holds SET expires_at = clock_timestamp() "
                        "+ make_interval(secs => $2) WHERE run_id = $1", self.run_id, self.ttl)
                    await self._conn.execute("SELECT pg_notify($1, $2)", HOLD_CHANNEL,
                                             f"refresh {self.run_id}")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("could not refresh the holds of run %d: %s", self.run_id, exc)
