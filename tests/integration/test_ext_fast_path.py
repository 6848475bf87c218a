"""The extended batch fast path (issue 16, lever 2) against a real server and proxy.

``Injection.ext_reply``: the backend drops the extended injection's replies with one
comparison against bytes computed once per context (inject.py ``_ext_reply``). A wrong
guess would be safe (the replies are then matched one by one) but slow: this checks, on the
real server, that the guess is what Postgres sends, so a change of ``CTX_SQL`` that changes
its row shows up here.
Then two tenants take turns on ONE pooled server with exactly the batch shapes the fast
path takes (P/B/D/E/S of "", B/D/E/S of a named statement), one of them also sending the
same shape with a statement the guard refuses: each victim's next transaction must see its
own context, rows and role.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv
from pgtenant.identity.context import TenantIdentity, build_context
from pgtenant.protocol import codec
from pgtenant.protocol.inject import (
    CLOSE_UNNAMED_PORTAL,
    CTX_PARSE,
    EXECUTE_UNNAMED,
    Injection,
)

from .conftest import ProxyProcess
from .rawpg import RawPg, describe_portal, errors, rows, sqlstates


async def _exchange(cluster: PostgresCluster, frames: bytes) -> bytes:
    """Log in as the superuser (trusted from 127.0.0.1), send ``frames`` in one write.

    Returns: every byte the server answers up to and including its ReadyForQuery.
    """
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(cluster.host, cluster.port), 10)

    async def frame() -> bytes:
        head = await asyncio.wait_for(reader.readexactly(5), 10)
        return head + await reader.readexactly(int.from_bytes(head[1:5], "big") - 4)

    try:
        writer.write(codec.startup_message([("user", "postgres"), ("database", "app")]))
        while (await frame())[0] != ord("Z"):
            pass
        writer.write(frames)
        out = b""
        while True:
            msg = await frame()
            out += msg
            if msg[0] == ord("Z"):
                return out
    finally:
        writer.close()


@pytest.mark.parametrize(("tenant_type", "settings", "key", "entity"), [
    ("sme", (), None, False),
    ("sme", (("application_name", "pgbench"),), None, False),
    ("agency", (("application_name", "it's"), ("DateStyle", "ISO, DMY")), b"k" * 32, True),
])
async def test_ext_reply_is_what_postgres_answers_to_the_injection(
        pg_cluster: PostgresCluster, demo_env: DemoEnv, tenant_type: str,
        settings: tuple[tuple[str, str], ...], key: bytes | None, entity: bool) -> None:
    identity = TenantIdentity(org_id=uuid.uuid4(), slug="x", tenant_type=tenant_type,
                              token_id=uuid.uuid4(),
                              entity_id=uuid.uuid4() if entity else None)
    inj = Injection(build_context(identity, demo_env.tenant_types[tenant_type]), key,
                    settings)
    got = await _exchange(pg_cluster, CTX_PARSE + inj.ext_bind + EXECUTE_UNNAMED
                          + CLOSE_UNNAMED_PORTAL + codec.sync())
    parse_complete = codec.frame(ord("1"), b"")
    assert got == parse_complete + inj.ext_reply + codec.ready_for_query(b"I"), got


_WHO = "SELECT current_setting('app.tenant_id'), current_user, $1::text"


def _unnamed_batch(sql: str, param: bytes) -> bytes:
    """pgbench -M extended's shape: the one the fast path takes."""
    return (codec.parse("", sql) + codec.bind("", "", [param]) + describe_portal()
            + codec.execute() + codec.sync())


def _named_batch(stmt: str, param: bytes) -> bytes:
    """pgbench -M prepared's shape."""
    return codec.bind("", stmt, [param]) + describe_portal() + codec.execute() + codec.sync()


async def test_tenants_alternating_on_one_server_through_the_fast_path_keep_their_context(
        start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(pool_size=1)
    env = proxy.env
    slugs = ("initech", "umbrella")
    raws = {slug: await RawPg.tenant(proxy, slug) for slug in slugs}
    try:
        for raw in raws.values():  # a named statement each (renamed to a global one)
            msgs = await raw.request(codec.parse("who", _WHO) + codec.sync())
            assert not errors(msgs), msgs
        for i in range(12):
            for slug, raw in raws.items():
                tenant = env.tenants[slug]
                param = f"{slug}-{i}".encode()
                batch = _unnamed_batch(_WHO, param) if i % 2 else _named_batch("who", param)
                msgs = await raw.request(batch)
                assert [m.type for m in msgs] == (["1", "2", "T", "D", "C", "Z"] if i % 2
                                                  else ["2", "T", "D", "C", "Z"]), msgs
                assert rows(msgs) == [[str(tenant.org_id), tenant.role, param.decode()]]
                assert msgs[-1].body == b"I"
            # The attacker's turn, same shape: the guard still judges the Parse text.
            attacker, victim = raws["initech"], raws["umbrella"]
            forged = str(env.tenants["initech"].org_id)  # left in the session, if it could
            msgs = await attacker.request(_unnamed_batch(
                f"SELECT set_config('app.tenant_id', '{forged}', false), $1::text", b"x"))
            assert sqlstates(msgs) and not rows(msgs), msgs
            msgs = await victim.request(_unnamed_batch(_WHO, b"v"))
            assert rows(msgs) == [[str(env.tenants["umbrella"].org_id),
                                   env.tenants["umbrella"].role, "v"]], msgs
            msgs = await attacker.request(_named_batch("who", b"a"))
            assert rows(msgs) == [[str(env.tenants["initech"].org_id),
                                   env.tenants["initech"].role, "a"]], msgs
    finally:
        for raw in raws.values():
            raw.abort()
