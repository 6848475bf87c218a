"""Hostile and broken clients on raw sockets against a real pgtenant process (issue #3, item 7).

Truncated, oversized, negative-length and out-of-order messages, a second StartupMessage,
garbage after SSLRequest and slow-loris startups. Every case must end in a clean
ErrorResponse or close; the proxy stays up and other clients are not disturbed. After each
case a fresh asyncpg client must still get its own tenant id; the fixtures' teardown fails
on any traceback in the proxy log. Cases already in test_auth_protocol.py are not repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.protocol import codec
from pgtenant.protocol.constants import PROTOCOL_3_0, SSL_REQUEST_CODE

from .conftest import ProxyProcess
from .helpers import (
    Raw,
    assert_healthy,
    asyncpg_connect,
    data_values,
    error_fields,
    expect_fatal_and_close,
    login,
    raw_client,
    simple_query,
    startup,
)

TENANT_QUERY = "SELECT current_setting('app.tenant_id')"


async def assert_alive_and_healthy(proxy: ProxyProcess) -> None:
    assert proxy.proc.poll() is None, f"pgtenant died:\n{proxy.log()[-4000:]}"
    await assert_healthy(proxy, "initech")


async def assert_session_works(raw: Raw, proxy: ProxyProcess, slug: str = "acme") -> None:
    reply = await simple_query(raw, TENANT_QUERY)
    assert data_values(reply) == [str(proxy.env.tenants[slug].org_id)], reply
    assert reply[-1] == ("Z", b"I")


def errors_in(messages: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    return [error_fields(body) for kind, body in messages if kind == "E"]


# ------------------------------------------------------------------------------ startup


@pytest.mark.parametrize("cut", [1, 3, 7, 12, -1], ids=["1", "3", "7", "12", "all-but-one"])
async def test_truncated_startup_packet_then_close(proxy: ProxyProcess, cut: int) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(startup("acme")[:cut])
    await assert_alive_and_healthy(proxy)


async def test_truncated_password_message_then_close(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(startup("acme"))
        assert (await raw.read_message())[0] == "R"
        await raw.send(codec.password_message(proxy.env.tenants["acme"].token.encode())[:9])
    await assert_alive_and_healthy(proxy)


@pytest.mark.parametrize(
    ("garbage", "sqlstate"),
    [
        (b"\xff" * 8, "08P01"),  # negative length
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "08P01"),  # a 1.2 GB "length"
        (codec.query("SELECT 1"), "08P01"),  # a typed message where a startup packet goes
        (struct.pack("!ii", 8, 0x12345678), "0A000"),  # an unknown request code
        (struct.pack("!ii", 7, PROTOCOL_3_0), "08P01"),  # length below the minimum
    ],
    ids=["negative-length", "http", "typed-message", "unknown-code", "short-length"],
)
async def test_garbage_after_ssl_request_is_refused(proxy: ProxyProcess, garbage: bytes,
                                                    sqlstate: str) -> None:
    async with raw_client(proxy) as raw:
        await raw.send(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert await raw.read_exactly(1) == b"N"
        await raw.send(garbage)
        await expect_fatal_and_close(raw, sqlstate)
    await assert_alive_and_healthy(proxy)


async def test_slow_loris_startups_are_ended_by_the_login_timeout(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    # 2 s, not 1: the health check at the end logs in through this proxy too, and a real
    # login (token check, registry lookup) took over 1 s once on a loaded 2-core box.
    quick = start_proxy(extra="client_login_timeout = 2.0")
    packet = startup("acme")

    async def overlong_then_silent(raw: Raw) -> None:
        # The declared length promises 100 more bytes than ever arrive.
        await raw.send(struct.pack("!i", len(packet) + 100) + packet[4:])

    async def dribble(raw: Raw) -> None:
        for i in range(len(packet) - 1):  # one byte every 0.2 s: never done in time
            await raw.send(packet[i : i + 1])
            await asyncio.sleep(0.2)

    async def declined_ssl_then_silent(raw: Raw) -> None:
        await raw.send(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert await raw.read_exactly(1) == b"N"

    async def half_a_password(raw: Raw) -> None:
        await raw.send(packet)
        assert (await raw.read_message())[0] == "R"
        await raw.send(codec.password_message(quick.env.tenants["acme"].token.encode())[:20])

    async def run(behaviour: Callable[[Raw], object]) -> dict[str, str]:
        async with raw_client(quick) as raw:
            if behaviour is dribble:  # keeps sending while we wait for the verdict
                task = asyncio.ensure_future(dribble(raw))
            else:
                await behaviour(raw)  # type: ignore[misc]
                task = None
            try:
                return await expect_fatal_and_close(raw, "08P01", timeout=4.0)
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                        await task

    started = time.monotonic()
    behaviours = [overlong_then_silent, dribble, declined_ssl_then_silent, half_a_password]
    results = await asyncio.gather(*(run(b) for b in behaviours))
    assert time.monotonic() - started < 4.5  # all four ended by the one timeout, together
    for fields in results:
        assert "client_login_timeout" in fields["M"], fields
    await assert_alive_and_healthy(quick)


# ------------------------------------------------------------------------------ after login


@pytest.mark.parametrize(
    ("msg_type", "length"),
    [(b"P", -1), (b"d", -100_000), (b"S", -(1 << 31)), (b"X", 0), (b"B", 3)],
    ids=["parse-1", "copydata-100000", "sync-min-int", "terminate-0", "bind-3"],
)
async def test_negative_or_short_length_after_login_is_08P01(
    proxy: ProxyProcess, msg_type: bytes, length: int,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        await raw.send(msg_type + struct.pack("!i", length) + b"\x00" * 8)
        fields = await expect_fatal_and_close(raw, "08P01")
        assert str(length) in fields["M"], fields
    await assert_alive_and_healthy(proxy)


async def test_negative_length_in_the_middle_of_a_transaction_is_08P01(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        assert (await simple_query(raw, "BEGIN"))[-1] == ("Z", b"T")
        await raw.send(b"Q" + struct.pack("!i", -7))
        await expect_fatal_and_close(raw, "08P01")
    await assert_alive_and_healthy(proxy)


async def test_parse_with_unterminated_strings_is_08P01_and_close(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:  # the proxy must read a Parse's SQL: it cannot
        await login(raw, proxy.env, "acme")
        await raw.send(codec.frame(ord("P"), b"no terminators here") + codec.sync())
        await expect_fatal_and_close(raw, "08P01")
    await assert_alive_and_healthy(proxy)


@pytest.mark.parametrize(
    "bad",
    [
        codec.frame(ord("B"), b"\x00\x00\x00\x00\x00\x05\x00\x00\x00\x10ab"),  # short params
        codec.frame(ord("E"), b"\x00\x00"),  # Execute without its row count
    ],
    ids=["bind-short-params", "execute-short"],
)
async def test_truncated_extended_messages_get_postgres_error_and_the_session_survives(
    proxy: ProxyProcess, bad: bytes,
) -> None:
    """Frames the proxy only forwards are judged by Postgres: an ERROR, not a disconnect."""
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        await raw.send(bad + codec.sync())
        messages = await raw.read_until("Z")
        errors = errors_in(messages)
        assert len(errors) == 1 and errors[0]["S"] == "ERROR", messages
        assert errors[0]["C"] in ("08P01", "26000"), messages  # malformed / no such statement
        assert messages[-1] == ("Z", b"I")
        await assert_session_works(raw, proxy)
    await assert_alive_and_healthy(proxy)


async def test_second_startup_message_after_login_is_08P01_and_close(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        await raw.send(startup("acme"))
        await expect_fatal_and_close(raw, "08P01", timeout=1.5)


async def test_second_startup_message_after_login_disturbs_no_one(proxy: ProxyProcess) -> None:
    other = await asyncpg_connect(proxy, "initech")
    try:
        async with raw_client(proxy) as raw:
            await login(raw, proxy.env, "acme")
            await raw.send(startup("acme") + startup("initech"))
            assert await other.fetchval(TENANT_QUERY) == str(proxy.env.tenants["initech"].org_id)
    finally:
        await other.close()
    await assert_alive_and_healthy(proxy)


async def test_copy_and_sync_messages_out_of_order_outside_a_transaction(
    proxy: ProxyProcess,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        # Stray copy messages are ignored (as Postgres does); a bare Sync earns one 'Z'.
        await raw.send(codec.frame(ord("d"), b"1\t2\n") + codec.frame(ord("c"), b"")
                       + codec.frame(ord("f"), b"oops\x00") + codec.sync())
        assert await raw.read_message() == ("Z", b"I")
        await raw.send(codec.frame(ord("H"), b"") + codec.sync() + codec.sync())
        assert await raw.read_until("Z") == [("Z", b"I")]
        assert await raw.read_until("Z") == [("Z", b"I")]
        await assert_session_works(raw, proxy)
        # The same in an open transaction: Postgres itself ignores them there.
        assert (await simple_query(raw, "BEGIN"))[-1] == ("Z", b"T")
        await raw.send(codec.frame(ord("d"), b"x") + codec.frame(ord("c"), b""))
        assert (await simple_query(raw, "SELECT 1"))[-1] == ("Z", b"T")
        assert (await simple_query(raw, "COMMIT"))[-1] == ("Z", b"I")
        await assert_session_works(raw, proxy)
    await assert_alive_and_healthy(proxy)


async def test_execute_of_a_portal_that_was_never_bound(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        await raw.send(codec.execute("nosuch") + codec.sync())
        messages = await raw.read_until("Z")
        assert [e["C"] for e in errors_in(messages)] == ["34000"], messages  # no such portal
        assert messages[-1] == ("Z", b"I")
        await assert_session_works(raw, proxy)
    await assert_alive_and_healthy(proxy)


async def test_bind_of_a_statement_never_parsed_gets_postgres_error(proxy: ProxyProcess) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        await raw.send(codec.bind("", "never_parsed", []) + codec.execute() + codec.sync())
        messages = await raw.read_until("Z")
        errors = errors_in(messages)
        assert [e["C"] for e in errors] == ["26000"], messages  # invalid_sql_statement_name
        assert "never_parsed" in errors[0]["M"]
        assert messages[-1] == ("Z", b"I")
        # The session goes on: extended and simple queries both work afterwards.
        await raw.send(codec.parse("", TENANT_QUERY) + codec.bind("", "", [])
                       + codec.execute() + codec.sync())
        messages = await raw.read_until("Z")
        assert data_values(messages) == [str(proxy.env.tenants["acme"].org_id)], messages
        await assert_session_works(raw, proxy)
    await assert_alive_and_healthy(proxy)


async def test_huge_number_of_tiny_pipelined_messages(proxy: ProxyProcess) -> None:
    syncs, queries = 20_000, 2_000
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")

        async def read_replies(count: int) -> list[tuple[str, bytes]]:
            seen = []
            while count:
                msg = await raw.read_message()
                seen.append(msg)
                count -= msg[0] == "Z"
            return seen

        # 20 000 Sync frames (100 kB of 5-byte messages), answered without a server.
        reader = asyncio.ensure_future(read_replies(syncs))
        await raw.send(codec.sync() * syncs)
        assert await asyncio.wait_for(reader, 20) == [("Z", b"I")] * syncs
        # 2 000 pipelined one-row queries, each injected and answered in order.
        reader = asyncio.ensure_future(read_replies(queries))
        await raw.send(b"".join(codec.query(f"SELECT {i}") for i in range(queries)))
        seen = await asyncio.wait_for(reader, 20)
        assert data_values(seen) == [str(i) for i in range(queries)]
        assert not errors_in(seen)
        await assert_session_works(raw, proxy)
    await assert_alive_and_healthy(proxy)


# ------------------------------------------------------------------------------ crowds


def _garbage(rng: random.Random, i: int) -> tuple[bool, bytes]:
    """Returns: (log in first?, bytes) for garbage client ``i``: a mix of every kind."""
    kind = i % 5
    if kind == 0:
        return False, rng.randbytes(rng.randint(1, 200))
    if kind == 1:
        return False, startup("acme")[: rng.randint(1, 30)]
    if kind == 2:
        return True, rng.randbytes(rng.randint(1, 200))
    if kind == 3:  # well-formed frames of random types with random bodies
        frames = b"".join(codec.frame(rng.choice(b"QPBEDCSHdcf?\x00"), rng.randbytes(
            rng.randint(0, 20))) for _ in range(rng.randint(1, 6)))
        return True, frames
    return True, b"Q" + struct.pack("!i", rng.choice([-1, 0, 3, -(1 << 31)]))


async def test_garbage_crowd_does_not_disturb_well_behaved_clients(proxy: ProxyProcess) -> None:
    env = proxy.env
    rng = random.Random(20240607)
    good = [await asyncpg_connect(proxy, slug) for slug in ("acme", "initech") * 2 + ("acme",)]
    slugs = ["acme", "initech"] * 2 + ["acme"]
    stop = asyncio.Event()

    async def well_behaved(conn: object, slug: str) -> int:
        done = 0
        while not stop.is_set() or done < 5:
            value = await conn.fetchval(TENANT_QUERY)  # type: ignore[attr-defined]
            assert value == str(env.tenants[slug].org_id)
            done += 1
        return done

    async def garbage_client(i: int) -> None:
        do_login, data = _garbage(rng, i)
        async with raw_client(proxy) as raw:
            if do_login:
                await login(raw, env, "initech")
            with contextlib.suppress(ConnectionError):
                await raw.send(data)
            # The proxy answers with an ErrorResponse and closes, or waits for more bytes.
            try:
                rest = await asyncio.wait_for(raw.reader.read(), 1.0)
            except (TimeoutError, ConnectionError):
                return
            if rest:
                kinds = set()
                pos = 0
                while len(rest) - pos >= 5:
                    t, length = codec.HEADER.unpack_from(rest, pos)
                    kinds.add(chr(t))
                    pos += 1 + length
                assert kinds <= set("ETDCZINS1234ntsc"), (i, data, rest)

    workers = [asyncio.ensure_future(well_behaved(c, s)) for c, s in zip(good, slugs, strict=True)]
    try:
        await asyncio.gather(*(garbage_client(i) for i in range(50)))
        stop.set()
        counts = await asyncio.wait_for(asyncio.gather(*workers), 20)
        assert all(n >= 5 for n in counts), counts
    finally:
        stop.set()
        for w in workers:
            w.cancel()
        for c in good:
            await c.close()
    await assert_alive_and_healthy(proxy)


# ------------------------------------------------------------------------------ found by fuzzing


@pytest.mark.parametrize("request_frame", [codec.execute(""), codec.frame(ord("D"), b"P\x00")],
                         ids=["execute", "describe"])
async def test_unnamed_portal_without_bind_is_34000_as_from_postgres(
    proxy: ProxyProcess, request_frame: bytes,
) -> None:
    async with raw_client(proxy) as raw:
        await login(raw, proxy.env, "acme")
        await raw.send(request_frame + codec.sync())
        messages = await raw.read_until("Z")
        assert [e["C"] for e in errors_in(messages)] == ["34000"], messages
        await assert_session_works(raw, proxy)


async def test_deeply_nested_query_gets_postgres_answer_not_internal_error(
    demo_env: DemoEnv, tmp_path: Path,
) -> None:
    own = ProxyProcess(demo_env, tmp_path)  # its log is checked here, not in a fixture
    log = ""
    try:
        async with raw_client(own) as raw:
            await login(raw, own.env, "acme")
            reply = await simple_query(raw, 'SELECT 1 AS "temp" WHERE ' + "NOT " * 1000 + "true")
            # Rows, or at worst Postgres's own ERROR (stack depth): never a FATAL from us.
            assert reply[-1][0] == "Z", reply
            assert all(e["S"] == "ERROR" for e in errors_in(reply)), reply
            await assert_session_works(raw, own)
    finally:
        log = own.stop()
    own.check_invariants(log)
