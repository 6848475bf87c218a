"""PgBouncer's timeouts (issue #5) on a real proxy: each ends with a clear ErrorResponse
naming it and a log line. (query_wait_timeout, client_login_timeout and
server_connect_timeout have their own tests in test_pool_release/test_bad_input.)"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest

from .conftest import ProxyProcess


def _backends(proxy: ProxyProcess, app_name: str, needle: str = "") -> list[tuple[int, str]]:
    with psycopg.connect(proxy.env.admin_dsn, autocommit=True) as admin:
        return admin.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE application_name = %s "
            "AND query LIKE '%%' || %s || '%%'", (app_name, needle)).fetchall()


def _named(app_name: str) -> Callable[[str], str]:
    """Config transform: the pool's backends carry ``application_name`` (to find them)."""
    def transform(text: str) -> str:
        start = text.index("[databases.")
        dsn_line = text.index("dsn = ", start)
        end = text.index('"', text.index('"', dsn_line) + 1)
        sep = "&" if "?" in text[dsn_line:end] else "?"
        return text[:end] + f"{sep}application_name={app_name}" + text[end:]
    return transform


def test_query_timeout_cancels_the_query_and_ends_the_client(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="query_timeout = 0.5", transform=_named("pgt_qt"))
    # The client names itself too: in a transaction its backend shows the client's name.
    with psycopg.connect(**proxy.conninfo("acme"), application_name="pgt_qt",
                         autocommit=True) as conn:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="query_timeout") as info:
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 5
        assert info.value.sqlstate in ("57014", None)  # libpq may lose it with the socket
    deadline = time.monotonic() + 5
    while _backends(proxy, "pgt_qt", "pg_sleep(30)"):  # the backend stopped sleeping
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "reason=QueryTimeout sqlstate=57014" in proxy.log()


def test_idle_transaction_timeout_rolls_back_and_ends_the_client(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="idle_transaction_timeout = 0.5")
    conn = psycopg.connect(**proxy.conninfo("acme"))
    conn.execute("SELECT 1")  # psycopg opened a transaction block
    time.sleep(1.2)
    with pytest.raises(psycopg.Error, match="idle_transaction_timeout"):
        conn.execute("SELECT 1")
    conn.close()
    assert "reason=IdleInTransactionTimeout sqlstate=25P03" in proxy.log()
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)  # the pool is fine


def test_client_idle_timeout_ends_idle_clients_only(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="client_idle_timeout = 0.6")
    idle = psycopg.connect(**proxy.conninfo("acme"), autocommit=True)
    busy = psycopg.connect(**proxy.conninfo("initech"), autocommit=True)
    for _ in range(6):
        busy.execute("SELECT 1")
        time.sleep(0.2)
    with pytest.raises(psycopg.Error, match="client_idle_timeout"):
        idle.execute("SELECT 1")
    assert busy.execute("SELECT 1").fetchone() == (1,)
    idle.close()
    busy.close()
    assert "reason=ClientIdleTimeout sqlstate=57P05" in proxy.log()


def test_server_idle_timeout_and_server_lifetime_close_server_connections(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="server_idle_timeout = 0.5", transform=_named("pgt_sit"))
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        assert _backends(proxy, "pgt_sit")
        deadline = time.monotonic() + 5
        while _backends(proxy, "pgt_sit"):
            assert time.monotonic() < deadline, "idle server not closed"
            time.sleep(0.1)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # a new one is opened
    assert "server_idle_timeout" in proxy.log()

    proxy = start_proxy(extra="server_lifetime = 0.5", transform=_named("pgt_life"))
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
        time.sleep(1.0)
        second = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert first != second
    assert "server_lifetime" in proxy.log()
