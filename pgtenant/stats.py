"""The counters the data path adds to: plain integers and fixed-bucket histograms.

No locks, no label lookups, no allocation per message: one ``LabelStats`` per (database,
tenant type) and one ``TenantStats`` per tenant, held by the objects that count. Prometheus
families are built from them at scrape time (``metrics.py``), so this module imports
nothing and the protocol core may count without depending on the exporter.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CONNECT_BUCKETS", "DURATION_BUCKETS", "WAIT_BUCKETS", "Histogram", "LabelStats",
           "Metrics", "NotifyStats", "TenantStats"]

# Typed tuple[float, ...], not left to inference: compiled by mypyc (setup.py), an inferred
# fixed-length tuple of floats became a native constant that was never set at import.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0)
WAIT_BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)
CONNECT_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)


class Histogram:
    """Fixed buckets; ``observe`` is a short scan from the smallest bound and two additions.

    Buckets are Prometheus's ``le``: ``value`` counts in the first bucket whose bound is
    >= ``value`` (``bisect_left``), or in +Inf past the last bound.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        if not bounds or bounds[0] <= 0.0:  # observe_zero counts in the first bucket
            raise ValueError(f"histogram bounds must start above 0: {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A scan, not bisect_left: the data path's values (a transaction's, a query's
        # seconds) sit in the first few buckets, and compiled (mypyc) the scan compares
        # unboxed floats where bisect boxed the value and called back into Python
        # comparisons (2-2.7 % of the proxy's CPU under pgbench -S, issue 16).
        i = 0
        for bound in self.bounds:
            if value <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.total += value

    def observe_zero(self) -> None:
        """``observe(0.0)``, e.g. a wait for a server that did not wait: the first bucket
        (every bound is above 0, see __init__), and the sum unchanged."""
        self.counts[0] += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Returns: cumulative (le, count) pairs as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def merge(self, other: Histogram) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.total += other.total


class LabelStats:
    """Counters of one (database, tenant type)."""

    __slots__ = ("bytes_received", "bytes_sent", "errors", "function_calls_refused",
                 "logins", "queries", "query_seconds", "server_resets", "temp_resets",
                 "transaction_seconds", "transactions", "wait_seconds")

    def __init__(self) -> None:
        self.transactions = 0
        self.queries = 0
        self.logins = 0
        self.bytes_received = 0  # from clients
        self.bytes_sent = 0  # to clients
        self.function_calls_refused = 0
        self.server_resets = 0  # servers emptied (DISCARD ALL) before this label's use
        self.temp_resets = 0  # servers whose temp objects were emptied (DISCARD TEMP) after
        self.errors: dict[str, int] = {}  # SQLSTATE class -> ErrorResponses sent to clients
        self.transaction_seconds = Histogram(DURATION_BUCKETS)
        self.query_seconds = Histogram(DURATION_BUCKETS)
        self.wait_seconds = Histogram(WAIT_BUCKETS)

    def error(self, sqlstate: str) -> None:
        key = sqlstate[:2]
        self.errors[key] = self.errors.get(key, 0) + 1


class TenantStats:
    """Counters of one tenant (for the top-N series and SHOW TENANTS)."""

    __slots__ = ("transactions", "wait_count", "wait_total")

    def __init__(self) -> None:
        self.transactions = 0
        self.wait_count = 0
        self.wait_total = 0.0


class NotifyStats:
    """Counters of one database's LISTEN/NOTIFY (notify.py, protocol/listen.py)."""

    __slots__ = ("delivered", "dropped_pooled", "dropped_queue_full", "listener_losses")

    def __init__(self) -> None:
        self.delivered = 0  # NotificationResponses sent to clients
        self.dropped_queue_full = 0  # a client's queue was full (protocol/listen.py)
        # NotificationResponses from pooled servers (a LISTEN the guard could not see)
        self.dropped_pooled = 0
        self.listener_losses = 0  # the listener connection was lost (notifications lost)


class Metrics:
    """The process's counters, by label set."""

    def __init__(self, top_tenants: int = 20):
        self.top_tenants = top_tenants
        self.by_label: dict[tuple[str, str], LabelStats] = {}
        self.tenants: dict[tuple[str, str, str], TenantStats] = {}  # (db, type, slug)
        self.auth_failures: dict[str, int] = {}  # reason -> count

    def labels(self, database: str, tenant_type: str) -> LabelStats:
        key = (database, tenant_type)
        stats = self.by_label.get(key)
        if stats is None:
            stats = self.by_label[key] = LabelStats()
        return stats

    def tenant(self, database: str, tenant_type: str, slug: str) -> TenantStats:
        key = (database, tenant_type, slug)
        stats = self.tenants.get(key)
        if stats is None:
            stats = self.tenants[key] = TenantStats()
        return stats

    def auth_failure(self, reason: str) -> None:
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def top(self) -> list[tuple[tuple[str, str, str], TenantStats]]:
        """Returns: the per-tenant series to export: the busiest ``top_tenants`` tenants,
        then one ``other`` entry per (database, type) with the rest summed."""
        ranked = sorted(self.tenants.items(), key=lambda kv: kv[1].transactions, reverse=True)
        out = ranked[: self.top_tenants]
        rest: dict[tuple[str, str, str], TenantStats] = {}
        for (db, ttype, _), stats in ranked[self.top_tenants:]:
            other = rest.setdefault((db, ttype, "other"), TenantStats())
            other.transactions += stats.transactions
            other.wait_count += stats.wait_count
            other.wait_total += stats.wait_total
        return out + list(rest.items())
