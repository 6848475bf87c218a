"""In-process cost of one transaction through ``Session`` and ``Pool``: no sockets, no loop.

A real ``session.Session`` over a real ``pool.Pool`` (one server, never connected: its
transport is a recorder), driven the way the client connection drives it: the client's
``pgbench -S`` Query (``client_data``), then Postgres's replies (``server_data``). So each
transaction runs the whole server round trip of ``session.py``: ``_request_server`` ->
``pool.acquire`` -> ``_attach`` -> ``Link.attach`` ... ``Link.detach`` -> ``_maybe_release``
-> ``pool.release``. ``--profile`` prints cProfile's figures of the pool and session
functions per transaction (deterministic call counts; its times carry cProfile's overhead).

Usage: ``python -m benchmarks.session_loop [-n N] [--repeat R] [--profile]``; prints CPU µs
per transaction, best of R runs of N (issue 16, lever 4: keeping a server attached between
transactions).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from functools import partial
from typing import Any

from pgtenant import build_kind
from pgtenant.config import Config, DatabaseConfig, Dsn
from pgtenant.errors import ProxyError
from pgtenant.pool import Pool
from pgtenant.protocol import codec
from pgtenant.protocol.tracker import Link
from pgtenant.server import ServerConnection, ServerState
from pgtenant.session import Session
from pgtenant.stats import LabelStats, TenantStats

from .tracker_loop import _SELECT, _make_link, _replies, _simple_case

__all__ = ["main"]


class _Transport:
    """A socket that takes everything (the client's, or a server's)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.sent.extend(chunks)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Client:
    peer_host = "bench"
    user = "bench"
    database = "app"
    writing_paused = False

    def fail(self, error: ProxyError) -> None:
        raise AssertionError(error.message)

    def close(self, reason: str) -> None:
        raise AssertionError(reason)

    def log_fields(self, **more: object) -> dict[str, dict[str, object]]:
        return {}


class _Registry:
    def is_revoked(self, token_id: object) -> bool:
        return False


class _Limits:
    def pin(self, key: object, delta: int) -> None:
        pass

    def may_pin(self, key: object) -> bool:
        return True


class _Services:
    stopping = False
    registry: Any = _Registry()
    limits = _Limits()


def _setup() -> tuple[Session, _Transport, list[bytes], bytes]:
    db = DatabaseConfig(name="app", dsn=Dsn(), pool_size=1)
    pool = Pool(db, Config(databases={"app": db}))
    server = ServerConnection(db.dsn, on_lost=pool.server_lost)
    wire = _Transport()
    server.transport = wire  # type: ignore[assignment]
    pool.state._set_state(server, ServerState.IDLE)
    link: Link = _make_link()
    session = Session(_Client(), _Services(), _Transport(),  # type: ignore[arg-type]
                      pool=pool, link=lambda may_pin: link, tenant_key=link.tenant_key,
                      max_servers=0, stats=LabelStats(), tenant_stats=TenantStats())
    queries = [codec.query(_SELECT.format(aid)) for aid in range(1, 1001)]
    for _ in range(2):  # the first one resets nothing; the steady state from the second
        session.client_data(queries[0])
        sent = b"".join(wire.sent)
        wire.sent.clear()
        reply = _replies(link, sent)
        session.server_data(reply)
    assert session.server is None or session.server is server
    return session, wire, queries, reply


def _run(session: Session, wire: _Transport, queries: list[bytes], reply: bytes,
         n: int) -> float:
    sent = wire.sent
    client_data, server_data = session.client_data, session.server_data
    t0 = time.process_time()
    for i in range(n):
        client_data(queries[i % 1000])
        server_data(reply)
        sent.clear()
    return time.process_time() - t0


def _pool_round_trip(session: Session, n: int, *, park: bool = False) -> float:
    pool = session.pool
    acquire = pool.acquire
    # partial: a C-level call, so the parked round trip carries no extra Python frame
    give_back = partial(pool.park, owner=session) if park else pool.release
    t0 = time.process_time()
    for _ in range(n):
        server = acquire(session)
        assert server is not None
        give_back(server)
    return time.process_time() - t0


_WATCHED = ("pool.py", "pool_state.py", "session.py", "cancel.py")


def _profile(session: Session, wire: _Transport, queries: list[bytes], reply: bytes,
             n: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    _run(session, wire, queries, reply, n)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    total_calls = 0
    for (file, _line, name), (_, ncalls, tottime, _cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        total_calls += ncalls
        if file.endswith(_WATCHED):
            rows.append((file.rsplit("/", 1)[-1], name, ncalls / n, tottime / n * 1e6))
    print(f"cProfile, {n} transactions: {total_calls / n:.1f} calls per transaction in all")
    print("| function | calls/txn | tottime µs/txn (cProfile) |")
    print("|---|---|---|")
    for file, name, calls, tot in sorted(rows, key=lambda r: -r[3]):
        print(f"| {file}:{name} | {calls:.2f} | {tot:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="transactions per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best one counts")
    parser.add_argument("--profile", action="store_true", help="cProfile figures too")
    args = parser.parse_args(argv)
    print(f"protocol core: {build_kind()}")
    session, wire, queries, reply = _setup()
    _run(session, wire, queries, reply, min(args.n, 2000))  # warm caches
    best = min(_run(session, wire, queries, reply, args.n) for _ in range(args.repeat))
    print(f"session+pool simple {best / args.n * 1e6:7.2f} µs/transaction "
          f"(best of {args.repeat} x {args.n})")
    # The same transaction through the Link alone (tracker_loop), and the pool's round
    # trip alone (acquire + release of the session's server): what a parked server could
    # spare is at most the difference, of which the round trip is part.
    link_only = _simple_case()
    link_only(min(args.n, 2000))
    best_link = min(link_only(args.n) for _ in range(args.repeat))
    print(f"link alone          {best_link / args.n * 1e6:7.2f} µs/transaction")
    best_pool = min(_pool_round_trip(session, args.n) for _ in range(args.repeat))
    print(f"pool round trip     {best_pool / args.n * 1e6:7.2f} µs/transaction "
          "(pool.acquire + pool.release)")
    if hasattr(session.pool, "park"):  # a build with parking (run against older ones too)
        best_park = min(_pool_round_trip(session, args.n, park=True)
                        for _ in range(args.repeat))
        print(f"parked round trip   {best_park / args.n * 1e6:7.2f} µs/transaction "
              "(pool.acquire of its parked server + pool.park)")
    if args.profile:
        _profile(session, wire, queries, reply, args.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
