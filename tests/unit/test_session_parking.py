"""A real ``Session`` over a real ``Pool`` (no sockets: benchmarks/session_loop.py's rig):
it parks a clean server at the end of a transaction, takes it back at the next one, and
leaves no claim behind when its client goes (issue 16, lever 4)."""

from __future__ import annotations

from benchmarks.session_loop import _run, _setup
from benchmarks.tracker_loop import _replies
from pgtenant.server import ServerState


def test_a_session_parks_its_server_and_takes_it_back() -> None:
    session, wire, queries, reply = _setup()
    pool = session.pool
    (server,) = pool.containers[ServerState.IDLE]
    assert session.server is None  # between transactions: no server attached
    assert pool.state.parked_with(session) is server and server.peer is None
    _run(session, wire, queries, reply, 3)
    assert pool.state.parked_with(session) is server
    assert session.stats.transactions >= 3


def test_a_session_closed_while_parked_leaves_its_server_idle_and_unclaimed() -> None:
    session, _, _, _ = _setup()
    pool = session.pool
    (server,) = pool.containers[ServerState.IDLE]
    session.close()
    assert pool.state.parked_with(session) is None
    assert server.state is ServerState.IDLE and not pool.state._parked


def test_a_session_does_not_park_while_another_client_waits() -> None:
    session, wire, queries, _ = _setup()
    pool = session.pool
    other = _setup()[0]  # a second session on another pool: re-aimed at this one
    other.pool = pool
    session.client_data(queries[1])  # takes its parked server back
    assert session.server is not None
    other.client_data(queries[2])  # nobody idle: it waits
    assert other.waiting
    sent = b"".join(wire.sent)
    wire.sent.clear()
    session.server_data(_replies(session.link, sent))
    # Given back while someone waits: handed over, not parked.
    assert pool.state.parked_with(session) is None
    assert other.server is not None and not other.waiting
