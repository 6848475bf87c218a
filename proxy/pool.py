"""One pool per ``[databases.<name>]``, shared by every tenant (context is per transaction).

Herding server connections between containers happens here: a connection's state is the
container holding it, and only ``_set_state`` moves it (pgbouncer's ``objects.c``). The
decisions (who gets which server, when to open one) are synchronous and run on the event
loop thread, so a handoff cannot be interrupted half-way; the only awaits are the backend
connects and rollbacks, which run in tasks the pool owns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from .config import Config, DatabaseConfig
from .errors import PoolClosed, PoolTimeout, ProxyError, ServerUnavailable
from .metrics import CONNECT_BUCKETS, Histogram
from .protocol.tracker import CTX_NONE
from .server import ServerConnection, ServerState, send_cancel
from .tls import BackendTls

__all__ = ["Pool", "Waiter"]

log = logging.getLogger("pgtenant.pool")
_NOBODY: object = object()  # _holder's "not handed to any tenant"
_BACKOFF_FIRST = 0.25  # seconds before retrying a failed backend connect, doubling...
_BACKOFF_MAX = 5.0  # ...up to this


class Waiter(Protocol):
    """A client waiting for a server. ``server_assigned`` must accept synchronously.

    ``tenant_key`` names the tenant for fairness; ``max_servers`` caps the servers that
    tenant may hold at once (0: no cap).
    """

    tenant_key: object
    max_servers: int

    def server_assigned(self, server: ServerConnection) -> None: ...
    def pool_failed(self, error: ProxyError) -> None: ...


class Pool:
    """Server connections for one database entry and the clients waiting for them."""

    def __init__(self, db: DatabaseConfig, config: Config,
                 clock: Callable[[], float] = time.monotonic, *,
                 server_tls: BackendTls | None = None):
        self.db = db
        self.server_tls = server_tls  # built once by the App, shared by every server
        self.config = config
        self.clock = clock
        # Critical invariant: every live ServerConnection is in exactly one container.
        self.containers: dict[ServerState, dict[ServerConnection, None]] = {
            state: {} for state in ServerState if state is not ServerState.CLOSED
        }
        # Every waiter with its deadline; the same waiters queue per tenant (FIFO within a
        # tenant). Fairness across tenants: a free server goes to the tenant holding the
        # fewest servers (ties: the longest wait), skipping tenants at their cap, so one
        # tenant's flood of transactions cannot starve another's (issue #5).
        self.waiting: dict[Waiter, float] = {}
        self._queues: dict[object, deque[Waiter]] = {}
        self._since: dict[Waiter, float] = {}
        self.held: dict[object, int] = {}  # servers held, by tenant key
        self._holder: dict[ServerConnection, object] = {}
        # Backends that fail: connects are retried with a growing delay; waiters get the
        # last connect error once they have waited server_connect_timeout. The delay grows
        # once per retry *round*, not per failed connect: the N connects opened together
        # for N waiters fail together, and counting each would make the delay grow N times
        # for one outage (8 waiters: a 5 s wait after a 0.6 s outage). A connect belongs to
        # the round current when it was opened; the first failure of a round ends it.
        self._retry_at = 0.0
        self._backoff = _BACKOFF_FIRST
        self._round = 0
        self._round_of: dict[ServerConnection, int] = {}
        self._retry_timer: asyncio.TimerHandle | None = None
        self.last_connect_error: ProxyError | None = None
        self.server_params: dict[str, str] = {}
        self.out_of_sync = 0  # servers closed because a client left them mid-protocol
        self.connect_seconds = Histogram(CONNECT_BUCKETS)
        # PAUSE (admin console): no server is handed out or opened; idle ones are closed;
        # pause() returns once none is busy. Waiting transactions keep waiting (PgBouncer).
        self.paused = False
        self._drained: asyncio.Future[None] | None = None
        # Tenant holds (the migration runner: control/migrations/holds.py): a held tenant's
        # new transactions queue as if the pool were full, others are served as usual;
        # clients already holding a server (open transaction, pinned) are not touched.
        self.holds: set[object] = set()
        self.connect_errors = 0
        self.closed = False
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
        self._login_params: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        c = {s.value: len(d) for s, d in self.containers.items()}
        return (
            f"<Pool {self.db.name} [waiting: {len(self.waiting)} | servers: {c['active']} "
            f"active, {c['idle']} idle, {c['login']} login, {c['reset']} reset]>"
        )

    # ------------------------------------------------------------------ containers

    def _set_state(self, server: ServerConnection, new: ServerState) -> None:
        """The only place that moves a server between containers."""
        old = server.state
        if old is not ServerState.CLOSED:
            self.containers[old].pop(server, None)
        server.state = new
        if new is not ServerState.CLOSED:
            self.containers[new][server] = None

    @property
    def total(self) -> int:
        return sum(len(d) for d in self.containers.values())

    # ------------------------------------------------------------------ acquire / release

    @property
    def waiting_count(self) -> int:
        return len(self.waiting)

    def acquire(self, waiter: Waiter) -> ServerConnection | None:
        """Take an idle server for ``waiter`` now, or queue it (fair across tenants).

        Returns: the server (now ACTIVE), or None when the waiter was queued.
        Raises: PoolClosed when the pool is shutting down.
        """
        if self.closed:
            raise PoolClosed(f"database {self.db.name!r} is shutting down")
        idle = self.containers[ServerState.IDLE]
        # Idle servers and eligible waiters never coexist (_dispatch hands them out at
        # once), so an idle server here is nobody else's turn.
        if (idle and not self.paused and waiter.tenant_key not in self.holds
                and self._under_cap(waiter.tenant_key, waiter.max_servers)):
            server = next(reversed(idle))  # LIFO: the warmest connection
            self._assign(server, waiter.tenant_key)
            return server
        now = self.clock()
        self.waiting[waiter] = now + self.config.query_wait_timeout
        self._since[waiter] = now
        self._queues.setdefault(waiter.tenant_key, deque()).append(waiter)
        self._dispatch()
        return None

    def hold(self, key: object) -> None:
        """Hold a tenant's new transactions (they wait, up to query_wait_timeout)."""
        self.holds.add(key)

    def unhold(self, key: object) -> None:
        """Release a tenant: its waiting transactions are served now, in their order."""
        if key in self.holds:
            self.holds.discard(key)
            if key in self._queues:
                self._dispatch()

    def running(self, key: object) -> int:
        """Returns: the tenant's transactions in flight here (servers whose client is inside
        a transaction or owes replies; a pinned session between transactions is not)."""
        return sum(1 for server, holder in self._holder.items()
                   if holder == key and server.peer is not None
                   and getattr(server.peer, "has_running_transaction", True))

    def cancel_wait(self, waiter: Waiter) -> None:
        """The waiter went away before being served."""
        if self.waiting.pop(waiter, None) is not None:
            self._unqueue(waiter)

    def _unqueue(self, waiter: Waiter) -> None:
        """Forget a waiter that left ``self.waiting``."""
        self._since.pop(waiter, None)
        queue = self._queues.get(waiter.tenant_key)
        if queue is not None:
            try:
                queue.remove(waiter)
            except ValueError:
                pass
            if not queue:
                del self._queues[waiter.tenant_key]

    def _under_cap(self, key: object, cap: int) -> bool:
        return cap <= 0 or self.held.get(key, 0) < cap

    def _assign(self, server: ServerConnection, key: object) -> None:
        self._set_state(server, ServerState.ACTIVE)
        server.last_used = self.clock()  # SHOW SERVERS' request_time
        self._holder[server] = key
        self.held[key] = self.held.get(key, 0) + 1

    def _unassign(self, server: ServerConnection) -> None:
        """The server is no longer held by the tenant it was handed to."""
        key = self._holder.pop(server, _NOBODY)
        if key is not _NOBODY:
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]

    def release(self, server: ServerConnection) -> None:
        """An attached client is done with a provably idle server."""
        server.peer = None
        self._unassign(server)
        if server.closed or self.closed:
            self.discard(server)
            return
        now = self.clock()
        lifetime = self.config.server_lifetime
        if lifetime > 0 and now - server.created_at >= lifetime:
            log.info("database=%s closing server connection #%d: older than "
                     "server_lifetime (%gs)", self.db.name, server.id, lifetime)
            self.discard(server)
            return
        if self.total > self.max_servers:
            # pool_size was lowered (RELOAD/SIGHUP): shrink as servers come free, so the
            # new size holds within one transaction per server, busy or not.
            log.info("database=%s closing server connection #%d: above pool_size (%d) + "
                     "reserve_pool (%d)", self.db.name, server.id, self.db.pool_size,
                     self.db.reserve_pool)
            self.discard(server)
            return
        server.last_used = now
        self._set_state(server, ServerState.IDLE)
        if self.waiting or self.paused:  # else _dispatch has nothing to do
            self._dispatch()

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
        self._unassign(server)
        self._set_state(server, ServerState.CLOSED)
        server.close()
        self._dispatch()

    def release_dirty(self, server: ServerConnection) -> None:
        """A client left with a transaction open and nothing in flight: roll back, then reuse.

        Any failure closes the server; it never returns to the pool unclean (STYLE rule 5).
        """
        server.peer = None
        self._unassign(server)
        self._set_state(server, ServerState.RESET)
        self._spawn(self._rollback(server))

    async def _rollback(self, server: ServerConnection) -> None:
        clean = await server.rollback(timeout=self.config.server_connect_timeout)
        if server.state is not ServerState.RESET:
            return  # lost meanwhile
        if clean and not server.closed:
            self.release(server)
        else:
            self.discard(server, out_of_sync=True)

    def server_lost(self, server: ServerConnection) -> None:
        """Callback from ServerConnection.connection_lost."""
        self._unassign(server)
        if server.state is not ServerState.CLOSED:
            self._set_state(server, ServerState.CLOSED)
        if not self.closed:
            self._dispatch()

    # ------------------------------------------------------------------ decisions

    async def pause(self) -> None:
        """Stop handing out servers; return once every server is idle (then closed)."""
        self.paused = True
        self._dispatch()
        if not self._busy:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def resume(self) -> None:
        self.paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # a PAUSE still waiting ends: resumed meanwhile
        self._drained = None
        self._dispatch()

    def dispatch(self) -> None:
        """Apply a change from outside (a reload): close idle servers above a lowered
        pool_size, serve waiters a raised one has room for."""
        self._trim_idle()
        self._dispatch()

    @property
    def max_servers(self) -> int:
        """Servers this pool may hold at most: pool_size, plus the reserve (which is opened
        only for transactions that waited reserve_pool_timeout, and kept like the rest;
        PgBouncer's janitor also closes only beyond pool_size + reserve_pool_size)."""
        return self.db.pool_size + self.db.reserve_pool

    def _trim_idle(self) -> None:
        """Close idle servers beyond ``max_servers``, least recently used first (busy ones
        are closed as they are released: ``release``)."""
        idle = self.containers[ServerState.IDLE]
        excess = self.total - self.max_servers
        for server in list(idle)[:max(0, excess)]:
            log.info("database=%s closing server connection #%d: above pool_size (%d) + "
                     "reserve_pool (%d)", self.db.name, server.id, self.db.pool_size,
                     self.db.reserve_pool)
            self._set_state(server, ServerState.CLOSED)
            server.close()

    @property
    def _busy(self) -> bool:
        return any(self.containers[s] for s in (ServerState.ACTIVE, ServerState.RESET,
                                                 ServerState.LOGIN))

    def _next_waiter(self) -> Waiter | None:
        """Returns: whose turn it is: the head of the queue of the eligible tenant holding
        the fewest servers, the longest-waiting head on ties (O(tenants waiting))."""
        best: Waiter | None = None
        best_rank = (0, 0.0)
        for key, queue in self._queues.items():
            if key in self.holds:
                continue
            head = queue[0]
            held = self.held.get(key, 0)
            if head.max_servers > 0 and held >= head.max_servers:
                continue
            rank = (held, self._since.get(head, 0.0))
            if best is None or rank < best_rank:
                best, best_rank = head, rank
        return best

    def _demand(self) -> tuple[int, float | None]:
        """Returns: (servers the eligible waiters could use now, when the longest-waiting
        eligible one started waiting)."""
        demand, oldest = 0, None
        for key, queue in self._queues.items():
            if key in self.holds:
                continue  # no server is opened for a held tenant
            cap = queue[0].max_servers
            room = len(queue) if cap <= 0 else min(len(queue), cap - self.held.get(key, 0))
            if room > 0:
                demand += room
                since = self._since.get(queue[0], 0.0)
                oldest = since if oldest is None else min(oldest, since)
        return demand, oldest

    def _dispatch(self) -> None:
        """Hand idle servers to waiters (fairly) and open servers when allowed."""
        idle = self.containers[ServerState.IDLE]
        if self.paused:
            for server in list(idle):  # PgBouncer's PAUSE disconnects idle servers
                self._set_state(server, ServerState.CLOSED)
                server.close()
            if not self._busy and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            return
        while idle and self.waiting:
            waiter = self._next_waiter()
            if waiter is None:
                break  # everyone waiting is at their tenant's cap
            del self.waiting[waiter]
            self._unqueue(waiter)
            server = next(reversed(idle))
            self._assign(server, waiter.tenant_key)
            waiter.server_assigned(server)
        if self.closed or not self.waiting:
            return
        now = self.clock()
        if now < self._retry_at:
            return  # the backend failed lately: retry after the backoff (tick calls again)
        demand, oldest = self._demand()
        logging_in = len(self.containers[ServerState.LOGIN])
        want = demand - logging_in
        if self.last_connect_error is not None:
            # The backend failed lately: one connect probes it, the others follow as soon as
            # it logs in (_connect_succeeded), rather than 50 failing at each retry.
            want = min(want, 1 - logging_in)
        limit = self.db.pool_size
        if oldest is not None and now - oldest >= self.config.reserve_pool_timeout:
            limit += self.db.reserve_pool
        for _ in range(max(0, min(want, limit - self.total))):
            self._open()

    def _open(self) -> ServerConnection:
        server = ServerConnection(self.db.dsn, self.server_lost, self.server_tls)
        self._set_state(server, ServerState.LOGIN)
        self._round_of[server] = self._round
        self._spawn(self._connect(server))
        return server

    async def _connect(self, server: ServerConnection) -> None:
        started = self.clock()
        try:
            await server.connect(self.config.server_connect_timeout, self._login_params)
            self.connect_seconds.observe(self.clock() - started)
        except asyncio.CancelledError:
            self._round_of.pop(server, None)  # the pool is closing
            raise
        except ProxyError as exc:
            delay = self._connect_failed(server, exc)
            if delay is not None and not self.closed:
                # Retry when the delay is over, not at the janitor's next sweep after it
                # (up to 0.25 s later): service resumes as soon as the backend is back.
                if self._retry_timer is not None:
                    self._retry_timer.cancel()
                self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry)
            return
        self._connect_succeeded(server)

    def _connect_failed(self, server: ServerConnection, exc: ProxyError) -> float | None:
        """A backend connect failed.

        Returns: the delay before the next retry round when this failure ended a round;
        None when another connect of the same round failed first (counted once).
        """
        self.connect_errors += 1
        self.last_connect_error = exc
        round_ = self._round_of.pop(server, self._round)
        self._set_state(server, ServerState.CLOSED)
        self._fail_waiters(exc)
        if round_ != self._round:
            log.debug("database=%s server connect failed (same retry round): %s",
                      self.db.name, exc.message)
            return None
        delay = self._backoff
        self._round += 1
        self._retry_at = self.clock() + delay
        self._backoff = min(delay * 2, _BACKOFF_MAX)
        log.error("database=%s server connect failed (retrying in %.2gs): %s",
                  self.db.name, delay, exc.message)
        return delay

    def _retry(self) -> None:
        """The backoff delay is over: open connects for whoever waits (a new round)."""
        self._retry_timer = None
        self._retry_at = 0.0
        if not self.closed and not self.paused:
            self._dispatch()

    def _connect_succeeded(self, server: ServerConnection) -> None:
        """A backend connect succeeded: the backend is back, the backoff starts over."""
        self._round_of.pop(server, None)
        if self.last_connect_error is not None:
            log.info("database=%s backend reachable again", self.db.name)
        self.last_connect_error = None
        self._backoff = _BACKOFF_FIRST
        self._retry_at = 0.0
        assert server.login is not None
        if not self.server_params:
            self.server_params = dict(server.login.parameters)
        if self._params_ready is not None and not self._params_ready.done():
            self._params_ready.set_result(None)
        server.ctx_state = CTX_NONE
        if server.state is ServerState.LOGIN:  # not lost meanwhile
            self.release(server)

    def _fail_waiters(self, exc: ProxyError) -> None:
        """A connect failed. A login waiting for the server's parameters fails now; waiting
        transactions keep waiting for the retries, up to server_connect_timeout (tick)."""
        if self._params_ready is not None and not self._params_ready.done():
            self._params_ready.set_exception(exc)
            self._params_ready.exception()  # mark retrieved; callers re-raise their own copy
            self._params_ready = None

    def tick(self, now: float) -> None:
        """Janitor sweep: waiters past ``query_wait_timeout`` (or, while the backend is
        failing, past ``server_connect_timeout``); retries, reserve, idle/old servers."""
        error = self.last_connect_error
        if error is not None and not any(self.containers[s] for s in (
                ServerState.IDLE, ServerState.ACTIVE, ServerState.RESET)):
            cutoff = now - self.config.server_connect_timeout
            for waiter in [w for w, since in self._since.items() if since <= cutoff]:
                del self.waiting[waiter]
                self._unqueue(waiter)
                waiter.pool_failed(ServerUnavailable(
                    f"{error.message} (no server connection for "
                    f"{self.config.server_connect_timeout:g}s: server_connect_timeout; "
                    "pgtenant keeps retrying)",
                    hint="check that the database server is up and reachable"))
        expired = [w for w, deadline in self.waiting.items() if deadline <= now]
        for waiter in expired:
            del self.waiting[waiter]
            self._unqueue(waiter)
            if waiter.tenant_key in self.holds:
                waiter.pool_failed(PoolTimeout(
                    "this tenant is being migrated: its transactions are held until its "
                    f"migration ends, and this one waited {self.config.query_wait_timeout:g}s "
                    "(query_wait_timeout)",
                    hint="retry shortly; the migration's lock_timeout bounds a hold"))
                continue
            waiter.pool_failed(
                PoolTimeout(
                    f"pool for database {self.db.name!r} is exhausted: no server connection "
                    f"came free within {self.config.query_wait_timeout:g}s "
                    f"(pool_size={self.db.pool_size}, query_wait_timeout)",
                    hint="raise pool_size or query_wait_timeout, or shorten transactions",
                )
            )
        if self.closed or self.paused:
            return
        self._trim_idle()
        self._close_stale_idle(now)
        if self.waiting:
            self._dispatch()  # retries after a backoff; the reserve pool after its timeout
        elif (self.verified and self.total < self.db.min_pool_size
              and now >= self._retry_at):
            for _ in range(self.db.min_pool_size - self.total):
                self._open()

    def _close_stale_idle(self, now: float) -> None:
        """server_idle_timeout and server_lifetime, keeping min_pool_size connections."""
        idle_limit, lifetime = self.config.server_idle_timeout, self.config.server_lifetime
        if idle_limit <= 0 and lifetime <= 0:
            return
        for server in list(self.containers[ServerState.IDLE]):  # oldest-used first
            if self.total <= self.db.min_pool_size:
                break
            if idle_limit > 0 and now - server.last_used >= idle_limit:
                why = f"idle for server_idle_timeout ({idle_limit:g}s)"
            elif lifetime > 0 and now - server.created_at >= lifetime:
                why = f"older than server_lifetime ({lifetime:g}s)"
            else:
                continue
            log.info("database=%s closing server connection #%d: %s", self.db.name,
                     server.id, why)
            self._set_state(server, ServerState.CLOSED)
            server.close()

    async def startup_parameters(self) -> dict[str, str]:
        """Returns: the backend's ParameterStatus set, connecting once if none is known.

        Raises: ServerUnavailable / ServerLoginFailed when no server can be opened.
        """
        await self.ensure_verified()
        if self.server_params:
            return self.server_params
        if self._params_ready is None:
            self._params_ready = asyncio.get_running_loop().create_future()
            if self.total < self.db.pool_size:
                self._open()
            elif not self.containers[ServerState.LOGIN]:
                raise ServerUnavailable(f"database {self.db.name!r}: no server parameters yet")
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
        self.closed = True
        for waiter in list(self.waiting):
            del self.waiting[waiter]
            self._unqueue(waiter)
            waiter.pool_failed(PoolClosed(f"database {self.db.name!r} is shutting down"))
        for state, container in self.containers.items():
            if state is ServerState.ACTIVE:
                continue  # their clients close them
            for server in list(container):
                self._set_state(server, ServerState.CLOSED)
                server.close()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
