"""Logs (issue #5): one line per connect/disconnect/error with tenant, database and reason;
JSON objects with log_format = "json"."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import psycopg
import pytest

from .conftest import ProxyProcess


def test_json_log_lines_carry_tenant_database_and_reason(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra='log_format = "json"')
    with psycopg.connect(**proxy.conninfo("acme"), autocommit=True) as conn:
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**proxy.conninfo("acme", token="pgt_wrong"))
    deadline = time.monotonic() + 5
    # Both lines are awaited: the first client's Terminate may be read after the failed login.
    awaited = ('"reason": "client sent Terminate"', '"reason": "AuthFailed"')
    while not all(line in proxy.log() for line in awaited):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = [line for line in proxy.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    login = next(r for r in records if r.get("event") == "login")
    assert (login["tenant"], login["database"], login["tenant_type"]) == ("acme", "app", "sme")
    bye = next(r for r in records if r.get("event") == "disconnect" and r.get("tenant"))
    assert bye["tenant"] == "acme" and bye["reason"] == "client sent Terminate"
    failed = next(r for r in records if r.get("reason") == "AuthFailed")
    assert failed["sqlstate"] == "28P01" and failed["database"] == "app"


def test_text_log_lines_name_tenant_database_and_reason(proxy: ProxyProcess) -> None:
    with psycopg.connect(**proxy.conninfo("initech"), autocommit=True) as conn:
        conn.execute("SELECT 1")
    deadline = time.monotonic() + 5
    while "tenant=initech reason=client sent Terminate" not in proxy.log():
        assert time.monotonic() < deadline  # written once the proxy saw the Terminate
        time.sleep(0.05)
    log = proxy.log()
    assert "login: client=127.0.0.1 user=initech db=app tenant=initech type=sme" in log
    assert "user=initech db=app tenant=initech reason=client sent Terminate" in log
