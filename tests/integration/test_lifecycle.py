"""Process lifecycle (issue #5): SIGTERM drains (running transactions finish, up to
shutdown_timeout), SIGINT stops at once. (SIGHUP reloads: see test_admin.)"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from .conftest import ProxyProcess


def test_sigterm_lets_running_transactions_finish_and_ends_idle_clients(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="shutdown_timeout = 20.0")
    running = psycopg.connect(**proxy.conninfo("acme"))
    idle = psycopg.connect(**proxy.conninfo("initech"), autocommit=True)
    idle.execute("SELECT 1")
    results: list[object] = []

    def transaction() -> None:
        try:
            running.execute("SELECT pg_sleep(1.0)")
            results.append(running.execute("SELECT 42").fetchone())
            running.commit()
            results.append("committed")
        except psycopg.Error as exc:
            results.append(exc)

    worker = threading.Thread(target=transaction)
    worker.start()
    time.sleep(0.3)  # the transaction is running
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(psycopg.Error, match="shutting down"):
        idle.execute("SELECT 1")  # idle: ended at once
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**proxy.conninfo("acme"), connect_timeout=2)  # not accepting
    worker.join(10)
    assert results == [(42,), "committed"]  # the running transaction finished
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 10  # left as soon as it was drained
    running.close()
    idle.close()
    assert "draining" in proxy.log()


def test_sigterm_gives_up_after_shutdown_timeout(start_proxy: Callable[..., ProxyProcess]
                                                  ) -> None:
    proxy = start_proxy(extra="shutdown_timeout = 1.0")
    stuck = psycopg.connect(**proxy.conninfo("acme"))
    stuck.execute("SELECT 1")  # a transaction left open, idle
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert 0.9 < time.monotonic() - started < 5
    stuck.close()
    assert "shutdown_timeout reached with 1 transaction(s) still running" in proxy.log()


def test_sigint_stops_at_once(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(extra="shutdown_timeout = 30.0")
    stuck = psycopg.connect(**proxy.conninfo("acme"))
    stuck.execute("SELECT 1")
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGINT)
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 3
    stuck.close()
