"""The runner's ``--concurrency`` is per database server (issue #12): the rollout with fake
pools and servers, no database needed."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

from pgtenant.control.migrations.files import parse_migration
from pgtenant.control.migrations.ledger import FleetRow
from pgtenant.control.migrations.runner import (
    Conn,
    RolloutOptions,
    TargetPlan,
    _rollout,
    _server_key,
    _servers,
)

MIG = parse_migration(Path("0001_x.sql"), "SELECT 1;\n")


class _Conn:
    """Stands in for a connection: takes the failure's log row and drops it."""

    async def execute(self, *args: Any) -> None:
        pass


class _Pool:
    """Stands in for asyncpg.Pool: ``acquire()`` lends a dummy connection."""

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_Conn]:
        yield _Conn()


class _Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))


def _target(slug: str, remote: str | None, size: int) -> TargetPlan:
    row = FleetRow(target=uuid4(), slug=slug, schema=f"t_{slug}", database=remote,
                   size=size, versions={}, last_status=None, last_error=None,
                   last_version=None)
    return TargetPlan(row=row, pending=[MIG], remote=remote)


async def _run(targets: list[TargetPlan], servers: Mapping[str | None, str],
               opts: RolloutOptions, fail: frozenset[str] = frozenset()
               ) -> tuple[Any, Counter[str], int, list[str]]:
    """Returns: the summary, the peak running count per server, the peak in all, and the
    order in which targets started."""
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    total_peak = 0
    started: list[str] = []

    async def work(conn: Conn, central: Conn, target: TargetPlan) -> None:
        nonlocal total_peak
        server = servers[target.remote]
        started.append(target.slug)
        running[server] += 1
        peak[server] = max(peak[server], running[server])
        total_peak = max(total_peak, sum(running.values()))
        # a failing target fails half-way through the others' time, so what runs next to
        # it is still running when it fails
        await asyncio.sleep(0.005 if target.slug in fail else 0.05)
        running[server] -= 1
        if target.slug in fail:
            raise OSError("boom")

    pools = {name: _Pool() for name in servers}
    summary = await _rollout(pools, 1, targets, opts, _Events(), work,  # type: ignore[arg-type]
                             shared_first=True, servers=servers)
    return summary, peak, total_peak, started


async def test_two_servers_run_concurrency_each_and_never_more_on_one() -> None:
    # the control database and database "x" on server a, database "y" on server b
    servers = {None: "a:5432", "x": "a:5432", "y": "b:5432"}
    targets = ([_target(f"a{i}", None if i % 2 else "x", i) for i in range(6)]
               + [_target(f"b{i}", "y", i) for i in range(6)])
    summary, peak, total_peak, _ = await _run(targets, servers,
                                              RolloutOptions(concurrency=2))
    assert summary.status == "done" and len(summary.done) == 12
    assert peak == {"a:5432": 2, "b:5432": 2}  # never more than 2 on one server
    assert total_peak == 4  # but 4 at once over the two


async def test_one_server_keeps_one_global_limit_and_the_size_order() -> None:
    servers = {None: "a:5432", "x": "a:5432"}
    targets = [_target(f"t{i}", None if i % 2 else "x", 10 - i) for i in range(8)]
    summary, peak, total_peak, started = await _run(targets, servers,
                                                    RolloutOptions(concurrency=3))
    assert summary.status == "done"
    assert peak == {"a:5432": 3} and total_peak == 3
    assert started == [f"t{i}" for i in reversed(range(8))]  # smallest first


async def test_max_failures_stops_every_server_and_lists_the_rest_in_wave_order() -> None:
    servers = {None: "a:5432", "y": "b:5432"}
    targets = ([_target(f"a{i}", None, i) for i in range(5)]
               + [_target(f"b{i}", "y", 10 + i) for i in range(5)])
    summary, _, _, started = await _run(targets, servers,
                                        RolloutOptions(concurrency=1, max_failures=1),
                                        fail=frozenset({"a0"}))
    assert summary.status == "stopped"
    assert list(summary.failed) == ["a0"]
    # a0 and b0 started together (one per server); after a0 failed nobody else started
    assert sorted(started) == ["a0", "b0"] and summary.done == ["b0"]
    assert summary.not_started == ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"]


def test_the_server_key_is_host_and_port_of_the_url() -> None:
    assert _server_key("postgresql://u:p@db1:5433/app") == "db1:5433"
    assert _server_key("postgresql://u@db1/other") == "db1:5432"
    # today every other database is reached with --dsn's host and port: one server
    admin = "postgresql://u:p@db1:5433/control"
    others = {"x": "postgresql://u:p@db1:5433/x", "y": "postgresql://u:p@db2:5433/y"}
    assert _servers(admin, others) == {None: "db1:5433", "x": "db1:5433", "y": "db2:5433"}
