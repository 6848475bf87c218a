"""Tokens through a real pgtenant process: JWT logins, revocation within a second, throttling.

One proxy serves the JWT and revocation tests, with a token cache of 60 s so that only the
LISTEN/NOTIFY path can make a revocation take effect in time, and with throttling off so the
deliberate failures here do not slow each other down. The throttling tests start their own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import jwt
import psycopg
import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.control.tenants import issue_token, revoke_token

from .conftest import ProxyProcess

__all__: list[str] = []

SECRET = "integration-test-secret-0123456789abcdef"
# Longer than the cache would allow if only the cache TTL (60 s) made revocations work.
REVOCATION_DEADLINE = 1.5
WRONG_TOKEN_MESSAGE = 'password authentication failed for user "acme"'


@pytest.fixture(scope="module")
def jwt_proxy(demo_env: DemoEnv, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ProxyProcess]:
    extra = ("token_cache_ttl = 60\nauth_failure_delay = 0\n"
             f'[jwt]\nsecret = "{SECRET}"\nissuer = "https://idp.test"\n')
    proc = ProxyProcess(demo_env, tmp_path_factory.mktemp("tokens"), pool_size=2, extra=extra)
    yield proc
    proc.check_invariants(proc.stop())


def make_jwt(env: DemoEnv, slug: str = "acme", **over: Any) -> str:
    tenant = env.tenants[slug]
    claims: dict[str, Any] = {
        "org_id": str(tenant.org_id), "tenant_type": tenant.tenant_type,
        "iss": "https://idp.test", "exp": int(time.time()) + 300, "jti": uuid.uuid4().hex,
    }
    claims.update(over)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, "HS256")


async def connect(proxy: ProxyProcess, token: str, slug: str = "acme") -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(slug, token=token), statement_cache_size=0,
                                 timeout=10)


async def login_error(proxy: ProxyProcess, token: str) -> tuple[str, str]:
    """Returns: (SQLSTATE, message) of a refused login; fails the test if it is accepted."""
    try:
        conn = await connect(proxy, token)
    except asyncpg.PostgresError as exc:
        return exc.sqlstate, str(exc)
    await conn.close()
    raise AssertionError("login was accepted")


# ----------------------------------------------------------------------------- JWT


async def test_jwt_for_acme_logs_in_as_acme_and_sees_only_acme_rows(
    jwt_proxy: ProxyProcess,
) -> None:
    env = jwt_proxy.env
    conn = await connect(jwt_proxy, make_jwt(env))
    try:
        assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == str(
            env.tenants["acme"].org_id)
        rows = await conn.fetch("SELECT name FROM campaigns ORDER BY name")
        assert [r["name"] for r in rows] == env.tenants["acme"].rows["public.campaigns"]
    finally:
        await conn.close()


async def test_jwt_entity_claim_and_per_tenant_schema_are_honoured(
    jwt_proxy: ProxyProcess,
) -> None:
    env = jwt_proxy.env
    agency = next(t for t in env.tenants.values() if t.entities)
    entity = next(iter(agency.entities.values()))
    conn = await connect(jwt_proxy, make_jwt(env, agency.slug, entity_id=str(entity)),
                         agency.slug)
    try:
        assert await conn.fetchval("SELECT current_setting('app.entity_id')") == str(entity)
    finally:
        await conn.close()
    enterprise = next(t for t in env.tenants.values() if t.schema)
    conn = await connect(jwt_proxy, make_jwt(env, enterprise.slug), enterprise.slug)
    try:
        rows = await conn.fetch("SELECT name FROM projects ORDER BY name")
        assert [r["name"] for r in rows] == enterprise.rows[f"{enterprise.schema}.projects"]
    finally:
        await conn.close()


async def test_a_jwt_is_refused_under_another_tenants_user_name(
    jwt_proxy: ProxyProcess,
) -> None:
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect(jwt_proxy, make_jwt(jwt_proxy.env, "acme"), "initech")
    assert info.value.sqlstate == "28000"
    assert 'the token belongs to user "acme", not "initech"' in str(info.value)


async def test_bad_jwts_fail_exactly_like_a_wrong_opaque_token(jwt_proxy: ProxyProcess) -> None:
    env = jwt_proxy.env
    real = env.tenants["acme"].token
    bad = {
        "wrong opaque token": real[:-4] + ("aaaa" if not real.endswith("aaaa") else "bbbb"),
        "wrong type claim": make_jwt(env, tenant_type="enterprise"),
        "expired": make_jwt(env, exp=int(time.time()) - 10),
        "unknown org": make_jwt(env, org_id=str(uuid.uuid4())),
        "wrong issuer": make_jwt(env, iss="https://evil.test"),
        "bad signature": jwt.encode({"org_id": str(env.tenants["acme"].org_id),
                                     "iss": "https://idp.test",
                                     "exp": int(time.time()) + 60},
                                    SECRET[::-1], "HS256"),
        "alg none": jwt.encode({"org_id": str(env.tenants["acme"].org_id),
                                "exp": int(time.time()) + 60}, None, "none"),
    }
    errors = {kind: await login_error(jwt_proxy, token) for kind, token in bad.items()}
    assert set(errors.values()) == {errors["wrong opaque token"]}, errors
    state, message = errors["wrong opaque token"]
    assert state == "28P01" and message.startswith(WRONG_TOKEN_MESSAGE), errors


# ----------------------------------------------------------------------------- revocation


async def wait_refused(proxy: ProxyProcess, token: str, deadline: float) -> float:
    """Returns: seconds until a new login with ``token`` is refused with 28P01."""
    start = time.monotonic()
    while True:
        try:
            conn = await connect(proxy, token)
        except asyncpg.PostgresError as exc:
            assert exc.sqlstate == "28P01", exc
            return time.monotonic() - start
        await conn.close()
        assert time.monotonic() - start < deadline, "revoked token still accepted"
        await asyncio.sleep(0.05)


async def test_revoked_token_is_refused_and_its_open_session_ended_within_a_second(
    jwt_proxy: ProxyProcess,
) -> None:
    env = jwt_proxy.env
    token_id, token = await issue_token(env.admin_dsn, tenant_slug="acme", label="revoke-me")
    # psycopg (libpq) reports the FATAL error that precedes the close; asyncpg reports only
    # "connection closed in the middle of operation".
    session = await psycopg.AsyncConnection.connect(**jwt_proxy.conninfo("acme", token=token),
                                                    autocommit=True)
    try:
        await session.execute("SELECT 1")  # works, and the login is now cached for 60 s
        assert await revoke_token(env.admin_dsn, token_id)
        revoked_at = time.monotonic()
        await wait_refused(jwt_proxy, token, REVOCATION_DEADLINE)
        with pytest.raises(psycopg.OperationalError) as info:
            await session.execute("SELECT 1")
        assert time.monotonic() - revoked_at < REVOCATION_DEADLINE
        assert info.value.sqlstate == "28P01", info.value
        assert "token revoked" in str(info.value)
        assert session.closed or session.broken
    finally:
        await session.close()
    # Other tenants' tokens are untouched.
    other = await connect(jwt_proxy, env.tenants["acme"].token)
    await other.close()
    assert "revoked: refused from now on" in jwt_proxy.log()


async def test_deleted_token_is_refused_within_a_second(jwt_proxy: ProxyProcess) -> None:
    env = jwt_proxy.env
    token_id, token = await issue_token(env.admin_dsn, tenant_slug="acme", label="delete-me")
    (await connect(jwt_proxy, token)).terminate()
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        await admin.execute("DELETE FROM pgtenant.tokens WHERE id = $1", token_id)
    finally:
        await admin.close()
    await wait_refused(jwt_proxy, token, REVOCATION_DEADLINE)


async def test_revocations_still_arrive_after_the_listener_connection_is_killed(
    jwt_proxy: ProxyProcess,
) -> None:
    env = jwt_proxy.env
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        pids = await admin.fetch("SELECT pid FROM pg_stat_activity "
                                 "WHERE application_name = 'pgtenant-revocations'")
        assert len(pids) == 1
        await admin.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
        deadline = time.monotonic() + 5
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
            "'pgtenant-revocations' AND pid <> $1", pids[0]["pid"]
        ):
            assert time.monotonic() < deadline, "listener did not reconnect"
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    token_id, token = await issue_token(env.admin_dsn, tenant_slug="acme", label="after-drop")
    (await connect(jwt_proxy, token)).terminate()
    await asyncio.sleep(0.2)  # the LISTEN itself follows the connect by a round trip
    assert await revoke_token(env.admin_dsn, token_id)
    await wait_refused(jwt_proxy, token, REVOCATION_DEADLINE)
    assert "revocation listener: reconnected" in jwt_proxy.log()


# ----------------------------------------------------------------------------- throttling


async def timed_login(proxy: ProxyProcess, token: str) -> tuple[float, bool]:
    """Returns: (seconds until the proxy answered, whether the login succeeded)."""
    start = time.monotonic()
    try:
        conn = await connect(proxy, token)
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "28P01", exc
        return time.monotonic() - start, False
    await conn.close()
    return time.monotonic() - start, True


async def test_failures_past_the_limit_are_delayed_but_good_logins_are_not(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="auth_failure_limit = 2\nauth_failure_delay = 1.0")
    good = proxy.env.tenants["acme"].token
    # A script's guesses: each a different token (the same one retried within 2 s would be
    # one attempt, see test_login_match).
    wrongs = [good[:-4] + suffix for suffix in ("aaa1", "aaa2", "aaa3", "aaa4")]
    first, second, third = [await timed_login(proxy, wrong) for wrong in wrongs[:3]]
    assert not (first[1] or second[1] or third[1])
    assert first[0] < 0.5 and second[0] < 0.5, (first, second)
    assert third[0] >= 1.0, third
    # Same address, right token: answered at once (the count is per address, not per login).
    elapsed, ok = await timed_login(proxy, good)
    assert ok and elapsed < 0.5, elapsed
    # ... and a success does not wipe the failures: the next wrong token still waits.
    elapsed, ok = await timed_login(proxy, wrongs[3])
    assert not ok and elapsed >= 1.0, elapsed


async def test_delayed_clients_wait_concurrently_not_in_a_queue(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy(extra="auth_failure_limit = 0\nauth_failure_delay = 1.0")
    wrong = "pgt_" + "x" * 43
    start = time.monotonic()
    results = await asyncio.gather(*(timed_login(proxy, wrong) for _ in range(5)))
    assert all(elapsed >= 1.0 and not ok for elapsed, ok in results), results
    assert time.monotonic() - start < 3.0  # five delays overlapped
