"""One pool per ``[databases.<name>]``, shared by every tenant (context is per transaction).

The async side of the pool: it applies the ``Decisions`` that ``pool_state.PoolState``
returns (connects, closes, handoffs, retry timers) and owns the tasks doing that I/O. Who
gets which server, and when one is opened or closed, is decided there, synchronously.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from .config import Config, DatabaseConfig
from .errors import ProxyError, ServerUnavailable
from .notify import Notifier
from .pool_state import Decisions, Limits, PoolState, Requester, ServerState
from .protocol.inject import SERVER_SESSION
from .protocol.tracker import CTX_NONE
from .server import ServerConnection, send_cancel
from .stats import CONNECT_BUCKETS, Histogram
from .tls import BackendTls

__all__ = ["Pool", "Waiter"]

log = logging.getLogger("pgtenant.pool")


def limits_of(db: DatabaseConfig, config: Config) -> Limits:
    """Returns: the settings ``PoolState`` decides by, from the database entry and config."""
    return Limits(pool_size=db.pool_size, reserve_pool=db.reserve_pool,
                  min_pool_size=db.min_pool_size,
                  query_wait_timeout=config.query_wait_timeout,
                  reserve_pool_timeout=config.reserve_pool_timeout,
                  server_connect_timeout=config.server_connect_timeout,
                  server_idle_timeout=config.server_idle_timeout,
                  server_lifetime=config.server_lifetime)


class Waiter(Requester, Protocol):
    """A client waiting for a server. ``server_assigned`` must accept synchronously.

    ``tenant_key`` names the tenant for fairness; ``max_servers`` caps the servers that
    tenant may hold at once (0: no cap).
    """

    def server_assigned(self, server: ServerConnection) -> None: ...
    def pool_failed(self, error: ProxyError) -> None: ...


_Decisions = Decisions[ServerConnection, Waiter]


class Pool:
    """Server connections for one database entry and the clients waiting for them."""

    def __init__(self, db: DatabaseConfig, config: Config,
                 clock: Callable[[], float] = time.monotonic, *,
                 server_tls: BackendTls | None = None):
        self._db = db
        self._config = config
        self.server_tls = server_tls  # built once by the App, shared by every server
        self.clock = clock
        self.state: PoolState[ServerConnection, Waiter] = PoolState(
            db.name, limits_of(db, config), self._new_server)
        self._retry_timer: asyncio.TimerHandle | None = None
        self.server_params: dict[str, str] = {}
        self.out_of_sync = 0  # servers closed because a client left them mid-protocol
        self.connect_seconds = Histogram(CONNECT_BUCKETS)
        self._drained: asyncio.Future[None] | None = None  # a PAUSE waiting for busy servers
        self._tasks: set[asyncio.Task[None]] = set()
        self._params_ready: asyncio.Future[None] | None = None
        # Set by the app: checks the database's lockdown and fetches its signing key once,
        # before the first client is served (fail closed: no verification, no service).
        self.verifier: Callable[[Pool], Awaitable[None]] | None = None
        self.verified = False
        self.signing_key: bytes | None = None
        self._verify_lock = asyncio.Lock()
        # Our backends log in with no application_name of their own (they are the login
        # role's in pg_stat_activity), so a client that named itself nothing sees '' as from
        # Postgres at no cost per transaction; a dsn that names them makes clients that set
        # none re-apply '' with every transaction instead (client._startup_settings).
        self.names_backends = any(key == "application_name" for key, _ in db.dsn.params)
        # The database's listener for tenants' LISTEN (connects at the first one).
        self.notifier = Notifier(db.name, lambda: self._db.dsn, server_tls,
                                 lambda: self._config.server_connect_timeout)

    def __repr__(self) -> str:
        c = {s.value: len(d) for s, d in self.containers.items()}
        return (
            f"<Pool {self.db.name} [waiting: {len(self.waiting)} | servers: {c['active']} "
            f"active, {c['idle']} idle, {c['login']} login, {c['reset']} reset]>"
        )

    # ------------------------------------------------------------------ settings and views

    @property
    def db(self) -> DatabaseConfig:
        return self._db

    @db.setter
    def db(self, db: DatabaseConfig) -> None:  # RELOAD; dispatch() applies a new size
        self._db = db
        self.state.limits = limits_of(db, self._config)

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self.state.limits = limits_of(self._db, config)

    @property
    def containers(self) -> dict[ServerState, dict[ServerConnection, None]]:
        """One container per server state; ``SHOW POOLS`` numbers are their lengths."""
        return self.state.containers

    @property
    def waiting(self) -> dict[Waiter, float]:
        """Every waiting client, with its deadline."""
        return self.state.waiting

    @property
    def waiting_count(self) -> int:
        return len(self.state.waiting)

    @property
    def held(self) -> dict[object, int]:
        """Servers held, by tenant key."""
        return self.state.held

    @property
    def paused(self) -> bool:
        return self.state.paused

    @property
    def closed(self) -> bool:
        return self.state.closed

    @closed.setter
    def closed(self, closed: bool) -> None:
        self.state.closed = closed

    @property
    def total(self) -> int:
        return self.state.total

    # ------------------------------------------------------------------ applying decisions

    def _new_server(self) -> ServerConnection:
        return ServerConnection(self._db.dsn, self.server_lost, self.server_tls)

    def _apply(self, d: _Decisions) -> None:
        """Do what the state decided. Callbacks may re-enter the pool: the state is already
        consistent, and their own decisions are applied before they return."""
        for server, why in d.close:
            if why:
                log.info("database=%s closing server connection #%d: %s", self._db.name,
                         server.id, why)
            server.close()
        for waiter, error in d.fail:
            waiter.pool_failed(error)
        for waiter, server in d.assign:
            waiter.server_assigned(server)
        for server in d.open:
            self._spawn(self._connect(server))
        # d.retry_in: only a failed connect decides one; _connect sets the timer.
        if d.drained and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # ------------------------------------------------------------------ acquire / release

    def acquire(self, waiter: Waiter) -> ServerConnection | None:
        """Take an idle server for ``waiter`` now, or queue it (fair across tenants).

        Returns: the server (now ACTIVE), or None when the waiter was queued.
        Raises: PoolClosed when the pool is shutting down.
        """
        now = self.clock()
        # The server it parked, when the same checks let it have one: no Decisions to apply.
        server = self.state.take_parked(waiter, now)
        if server is not None:
            return server
        d = self.state.on_request(waiter, now)
        mine: ServerConnection | None = None
        for i, (who, server) in enumerate(d.assign):
            if who is waiter:
                mine = server
                del d.assign[i]
                break
        self._apply(d)
        return mine

    def hold(self, key: object) -> None:
        """Hold a tenant's new transactions (they wait, up to query_wait_timeout)."""
        self.state.on_hold(key)

    def unhold(self, key: object) -> None:
        """Release a tenant: its waiting transactions are served now, in their order."""
        self._apply(self.state.on_unhold(key, self.clock()))

    def running(self, key: object) -> int:
        """Returns: the tenant's transactions in flight here (servers whose client is inside
        a transaction or owes replies; a pinned session between transactions is not)."""
        return sum(1 for server in self.state.servers_held_by(key)
                   if server.peer is not None
                   and getattr(server.peer, "has_running_transaction", True))

    def cancel_wait(self, waiter: Waiter) -> None:
        """The waiter went away before being served."""
        self.state.on_cancel(waiter)

    def release(self, server: ServerConnection) -> None:
        """An attached client is done with a provably idle server."""
        server.peer = None
        self._apply(self.state.on_release(server, self.clock()))

    def park(self, server: ServerConnection, owner: Waiter) -> None:
        """Like ``release``, but ``owner`` gets this server back first at its next request
        while nobody else needs it (pool_state's "Parking")."""
        server.peer = None
        d = self.state.on_park(server, owner, self.clock())
        if d is not None:
            self._apply(d)

    def unpark(self, owner: Waiter) -> None:
        """``owner`` went away: a server it parked stays idle for anyone."""
        self.state.on_unpark(owner)

    def discard(self, server: ServerConnection, *, out_of_sync: bool = False) -> None:
        """Close a server and forget it."""
        if out_of_sync:
            self.out_of_sync += 1
            if server.login is not None and not server.closed:
                # Work may still run on the backend (a long query): cancel it rather than
                # leave it burning a backend until it next tries to write to us.
                login = server.login
                self._spawn(send_cancel(server.dsn, login.backend_pid, login.backend_secret))
        server.peer = None
        self._apply(self.state.on_discard(server, self.clock()))

    def release_dirty(self, server: ServerConnection, sql: str = "ROLLBACK") -> None:
        """A client left the server with something to clean first: run ``sql`` (ROLLBACK of
        a transaction left open with nothing in flight, DISCARD TEMP of temporary objects
        its transaction created), then reuse.

        Any failure closes the server; it never returns to the pool unclean (STYLE rule 5).
        """
        server.peer = None
        self.state.on_reset(server)
        self._spawn(self._reset(server, sql))

    async def _reset(self, server: ServerConnection, sql: str) -> None:
        clean = await server.reset(sql, timeout=self._config.server_connect_timeout)
        if server.state is not ServerState.RESET:
            return  # lost meanwhile
        if clean and not server.closed:
            self.release(server)
        else:
            self.discard(server, out_of_sync=True)

    def server_lost(self, server: ServerConnection) -> None:
        """Callback from ServerConnection.connection_lost."""
        self._apply(self.state.on_lost(server, self.clock()))

    # ------------------------------------------------------------------ admin and reload

    async def pause(self) -> None:
        """Stop handing out servers; return once every server is idle (then closed)."""
        self._apply(self.state.on_pause(self.clock()))
        if not self.state.busy:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def resume(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # a PAUSE still waiting ends: resumed meanwhile
        self._drained = None
        self._apply(self.state.on_resume(self.clock()))

    def dispatch(self) -> None:
        """Apply a change from outside (a reload): close idle servers above a lowered
        pool_size, serve waiters a raised one has room for."""
        self._apply(self.state.on_resize(limits_of(self._db, self._config), self.clock()))

    def tick(self, now: float) -> None:
        """Janitor sweep: waiters past ``query_wait_timeout`` (or, while the backend is
        failing, past ``server_connect_timeout``); retries, reserve, idle/old servers."""
        self._apply(self.state.on_tick(now, fill=self.verified))

    # ------------------------------------------------------------------ connects

    async def _connect(self, server: ServerConnection) -> None:
        started = self.clock()
        try:
            await server.connect(self._config.server_connect_timeout, SERVER_SESSION)
            self.connect_seconds.observe(self.clock() - started)
        except asyncio.CancelledError:
            self.state.on_connect_cancelled(server)  # the pool is closing
            raise
        except ProxyError as exc:
            delay = self._connect_failed(server, exc)
            if delay is not None and not self.closed:
                # Retry when the delay is over, not at the janitor's next sweep after it (up
                # to 0.25 s later): service resumes as soon as the backend is back.
                if self._retry_timer is not None:
                    self._retry_timer.cancel()
                self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry)
            return
        self._connect_succeeded(server)

    def _connect_failed(self, server: ServerConnection, exc: ProxyError) -> float | None:
        """A backend connect failed. A login waiting for the server's parameters fails now;
        waiting transactions keep waiting for the retries, up to server_connect_timeout.

        Returns: the delay before the next retry round when this failure ended a round;
        None when another connect of the same round failed first (counted once).
        """
        d = self.state.on_connect_failed(server, exc, self.clock())
        if self._params_ready is not None and not self._params_ready.done():
            self._params_ready.set_exception(exc)
            self._params_ready.exception()  # mark retrieved; callers re-raise their own copy
            self._params_ready = None
        if d.retry_in is None:
            log.debug("database=%s server connect failed (same retry round): %s",
                      self._db.name, exc.message)
        else:
            log.error("database=%s server connect failed (retrying in %.2gs): %s",
                      self._db.name, d.retry_in, exc.message)
        self._apply(d)
        return d.retry_in

    def _retry(self) -> None:
        """The backoff delay is over: open connects for whoever waits (a new round)."""
        self._retry_timer = None
        self._apply(self.state.on_retry(self.clock()))

    def _connect_succeeded(self, server: ServerConnection) -> None:
        """A backend connect succeeded: the backend is back, the backoff starts over."""
        if self.state.last_connect_error is not None:
            log.info("database=%s backend reachable again", self._db.name)
        assert server.login is not None
        if not self.server_params:
            self.server_params = dict(server.login.parameters)
        if self._params_ready is not None and not self._params_ready.done():
            self._params_ready.set_result(None)
        server.ctx_state = CTX_NONE
        self._apply(self.state.on_connected(server, self.clock()))

    async def startup_parameters(self) -> dict[str, str]:
        """Returns: the backend's ParameterStatus set, connecting once if none is known.

        Raises: ServerUnavailable / ServerLoginFailed when no server can be opened.
        """
        await self.ensure_verified()
        if self.server_params:
            return self.server_params
        if self._params_ready is None:
            self._params_ready = asyncio.get_running_loop().create_future()
            d = self.state.on_open(self.clock())
            if not d.open and not self.containers[ServerState.LOGIN]:
                raise ServerUnavailable(f"database {self.db.name!r}: no server parameters yet")
            self._apply(d)
        fut = self._params_ready
        try:
            await asyncio.shield(fut)
        except ProxyError as exc:
            raise type(exc)(exc.message) from None
        return self.server_params

    async def ensure_verified(self) -> None:
        """Run the app's verifier once (again after a failure).

        Raises: whatever the verifier raises (ContextError, ServerUnavailable).
        """
        if self.verified or self.verifier is None:
            return
        async with self._verify_lock:
            if not self.verified:
                await self.verifier(self)
                self.verified = True

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every server and fail every waiter."""
        await self.notifier.close()
        self._apply(self.state.on_close())
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
