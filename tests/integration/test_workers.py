"""``serve --workers N`` (issue #5): N processes on one port (SO_REUSEPORT) under a
supervisor; cancel requests reach the right worker; metrics are summed over workers."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from .conftest import ProxyProcess, free_port
from .helpers import metric_value as _value
from .helpers import scrape as _scrape


@pytest.fixture
def workers(start_proxy: Callable[..., ProxyProcess]) -> tuple[ProxyProcess, int]:
    port = free_port()
    proxy = start_proxy(pool_size=4, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"',
                        args=("--workers", "2"), ready_line="2 workers listening on")
    return proxy, port


def test_workers_share_the_port_and_their_metrics_are_summed(
    workers: tuple[ProxyProcess, int],
) -> None:
    proxy, port = workers
    before = _value(_scrape(port), "pgtenant_transactions_total")
    conns = [psycopg.connect(**proxy.conninfo("acme"), autocommit=True) for _ in range(24)]
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        m = _scrape(port)
        assert _value(m, "pgtenant_client_connections", state="idle") == 24  # both summed
        assert _value(m, "pgtenant_transactions_total") - before == 24
    finally:
        for conn in conns:
            conn.close()
    # The kernel spread the logins over both workers (each log line names its worker).
    workers_seen = set(re.findall(r"pgtenant\.client\[(\d+)\]: login:", proxy.log()))
    assert workers_seen == {"0", "1"}
    status, _, _ = _scrape_status(port, "/readyz")
    assert status == 200


def _scrape_status(port: int, path: str) -> tuple[int, str, str]:
    from .helpers import http_get as _get

    return _get(port, path)


def test_cancel_reaches_the_right_worker_whichever_receives_it(
    workers: tuple[ProxyProcess, int],
) -> None:
    proxy, _ = workers
    for _ in range(16):  # a cancel's new connection lands on either worker
        with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as conn:
            timer = threading.Timer(0.2, conn.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            assert time.monotonic() - started < 5
            timer.join()
    assert "cancel request passed to worker" in proxy.log()


def test_sigterm_stops_every_worker(workers: tuple[ProxyProcess, int]) -> None:
    proxy, _ = workers
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    assert "all workers stopped (exit codes [0, 0])" in proxy.log()


def test_a_worker_that_dies_is_restarted(workers: tuple[ProxyProcess, int]) -> None:
    proxy, _ = workers
    pid = proxy.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 2
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while proxy.log().count("]: pgtenant: listening on") < 3:  # 2 at start, 1 restarted
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        time.sleep(0.1)
    assert "restarting it" in proxy.log()
    for _ in range(6):  # both sockets serve again
        with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
