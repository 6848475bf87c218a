"""``Injection.ext_reply`` against a real server (issue 16, lever 2).

The backend drops the extended injection's replies with one comparison against bytes
computed once per context (inject.py ``_ext_reply``). A wrong guess would be safe (the
replies are then matched one by one) but slow: this checks, on the real server, that the
guess is what Postgres sends, so a change of ``CTX_SQL`` that changes its row shows up here.
"""

from __future__ import annotations

import asyncio
import uuid

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
