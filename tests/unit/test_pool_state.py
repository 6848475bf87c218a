"""PoolState (pgtenant/pool_state.py) driven directly: fake connections, a fake clock, no loop.

Each step asserts the decisions returned (rendered by ``show``) and a ``repr`` snapshot of
the containers, as httpcore's ``tests/_async/test_connection_pool.py`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pgtenant.errors import PoolClosed, ServerUnavailable
from pgtenant.pool_state import Decisions, Limits, PoolState, ServerState

T0 = 1000.0


class FakeConn:
    """A server connection as the decisions see it: state, times, and whether it is closed."""

    def __init__(self, n: int, now: float) -> None:
        self.n = n
        self.state = ServerState.LOGIN
        self.created_at = now
        self.last_used = now
        self.closed = False

    def __repr__(self) -> str:
        return f"#{self.n}"


class FakeWaiter:
    def __init__(self, name: str, tenant: str = "t", max_servers: int = 0) -> None:
        self.name = name
        self.tenant_key: object = tenant
        self.max_servers = max_servers

    def __repr__(self) -> str:
        return self.name


State = PoolState[FakeConn, FakeWaiter]
D = Decisions[FakeConn, FakeWaiter]


class Clock:
    def __init__(self) -> None:
        self.now = T0


def make(pool_size: int = 2, clock: Clock | None = None, **limits: Any) -> State:
    clock = clock or Clock()
    made: list[FakeConn] = []

    def new_server() -> FakeConn:
        made.append(FakeConn(len(made) + 1, clock.now))
        return made[-1]

    return PoolState("app", Limits(pool_size=pool_size, query_wait_timeout=10.0, **limits),
                     new_server)


def show(d: D) -> str:
    """Returns: the decisions in one line, in the order the async pool applies them."""
    parts = [f"close {s}" + (f" ({why})" if why else "") for s, why in d.close]
    parts += [f"fail {w} {type(e).__name__}" for w, e in d.fail]
    parts += [f"{w} <- {s}" for w, s in d.assign]
    parts += [f"open {s}" for s in d.open]
    if d.retry_in is not None:
        parts.append(f"retry in {d.retry_in:g}s")
    if d.drained:
        parts.append("drained")
    return "; ".join(parts)


def warm(state: State, n: int, now: float = T0) -> list[FakeConn]:
    """Returns: ``n`` servers made idle through the public events (min_pool_size fill)."""
    limits = state.limits
    state.limits = dataclasses.replace(limits, min_pool_size=n)
    opened = state.on_tick(now).open
    for server in opened:
        assert show(state.on_connected(server, now)) == ""
    state.limits = limits
    return opened


def snapshot(state: State, waiting: int, active: int, idle: int, login: int = 0,
             reset: int = 0, flags: str = "") -> str:
    return (f"<PoolState app{flags} [waiting: {waiting} | servers: {active} active, "
            f"{idle} idle, {login} login, {reset} reset]>")


# ---------------------------------------------------------------------- assignment


def test_request_takes_the_warmest_idle_server_and_release_makes_it_idle_again() -> None:
    state = make(3)
    warm(state, 3)
    assert repr(state) == ("<PoolState app [waiting: 0 | servers: 0 active, 3 idle, 0 login, "
                           "0 reset]>")
    a = FakeWaiter("a")
    d = state.on_request(a, T0 + 1)
    assert show(d) == "a <- #3"  # LIFO: the last one to become idle
    assert d.assign[0][1].last_used == T0 + 1
    assert repr(state) == snapshot(state, 0, 1, 2)
    assert show(state.on_release(d.assign[0][1], T0 + 2)) == ""
    assert show(state.on_request(FakeWaiter("b"), T0 + 3)) == "b <- #3"


def test_waiters_open_one_connect_each_up_to_pool_size_then_are_served_fifo() -> None:
    state = make(2)
    a, b, c = FakeWaiter("a"), FakeWaiter("b"), FakeWaiter("c")
    assert show(state.on_request(a, T0)) == "open #1"
    assert show(state.on_request(b, T0)) == "open #2"
    assert show(state.on_request(c, T0)) == ""  # pool_size reached
    assert repr(state) == snapshot(state, 3, 0, 0, login=2)
    s1, s2 = state.containers[ServerState.LOGIN]
    assert show(state.on_connected(s2, T0 + 1)) == "a <- #2"
    assert show(state.on_connected(s1, T0 + 1)) == "b <- #1"
    assert repr(state) == snapshot(state, 1, 2, 0)
    assert show(state.on_release(s1, T0 + 2)) == "c <- #1"
    assert show(state.on_release(s2, T0 + 2)) == ""
    assert repr(state) == snapshot(state, 0, 1, 1)


def test_cancelled_waiter_is_skipped_and_a_second_cancel_is_harmless() -> None:
    state = make(1)
    (s,) = warm(state, 1)
    state.on_request(FakeWaiter("holder"), T0)
    a, b = FakeWaiter("a"), FakeWaiter("b")
    state.on_request(a, T0)
    state.on_request(b, T0)
    state.on_cancel(a)
    state.on_cancel(a)
    assert repr(state) == snapshot(state, 1, 1, 0)
    assert show(state.on_release(s, T0 + 1)) == "b <- #1"


# ---------------------------------------------------------------------- fairness and caps


def test_free_server_goes_to_the_tenant_holding_fewest_then_to_the_longest_wait() -> None:
    state = make(2)
    s1, s2 = warm(state, 2)
    state.on_request(FakeWaiter("n1", "noisy"), T0)
    state.on_request(FakeWaiter("n2", "noisy"), T0)
    for i in range(3, 6):
        assert show(state.on_request(FakeWaiter(f"n{i}", "noisy"), T0 + i)) == ""
    assert show(state.on_request(FakeWaiter("q1", "quiet"), T0 + 9)) == ""
    assert repr(state) == snapshot(state, 4, 2, 0)
    assert show(state.on_release(s2, T0 + 10)) == "q1 <- #2"  # holds 0: first, queued last
    assert state.held == {"noisy": 1, "quiet": 1}
    assert show(state.on_release(s1, T0 + 11)) == "n3 <- #1"  # tie: the longest wait


def test_a_tenant_at_its_cap_waits_without_opening_while_others_are_served() -> None:
    state = make(3)
    s1, _ = warm(state, 2)
    assert show(state.on_request(FakeWaiter("a1", "a", 1), T0)) == "a1 <- #2"
    assert show(state.on_request(FakeWaiter("a2", "a", 1), T0)) == ""  # capped: no connect
    assert repr(state) == snapshot(state, 1, 1, 1)  # an idle server beside a capped waiter
    assert show(state.on_request(FakeWaiter("b1", "b", 1), T0)) == "b1 <- #1"
    assert show(state.on_release(s1, T0 + 1)) == ""  # b's server: a is still capped
    a1_server = next(s for s in state.containers[ServerState.ACTIVE])
    assert show(state.on_release(a1_server, T0 + 2)) == "a2 <- #2"


def test_held_tenant_waits_and_unhold_serves_its_waiters_in_order() -> None:
    state = make(2)
    warm(state, 2)
    state.on_hold("m")
    assert show(state.on_request(FakeWaiter("m1", "m"), T0)) == ""
    assert show(state.on_request(FakeWaiter("m2", "m"), T0)) == ""
    assert show(state.on_request(FakeWaiter("x", "x"), T0)) == "x <- #2"
    assert repr(state) == snapshot(state, 2, 1, 1)
    assert show(state.on_unhold("m", T0 + 1)) == "m1 <- #1"  # m2 waits for a free server
    assert show(state.on_unhold("m", T0 + 1)) == ""


# ---------------------------------------------------------------------- timeouts


def test_query_wait_timeout_fails_waiters_at_their_deadline_and_names_a_hold() -> None:
    state = make(1)
    warm(state, 1)
    state.on_request(FakeWaiter("holder"), T0)
    state.on_hold("m")
    state.on_request(FakeWaiter("early"), T0)
    state.on_request(FakeWaiter("held", "m"), T0 + 5)
    assert show(state.on_tick(T0 + 9.999)) == ""
    d = state.on_tick(T0 + 10)
    assert show(d) == "fail early PoolTimeout"
    assert "pool_size=1" in d.fail[0][1].message
    d = state.on_tick(T0 + 15)
    assert show(d) == "fail held PoolTimeout" and "being migrated" in d.fail[0][1].message
    assert repr(state) == snapshot(state, 0, 1, 0)


def test_reserve_pool_opens_only_after_reserve_pool_timeout() -> None:
    state = make(1, reserve_pool=1, reserve_pool_timeout=5.0)
    warm(state, 1)
    state.on_request(FakeWaiter("holder"), T0)
    assert show(state.on_request(FakeWaiter("w"), T0)) == ""
    assert show(state.on_tick(T0 + 4.99)) == ""
    assert show(state.on_tick(T0 + 5)) == "open #2"
    assert repr(state) == snapshot(state, 1, 1, 0, login=1)


def test_idle_servers_close_after_server_idle_timeout_keeping_min_pool_size() -> None:
    state = make(3, min_pool_size=1, server_idle_timeout=60.0)
    warm(state, 3)
    assert show(state.on_tick(T0 + 59)) == ""
    assert show(state.on_tick(T0 + 60)) == ("close #1 (idle for server_idle_timeout (60s)); "
                                            "close #2 (idle for server_idle_timeout (60s))")
    assert repr(state) == snapshot(state, 0, 0, 1)


def test_server_lifetime_closes_a_server_on_release_and_when_idle() -> None:
    state = make(2, server_lifetime=100.0, server_idle_timeout=0.0)
    s1, s2 = warm(state, 2)
    state.on_request(FakeWaiter("a"), T0)
    assert show(state.on_release(s2, T0 + 100)) == "close #2 (older than server_lifetime (100s))"
    assert show(state.on_tick(T0 + 100)) == "close #1 (older than server_lifetime (100s))"
    assert repr(state) == snapshot(state, 0, 0, 0)
    assert s1.state is ServerState.CLOSED


def test_min_pool_size_is_filled_only_when_asked_and_not_during_a_backoff() -> None:
    state = make(3, min_pool_size=2)
    assert show(state.on_tick(T0, fill=False)) == ""
    d = state.on_tick(T0)
    assert show(d) == "open #1; open #2"
    assert show(state.on_connect_failed(d.open[0], ServerUnavailable("down"), T0)) == (
        "retry in 0.25s")
    assert show(state.on_connect_failed(d.open[1], ServerUnavailable("down"), T0)) == ""
    assert show(state.on_tick(T0 + 0.2)) == ""
    assert show(state.on_tick(T0 + 0.25)) == "open #3; open #4"


# ---------------------------------------------------------------------- backend failures


def test_a_failed_round_backs_off_once_then_one_probe_connects_at_a_time() -> None:
    state = make(4)
    waiters = [FakeWaiter(f"w{i}") for i in range(4)]
    opened = [state.on_request(w, T0).open[0] for w in waiters]
    assert repr(state) == snapshot(state, 4, 0, 0, login=4)
    down = ServerUnavailable("connection refused")
    assert [show(state.on_connect_failed(s, down, T0)) for s in opened] == [
        "retry in 0.25s", "", "", ""]  # one round, one delay
    assert repr(state) == snapshot(state, 4, 0, 0, flags=" failing")
    assert show(state.on_tick(T0 + 0.2)) == ""  # backing off
    (probe,) = state.on_retry(T0 + 0.25).open  # the backend failed: one probe only
    assert repr(state) == snapshot(state, 4, 0, 0, login=1, flags=" failing")
    assert show(state.on_connect_failed(probe, down, T0 + 0.3)) == "retry in 0.5s"
    (probe,) = state.on_retry(T0 + 0.8).open
    d = state.on_connected(probe, T0 + 0.9)
    assert show(d) == "w0 <- #6; open #7; open #8; open #9"  # back: the rest follow at once
    assert (state.backoff, state.retry_at) == (0.25, 0.0)
    assert repr(state) == snapshot(state, 3, 1, 0, login=3)


def test_a_straggler_of_an_earlier_round_does_not_grow_the_backoff() -> None:
    state = make(2)
    s1 = state.on_request(FakeWaiter("a"), T0).open[0]
    s2 = state.on_request(FakeWaiter("b"), T0).open[0]
    down = ServerUnavailable("connection refused")
    assert state.on_connect_failed(s1, down, T0).retry_in == 0.25
    assert show(state.on_retry(T0 + 0.25)) == ""  # round 1's other connect is the probe
    assert state.on_connect_failed(s2, down, T0 + 0.3).retry_in is None
    (s3,) = state.on_retry(T0 + 0.3).open
    assert state.on_connect_failed(s3, down, T0 + 0.4).retry_in == 0.5


def test_waiters_fail_after_server_connect_timeout_while_nothing_is_usable() -> None:
    state = make(1, server_connect_timeout=3.0)
    s1 = state.on_request(FakeWaiter("a"), T0).open[0]
    state.on_request(FakeWaiter("b"), T0 + 2)
    state.on_connect_failed(s1, ServerUnavailable("backend is down"), T0)
    state.on_retry(T0 + 0.25)
    d = state.on_tick(T0 + 3)
    assert show(d) == "fail a ServerUnavailable"
    assert "backend is down" in d.fail[0][1].message and "keeps retrying" in d.fail[0][1].message
    assert repr(state) == snapshot(state, 1, 0, 0, login=1, flags=" failing")


def test_a_lost_server_leaves_its_container_and_a_waiter_gets_a_replacement() -> None:
    state = make(1)
    (s1,) = warm(state, 1)
    state.on_request(FakeWaiter("a"), T0)
    assert show(state.on_request(FakeWaiter("b"), T0)) == ""
    s1.closed = True
    assert show(state.on_lost(s1, T0 + 1)) == "open #2"
    assert s1.state is ServerState.CLOSED and state.held == {}
    assert show(state.on_release(s1, T0 + 2)) == "close #1"  # its client finishes: closed
    assert repr(state) == snapshot(state, 1, 0, 0, login=1)


# ---------------------------------------------------------------------- reset and discard


def test_reset_holds_the_server_until_it_is_released_or_discarded() -> None:
    state = make(2)
    s1, s2 = warm(state, 2)
    state.on_request(FakeWaiter("a"), T0)
    state.on_request(FakeWaiter("b"), T0)
    state.on_request(FakeWaiter("c"), T0)
    state.on_reset(s2)
    assert repr(state) == snapshot(state, 1, 1, 0, reset=1)
    assert show(state.on_release(s2, T0 + 1)) == "c <- #2"  # the rollback was clean
    assert show(state.on_discard(s1, T0 + 2)) == "close #1"  # no waiter: nothing opened
    assert repr(state) == snapshot(state, 0, 1, 0)


# ---------------------------------------------------------------------- resize


def test_a_lowered_pool_size_closes_idle_servers_at_once_and_busy_ones_on_release() -> None:
    state = make(4)
    _, _, s3, s4 = warm(state, 4)
    state.on_request(FakeWaiter("a"), T0)
    state.on_request(FakeWaiter("b"), T0)  # #4 and #3 busy
    d = state.on_resize(Limits(pool_size=1, reserve_pool=1), T0 + 1)
    assert show(d) == "close #1 (above pool_size (1) + reserve_pool (1)); close #2 (above " \
        "pool_size (1) + reserve_pool (1))"
    assert repr(state) == snapshot(state, 0, 2, 0)
    state.on_resize(Limits(pool_size=1), T0 + 1)
    assert show(state.on_release(s4, T0 + 2)) == "close #4 (above pool_size (1) + " \
        "reserve_pool (0))"
    assert show(state.on_release(s3, T0 + 3)) == ""
    assert repr(state) == snapshot(state, 0, 0, 1)


def test_a_raised_pool_size_opens_for_the_waiters() -> None:
    state = make(1)
    warm(state, 1)
    state.on_request(FakeWaiter("a"), T0)
    state.on_request(FakeWaiter("b"), T0)
    state.on_request(FakeWaiter("c"), T0)
    assert show(state.on_resize(Limits(pool_size=2), T0 + 1)) == "open #2"
    assert show(state.on_resize(Limits(pool_size=5), T0 + 1)) == "open #3"  # only 2 wait
    assert repr(state) == snapshot(state, 2, 1, 0, login=2)


# ---------------------------------------------------------------------- pause and close


def test_pause_closes_idle_servers_hands_out_nothing_and_drains_on_the_last_release() -> None:
    state = make(3)
    *_, s3 = warm(state, 3)
    state.on_request(FakeWaiter("a"), T0)
    d = state.on_pause(T0)
    assert show(d) == "close #1; close #2"  # still busy: not drained
    assert show(state.on_request(FakeWaiter("b"), T0)) == ""
    assert repr(state) == snapshot(state, 1, 1, 0, flags=" paused")
    assert show(state.on_release(s3, T0 + 1)) == "close #3; drained"
    assert repr(state) == snapshot(state, 1, 0, 0, flags=" paused")
    assert show(state.on_resume(T0 + 2)) == "open #4"
    assert repr(state) == snapshot(state, 1, 0, 0, login=1)


def test_close_fails_waiters_closes_all_but_active_servers_and_refuses_requests() -> None:
    state = make(3)
    _, s2, s3 = warm(state, 3)
    state.on_request(FakeWaiter("a"), T0)
    state.on_reset(s3)
    state.on_request(FakeWaiter("b"), T0)
    state.on_request(FakeWaiter("c"), T0)
    assert show(state.on_request(FakeWaiter("d"), T0)) == ""
    assert repr(state) == snapshot(state, 1, 2, 0, reset=1)
    d = state.on_close()
    assert show(d) == "close #3; fail d PoolClosed"  # active ones: their clients close them
    assert repr(state) == snapshot(state, 0, 2, 0, flags=" closed")
    assert show(state.on_release(s2, T0 + 1)) == "close #2"
    with pytest.raises(PoolClosed, match="'app' is shutting down"):
        state.on_request(FakeWaiter("late"), T0 + 2)


def test_last_connect_error_is_the_latest_failure_and_clears_on_success() -> None:
    state = make(1)
    s1 = state.on_request(FakeWaiter("a"), T0).open[0]
    error = ServerUnavailable("connection refused")
    state.on_connect_failed(s1, error, T0)
    assert state.last_connect_error is error
    (s2,) = state.on_retry(T0 + 1).open
    assert show(state.on_connected(s2, T0 + 1)) == "a <- #2"
    assert state.last_connect_error is None
