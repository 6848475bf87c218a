"""The pool's decisions, as synchronous code: who gets which server, what to open and close.

Owns the per-state containers of one database's servers and its waiting clients. It does no
I/O and never awaits: time comes in as an argument and every event returns a ``Decisions``
value that ``pool.Pool`` applies (connects, closes, callbacks). It imports nothing from
``server``, ``client`` or ``app``.

Theory of operation
-------------------
A server's state is the container holding it (pgbouncer's ``objects.c``: "state change means
moving between lists"), and only ``_set_state`` moves it::

    LOGIN --connected--> IDLE --assigned--> ACTIVE --released--> IDLE
      |                   |                   |  \\--left dirty--> RESET --clean--> IDLE
      +--failed/lost------+--trimmed/stale----+----discarded/lost--------------> CLOSED

CLOSED is no container: a closed server is forgotten. ``SHOW POOLS`` numbers are the
containers' lengths, so they cannot drift.

Parking (issue 16): a client that gives back a clean server while nobody waits "parks" it
(``on_park``): the server goes to IDLE exactly as a release would put it there, and the pool
remembers whose it was. That client's next request takes it back first (``take_parked``,
O(1), after the very checks ``on_request`` makes); anyone else takes an unparked idle server
first and reclaims a parked one (least recently used) only when no other is idle. A parked
server is an idle server in every other respect (SHOW POOLS, idle timeout, lifetime, PAUSE,
trimming, handing to waiters), and it stops being parked whenever it leaves IDLE
(``_set_state``), so no other path needs to know about parking.

Waiters queue per tenant (FIFO within a tenant). A free server goes to the head of the
eligible tenant holding the fewest servers, the longest wait on ties (issue #5); a tenant is
eligible when it is not held (migration) and under its ``max_servers`` cap. Invariant: an idle
server and an eligible waiter never coexist after an event returns (unless paused).

Opening follows demand: the eligible waiters' room, less the connects in flight, up to
``pool_size`` (plus ``reserve_pool`` once the oldest eligible waiter waited
``reserve_pool_timeout``). While the backend fails, one connect probes it at a time, and the
retry delay doubles once per retry *round* (the connects opened together fail together:
counting each would grow the delay N times for one outage; 8 waiters: a 5 s wait after a
0.6 s outage).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Protocol, TypeVar

from .errors import PoolClosed, PoolTimeout, ProxyError, ServerUnavailable

__all__ = ["Conn", "Decisions", "Limits", "PoolState", "Requester", "ServerState"]

BACKOFF_FIRST = 0.25  # seconds before retrying a failed backend connect, doubling...
BACKOFF_MAX = 5.0  # ...up to this
_NOBODY: object = object()  # _holder's "not handed to any tenant"


class ServerState(Enum):
    """Which pool container holds the connection (pgbouncer's SV_* states)."""

    LOGIN = "login"
    IDLE = "idle"
    ACTIVE = "active"
    RESET = "reset"  # rolling back after a client left mid-transaction
    CLOSED = "closed"

    # Members are singletons: identity hashing spares Enum's Python-level __hash__ on every
    # container move (twice per transaction).
    __hash__ = object.__hash__


class Conn(Protocol):
    """What the pool's decisions read of a server connection (``server.ServerConnection``)."""

    state: ServerState  # assigned by PoolState._set_state only
    created_at: float
    last_used: float

    @property
    def closed(self) -> bool: ...


class Requester(Protocol):
    """A client asking for a server: its tenant (fairness) and that tenant's cap (0: none)."""

    @property
    def tenant_key(self) -> object: ...
    @property
    def max_servers(self) -> int: ...


S = TypeVar("S", bound=Conn)
W = TypeVar("W", bound=Requester)


# No slots=True: mypyc compiles this module, and a dataclass with slots (a class made anew)
# cannot be a native class. One per pool.
@dataclass(frozen=True, kw_only=True)
class Limits:
    """The settings the decisions follow (``[databases.x]`` and the global timeouts)."""

    pool_size: int
    reserve_pool: int = 0
    min_pool_size: int = 0
    query_wait_timeout: float = 120.0
    reserve_pool_timeout: float = 5.0
    server_connect_timeout: float = 15.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0


class Decisions(Generic[S, W]):
    """What the async pool must do after an event, in this order.

    ``close``: servers already CLOSED here whose socket must be closed, with the reason to
    log ('' for none). ``fail``: waiters already dequeued, to be told why. ``assign``:
    servers already ACTIVE for these waiters (a handoff is synchronous and always accepted).
    ``open``: new servers in LOGIN, to be connected. ``retry_in``: call ``on_retry`` after
    this delay (set by ``on_connect_failed`` when the failure ended a retry round).
    ``drained``: paused, and no server is busy any more.
    """

    # Not a dataclass: mypyc (setup.py) compiles this module and cannot make a generic
    # dataclass a native class (it fails at import). Built empty, filled by PoolState.
    def __init__(self) -> None:
        self.close: list[tuple[S, str]] = []
        self.fail: list[tuple[W, ProxyError]] = []
        self.assign: list[tuple[W, S]] = []
        self.open: list[S] = []
        self.retry_in: float | None = None
        self.drained = False


class PoolState(Generic[S, W]):
    """Servers of one database entry and the clients waiting for them: decisions only."""

    def __init__(self, name: str, limits: Limits, new_server: Callable[[], S]) -> None:
        self.name = name
        self.limits = limits
        self.new_server = new_server  # builds an unconnected server (no I/O)
        # Critical invariant: every live server is in exactly one container.
        self.containers: dict[ServerState, dict[S, None]] = {
            state: {} for state in ServerState if state is not ServerState.CLOSED
        }
        # Their summed lengths, kept by _set_state: summing them was 2 % of the proxy's CPU
        # under pgbench -S (read once per release; issue 16).
        self._total = 0
        self.waiting: dict[W, float] = {}  # every waiter with its deadline
        self._queues: dict[object, deque[W]] = {}  # the same waiters, per tenant
        self._since: dict[W, float] = {}
        self.held: dict[object, int] = {}  # servers held, by tenant key
        self._holder: dict[S, object] = {}
        # Connect retries (see the module docstring). A connect belongs to the round current
        # when it was opened; the first failure of a round ends it.
        self.retry_at = 0.0
        self.backoff = BACKOFF_FIRST
        self._round = 0
        self._round_of: dict[S, int] = {}
        self.last_connect_error: ProxyError | None = None
        # PAUSE: no server is handed out or opened; idle ones are closed. Waiting
        # transactions keep waiting (PgBouncer).
        self.paused = False
        # Tenant holds (migrations): a held tenant's new transactions queue as if the pool
        # were full; others are served as usual.
        self.holds: set[object] = set()
        self.closed = False
        # Parked servers (see the module docstring): every one is in IDLE; both directions.
        self._parked: dict[S, W] = {}
        self._parked_by: dict[W, S] = {}

    def __repr__(self) -> str:
        c = {s.value: len(d) for s, d in self.containers.items()}
        flags = "".join(f" {f}" for f, on in (("paused", self.paused),
                                              ("closed", self.closed),
                                              ("failing", self.last_connect_error is not None))
                        if on)
        return (f"<PoolState {self.name}{flags} [waiting: {len(self.waiting)} | servers: "
                f"{c['active']} active, {c['idle']} idle, {c['login']} login, "
                f"{c['reset']} reset]>")

    # ------------------------------------------------------------------ containers

    def _set_state(self, server: S, new: ServerState) -> None:
        """The only place that moves a server between containers."""
        old = server.state
        if old is ServerState.IDLE and self._parked:
            owner = self._parked.pop(server, None)  # parked only while idle
            if owner is not None:
                del self._parked_by[owner]
        # A new server starts in LOGIN before it is in any container (pool.Pool's
        # new_server): the count follows what pop finds, not the state it had.
        if old is not ServerState.CLOSED and self.containers[old].pop(server, 0) is None:
            self._total -= 1
        server.state = new
        if new is not ServerState.CLOSED:
            self.containers[new][server] = None  # new to it: it was in old's at most
            self._total += 1

    def _close(self, server: S, d: Decisions[S, W], why: str = "") -> None:
        self._set_state(server, ServerState.CLOSED)
        d.close.append((server, why))

    @property
    def total(self) -> int:
        """Returns: the live servers, in every container (their lengths' sum)."""
        return self._total

    @property
    def max_servers(self) -> int:
        """Servers this pool may hold at most: pool_size, plus the reserve (opened only for
        transactions that waited reserve_pool_timeout, and kept like the rest; PgBouncer's
        janitor also closes only beyond pool_size + reserve_pool_size)."""
        return self.limits.pool_size + self.limits.reserve_pool

    @property
    def busy(self) -> bool:
        """Returns: whether a server is handed out, being reset or logging in."""
        return any(self.containers[s] for s in (ServerState.ACTIVE, ServerState.RESET,
                                                 ServerState.LOGIN))

    def parked_with(self, waiter: W) -> S | None:
        """Returns: the idle server parked by ``waiter``, if any."""
        return self._parked_by.get(waiter)

    def _pick_idle(self) -> S:
        """Returns: the idle server to hand to a waiter that has none parked: the most
        recently used unparked one, else the parked one idle longest (reclaimed)."""
        idle = self.containers[ServerState.IDLE]
        parked = self._parked
        if len(idle) > len(parked):
            for server in reversed(idle):
                if server not in parked:
                    return server
        return next(iter(idle))

    def servers_held_by(self, key: object) -> list[S]:
        """Returns: the servers handed to tenant ``key`` and not released yet."""
        return [server for server, holder in self._holder.items() if holder == key]

    # ------------------------------------------------------------------ clients

    def on_request(self, waiter: W, now: float) -> Decisions[S, W]:
        """A client wants a server: take an idle one now, or queue (fair across tenants).

        Returns: decisions whose ``assign`` holds ``(waiter, server)`` when served at once.
        Raises: PoolClosed when the pool is shutting down.
        """
        if self.closed:
            raise PoolClosed(f"database {self.name!r} is shutting down")
        d: Decisions[S, W] = Decisions()
        idle = self.containers[ServerState.IDLE]
        # Idle servers and eligible waiters never coexist, so an idle server here is nobody
        # else's turn.
        if (idle and not self.paused and waiter.tenant_key not in self.holds
                and self._under_cap(waiter.tenant_key, waiter.max_servers)):
            server = self._parked_by.get(waiter)  # its own, else the warmest unparked
            if server is None:
                server = self._pick_idle()
            self._assign(server, waiter.tenant_key, now)
            d.assign.append((waiter, server))
            return d
        self.waiting[waiter] = now + self.limits.query_wait_timeout
        self._since[waiter] = now
        self._queues.setdefault(waiter.tenant_key, deque()).append(waiter)
        self._dispatch(d, now)
        return d

    def take_parked(self, waiter: W, now: float) -> S | None:
        """The fast path of ``on_request``: ``waiter`` takes back the server it parked, when
        ``on_request`` would hand it an idle server now (same checks: pool open and not
        paused, tenant not held, under its cap).

        Returns: the server (now ACTIVE), or None: call ``on_request``.
        """
        server = self._parked_by.get(waiter)
        if server is None or self.closed or self.paused:
            return None
        key, cap = waiter.tenant_key, waiter.max_servers
        if key in self.holds or (cap > 0 and self.held.get(key, 0) >= cap):  # _under_cap
            return None
        self._assign(server, key, now)  # unparks it (_set_state)
        return server

    def on_unpark(self, waiter: W) -> None:
        """The client that parked a server went away: it stays idle, anyone's."""
        server = self._parked_by.pop(waiter, None)
        if server is not None:
            del self._parked[server]

    def on_cancel(self, waiter: W) -> None:
        """The waiter went away before being served (harmless when it is not queued)."""
        if self.waiting.pop(waiter, None) is not None:
            self._unqueue(waiter)

    def on_hold(self, key: object) -> None:
        """Hold a tenant's new transactions (they wait, up to query_wait_timeout)."""
        self.holds.add(key)

    def on_unhold(self, key: object, now: float) -> Decisions[S, W]:
        """Release a tenant: its waiting transactions are served now, in their order."""
        d: Decisions[S, W] = Decisions()
        if key in self.holds:
            self.holds.discard(key)
            if key in self._queues:
                self._dispatch(d, now)
        return d

    def _dequeue(self, waiter: W) -> None:
        del self.waiting[waiter]
        self._unqueue(waiter)

    def _unqueue(self, waiter: W) -> None:
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

    def _assign(self, server: S, key: object, now: float) -> None:
        self._set_state(server, ServerState.ACTIVE)
        server.last_used = now  # SHOW SERVERS' request_time
        self._holder[server] = key
        self.held[key] = self.held.get(key, 0) + 1

    def _unassign(self, server: S) -> None:
        """The server is no longer held by the tenant it was handed to."""
        key = self._holder.pop(server, _NOBODY)
        if key is not _NOBODY:
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]

    # ------------------------------------------------------------------ servers coming back

    def on_release(self, server: S, now: float) -> Decisions[S, W]:
        """A client is done with a provably idle server (or a reset or login finished)."""
        d: Decisions[S, W] = Decisions()
        self._unassign(server)
        if server.closed or self.closed:
            self._discard(server, d, now)
            return d
        lifetime = self.limits.server_lifetime
        if lifetime > 0 and now - server.created_at >= lifetime:
            self._close(server, d, f"older than server_lifetime ({lifetime:g}s)")
            self._dispatch(d, now)
            return d
        if self.total > self.max_servers:
            # pool_size was lowered (RELOAD/SIGHUP): shrink as servers come free, so the
            # new size holds within one transaction per server, busy or not.
            self._close(server, d, self._above_size())
            self._dispatch(d, now)
            return d
        server.last_used = now
        self._set_state(server, ServerState.IDLE)
        if self.waiting or self.paused:  # else _dispatch has nothing to do
            self._dispatch(d, now)
        return d

    def on_park(self, server: S, owner: W, now: float) -> Decisions[S, W] | None:
        """``owner`` is done with a provably idle server and keeps first claim on it: like
        ``on_release``, and the server is parked with ``owner`` when it goes to IDLE with
        nobody waiting (else it is released: a waiter needs it now).

        Returns: None when parked (nothing to do), else ``on_release``'s decisions.
        """
        limits = self.limits
        lifetime = limits.server_lifetime
        if (self.waiting or self.paused or self.closed or server.closed
                or (lifetime > 0 and now - server.created_at >= lifetime)
                or self._total > limits.pool_size + limits.reserve_pool):  # max_servers
            return self.on_release(server, now)
        self._unassign(server)
        server.last_used = now
        self._set_state(server, ServerState.IDLE)
        previous = self._parked_by.get(owner)
        if previous is not None:  # one parked server per client: the older one is anyone's
            del self._parked[previous]
        self._parked[server] = owner
        self._parked_by[owner] = server
        return None

    def on_discard(self, server: S, now: float) -> Decisions[S, W]:
        """Close a server and forget it (dirty session, out of sync, failed reset)."""
        d: Decisions[S, W] = Decisions()
        self._discard(server, d, now)
        return d

    def _discard(self, server: S, d: Decisions[S, W], now: float) -> None:
        self._unassign(server)
        self._close(server, d)
        self._dispatch(d, now)

    def on_reset(self, server: S) -> None:
        """A client left with a transaction open: the server rolls back (RESET) first."""
        self._unassign(server)
        self._set_state(server, ServerState.RESET)

    def on_lost(self, server: S, now: float) -> Decisions[S, W]:
        """The server's socket went away (already closed: nothing to close)."""
        d: Decisions[S, W] = Decisions()
        self._unassign(server)
        if server.state is not ServerState.CLOSED:
            self._set_state(server, ServerState.CLOSED)
        if not self.closed:
            self._dispatch(d, now)
        return d

    # ------------------------------------------------------------------ connects

    def on_open(self, now: float) -> Decisions[S, W]:
        """Open one server if there is room (a login needs the backend's parameters)."""
        d: Decisions[S, W] = Decisions()
        if self.total < self.limits.pool_size:
            self._open(d)
        return d

    def _open(self, d: Decisions[S, W]) -> None:
        server = self.new_server()
        self._set_state(server, ServerState.LOGIN)
        self._round_of[server] = self._round
        d.open.append(server)

    def on_connected(self, server: S, now: float) -> Decisions[S, W]:
        """A backend connect succeeded: the backend is back, the backoff starts over."""
        self._round_of.pop(server, None)
        self.last_connect_error = None
        self.backoff = BACKOFF_FIRST
        self.retry_at = 0.0
        if server.state is ServerState.LOGIN:  # not lost meanwhile
            return self.on_release(server, now)
        return Decisions()

    def on_connect_failed(self, server: S, error: ProxyError, now: float) -> Decisions[S, W]:
        """A backend connect failed (its socket is closed already).

        Returns: decisions whose ``retry_in`` is the delay before the next retry round when
        this failure ended a round; None when another connect of the round failed first.
        """
        d: Decisions[S, W] = Decisions()
        self.last_connect_error = error
        round_ = self._round_of.pop(server, self._round)
        self._set_state(server, ServerState.CLOSED)
        if round_ != self._round:
            return d
        d.retry_in = self.backoff
        self._round += 1
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return d

    def on_connect_cancelled(self, server: S) -> None:
        """The pool is closing: a connect in flight was cancelled."""
        self._round_of.pop(server, None)

    def on_retry(self, now: float) -> Decisions[S, W]:
        """The backoff delay is over: open connects for whoever waits (a new round)."""
        d: Decisions[S, W] = Decisions()
        self.retry_at = 0.0
        if not self.closed and not self.paused:
            self._dispatch(d, now)
        return d

    # ------------------------------------------------------------------ admin and reload

    def on_pause(self, now: float) -> Decisions[S, W]:
        """PAUSE: hand out and open nothing; close idle servers (``drained`` once none is
        busy)."""
        self.paused = True
        d: Decisions[S, W] = Decisions()
        self._dispatch(d, now)
        return d

    def on_resume(self, now: float) -> Decisions[S, W]:
        """RESUME: serve the waiters again."""
        self.paused = False
        d: Decisions[S, W] = Decisions()
        self._dispatch(d, now)
        return d

    def on_resize(self, limits: Limits, now: float) -> Decisions[S, W]:
        """New settings (RELOAD): close idle servers above a lowered pool_size (busy ones as
        they are released: ``on_release``), serve waiters a raised one has room for."""
        self.limits = limits
        d: Decisions[S, W] = Decisions()
        self._trim_idle(d)
        self._dispatch(d, now)
        return d

    def on_close(self) -> Decisions[S, W]:
        """Shutdown: fail every waiter, close every server but the active ones (their
        clients close them)."""
        self.closed = True
        d: Decisions[S, W] = Decisions()
        for waiter in list(self.waiting):
            self._dequeue(waiter)
            d.fail.append((waiter, PoolClosed(f"database {self.name!r} is shutting down")))
        for state, container in self.containers.items():
            if state is not ServerState.ACTIVE:
                for server in list(container):
                    self._close(server, d)
        return d

    def _above_size(self) -> str:
        return (f"above pool_size ({self.limits.pool_size}) + reserve_pool "
                f"({self.limits.reserve_pool})")

    def _trim_idle(self, d: Decisions[S, W]) -> None:
        """Close idle servers beyond ``max_servers``, least recently used first."""
        excess = self.total - self.max_servers
        for server in list(self.containers[ServerState.IDLE])[:max(0, excess)]:
            self._close(server, d, self._above_size())

    # ------------------------------------------------------------------ dispatch

    def _next_waiter(self) -> W | None:
        """Returns: whose turn it is: the head of the queue of the eligible tenant holding
        the fewest servers, the longest-waiting head on ties (O(tenants waiting))."""
        best: W | None = None
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

    def _dispatch(self, d: Decisions[S, W], now: float) -> None:
        """Hand idle servers to waiters (fairly) and open servers when allowed."""
        idle = self.containers[ServerState.IDLE]
        if self.paused:
            for server in list(idle):  # PgBouncer's PAUSE disconnects idle servers
                self._close(server, d)
            d.drained = not self.busy
            return
        while idle and self.waiting:
            waiter = self._next_waiter()
            if waiter is None:
                break  # everyone waiting is at their tenant's cap
            self._dequeue(waiter)
            got = self._parked_by.get(waiter)  # its own (after a hold, say), else any
            if got is None:
                got = self._pick_idle()
            self._assign(got, waiter.tenant_key, now)
            d.assign.append((waiter, got))
        if self.closed or not self.waiting or now < self.retry_at:
            return  # after a failure, the retry waits for the backoff (on_retry, on_tick)
        demand, oldest = self._demand()
        logging_in = len(self.containers[ServerState.LOGIN])
        want = demand - logging_in
        if self.last_connect_error is not None:
            # The backend failed lately: one connect probes it, the others follow as soon as
            # it logs in (on_connected), rather than 50 failing at each retry.
            want = min(want, 1 - logging_in)
        limit = self.limits.pool_size
        if oldest is not None and now - oldest >= self.limits.reserve_pool_timeout:
            limit += self.limits.reserve_pool
        for _ in range(max(0, min(want, limit - self.total))):
            self._open(d)

    # ------------------------------------------------------------------ janitor

    def on_tick(self, now: float, *, fill: bool = True) -> Decisions[S, W]:
        """Janitor sweep: waiters past ``query_wait_timeout`` (or, while the backend is
        failing, past ``server_connect_timeout``); retries, reserve, idle/old servers; and
        ``min_pool_size`` when ``fill`` (the database is verified)."""
        d: Decisions[S, W] = Decisions()
        limits = self.limits
        error = self.last_connect_error
        if error is not None and not any(self.containers[s] for s in (
                ServerState.IDLE, ServerState.ACTIVE, ServerState.RESET)):
            cutoff = now - limits.server_connect_timeout
            for waiter in [w for w, since in self._since.items() if since <= cutoff]:
                self._dequeue(waiter)
                d.fail.append((waiter, ServerUnavailable(
                    f"{error.message} (no server connection for "
                    f"{limits.server_connect_timeout:g}s: server_connect_timeout; "
                    "pgtenant keeps retrying)",
                    hint="check that the database server is up and reachable")))
        for waiter in [w for w, deadline in self.waiting.items() if deadline <= now]:
            self._dequeue(waiter)
            d.fail.append((waiter, self._timeout(waiter)))
        if self.closed or self.paused:
            return d
        self._trim_idle(d)
        self._close_stale_idle(d, now)
        if self.waiting:
            self._dispatch(d, now)  # retries after a backoff; the reserve after its timeout
        elif fill and self.total < limits.min_pool_size and now >= self.retry_at:
            for _ in range(limits.min_pool_size - self.total):
                self._open(d)
        return d

    def _timeout(self, waiter: W) -> PoolTimeout:
        wait = self.limits.query_wait_timeout
        if waiter.tenant_key in self.holds:
            return PoolTimeout(
                "this tenant is being migrated: its transactions are held until its "
                f"migration ends, and this one waited {wait:g}s (query_wait_timeout)",
                hint="retry shortly; the migration's lock_timeout bounds a hold")
        return PoolTimeout(
            f"pool for database {self.name!r} is exhausted: no server connection came free "
            f"within {wait:g}s (pool_size={self.limits.pool_size}, query_wait_timeout)",
            hint="raise pool_size or query_wait_timeout, or shorten transactions")

    def _close_stale_idle(self, d: Decisions[S, W], now: float) -> None:
        """server_idle_timeout and server_lifetime, keeping min_pool_size connections."""
        idle_limit, lifetime = self.limits.server_idle_timeout, self.limits.server_lifetime
        if idle_limit <= 0 and lifetime <= 0:
            return
        for server in list(self.containers[ServerState.IDLE]):  # oldest-used first
            if self.total <= self.limits.min_pool_size:
                break
            if idle_limit > 0 and now - server.last_used >= idle_limit:
                self._close(server, d, f"idle for server_idle_timeout ({idle_limit:g}s)")
            elif lifetime > 0 and now - server.created_at >= lifetime:
                self._close(server, d, f"older than server_lifetime ({lifetime:g}s)")
