"""The proxy's side of tenant holds: hold a migrating tenant's new transactions in every pool.

The migration runner (``control/migrations/holds.py``) records a hold per tenant whose DDL
is about to run; the registry's listener reads the holds in force (``identity/registry.py``)
and hands them to ``TenantHolds.update``. While a tenant is held, every pool queues its new
transactions as if full (``Pool.hold``; they wait up to ``query_wait_timeout``); its
transactions already running, and pinned sessions, go on. Once none of its transactions is
in flight here, the proxy answers the runner (``Registry.ack_hold``) so the DDL takes its
locks without waiting behind them. A release (the tenant's migration committed or failed)
serves the queued transactions at once.

A hold also ends on this proxy's own clock when its ``seconds_left`` pass without a refresh
(the runner refreshes every few seconds): a runner killed -9, or a listener cut off from the
control database, can delay a tenant by at most the hold's TTL, never stop it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol
from uuid import UUID

__all__ = ["HoldPool", "TenantHolds"]

log = logging.getLogger("pgtenant.holds")
_DRAIN_POLL = 0.02  # seconds between looks at a held tenant's running transactions


class HoldPool(Protocol):
    """What ``TenantHolds`` needs of a pool (``pool.Pool``)."""

    def hold(self, key: object) -> None: ...
    def unhold(self, key: object) -> None: ...
    def running(self, key: object) -> int: ...


class TenantHolds:
    """The holds in force on this proxy; see the module docstring."""

    def __init__(self, pools: Callable[[], Iterable[HoldPool]],
                 ack: Callable[[UUID, int], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pools = pools
        self._ack = ack
        self.clock = clock
        # org id -> (run id, local deadline)
        self.held: dict[UUID, tuple[int, float]] = {}
        self._undrained: set[tuple[UUID, int]] = set()  # holds not answered yet
        self._tasks: set[asyncio.Task[None]] = set()
        self.held_total = 0  # holds applied since start (metrics, tests)
        self._timer: asyncio.TimerHandle | None = None

    def update(self, holds: dict[UUID, tuple[int, float]]) -> None:
        """Make the holds in force exactly ``holds`` (org -> (run id, seconds left))."""
        now = self.clock()
        for org in [o for o in self.held if o not in holds]:
            self._release(org, "released by the migration runner")
        for org, (run_id, seconds_left) in holds.items():
            before = self.held.get(org)
            self.held[org] = (run_id, now + seconds_left)
            if before is None or before[0] != run_id:
                self.held_total += 1
                for pool in self._pools():
                    pool.hold(org)
                self._undrained.add((org, run_id))
                why = (f"migration run {run_id} is changing its schema" if run_id
                       else "it is being dropped")  # run 0: tenant drop (provision.py)
                log.info("tenant org=%s held: %s; its new transactions wait", org, why)
        self.check()

    def apply_to(self, pool: HoldPool) -> None:
        """A pool created after the holds (RELOAD): hold the same tenants there."""
        for org in self.held:
            pool.hold(org)

    def check(self) -> None:
        """Janitor sweep: expire holds nobody refreshed; answer the runner for tenants with
        nothing in flight any more."""
        now = self.clock()
        for org in [o for o, (_, deadline) in self.held.items() if deadline <= now]:
            self._release(org, "expired (its migration runner stopped refreshing it)")
        for org, run_id in list(self._undrained):
            if org not in self.held:
                self._undrained.discard((org, run_id))
            elif not any(pool.running(org) for pool in self._pools()):
                self._undrained.discard((org, run_id))
                task = asyncio.ensure_future(self._ack(org, run_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if self._undrained and self._timer is None:
            # the runner waits for our answer: look again soon, not at the next sweep
            self._timer = asyncio.get_running_loop().call_later(_DRAIN_POLL, self._poll)

    def _poll(self) -> None:
        self._timer = None
        self.check()

    def _release(self, org: UUID, why: str) -> None:
        del self.held[org]
        for pool in self._pools():
            pool.unhold(org)
        log.info("tenant org=%s no longer held: %s", org, why)
