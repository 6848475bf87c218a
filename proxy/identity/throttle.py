"""Throttling of repeated login failures per client address (sans clock, sans I/O).

Owns the bookkeeping only: which address failed when, and how long its next failed login
must wait before it is answered. The caller passes ``now`` (``time.monotonic()``) and does
the waiting (``client.py``).

Semantics (``limit``, ``window``, ``delay`` are ``auth_failure_limit``,
``auth_failure_window``, ``auth_failure_delay``):

- an address is *over the limit* while it has ``limit`` or more failures in the last
  ``window`` seconds; a login attempt that starts while its address is over the limit and
  then fails is answered only after ``delay`` seconds. With ``limit = 2`` the first two wrong
  tokens are answered at once and every further one (within the window) waits;
- a successful login is never delayed and does not reset the count. Tokens carry 256 bits
  (or a signature), so the delay is not what stops guessing; it bounds how fast one address
  can burn lookups and fill the log, and must not slow a healthy application that shares an
  address (NAT, one host) with a misconfigured one. Not resetting on success keeps a client
  that holds one valid token from laundering its failures;
- ``delay = 0`` disables throttling; ``limit = 0`` delays every failure.

Memory is bounded: at most ``limit`` timestamps per address and ``max_addresses`` addresses;
when the table is full, expired entries are dropped first, then the oldest addresses.
"""

from __future__ import annotations

from collections import deque

__all__ = ["AuthThrottle"]


class AuthThrottle:
    """Failed-login counter per address; see the module docstring."""

    def __init__(self, limit: int, window: float, delay: float, *,
                 max_addresses: int = 10_000):
        self.limit = limit
        self.window = window
        self.delay = delay
        self.max_addresses = max_addresses
        # address -> timestamps of its latest failures (only the last ``limit`` matter:
        # the address is over the limit iff the oldest of them is inside the window).
        self._failures: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def record_failure(self, addr: str, now: float) -> None:
        """Count one failed login from ``addr`` at ``now``.

        Returns: None.
        """
        if self.delay <= 0:
            return  # disabled: keep no state at all
        times = self._failures.pop(addr, None)
        if times is None:
            if len(self._failures) >= self.max_addresses:
                self._evict(now)
            times = deque(maxlen=max(self.limit, 1))
        times.append(now)
        self._failures[addr] = times  # re-inserted: dict order is least recently failed first

    def delay_for(self, addr: str, now: float) -> float:
        """Returns: seconds a failed login from ``addr`` starting at ``now`` must wait (0: none)."""
        if self.delay <= 0:
            return 0.0
        if self.limit <= 0:
            return self.delay
        times = self._failures.get(addr)
        if times is None or len(times) < self.limit:
            return 0.0
        return self.delay if times[0] > now - self.window else 0.0

    def _evict(self, now: float) -> None:
        horizon = now - self.window
        expired = [a for a, t in self._failures.items() if t[-1] <= horizon]
        for addr in expired:
            del self._failures[addr]
        # Still full: forget the addresses whose last failure is oldest (insertion order).
        excess = len(self._failures) - self.max_addresses + 1
        for addr in list(self._failures)[:max(excess, 0)]:
            del self._failures[addr]
