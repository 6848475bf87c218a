"""Property: whatever hostile message sequences three tenants send at once through one proxy,
every statement runs as its own sender, and every reply goes to its own sender.

Hypothesis draws, per client (acme and initech: SME, same role; hooli: own schema and role),
a short program of protocol actions: simple Queries of several statements, pipelined
extended batches with errors mid-batch (1/0), skipped Parses, Flush, BEGIN/COMMIT/ROLLBACK
in various positions, COPY out and in, stray copy messages outside COPY, cancel requests
and abrupt disconnects. The three programs run concurrently through a proxy with two
servers against the real Postgres.

Every generated statement of client X calls ``pgtest.mark('<X>:<n>')``, a SECURITY DEFINER
function (created by the admin) that records (tag, app.tenant_id, caller's role) in
``pgtest.marks`` and returns ``tag|tenant_id``. Checked after each example:

1. every row of ``pgtest.marks`` tagged by X carries X's tenant id and X's role: never
   ``''``, another tenant's, or the login role (rolled-back marks vanish; that is fine);
2. every DataRow / CopyData any client received carries only its own tags, each with its
   own tenant id.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgtenant.control.demo import DemoEnv

from . import rawpg
from .conftest import ProxyProcess
from .rawpg import Msg, RawPg

CLIENTS = ("acme", "initech", "hooli")
STATS = {"marks": 0, "replies": 0, "troubles": 0}  # across examples: the test exercised something
READ_TIMEOUT = 4.0
TAG = re.compile(r"(acme|initech|hooli):(\d+)\|([0-9a-f-]*)")

SETUP = (
    "CREATE SCHEMA IF NOT EXISTS pgtest",
    "CREATE TABLE IF NOT EXISTS pgtest.marks (tag text, tenant text, usr text, "
    "ts timestamptz DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS pgtest.sink (line text)",
    # The caller's role is a parameter default: defaults are evaluated in the caller's
    # context, while inside a SECURITY DEFINER body current_user is the owner.
    """
    CREATE OR REPLACE FUNCTION pgtest.mark(tag text, usr text DEFAULT current_user)
    RETURNS text LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
        INSERT INTO pgtest.marks (tag, tenant, usr)
        VALUES (tag, current_setting('app.tenant_id', true), usr);
        SELECT tag || '|' || coalesce(current_setting('app.tenant_id', true), '');
    $$
    """,
    "GRANT USAGE ON SCHEMA pgtest TO PUBLIC",
    "GRANT EXECUTE ON FUNCTION pgtest.mark(text, text) TO PUBLIC",
    "GRANT INSERT ON pgtest.sink TO PUBLIC",
)


@pytest.fixture
def hostile_proxy(demo_env: DemoEnv,
                  start_proxy: Callable[..., ProxyProcess]) -> Iterator[ProxyProcess]:
    async def setup() -> None:
        admin = await asyncpg.connect(demo_env.admin_dsn)
        try:
            for sql in SETUP:
                await admin.execute(sql)
            await admin.execute("TRUNCATE pgtest.marks")
        finally:
            await admin.close()

    asyncio.run(setup())
    yield start_proxy(pool_size=2, extra="auth_failure_delay = 0.0")


# ------------------------------------------------------------------------------ programs

SIMPLE_PART = st.sampled_from(["mark", "mark", "BEGIN", "COMMIT", "ROLLBACK", "SELECT 1/0",
                               "SAVEPOINT s", "ROLLBACK TO s"])
EXT_PART = st.sampled_from(["pbe", "pbe", "named", "rebind", "err", "skip", "bind_unnamed",
                            "flush", "begin", "commit", "rollback", "describe"])
QUERY = st.tuples(st.just("query"), st.lists(SIMPLE_PART, min_size=1, max_size=4))
EXT = st.tuples(st.just("ext"), st.lists(EXT_PART, min_size=1, max_size=6))
STRAY = st.tuples(st.just("stray"), st.sampled_from(["d", "c", "f"]))
SLEEP = st.tuples(st.just("sleep_query"), st.just(None))
ACTION = st.one_of(
    QUERY, EXT, STRAY,
    # Several requests in ONE write, the proxy sees them all at once.
    st.tuples(st.just("pipeline"), st.lists(st.one_of(QUERY, EXT, STRAY, SLEEP), min_size=2,
                                            max_size=4)),
    st.tuples(st.just("copy_out"), st.just(None)),
    st.tuples(st.just("copy_in"),
              st.sampled_from(["done", "fail", "sync_inside", "ext", "ext_fail"])),
    st.tuples(st.just("cancel"), st.floats(min_value=0, max_value=0.05)),
    SLEEP,
    st.tuples(st.just("disconnect"), st.booleans()),
)
PROGRAMS = st.tuples(*(st.lists(ACTION, min_size=1, max_size=6) for _ in CLIENTS))


@dataclass
class Client:
    slug: str
    raw: RawPg | None = None
    n: int = 0
    named: list[str] = field(default_factory=list)
    received: list[Msg] = field(default_factory=list)
    troubles: list[str] = field(default_factory=list)

    def tag(self) -> str:
        self.n += 1
        return f"{self.slug}:{self.n}"

    def mark(self) -> str:
        return f"SELECT pgtest.mark('{self.tag()}')"


def frames_for(client: Client, action: tuple[str, Any]) -> tuple[list[bytes], int]:
    """Returns: the frames of one action (sent in one write) and the ReadyForQuery count
    that Postgres owes for them."""
    kind, arg = action
    if kind == "pipeline":
        frames, owed = [], 0
        for sub in arg:
            more, n = frames_for(client, sub)
            frames += more
            owed += n
        return frames, owed
    if kind == "query":
        parts = [client.mark() if p == "mark" else p for p in arg]
        return [rawpg.query("; ".join(parts))], 1
    if kind == "sleep_query":
        return [rawpg.query(f"SELECT pg_sleep(0.05), pgtest.mark('{client.tag()}')")], 1
    if kind == "copy_out":
        return [rawpg.query(f"COPY (SELECT pgtest.mark('{client.tag()}')) TO STDOUT")], 1
    if kind == "copy_in" and arg in ("ext", "ext_fail"):
        # Extended COPY FROM STDIN: Postgres ignores the batch's Sync while copying; the
        # Sync after CopyDone/CopyFail earns the one ReadyForQuery.
        end = rawpg.copy_fail("no") if arg == "ext_fail" else rawpg.copy_done()
        return [rawpg.ext("COPY pgtest.sink FROM STDIN"), rawpg.sync(),
                rawpg.copy_data(f"{client.slug}-line\n".encode()), end, rawpg.sync()], 1
    if kind == "copy_in":
        frames = [rawpg.query("COPY pgtest.sink FROM STDIN"),
                  rawpg.copy_data(f"{client.slug}-line\n".encode())]
        if arg == "sync_inside":  # Postgres ignores a Sync during COPY FROM STDIN
            frames.append(rawpg.sync())
        frames.append(rawpg.copy_fail("no") if arg == "fail" else rawpg.copy_done())
        return frames, 1
    if kind == "stray":
        msg = {"d": rawpg.copy_data(b"x\n"), "c": rawpg.copy_done(),
               "f": rawpg.copy_fail("x")}[arg]
        return [msg, rawpg.sync()], 1
    if kind == "ext":
        frames = []
        for part in arg:
            if part == "pbe":
                frames.append(rawpg.ext(client.mark()))
            elif part == "named":
                name = f"s{len(client.named)}"
                client.named.append(name)
                frames += [rawpg.parse(name, client.mark()), rawpg.bind("", name, []),
                           rawpg.execute()]
            elif part == "rebind" and client.named:
                frames += [rawpg.bind("", client.named[-1], []), rawpg.execute()]
            elif part == "err":
                frames.append(rawpg.ext("SELECT 1/0"))
            elif part == "skip":
                frames.append(rawpg.parse("", client.mark()))
            elif part == "bind_unnamed":
                frames += [rawpg.bind("", "", []), rawpg.execute()]
            elif part == "flush":
                frames.append(rawpg.flush())
            elif part == "describe":
                frames.append(rawpg.describe_statement(""))
            elif part in ("begin", "commit", "rollback"):
                frames.append(rawpg.ext(part.upper()))
        frames.append(rawpg.sync())
        return frames, 1
    raise AssertionError(kind)


async def run_client(proxy: ProxyProcess, client: Client,
                     program: list[tuple[str, Any]]) -> None:
    try:
        client.raw = await RawPg.tenant(proxy, client.slug)
    except (TimeoutError, rawpg.LoginFailed, ConnectionError, OSError) as exc:
        client.troubles.append(f"login: {exc!r}")
        return
    raw = client.raw
    for action in program:
        kind, arg = action
        if kind == "disconnect":
            if arg:  # mid-transaction
                raw.send(rawpg.query("BEGIN"), rawpg.query(client.mark()))
            raw.abort()
            return
        if kind == "cancel":
            await asyncio.sleep(float(arg))
            try:
                await raw.cancel(timeout=READ_TIMEOUT)
            except (TimeoutError, ConnectionError, OSError) as exc:
                client.troubles.append(f"cancel: {exc!r}")
            continue
        frames, owed = frames_for(client, action)
        try:
            raw.send(*frames)
            client.received += await raw.until_ready(owed, timeout=READ_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            client.received += await raw.drain_quietly(0.2)
            client.troubles.append(f"{kind}: {exc!r}")
            return
    try:  # leave no transaction open: the next example reuses the servers
        client.received += await raw.request(rawpg.query("ROLLBACK"), timeout=READ_TIMEOUT)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        client.troubles.append(f"final: {exc!r}")


def check_received(env: DemoEnv, client: Client) -> None:
    own_org = str(env.tenants[client.slug].org_id)
    for msg in client.received:
        if msg.type not in "Dd":
            continue
        text = " ".join(v or "" for v in msg.values) if msg.type == "D" else msg.body.decode(
            errors="replace")
        for other in CLIENTS:
            if other != client.slug:
                assert f"{other}:" not in text, (
                    f"{client.slug} received {other}'s reply: {msg!r} {text!r}")
        for slug, _n, tid in TAG.findall(text):
            assert slug == client.slug, text
            assert tid == own_org, (
                f"{client.slug}'s statement ran with tenant id {tid!r}, not {own_org}: {text!r}")


async def run_example(proxy: ProxyProcess,
                      programs: tuple[list[tuple[str, Any]], ...]) -> None:
    env = proxy.env
    clients = [Client(slug) for slug in CLIENTS]
    try:
        await asyncio.wait_for(asyncio.gather(
            *(run_client(proxy, c, p) for c, p in zip(clients, programs, strict=True))), 60)
    finally:
        for c in clients:
            if c.raw is not None:
                await c.raw.close()
    for c in clients:
        check_received(env, c)
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        await asyncio.sleep(0.1)  # an aborted client's last statement may still be running
        marks = await admin.fetch("SELECT tag, tenant, usr FROM pgtest.marks")
        await admin.execute("TRUNCATE pgtest.marks")
    finally:
        await admin.close()
    STATS["marks"] += len(marks)
    STATS["replies"] += sum(len(TAG.findall(repr(c.received))) for c in clients)
    STATS["troubles"] += sum(len(c.troubles) for c in clients)
    for tag, tenant, usr in marks:
        slug = tag.split(":")[0]
        assert usr != env.proxy_role, f"{tag} ran as the login role {usr} (tenant {tenant!r})"
        assert tenant == str(env.tenants[slug].org_id), (
            f"{tag} ran with tenant id {tenant!r} (role {usr})")
        assert usr == env.tenants[slug].role, f"{tag} ran as {usr}"


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs=PROGRAMS)
def test_hostile_sequences_from_three_tenants_never_cross_tenants(
    hostile_proxy: ProxyProcess, programs: tuple[list[tuple[str, Any]], ...],
) -> None:
    asyncio.run(run_example(hostile_proxy, programs))


def test_the_hostile_property_test_exercised_marks() -> None:
    """Runs after the property test (file order): its examples really ran marked
    statements and received their replies, so its assertions were not vacuous."""
    assert STATS["marks"] > 20 and STATS["replies"] > 20, STATS
