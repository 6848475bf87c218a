"""Prometheus metrics (issue #5): the families built at scrape from the counters of stats.py.

The data path only adds to integers and bucket arrays of objects it already holds
(``stats.py``: one ``LabelStats`` per (database, tenant type), one ``TenantStats`` per
tenant): no locks, no label lookups, no allocation per message. ``Collector.collect`` runs
on the event loop thread (the HTTP endpoint is served there too), reads those numbers plus
the pools' and clients' current states, and builds the metric families prometheus-client
renders.

Per-tenant series are limited to the ``top_tenants`` tenants with the most transactions,
plus one ``tenant="other"`` series with the rest, so 10,000 tenants cost a bounded number of
series. (A tenant moving in or out of the top set moves its counts between series, so those
per-tenant counters may step down; the per-type totals never do.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as _CollectorBase

from .pool_state import ServerState
from .stats import Histogram, Metrics, NotifyStats

__all__ = ["Collector", "MetricsSource"]

def _histogram(name: str, doc: str, labels: list[str],
               series: Iterable[tuple[list[str], Histogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in series:
        family.add_metric(values, hist.buckets(), hist.total)
    return family


class _ClientView(Protocol):
    @property
    def database(self) -> str | None: ...
    @property
    def tenant_type(self) -> str | None: ...
    @property
    def metrics_state(self) -> str: ...


class _NotifierView(Protocol):
    @property
    def stats(self) -> NotifyStats: ...
    @property
    def channels(self) -> Sized: ...
    @property
    def up(self) -> bool: ...


class _PoolView(Protocol):
    @property
    def notifier(self) -> _NotifierView: ...
    @property
    def containers(self) -> Mapping[ServerState, Sized]: ...
    @property
    def connect_seconds(self) -> Histogram: ...
    @property
    def waiting_count(self) -> int: ...


class _GuardView(Protocol):
    @property
    def refusals_by_rule(self) -> Mapping[str, int]: ...


class _RegistryView(Protocol):
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...


class MetricsSource(Protocol):
    """What a scrape reads (the App, structurally): metrics.py does not import the app, so
    the layers stay a DAG (app composes metrics, never the other way)."""

    @property
    def metrics(self) -> Metrics: ...
    @property
    def clients(self) -> Iterable[_ClientView]: ...
    @property
    def pools(self) -> Mapping[str, _PoolView]: ...
    @property
    def guard(self) -> _GuardView: ...
    @property
    def registry(self) -> _RegistryView: ...


class Collector(_CollectorBase):
    """Builds every ``pgtenant_*`` family from the running App at scrape time."""

    def __init__(self, app: MetricsSource):
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app, m = self.app, self.app.metrics
        lbl = ["database", "tenant_type"]
        clients = GaugeMetricFamily("pgtenant_client_connections",
                                    "Client connections by state", labels=[*lbl, "state"])
        counts: dict[tuple[str, str, str], int] = {}
        for client in app.clients:
            key = (client.database or "", client.tenant_type or "", client.metrics_state)
            counts[key] = counts.get(key, 0) + 1
        for ckey, n in sorted(counts.items()):
            clients.add_metric(list(ckey), n)
        yield clients

        servers = GaugeMetricFamily("pgtenant_server_connections",
                                    "Server connections by database and state",
                                    labels=["database", "state"])
        connect = []
        for name, pool in app.pools.items():
            for state, members in pool.containers.items():
                servers.add_metric([name, state.value], len(members))
            connect.append(([name], pool.connect_seconds))
        yield servers
        waiting = GaugeMetricFamily("pgtenant_pool_waiting_clients",
                                    "Transactions waiting for a server", labels=["database"])
        for name, pool in app.pools.items():
            waiting.add_metric([name], pool.waiting_count)
        yield waiting
        yield _histogram("pgtenant_server_connect_seconds",
                         "Time to connect and log in to a backend", ["database"], connect)
        yield from _notify_families(app.pools)

        label_items = sorted(m.by_label.items())

        def counter(name: str, doc: str, attr: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=lbl)
            for key, stats in label_items:
                family.add_metric(list(key), getattr(stats, attr))
            return family

        yield counter("pgtenant_transactions", "Transactions (server hold periods) completed",
                      "transactions")
        yield counter("pgtenant_queries", "Client requests (Query or Sync batches) answered",
                      "queries")
        yield counter("pgtenant_client_received_bytes", "Bytes received from clients",
                      "bytes_received")
        yield counter("pgtenant_client_sent_bytes", "Bytes sent to clients", "bytes_sent")
        yield counter("pgtenant_server_resets",
                      "Servers emptied (DISCARD ALL) because another tenant used them last",
                      "server_resets")
        yield counter("pgtenant_temp_resets",
                      "Servers whose session reported temporary objects, emptied (DISCARD "
                      "TEMP) before going back to the pool", "temp_resets")
        yield _histogram("pgtenant_transaction_duration_seconds",
                         "How long a transaction held its server", lbl,
                         ((list(k), s.transaction_seconds) for k, s in label_items))
        yield _histogram("pgtenant_query_duration_seconds",
                         "Time from a client request to its ReadyForQuery", lbl,
                         ((list(k), s.query_seconds) for k, s in label_items))
        yield _histogram("pgtenant_pool_wait_seconds",
                         "Time a transaction waited for a server", lbl,
                         ((list(k), s.wait_seconds) for k, s in label_items))
        errors = CounterMetricFamily(
            "pgtenant_errors", "ErrorResponses from servers and the proxy, by SQLSTATE class",
            labels=[*lbl, "sqlstate_class"])
        for (db, ttype), stats in label_items:
            for cls, n in sorted(stats.errors.items()):
                errors.add_metric([db, ttype, cls], n)
        yield errors

        auth = CounterMetricFamily("pgtenant_auth_failures", "Failed logins by reason",
                                   labels=["reason"])
        for reason, n in sorted(m.auth_failures.items()):
            auth.add_metric([reason], n)
        yield auth
        refusals = CounterMetricFamily("pgtenant_guard_refusals",
                                       "Statements refused by the statement guard, by rule",
                                       labels=["rule"])
        by_rule = dict(app.guard.refusals_by_rule)
        fcalls = sum(s.function_calls_refused for _, s in label_items)
        if fcalls:
            by_rule["function_call_message"] = fcalls
        for rule, n in sorted(by_rule.items()):
            refusals.add_metric([rule], n)
        yield refusals
        tokens = CounterMetricFamily("pgtenant_token_cache_requests",
                                     "Token and organisation lookups, by cache result",
                                     labels=["result"])
        tokens.add_metric(["hit"], app.registry.hits)
        tokens.add_metric(["miss"], app.registry.misses)
        yield tokens

        tlbl = [*lbl, "tenant"]
        top = m.top()
        tenant_txn = CounterMetricFamily(
            "pgtenant_tenant_transactions",
            "Transactions per tenant (busiest tenants, the rest as tenant=\"other\")",
            labels=tlbl)
        tenant_wait = CounterMetricFamily(
            "pgtenant_tenant_pool_wait_seconds",
            "Total time each tenant's transactions waited for a server", labels=tlbl)
        for tkey, tstats in top:
            tenant_txn.add_metric(list(tkey), tstats.transactions)
            tenant_wait.add_metric(list(tkey), tstats.wait_total)
        yield tenant_txn
        yield tenant_wait


def _notify_families(pools: Mapping[str, _PoolView]) -> Iterator[Metric]:
    """LISTEN/NOTIFY (notify.py): the listener connections, the server channels they
    listen to, and what became of the notifications."""
    listeners = GaugeMetricFamily("pgtenant_notify_listeners",
                                  "Listener connections logged in (0 or 1 per database)",
                                  labels=["database"])
    channels = GaugeMetricFamily("pgtenant_notify_channels",
                                 "Server channels the listener listens to (tenant channels "
                                 "some client listens to)", labels=["database"])
    delivered = CounterMetricFamily("pgtenant_notifications_delivered",
                                    "NotificationResponses sent to clients",
                                    labels=["database"])
    dropped = CounterMetricFamily(
        "pgtenant_notifications_dropped",
        "Notifications not delivered: a client's queue was full (queue_full), or one arrived "
        "on a pooled server (pooled_server: a LISTEN the guard could not see)",
        labels=["database", "reason"])
    losses = CounterMetricFamily("pgtenant_notify_listener_losses",
                                 "Listener connections lost (notifications sent until it "
                                 "reconnected are lost)", labels=["database"])
    for name, pool in sorted(pools.items()):
        notifier = pool.notifier
        stats = notifier.stats
        listeners.add_metric([name], 1 if notifier.up else 0)
        channels.add_metric([name], len(notifier.channels))
        delivered.add_metric([name], stats.delivered)
        dropped.add_metric([name, "queue_full"], stats.dropped_queue_full)
        dropped.add_metric([name, "pooled_server"], stats.dropped_pooled)
        losses.add_metric([name], stats.listener_losses)
    yield from (listeners, channels, delivered, dropped, losses)
