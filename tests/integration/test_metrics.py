"""Prometheus endpoint (issue #5): /metrics, /healthz, /readyz of a real proxy process,
scraped while real clients work through it, parsed with prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from .conftest import ProxyProcess, free_port
from .helpers import http_get as _get
from .helpers import metric_value as _value
from .helpers import scrape as _scrape


@pytest.fixture
def metered(start_proxy: Callable[..., ProxyProcess]) -> tuple[ProxyProcess, int]:
    port = free_port()
    proxy = start_proxy(pool_size=2, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                                          "top_tenants = 1")
    return proxy, port


def test_metrics_count_what_clients_did(metered: tuple[ProxyProcess, int]) -> None:
    proxy, port = metered
    db = "app"
    before = _scrape(port)
    assert _value(before, "pgtenant_transactions_total") == 0
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as acme:
        for _ in range(5):
            acme.execute("SELECT 1").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            acme.execute("SET ROLE t_hooli")
        with pytest.raises(psycopg.errors.DivisionByZero):
            acme.execute("SELECT 1/0")
        with psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as initech:
            initech.execute("SELECT 1").fetchone()
            during = _scrape(port)  # both connected and idle now
            assert _value(during, "pgtenant_client_connections", database=db,
                          tenant_type="sme", state="idle") == 2
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**proxy.conninfo("acme", token="pgt_not_a_real_token"))
    m = _scrape(port)
    sme = {"database": db, "tenant_type": "sme"}
    assert _value(m, "pgtenant_transactions_total", **sme) == 8  # 5 + SET + 1/0 + initech
    assert _value(m, "pgtenant_queries_total", **sme) == 8
    assert _value(m, "pgtenant_transaction_duration_seconds_count", **sme) == 8
    assert _value(m, "pgtenant_query_duration_seconds_count", **sme) == 8
    assert _value(m, "pgtenant_pool_wait_seconds_count", **sme) == 8
    assert _value(m, "pgtenant_pool_wait_seconds_bucket", le="+Inf", **sme) == 8
    assert _value(m, "pgtenant_client_received_bytes_total", **sme) > 0
    assert _value(m, "pgtenant_client_sent_bytes_total", **sme) > 0
    # initech's one transaction landed on a server acme used: emptied first, once.
    assert _value(m, "pgtenant_server_resets_total", **sme) == 1
    assert _value(m, "pgtenant_guard_refusals_total", rule="variable_set") == 1
    assert _value(m, "pgtenant_errors_total", sqlstate_class="42", **sme) == 1
    assert _value(m, "pgtenant_errors_total", sqlstate_class="22", **sme) == 1
    assert _value(m, "pgtenant_auth_failures_total", reason="invalid_token") == 1
    assert _value(m, "pgtenant_token_cache_requests_total", result="miss") >= 2
    assert _value(m, "pgtenant_server_connect_seconds_count", database=db) >= 1
    assert _value(m, "pgtenant_server_connections", database=db, state="idle") >= 1
    assert _value(m, "pgtenant_client_connections") == 0  # all gone
    # top_tenants = 1: acme has its own series, initech is summed into "other".
    assert _value(m, "pgtenant_tenant_transactions_total", tenant="acme") == 7
    assert _value(m, "pgtenant_tenant_transactions_total", tenant="other") == 1
    assert _value(m, "pgtenant_tenant_transactions_total", tenant="initech") == 0
    assert _value(m, "process_cpu_seconds_total") > 0


def test_health_and_readiness_endpoints(metered: tuple[ProxyProcess, int]) -> None:
    proxy, port = metered
    with psycopg.connect(**proxy.conninfo("acme")) as conn:  # the database gets verified
        conn.execute("SELECT 1")
    assert _get(port, "/healthz")[::2] == (200, "ok\n")
    assert _get(port, "/readyz")[::2] == (200, "ready\n")
    assert _get(port, "/nope")[0] == 404
    assert _get(port, "/metrics", "POST")[0] == 405
    assert _get(port, "/metrics", "HEAD")[0] == 200


def test_readiness_fails_while_a_database_cannot_be_verified(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    port = free_port()
    dead = free_port()  # nothing listens there

    def unreachable(text: str) -> str:
        import re
        return re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{dead}/", text, count=1)

    start_proxy(extra=f'[metrics]\nlisten = "127.0.0.1:{port}"', transform=unreachable)
    status, _, body = _get(port, "/readyz")
    assert status == 503 and "not verified" in body
    assert _get(port, "/healthz")[0] == 200  # alive all the same


def test_dashboard_uses_only_metric_names_the_proxy_exports(
    metered: tuple[ProxyProcess, int],
) -> None:
    import json
    import re
    from pathlib import Path

    proxy, port = metered
    with psycopg.connect(**proxy.conninfo("acme")) as conn:
        conn.execute("SELECT 1")
    body = _get(port, "/metrics")[2]
    exported = set()  # every series name the families may have, samples or not (yet)
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        base = name.removesuffix("_total")
        exported.update(base + s for s in suffixes.get(kind, ("",)))
    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(?:pgtenant|process)_[a-z_]+", e)}
    assert used and not used - exported, sorted(used - exported)
    scrape = (root / "config" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in scrape and "127.0.0.1:9127" in scrape
