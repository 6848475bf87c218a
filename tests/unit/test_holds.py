"""The proxy's side of tenant holds (pgtenant/holds.py) with fake pools and a fake clock."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

from pgtenant.holds import TenantHolds


class FakePool:
    def __init__(self) -> None:
        self.holds: set[object] = set()
        self.busy: dict[object, int] = {}

    def hold(self, key: object) -> None:
        self.holds.add(key)

    def unhold(self, key: object) -> None:
        self.holds.discard(key)

    def running(self, key: object) -> int:
        return self.busy.get(key, 0)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[TenantHolds, list[FakePool], list[tuple[UUID, int]], Clock]:
    pools = [FakePool(), FakePool()]
    acks: list[tuple[UUID, int]] = []

    async def ack(org: UUID, run: int) -> None:
        acks.append((org, run))

    clock = Clock()
    return TenantHolds(lambda: pools, ack, clock), pools, acks, clock


async def test_a_hold_reaches_every_pool_and_a_missing_row_releases_it() -> None:
    holds, pools, _, _ = make()
    org = uuid4()
    holds.update({org: (7, 10.0)})
    assert all(org in p.holds for p in pools)
    holds.update({})
    assert not any(p.holds for p in pools)


async def test_the_runner_is_answered_once_the_tenant_has_nothing_in_flight() -> None:
    holds, pools, acks, _ = make()
    org = uuid4()
    pools[1].busy[org] = 1
    holds.update({org: (7, 10.0)})
    await asyncio.sleep(0.05)
    assert acks == []  # a transaction of it still runs on pool 1
    pools[1].busy[org] = 0
    await asyncio.sleep(0.1)  # looked at again within the drain poll, not a janitor sweep
    assert acks == [(org, 7)]
    holds.update({org: (7, 10.0)})  # a refresh is not a new hold: no second answer
    await asyncio.sleep(0.05)
    assert acks == [(org, 7)]


async def test_a_hold_nobody_refreshes_expires_on_the_proxys_clock() -> None:
    holds, pools, _, clock = make()
    org = uuid4()
    holds.update({org: (7, 3.0)})
    clock.now += 2.9
    holds.check()
    assert org in pools[0].holds
    clock.now += 0.2
    holds.check()
    assert org not in pools[0].holds and holds.held == {}


async def test_a_pool_created_later_holds_the_same_tenants() -> None:
    holds, _, _, _ = make()
    org = uuid4()
    holds.update({org: (1, 5.0)})
    late = FakePool()
    holds.apply_to(late)
    assert late.holds == {org}
