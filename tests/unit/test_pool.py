"""Pool decisions with fake servers: LIFO idle reuse, FIFO waiters, timeouts, containers.

Servers are real ``ServerConnection`` objects that never connect: they are placed straight
into the IDLE container, and ``pool_size`` equals their number, so the pool never has room
to open (and connect) a new one. Everything here is synchronous except ``close``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

import pytest

from pgtenant.config import Config, DatabaseConfig, Dsn
from pgtenant.errors import PoolClosed, PoolTimeout, ProxyError, ServerUnavailable
from pgtenant.pool import Pool
from pgtenant.protocol.handshake import LoginResult
from pgtenant.server import ServerConnection, ServerState

QUERY_WAIT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWaiter:
    """A client waiting for a server; records what the pool told it."""

    def __init__(self, name: str, events: list[tuple[str, str, object]] | None = None, *,
                 tenant: str = "t", max_servers: int = 0):
        self.name = name
        self.tenant_key: object = tenant
        self.max_servers = max_servers
        self.assigned: list[ServerConnection] = []
        self.failed: list[ProxyError] = []
        self.events = events if events is not None else []

    def server_assigned(self, server: ServerConnection) -> None:
        self.assigned.append(server)
        self.events.append(("assigned", self.name, server))

    def pool_failed(self, error: ProxyError) -> None:
        self.failed.append(error)
        self.events.append(("failed", self.name, error))

    def __repr__(self) -> str:
        return f"<FakeWaiter {self.name}>"


def make_pool(n: int, *, clock: Clock | None = None) -> tuple[Pool, list[ServerConnection]]:
    """Returns: a pool for database ``app`` with ``n`` idle servers and ``pool_size == n``."""
    db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=n)
    config = Config(query_wait_timeout=QUERY_WAIT, databases={"app": db})
    pool = Pool(db, config, clock=clock or Clock())
    servers = []
    for _ in range(n):
        server = ServerConnection(db.dsn, on_lost=pool.server_lost)
        pool.state._set_state(server, ServerState.IDLE)
        servers.append(server)
    check_containers(pool, servers)
    return pool, servers


def check_containers(pool: Pool, servers: list[ServerConnection]) -> None:
    """Every live server is in exactly one container (its state's); closed ones in none."""
    for server in servers:
        holders = [state for state, c in pool.containers.items() if server in c]
        if server.state is ServerState.CLOSED:
            assert holders == [], f"{server!r} closed but held by {holders}"
        else:
            assert holders == [server.state], f"{server!r} held by {holders}"
    known = set(servers)
    for state, container in pool.containers.items():
        assert set(container) <= known, f"unknown server in {state}"
    # pool.total is a count kept as servers move (pool_state._set_state): it must equal the
    # containers' lengths recomputed, after every step of the random walks too.
    assert pool.total == sum(map(len, pool.containers.values()))
    assert pool.total == sum(s.state is not ServerState.CLOSED for s in servers)


def states(servers: list[ServerConnection]) -> list[str]:
    return [s.state.value for s in servers]


# ---------------------------------------------------------------------- acquire


def test_acquire_returns_the_most_recently_idle_server_and_makes_it_active() -> None:
    clock = Clock()
    pool, servers = make_pool(3, clock=clock)
    clock.now = 1005.0
    server = pool.acquire(FakeWaiter("a"))
    assert server is servers[2]  # LIFO: the last one placed in IDLE
    assert server.state is ServerState.ACTIVE
    assert server.last_used == 1005.0
    assert pool.waiting == {}
    check_containers(pool, servers)


def test_released_server_is_the_next_one_handed_out() -> None:
    pool, servers = make_pool(3)
    first = pool.acquire(FakeWaiter("a"))
    second = pool.acquire(FakeWaiter("b"))
    assert (first, second) == (servers[2], servers[1])
    assert first is not None
    pool.release(first)
    check_containers(pool, servers)
    assert pool.acquire(FakeWaiter("c")) is first  # the warmest connection
    check_containers(pool, servers)


def test_acquire_with_no_idle_server_queues_the_waiter_with_a_deadline() -> None:
    clock = Clock()
    pool, servers = make_pool(1, clock=clock)
    pool.acquire(FakeWaiter("holder"))
    waiter = FakeWaiter("w")
    assert pool.acquire(waiter) is None
    assert pool.waiting == {waiter: clock.now + QUERY_WAIT}
    assert waiter.assigned == [] and waiter.failed == []
    assert pool.containers[ServerState.LOGIN] == {}  # no room: nothing is opened
    check_containers(pool, servers)


def test_waiters_are_served_fifo_synchronously_on_release() -> None:
    pool, servers = make_pool(2)
    held = [pool.acquire(FakeWaiter("h1")), pool.acquire(FakeWaiter("h2"))]
    events: list[tuple[str, str, object]] = []
    w1, w2, w3 = (FakeWaiter(n, events) for n in ("w1", "w2", "w3"))
    for w in (w1, w2, w3):
        assert pool.acquire(w) is None
    assert list(pool.waiting) == [w1, w2, w3]
    check_containers(pool, servers)

    assert held[1] is not None
    pool.release(held[1])
    assert events == [("assigned", "w1", held[1])]  # before release() returned
    assert held[1].state is ServerState.ACTIVE
    assert list(pool.waiting) == [w2, w3]
    check_containers(pool, servers)

    assert held[0] is not None
    pool.release(held[0])
    assert events[-1] == ("assigned", "w2", held[0])
    assert list(pool.waiting) == [w3]
    assert w3.assigned == []
    check_containers(pool, servers)


def test_cancel_wait_removes_the_waiter_from_the_queue() -> None:
    pool, servers = make_pool(1)
    server = pool.acquire(FakeWaiter("holder"))
    w1, w2 = FakeWaiter("w1"), FakeWaiter("w2")
    pool.acquire(w1)
    pool.acquire(w2)
    pool.cancel_wait(w1)
    assert list(pool.waiting) == [w2]
    pool.cancel_wait(w1)  # twice is harmless
    pool.cancel_wait(FakeWaiter("never queued"))
    assert server is not None
    pool.release(server)
    assert w1.assigned == [] and w1.failed == []
    assert w2.assigned == [server]
    check_containers(pool, servers)


def test_acquire_on_a_closed_pool_raises_pool_closed() -> None:
    pool, _ = make_pool(1)
    pool.closed = True
    with pytest.raises(PoolClosed, match="'app' is shutting down") as info:
        pool.acquire(FakeWaiter("late"))
    assert info.value.sqlstate == "57P01"


# ---------------------------------------------------------------------- tick


def test_tick_fails_waiters_past_query_wait_timeout_with_pool_timeout() -> None:
    clock = Clock()
    pool, servers = make_pool(1, clock=clock)
    pool.acquire(FakeWaiter("holder"))
    early, late = FakeWaiter("early"), FakeWaiter("late")
    pool.acquire(early)
    clock.now += 5
    pool.acquire(late)

    pool.tick(clock.now + QUERY_WAIT - 5 - 0.001)
    assert list(pool.waiting) == [early, late] and early.failed == []

    pool.tick(1000.0 + QUERY_WAIT)  # exactly at the deadline
    assert list(pool.waiting) == [late]
    (error,) = early.failed
    assert isinstance(error, PoolTimeout)
    assert error.sqlstate == "53300"
    assert "exhausted" in error.message
    assert "'app'" in error.message
    assert "pool_size=1" in error.message
    assert error.hint is not None
    assert early.assigned == []

    pool.tick(clock.now + QUERY_WAIT)
    assert pool.waiting == {}
    assert len(late.failed) == 1
    check_containers(pool, servers)


def test_timed_out_waiter_is_not_served_later() -> None:
    clock = Clock()
    pool, servers = make_pool(1, clock=clock)
    server = pool.acquire(FakeWaiter("holder"))
    gone, next_one = FakeWaiter("gone"), FakeWaiter("next")
    pool.acquire(gone)
    clock.now += 1
    pool.acquire(next_one)
    pool.tick(1000.0 + QUERY_WAIT)
    assert server is not None
    pool.release(server)
    assert gone.assigned == [] and next_one.assigned == [server]
    check_containers(pool, servers)


# ---------------------------------------------------------------------- discard and loss


def test_discard_closes_the_server_and_counts_out_of_sync() -> None:
    pool, servers = make_pool(3)
    a = pool.acquire(FakeWaiter("a"))
    b = pool.acquire(FakeWaiter("b"))
    assert a is not None and b is not None
    pool.discard(a, out_of_sync=True)
    assert a.state is ServerState.CLOSED
    assert pool.out_of_sync == 1
    check_containers(pool, servers)
    pool.discard(b)
    assert pool.out_of_sync == 1
    assert pool.total == 1
    check_containers(pool, servers)


def test_server_lost_while_idle_leaves_every_container() -> None:
    pool, servers = make_pool(2)
    servers[0].connection_lost(None)  # the socket went away: on_lost is pool.server_lost
    assert servers[0].state is ServerState.CLOSED
    assert servers[0].closed
    check_containers(pool, servers)
    assert pool.acquire(FakeWaiter("a")) is servers[1]
    assert pool.total == 1  # a waiter now would make the pool open a replacement
    check_containers(pool, servers)


def test_server_lost_while_active_is_not_returned_to_idle_on_release() -> None:
    pool, servers = make_pool(1)
    server = pool.acquire(FakeWaiter("a"))
    assert server is not None
    server.connection_lost(ConnectionResetError())
    assert server.state is ServerState.CLOSED
    pool.release(server)
    assert server.state is ServerState.CLOSED
    assert pool.containers[ServerState.IDLE] == {}
    check_containers(pool, servers)


# ---------------------------------------------------------------------- repr


def test_repr_is_a_snapshot_of_waiters_and_containers() -> None:
    pool, servers = make_pool(2)
    assert repr(pool) == "<Pool app [waiting: 0 | servers: 0 active, 2 idle, 0 login, 0 reset]>"
    pool.acquire(FakeWaiter("a"))
    pool.acquire(FakeWaiter("b"))
    pool.acquire(FakeWaiter("c"))
    assert repr(pool) == "<Pool app [waiting: 1 | servers: 2 active, 0 idle, 0 login, 0 reset]>"
    check_containers(pool, servers)


# ---------------------------------------------------------------------- close


async def test_close_fails_waiters_and_closes_all_but_active_servers() -> None:
    pool, servers = make_pool(3)
    active = pool.acquire(FakeWaiter("a"))
    assert active is not None
    pool.acquire(FakeWaiter("b"))
    pool.acquire(FakeWaiter("c"))
    waiter = FakeWaiter("w")
    pool.acquire(waiter)
    await pool.close()
    (error,) = waiter.failed
    assert isinstance(error, PoolClosed)
    assert pool.waiting == {}
    assert sum(s.state is ServerState.ACTIVE for s in servers) == 3  # their clients close them
    check_containers(pool, servers)
    pool.release(active)  # a client done after shutdown: the server is closed, not pooled
    assert active.state is ServerState.CLOSED
    check_containers(pool, servers)
    with pytest.raises(PoolClosed):
        pool.acquire(FakeWaiter("late"))


async def test_close_closes_idle_servers() -> None:
    pool, servers = make_pool(2)
    await pool.close()
    assert states(servers) == ["closed", "closed"]
    assert pool.total == 0
    check_containers(pool, servers)


# ---------------------------------------------------------------------- random walk


@pytest.mark.parametrize("seed", range(20))
def test_random_walk_keeps_containers_fifo_and_single_assignment(seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    pool, servers = make_pool(3, clock=clock)
    events: list[tuple[str, str, object]] = []
    held: list[ServerConnection] = []
    queue: list[FakeWaiter] = []  # our model of the FIFO
    waiters: list[FakeWaiter] = []
    for step in range(200):
        op = rng.choice(["acquire", "acquire", "release", "cancel", "tick"])
        if op == "acquire":
            w = FakeWaiter(f"w{step}", events)
            waiters.append(w)
            got = pool.acquire(w)
            if got is None:
                queue.append(w)
            else:
                assert not queue, "served ahead of queued waiters"
                held.append(got)
        elif op == "release" and held:
            server = held.pop(rng.randrange(len(held)))
            before = len(events)
            pool.release(server)
            if queue:
                first = queue.pop(0)
                assert events[before:] == [("assigned", first.name, server)]
                held.append(server)
            else:
                assert server.state is ServerState.IDLE
        elif op == "cancel" and queue:
            w = queue.pop(rng.randrange(len(queue)))
            pool.cancel_wait(w)
        elif op == "tick":
            clock.now += rng.uniform(0, QUERY_WAIT / 2)
            pool.tick(clock.now)
            queue = [w for w in queue if not w.failed]
        assert list(pool.waiting) == queue
        check_containers(pool, servers)
        assert len(held) == len(pool.containers[ServerState.ACTIVE])
    for w in waiters:
        assert len(w.assigned) + len(w.failed) <= 1


# ---------------------------------------------------------------------- fairness and limits


def test_free_server_goes_to_the_tenant_holding_the_fewest_servers() -> None:
    """A noisy tenant with many queued transactions cannot starve a small one: the small
    tenant's waiter, queued last, is served at the first release."""
    pool, servers = make_pool(2)
    events: list[tuple[str, str, object]] = []
    held = [pool.acquire(FakeWaiter(f"h{i}", tenant="noisy")) for i in range(2)]
    noisy = [FakeWaiter(f"n{i}", events, tenant="noisy") for i in range(5)]
    for w in noisy:
        assert pool.acquire(w) is None
    small = FakeWaiter("s", events, tenant="small")
    assert pool.acquire(small) is None
    assert held[0] is not None and held[1] is not None
    pool.release(held[0])
    assert events == [("assigned", "s", held[0])]
    pool.release(held[1])  # both hold one now: the longest-waiting head goes next
    assert events[-1] == ("assigned", "n0", held[1])
    assert pool.held == {"noisy": 1, "small": 1}
    check_containers(pool, servers)


def test_tenant_at_its_server_cap_waits_while_others_are_served() -> None:
    pool, servers = make_pool(3)
    first = pool.acquire(FakeWaiter("a1", tenant="a", max_servers=1))
    assert first is not None
    capped = FakeWaiter("a2", tenant="a", max_servers=1)
    assert pool.acquire(capped) is None  # idle servers exist, but "a" holds its one
    other = pool.acquire(FakeWaiter("b1", tenant="b", max_servers=1))
    assert other is not None  # an idle server with a capped waiter queued: b's turn
    assert capped.assigned == []
    pool.release(first)  # a is under its cap again
    assert capped.assigned == [first]
    check_containers(pool, servers)


@pytest.fixture
def unscheduled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's connects (``Pool._spawn``) are closed, never run: the test decides their
    outcome. Patched in asyncio, not on the pool: the methods of a Pool compiled by mypyc
    (setup.py) cannot be replaced on the instance. These tests run no event loop."""

    def ensure_future(coro: Coroutine[Any, Any, None]) -> Future[None]:
        coro.close()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    monkeypatch.setattr(asyncio, "ensure_future", ensure_future)


@pytest.mark.usefixtures("unscheduled")
def test_reserve_pool_opens_after_reserve_pool_timeout() -> None:
    clock = Clock()
    pool, _ = make_pool(1, clock=clock)
    pool.db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=1, reserve_pool=1)
    pool.acquire(FakeWaiter("holder"))
    pool.acquire(FakeWaiter("w"))
    assert len(pool.containers[ServerState.LOGIN]) == 0  # pool_size reached
    clock.now += pool.config.reserve_pool_timeout - 0.01
    pool.tick(clock.now)
    assert len(pool.containers[ServerState.LOGIN]) == 0
    clock.now += 0.02
    pool.tick(clock.now)
    assert len(pool.containers[ServerState.LOGIN]) == 1  # one reserve connection for the
    # transaction that waited


def test_idle_servers_are_closed_after_server_idle_timeout_keeping_min_pool_size() -> None:
    clock = Clock()
    pool, servers = make_pool(3, clock=clock)
    pool.db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=3, min_pool_size=1)
    for s in servers:
        s.last_used = clock.now
    clock.now += pool.config.server_idle_timeout + 1
    pool.tick(clock.now)
    assert states(servers).count("closed") == 2 and pool.total == 1
    check_containers(pool, servers)


def test_server_older_than_server_lifetime_is_closed_on_release() -> None:
    clock = Clock()
    pool, servers = make_pool(2, clock=clock)
    server = pool.acquire(FakeWaiter("a"))
    assert server is not None
    server.created_at = clock.now - pool.config.server_lifetime
    pool.release(server)
    assert server.state is ServerState.CLOSED
    check_containers(pool, servers)


# ------------------------------------------------------------------ backend connect retries

def _connecting_pool(pool_size: int, clock: Clock) -> tuple[Pool, list[ServerConnection]]:
    """Returns: an empty pool whose connects never run: the test decides their outcome
    (``_connect_failed`` / ``_connect_succeeded``; the test uses the ``unscheduled``
    fixture), and the list of servers it opened."""
    db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=pool_size)
    pool = Pool(db, Config(query_wait_timeout=QUERY_WAIT, databases={"app": db}), clock=clock)
    opened: list[ServerConnection] = []
    real_new = pool.state.new_server

    def new_server() -> ServerConnection:
        server = real_new()
        opened.append(server)
        return server

    pool.state.new_server = new_server
    return pool, opened


def _fail_all(pool: Pool, servers: list[ServerConnection]) -> list[float | None]:
    down = ServerUnavailable("backend 127.0.0.1:5432 is unreachable: connection refused")
    return [pool._connect_failed(s, down) for s in servers if s.state is ServerState.LOGIN]


@pytest.mark.usefixtures("unscheduled")
def test_connects_failing_together_grow_the_backoff_once() -> None:
    """50 waiters open 50 connects; the outage makes them all fail: that is one failed
    round (one 0.25 s delay, then 0.5 s), not 50 (which reached the 5 s cap at once)."""
    clock = Clock()
    pool, opened = _connecting_pool(50, clock)
    waiters = [FakeWaiter(f"w{i}") for i in range(50)]
    for waiter in waiters:
        assert pool.acquire(waiter) is None
    assert len(opened) == 50
    assert _fail_all(pool, opened) == [0.25] + [None] * 49
    assert pool.total == 0 and pool.state.retry_at == clock.now + 0.25
    clock.now += 0.2
    pool.tick(clock.now)
    assert len(opened) == 50  # still backing off
    clock.now += 0.05
    pool.tick(clock.now)
    assert len(opened) == 51  # the second round: one connect probes the backend
    assert _fail_all(pool, opened[50:]) == [0.5]
    clock.now += 0.5
    pool.tick(clock.now)
    assert len(opened) == 52
    back = opened[51]
    back.login = LoginResult()
    pool._connect_succeeded(back)  # the backend is back: a waiter is served at once...
    assert sum(len(w.assigned) for w in waiters) == 1
    assert len(pool.containers[ServerState.LOGIN]) == 49  # ...and the rest connect now
    assert pool.state.backoff == 0.25 and pool.state.retry_at == 0.0
    check_containers(pool, opened)


@pytest.mark.usefixtures("unscheduled")
def test_a_late_failure_of_an_earlier_round_does_not_grow_the_backoff() -> None:
    clock = Clock()
    pool, opened = _connecting_pool(2, clock)
    pool.acquire(FakeWaiter("a"))
    pool.acquire(FakeWaiter("b"))
    down = ServerUnavailable("connection refused")
    assert pool._connect_failed(opened[0], down) == 0.25
    clock.now += 0.25
    pool.tick(clock.now)  # round 1's other connect still runs: it is the probe
    assert len(opened) == 2
    assert pool._connect_failed(opened[1], down) is None  # round 1's straggler
    pool.tick(clock.now)
    assert len(opened) == 3  # round 2
    assert pool._connect_failed(opened[2], down) == 0.5
    check_containers(pool, opened)


# ------------------------------------------------------------------ pool_size lowered

def test_lowered_pool_size_closes_released_servers_above_it() -> None:
    pool, servers = make_pool(4)
    busy = [pool.acquire(FakeWaiter(f"c{i}")) for i in range(4)]
    pool.db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=2)  # RELOAD
    pool.dispatch()
    assert pool.total == 4  # all busy: nothing is cut
    for server in busy[:3]:
        assert server is not None
        pool.release(server)
    assert states(servers).count("closed") == 2 and pool.total == 2
    assert busy[2] is not None and busy[2].state is ServerState.IDLE
    check_containers(pool, servers)


def test_lowered_pool_size_closes_idle_servers_above_it_at_once() -> None:
    pool, servers = make_pool(5)
    pool.db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=3, reserve_pool=1)
    pool.dispatch()
    assert pool.total == 4  # pool_size + reserve_pool, as PgBouncer's janitor keeps
    assert states(servers).count("closed") == 1
    check_containers(pool, servers)


# ---------------------------------------------------------------------- tenant holds


def test_a_held_tenant_waits_while_idle_servers_serve_other_tenants() -> None:
    pool, servers = make_pool(2)
    pool.hold("migrating")
    held, other = FakeWaiter("held", tenant="migrating"), FakeWaiter("other", tenant="x")
    assert pool.acquire(held) is None  # an idle server is there, but not for it
    assert pool.acquire(other) is not None
    assert held.assigned == [] and list(pool.waiting) == [held]
    check_containers(pool, servers)


def test_unhold_serves_the_held_tenants_waiters_in_order_at_once() -> None:
    events: list[tuple[str, str, object]] = []
    pool, servers = make_pool(2)
    pool.hold("m")
    first, second = FakeWaiter("first", events, tenant="m"), FakeWaiter("second", events,
                                                                       tenant="m")
    pool.acquire(first)
    pool.acquire(second)
    assert events == [] and len(pool.containers[ServerState.IDLE]) == 2  # idle, not theirs
    pool.unhold("m")
    assert [(kind, name) for kind, name, _ in events] == [("assigned", "first"),
                                                          ("assigned", "second")]
    check_containers(pool, servers)


def test_a_held_waiter_past_query_wait_timeout_is_told_its_tenant_is_being_migrated() -> None:
    clock = Clock()
    pool, _ = make_pool(1, clock=clock)
    pool.hold("m")
    waiter = FakeWaiter("w", tenant="m")
    pool.acquire(waiter)
    pool.tick(clock.now + QUERY_WAIT)
    (error,) = waiter.failed
    assert isinstance(error, PoolTimeout) and "being migrated" in error.message


def test_running_counts_only_the_tenants_servers_with_a_transaction_in_flight() -> None:
    pool, _ = make_pool(3)

    class Peer:
        def __init__(self, running: bool) -> None:
            self.has_running_transaction = running

    a = pool.acquire(FakeWaiter("a", tenant="m"))
    b = pool.acquire(FakeWaiter("b", tenant="m"))
    c = pool.acquire(FakeWaiter("c", tenant="other"))
    assert a is not None and b is not None and c is not None
    a.peer, b.peer, c.peer = Peer(True), Peer(False), Peer(True)  # type: ignore[assignment]
    assert pool.running("m") == 1  # b: a pinned session between transactions
    assert pool.running("other") == 1 and pool.running("nobody") == 0
