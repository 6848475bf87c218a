"""Parked servers (issue 16, lever 4): a client that gives back a clean server while nobody
waits keeps first claim on it; every admission check of ``acquire`` still applies, and a
parked server is an idle server to everything else (pool_state's "Parking")."""

from __future__ import annotations

import random

import pytest

from pgtenant.config import DatabaseConfig, Dsn
from pgtenant.pool import Pool
from pgtenant.pool_state import Decisions
from pgtenant.server import ServerConnection, ServerState

from .test_pool import Clock, FakeWaiter, check_containers, make_pool


def _parked(pool_size: int, clock: Clock | None = None
            ) -> tuple[Pool, list[ServerConnection], FakeWaiter, ServerConnection]:
    """Returns: (pool, servers, owner, its parked server)."""
    pool, servers = make_pool(pool_size, clock=clock)
    owner = FakeWaiter("owner", tenant="a")
    server = pool.acquire(owner)
    assert server is not None
    pool.park(server, owner)
    check_containers(pool, servers)
    return pool, servers, owner, server


def test_a_parked_server_is_idle_and_comes_back_to_its_owner_before_warmer_ones() -> None:
    pool, servers, owner, server = _parked(3)
    assert server.state is ServerState.IDLE and server.peer is None
    assert pool.state.parked_with(owner) is server
    other = pool.acquire(FakeWaiter("b", tenant="b"))
    assert other is not None and other is not server  # an unparked one first
    pool.release(other)  # now the warmest idle server: LIFO would hand it out
    assert pool.acquire(owner) is server
    assert server.state is ServerState.ACTIVE and pool.held == {"a": 1}
    assert pool.state.parked_with(owner) is None  # parked only while idle
    check_containers(pool, servers)


def test_another_client_reclaims_a_parked_server_only_when_no_other_is_idle() -> None:
    pool, servers, owner, server = _parked(1)
    thief = FakeWaiter("other", tenant="b")
    assert pool.acquire(thief) is server  # the only idle server: reclaimed
    assert pool.state.parked_with(owner) is None and pool.held == {"b": 1}
    assert pool.acquire(owner) is None  # its owner now waits like anyone
    pool.park(server, thief)  # someone waits: released to it, not parked
    assert owner.assigned == [server] and pool.state.parked_with(thief) is None
    check_containers(pool, servers)


def test_the_least_recently_parked_server_is_reclaimed_first() -> None:
    clock = Clock()
    pool, servers = make_pool(2, clock=clock)
    first, second = FakeWaiter("first", tenant="a"), FakeWaiter("second", tenant="b")
    s1, s2 = pool.acquire(first), pool.acquire(second)
    assert s1 is not None and s2 is not None
    pool.park(s1, first)
    clock.now += 1
    pool.park(s2, second)
    assert pool.acquire(FakeWaiter("third", tenant="c")) is s1
    assert pool.state.parked_with(second) is s2
    check_containers(pool, servers)


def test_a_waiter_is_served_by_a_parked_server_at_once() -> None:
    pool, servers, owner, server = _parked(1)
    pool.hold("a")
    assert pool.acquire(owner) is None  # held: its own parked server is not for it
    assert server.state is ServerState.IDLE  # an ineligible waiter leaves it idle
    thief = FakeWaiter("b", tenant="b")
    assert pool.acquire(thief) is server
    pool.unhold("a")
    assert owner.assigned == []
    pool.release(server)
    assert owner.assigned == [server]
    check_containers(pool, servers)


def test_a_held_tenant_does_not_take_back_its_parked_server() -> None:
    pool, servers, owner, server = _parked(2)
    pool.hold("a")
    assert pool.acquire(owner) is None and list(pool.waiting) == [owner]
    pool.unhold("a")
    assert owner.assigned == [server]  # its own, once it is its turn
    check_containers(pool, servers)


def test_a_tenant_at_its_cap_does_not_take_back_its_parked_server() -> None:
    pool, servers = make_pool(3)
    busy = FakeWaiter("busy", tenant="a", max_servers=1)
    owner = FakeWaiter("owner", tenant="a", max_servers=1)
    server = pool.acquire(owner)
    assert server is not None
    pool.park(server, owner)
    assert pool.acquire(busy) is not None  # the tenant's one server (an unparked one)
    assert pool.acquire(owner) is None  # at its cap: waits, parked server or not
    check_containers(pool, servers)


def test_pause_closes_a_parked_server_and_the_owner_waits() -> None:
    pool, servers, owner, server = _parked(1)
    pool.state.on_pause(pool.clock())
    assert server.state is ServerState.CLOSED and pool.state.parked_with(owner) is None
    assert pool.acquire(owner) is None
    check_containers(pool, servers)


def test_a_closed_pool_refuses_the_owner_of_a_parked_server() -> None:
    pool, _, owner, _ = _parked(2)
    pool.closed = True
    with pytest.raises(Exception, match="shutting down"):
        pool.acquire(owner)


def test_idle_timeout_closes_a_parked_server() -> None:
    clock = Clock()
    pool, servers, owner, server = _parked(2, clock)
    clock.now += pool.config.server_idle_timeout + 1
    pool.tick(clock.now)
    assert server.state is ServerState.CLOSED and pool.state.parked_with(owner) is None
    check_containers(pool, servers)


def test_a_server_past_its_lifetime_is_closed_not_parked() -> None:
    clock = Clock()
    pool, servers = make_pool(2, clock=clock)
    owner = FakeWaiter("owner")
    server = pool.acquire(owner)
    assert server is not None
    server.created_at = clock.now - pool.config.server_lifetime
    pool.park(server, owner)
    assert server.state is ServerState.CLOSED and pool.state.parked_with(owner) is None
    check_containers(pool, servers)


def test_a_lowered_pool_size_closes_a_server_instead_of_parking_it() -> None:
    pool, servers = make_pool(2)
    owner = FakeWaiter("owner")
    server = pool.acquire(owner)
    assert server is not None
    pool.db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=1)
    pool.park(server, owner)
    assert server.state is ServerState.CLOSED and pool.total == 1
    check_containers(pool, servers)


def test_a_parked_server_lost_is_forgotten() -> None:
    pool, servers, owner, server = _parked(2)
    pool.server_lost(server)
    assert server.state is ServerState.CLOSED and pool.state.parked_with(owner) is None
    other = pool.acquire(owner)
    assert other is not None and other is not server
    check_containers(pool, servers)


def test_an_owner_gone_leaves_its_server_idle_for_anyone() -> None:
    pool, servers, owner, server = _parked(2)
    pool.unpark(owner)
    assert server.state is ServerState.IDLE and pool.state.parked_with(owner) is None
    assert not pool.state._parked and not pool.state._parked_by
    assert pool.acquire(FakeWaiter("b")) is server  # the warmest again, no longer parked
    check_containers(pool, servers)


def test_one_parked_server_per_client() -> None:
    pool, servers = make_pool(3)
    owner = FakeWaiter("owner")
    s1, s2 = pool.acquire(owner), pool.acquire(FakeWaiter("x"))
    assert s1 is not None and s2 is not None
    pool.park(s1, owner)
    pool.park(s2, owner)  # (a client has one server at a time; this must not leak s1)
    assert pool.state.parked_with(owner) is s2
    assert set(pool.state._parked) == {s2}
    check_containers(pool, servers)


@pytest.mark.parametrize("seed", range(20))
def test_random_walk_keeps_parking_consistent_with_the_containers(seed: int) -> None:
    """Parking, requests, releases, losses, holds, pauses and connects at random, on the
    decisions alone (no I/O): every parked server is idle, both maps agree, every active
    server is someone's, and the containers stay exact."""
    rng = random.Random(seed)
    clock = Clock()
    pool, servers = make_pool(3, clock=clock)
    state = pool.state
    state.new_server = lambda: ServerConnection(pool.db.dsn, on_lost=pool.server_lost)
    waiters = [FakeWaiter(f"w{i}", tenant=f"t{i % 3}") for i in range(5)]
    mine: dict[FakeWaiter, ServerConnection] = {}

    def apply(d: object) -> None:
        if d is None:
            return
        assert isinstance(d, Decisions)
        for who, server in d.assign:
            mine[who] = server
        servers.extend(d.open)

    for _ in range(400):
        clock.now += rng.random()
        w = rng.choice(waiters)
        op = rng.random()
        if w in mine:
            s = mine.pop(w)
            if op < 0.6:
                apply(state.on_park(s, w, clock.now))
            elif op < 0.8:
                apply(state.on_release(s, clock.now))
            else:
                apply(state.on_discard(s, clock.now))
        elif w in state.waiting:
            if op < 0.2:
                state.on_cancel(w)
                state.on_unpark(w)
        else:
            got = state.take_parked(w, clock.now)
            if got is None:
                apply(state.on_request(w, clock.now))
            else:
                mine[w] = got
        r = rng.random()
        if r < 0.05:
            state.on_hold("t1")
        elif r < 0.10:
            apply(state.on_unhold("t1", clock.now))
        elif r < 0.13:
            apply(state.on_resume(clock.now) if state.paused else state.on_pause(clock.now))
        elif r < 0.2 and state.containers[ServerState.LOGIN]:
            apply(state.on_connected(next(iter(state.containers[ServerState.LOGIN])),
                                     clock.now))
        elif r < 0.22 and state.containers[ServerState.IDLE]:
            lost = rng.choice(list(state.containers[ServerState.IDLE]))
            apply(state.on_lost(lost, clock.now))
        elif r < 0.24:
            apply(state.on_tick(clock.now + 700))  # past server_idle_timeout
        for s, owner in state._parked.items():
            assert s.state is ServerState.IDLE and state._parked_by[owner] is s
        assert len(state._parked) == len(state._parked_by)
        assert set(mine.values()) == set(state.containers[ServerState.ACTIVE])
        assert len(mine) == len(set(mine.values()))
        check_containers(pool, servers)
