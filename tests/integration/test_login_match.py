"""Login details real clients rely on, against a real pgtenant and a real Postgres:
the user name must match the token, a person's typo'd token (retried by libpq's
``sslmode=prefer``) is not throttled, and the startup phase answers like Postgres
(application_name, Terminate before startup).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from pgtenant.control.cluster import find_bindir
from pgtenant.protocol import codec
from pgtenant.tls import make_self_signed

from .conftest import ProxyProcess
from .helpers import data_values, login, raw_client, simple_query, wait_for

__all__: list[str] = []

PSQL = str(find_bindir() / "psql")


# ------------------------------------------------------------------------------ user names

async def test_a_user_name_that_is_not_the_tokens_tenant_is_refused_with_28000(
    proxy: ProxyProcess,
) -> None:
    for user in ("initech", "postgres"):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(proxy.dsn("acme", user=user), timeout=10)
        assert info.value.sqlstate == "28000", info.value
        assert f'the token belongs to user "acme", not "{user}"' in str(info.value)
    conn = await asyncpg.connect(proxy.dsn("acme"), timeout=10)  # its own slug: in
    await conn.close()


async def test_any_user_lists_names_accepted_with_every_token(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra='any_user = ["app"]\n')
    env = proxy.env
    conn = await asyncpg.connect(proxy.dsn("acme", user="app"), timeout=10)
    try:  # the token, not the shared user name, decides the tenant
        assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == str(
            env.tenants["acme"].org_id)
    finally:
        await conn.close()
    with pytest.raises(asyncpg.PostgresError) as info:  # another name is still refused
        await asyncpg.connect(proxy.dsn("acme", user="initech"), timeout=10)
    assert info.value.sqlstate == "28000"


async def test_a_refused_user_name_is_logged_escaped_in_json(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra='log_format = "json"\n')
    async with raw_client(proxy) as raw:
        await raw.send(codec.startup_message([("user", "evil\n{\"level\":\"info\"}\u2028"),
                                              ("database", "app")]))
        assert (await raw.read_message())[0] == "R"
        await raw.send(codec.password_message(proxy.env.tenants["acme"].token.encode()))
        msg_type, _ = await raw.read_message()
        assert msg_type == "E"
    await wait_for(lambda: "WrongUser" in proxy.log())
    records = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    refused = [r for r in records if r.get("reason") == "WrongUser"]
    assert refused and refused[0]["user"] == "evil\n{\"level\":\"info\"}\u2028"
    assert not any("\u2028" in line for line in proxy.log().splitlines())


# ------------------------------------------------------------------------------ typos

def _psql(proxy: ProxyProcess, token: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    out = subprocess.run(
        [PSQL, "-X", "-A", "-t", "-c", "SELECT current_setting('app.tenant_id')",
         f"host=127.0.0.1 port={proxy.port} dbname=app user=acme sslmode=prefer"],
        capture_output=True, text=True, timeout=30, env={"PGPASSWORD": token})
    return time.monotonic() - started, out


def test_a_persons_typos_over_sslmode_prefer_are_not_delayed(
    start_proxy: Callable[..., ProxyProcess], tmp_path: Path,
) -> None:
    _, cert, key = make_self_signed(tmp_path / "certs", ("127.0.0.1", "localhost"))
    proxy = start_proxy(extra=(
        "auth_failure_limit = 5\nauth_failure_delay = 3.0\n"
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'))
    good = proxy.env.tenants["acme"].token
    for i in range(3):
        typo = good[:-3] + ("xy" + str(i) if not good.endswith("xy" + str(i)) else "zz0")
        elapsed, out = _psql(proxy, typo)
        assert out.returncode != 0 and "password authentication failed" in out.stderr, out
        assert elapsed < 2.0, (i, elapsed)
    elapsed, out = _psql(proxy, good)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(proxy.env.tenants["acme"].org_id)
    assert elapsed < 2.0, elapsed
    # libpq did retry each typo on a second connection (TLS, then plaintext): two refusals
    # per attempt reached the proxy, and they were counted as one.
    assert proxy.log().count("sqlstate=28P01") == 6, proxy.log()


# ------------------------------------------------------------------------------ startup

async def test_no_application_name_is_reported_and_shown_empty_as_postgres_does(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(codec.startup_message([("user", "acme"), ("database", "app")]))
        assert (await raw.read_message())[0] == "R"
        await raw.send(codec.password_message(proxy.env.tenants["acme"].token.encode()))
        messages = await raw.read_until("Z")
        statuses = dict(codec.parse_parameter_status(body) for t, body in messages if t == "S")
        assert statuses["application_name"] == ""
        reply = await simple_query(raw, "SHOW application_name")
        assert data_values(reply) == [""]
        assert not [body for t, body in reply if t == "S"], reply


async def test_terminate_before_startup_closes_without_an_error(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(codec.terminate())
        assert await raw.at_eof(timeout=3.0)  # b"": closed, and no ErrorResponse first
    async with raw_client(proxy) as raw:  # the proxy is fine
        await login(raw, proxy.env, "acme")
