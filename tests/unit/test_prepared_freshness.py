"""Renamed statements against SQL DEALLOCATE and DDL, step by step (protocol/prepared.py,
protocol/freshness.py); the same through a real proxy and Postgres is in
tests/integration/test_prepared_staleness.py."""

from __future__ import annotations

from pgtenant.protocol import codec
from pgtenant.protocol.freshness import Freshness
from pgtenant.protocol.tracker import CTX_READY, IDLE, Link

from .links import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    INJECTED,
    PARSE_COMPLETE,
    ROW,
    Z_E,
    Z_I,
    Z_T,
    cc,
    client_sends,
    make_link,
    server_sends,
    start,
)

INJ_READY = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE  # the extended injection
TEXT = "SELECT $1::mood::text"


def parsed(text: str = TEXT, name: str = "q") -> tuple[Link, bytes]:
    """A link whose client parsed ``name`` on its server. Returns: (link, global name)."""
    link = make_link()
    start(link, codec.parse(name, text) + codec.sync(), ctx_state=CTX_READY)
    server_sends(link, INJ_READY + PARSE_COMPLETE + Z_I)
    return link, link.client_statements[name.encode()][0]


def parse_again(link: Link, name: str, text: str = TEXT) -> bytes:
    out, _, _ = client_sends(link, codec.parse(name, text) + codec.sync())
    return out


def really_parses(out: bytes, global_name: bytes) -> bool:
    return codec.frame(ord("P"), global_name + b"\x00" + TEXT.encode() + b"\x00\x00\x00") in out


def test_freshness_requires_copies_newer_than_the_last_invalidation() -> None:
    fresh = Freshness()
    assert fresh.required(b"g") == 1  # True, the stamp of a copy made before any
    fresh.invalidate(b"g")
    assert fresh.required(b"g") == fresh.generation > 1 and fresh.required(b"h") == 1
    fresh.invalidate_all()
    assert fresh.required(b"h") == fresh.generation


def test_deallocate_in_a_block_is_answered_with_the_blocks_status() -> None:
    link, _ = parsed()
    client_sends(link, codec.query("BEGIN"))
    server_sends(link, INJECTED + cc("BEGIN") + Z_T)
    out, reply, outcome = client_sends(link, codec.query("DEALLOCATE q"))
    assert (out, reply, outcome) == (b"", cc("DEALLOCATE") + Z_T, IDLE)
    assert b"q" not in link.client_statements


def test_deallocate_in_a_failed_block_goes_to_postgres_and_drops_nothing() -> None:
    link, _ = parsed()
    client_sends(link, codec.query("SELECT 1/0"))
    server_sends(link, INJECTED + codec.error_response("22012", "division by zero") + Z_E)
    out, reply, _ = client_sends(link, codec.query("DEALLOCATE q"))
    assert out == codec.query("DEALLOCATE q") and reply == b""  # Postgres says 25P02
    assert b"q" in link.client_statements


def test_a_parse_after_deallocate_is_a_real_one() -> None:
    link, global_name = parsed()
    _, reply, _ = client_sends(link, codec.query("DEALLOCATE q"))
    assert reply == cc("DEALLOCATE") + Z_I
    out = parse_again(link, "q")
    # The copy may be stale (psycopg deallocates after DDL): closed and parsed again.
    assert codec.frame(ord("C"), b"S" + global_name + b"\x00") in out
    assert really_parses(out, global_name)
    assert server_sends(link, INJ_READY + CLOSE_COMPLETE + PARSE_COMPLETE + Z_I) == (
        PARSE_COMPLETE + Z_I)
    # Fresh now: the next Parse of the text (another name) is answered by the proxy.
    out = parse_again(link, "r")
    assert not really_parses(out, global_name)


def test_extended_deallocate_is_rewritten_to_the_global_statement() -> None:
    link, global_name = parsed()
    # In a pipeline (psycopg's pipeline mode): not a lone batch the proxy answers (local.py).
    out, _, _ = client_sends(link, codec.parse("", "DEALLOCATE q") + codec.bind("", "", [])
                             + codec.execute("", 0) + codec.parse("", "SELECT 2")
                             + codec.bind("", "", []) + codec.execute("", 0) + codec.sync())
    assert codec.parse("", "DEALLOCATE " + global_name.decode()) in out
    assert b"DEALLOCATE q" not in out
    assert b"q" not in link.client_statements and link.prepared[global_name] is False
    seen = server_sends(link, INJ_READY + (PARSE_COMPLETE + BIND_COMPLETE) + cc("DEALLOCATE")
                        + (PARSE_COMPLETE + BIND_COMPLETE) + ROW + cc("SELECT 1") + Z_I)
    assert seen == (PARSE_COMPLETE + BIND_COMPLETE + cc("DEALLOCATE") + PARSE_COMPLETE
                    + BIND_COMPLETE + ROW + cc("SELECT 1") + Z_I)
    # Parsed again: a real Parse (Close first: the DEALLOCATE dropped it, if it ran).
    out = parse_again(link, "q")
    assert codec.frame(ord("C"), b"S" + global_name + b"\x00") in out
    assert really_parses(out, global_name)


def test_a_stale_copy_error_at_bind_makes_the_next_parse_real() -> None:
    link, global_name = parsed()
    client_sends(link, codec.bind("", "q", [b"a"]) + codec.execute("", 0) + codec.sync())
    err = codec.error_response("XX000", "cache lookup failed for type 16390")
    assert server_sends(link, INJ_READY + err + Z_I) == err + Z_I
    out = parse_again(link, "q2")
    assert really_parses(out, global_name)


def test_ddl_makes_later_parses_real_but_leaves_earlier_statements_as_postgres_would() -> None:
    link, global_name = parsed()
    client_sends(link, codec.query("DROP TYPE mood"))
    server_sends(link, INJECTED + cc("DROP TYPE") + Z_I)
    # Parsed before the DDL: bound as it is; Postgres re-plans it or fails as it would.
    out, _, _ = client_sends(link, codec.bind("", "q", [b"a"]) + codec.execute("", 0)
                             + codec.sync())
    assert not really_parses(out, global_name)
    server_sends(link, INJ_READY + BIND_COMPLETE + ROW + cc("SELECT 1") + Z_I)
    # Parsed after it: a real Parse.
    assert really_parses(parse_again(link, "r"), global_name)


def test_upsert_is_no_ddl() -> None:
    link, global_name = parsed()
    client_sends(link, codec.query("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING"))
    server_sends(link, INJECTED + cc("INSERT 0 1") + Z_I)
    assert not really_parses(parse_again(link, "r"), global_name)
