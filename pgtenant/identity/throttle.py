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
- ``delay = 0`` disables throttling; ``limit = 0`` delays every failure;
- a failure is counted per client *attempt*, not per TCP connection: libpq with the default
  ``sslmode=prefer`` (psql, psycopg...) retries a refused login at once on a second
  connection (with TLS, then without), so a person's typo arrived twice and the third typo
  was already delayed. A failure with the same ``attempt`` fingerprint (user, database and
  a hash of the token, from the caller) as the address's previous one, within
  ``retry_window`` seconds of it, is that retry and is not counted again. Guessing scripts
  stay throttled: every new guess has a new fingerprint, and repeating one wrong token is
  still counted once per ``retry_window``.

Memory is bounded: at most ``limit`` timestamps per address and ``max_addresses`` addresses;
when the table is full, expired entries are dropped first, then the oldest addresses.
"""

from __future__ import annotations

from collections import deque

__all__ = ["AuthThrottle"]


class AuthThrottle:
    """Failed-login counter per address; see the module docstring."""

    def __init__(self, limit: int, window: float, delay: float, *,
                 max_addresses: int = 10_000, retry_window: float = 2.0):
        self.limit = limit
        self.window = window
        self.delay = delay
        self.max_addresses = max_addresses
        self.retry_window = retry_window
        # address -> (fingerprint, time, delay it got) of the failure last counted for it:
        # the one a client's immediate retry of the same attempt repeats, and which waits
        # as long as that attempt did, not longer. Keys: a subset of _failures'.
        self._last_attempt: dict[str, tuple[str, float, float]] = {}
        # address -> timestamps of its latest failures (only the last ``limit`` matter:
        # the address is over the limit iff the oldest of them is inside the window).
        self._failures: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def record_failure(self, addr: str, now: float, attempt: str | None = None) -> None:
        """Count one failed login from ``addr`` at ``now``, unless it repeats the previous
        counted failure of ``addr`` (same ``attempt`` fingerprint, within ``retry_window``):
        see the module docstring. ``attempt`` None: always counted.

        Returns: None.
        """
        if self.delay <= 0:
            return  # disabled: keep no state at all
        if self._retry_of(addr, now, attempt) is not None:
            return
        before = self.delay_for(addr, now)  # what this attempt got, for its retry
        times = self._failures.pop(addr, None)
        if times is None:
            if len(self._failures) >= self.max_addresses:
                self._evict(now)
            times = deque(maxlen=max(self.limit, 1))
        times.append(now)
        self._failures[addr] = times  # re-inserted: dict order is least recently failed first
        if attempt is not None:
            self._last_attempt[addr] = (attempt, now, before)
        else:
            self._last_attempt.pop(addr, None)

    def delay_for(self, addr: str, now: float, attempt: str | None = None) -> float:
        """Returns: seconds a failed login from ``addr`` starting at ``now`` must wait (0: none);
        the retry of an attempt (see ``record_failure``) waits what the attempt waited."""
        if self.delay <= 0:
            return 0.0
        retried = self._retry_of(addr, now, attempt)
        if retried is not None:
            return retried
        if self.limit <= 0:
            return self.delay
        times = self._failures.get(addr)
        if times is None or len(times) < self.limit:
            return 0.0
        return self.delay if times[0] > now - self.window else 0.0

    def _retry_of(self, addr: str, now: float, attempt: str | None) -> float | None:
        """Returns: the delay of the counted attempt that ``attempt`` repeats within
        ``retry_window``, or None when it is a new attempt."""
        last = self._last_attempt.get(addr) if attempt is not None else None
        if last is None or last[0] != attempt or now - last[1] > self.retry_window:
            return None
        return last[2]

    def _evict(self, now: float) -> None:
        horizon = now - self.window
        expired = [a for a, t in self._failures.items() if t[-1] <= horizon]
        for addr in expired:
            del self._failures[addr]
            self._last_attempt.pop(addr, None)
        # Still full: forget the addresses whose last failure is oldest (insertion order).
        excess = len(self._failures) - self.max_addresses + 1
        for addr in list(self._failures)[:max(excess, 0)]:
            del self._failures[addr]
            self._last_attempt.pop(addr, None)
