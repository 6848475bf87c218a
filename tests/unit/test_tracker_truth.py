"""Issue #10: the tracker's model follows the server's replies, never the client's claims.

Byte tables through ``Link`` (no sockets): COPY driven by CopyInResponse, replies checked
against what is owed, a server changing tenant emptied first, a skipped Parse re-done.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest

from pgtenant.errors import ClientProtocolError, ServerProtocolError
from pgtenant.protocol import codec
from pgtenant.protocol.sql import MAY_COPY_IN, SESSION_STATE, TXN_CONTROL, TXN_END, classify
from pgtenant.protocol.tracker import CTX_NONE, CTX_READY, HOLD, Link

from .links import (
    BIND_COMPLETE,
    INJECTED,
    PARSE_COMPLETE,
    Z_I,
    Z_T,
    cc,
    client_sends,
    make_link,
    server_sends,
    start,
)

COPY_IN_RESPONSE = codec.frame(ord("G"), b"\x00\x00\x00")
COPY_DONE = codec.frame(ord("c"), b"")
COPY_FAIL = codec.frame(ord("f"), b"no\x00")
EXT_INJECTED = BIND_COMPLETE + codec.frame(ord("D"), b"\x00\x00") + cc("SELECT 1") \
    + codec.frame(ord("3"), b"")


def copy_data(text: bytes) -> bytes:
    return codec.frame(ord("d"), text)


def test_execute_and_copy_from_stdin_are_classified_as_the_server_may_run_them() -> None:
    flags = classify(b'EXECUTE "__pgtenant_pabc"')
    assert flags & TXN_CONTROL and flags & TXN_END and flags & MAY_COPY_IN
    assert flags & SESSION_STATE
    assert classify(b"COPY t FROM STDIN") & MAY_COPY_IN
    assert not classify(b"COPY t TO STDOUT") & MAY_COPY_IN
    assert not classify(b"SELECT 'copy' FROM t") & MAY_COPY_IN


def test_copy_messages_outside_copy_never_reach_the_server() -> None:
    link = make_link()
    start(link, codec.query("SELECT 1"))
    out, _, _ = client_sends(link, COPY_DONE + COPY_FAIL + copy_data(b"x") + codec.sync())
    # Postgres ignores them: dropped; the Sync still owes a ReadyForQuery.
    assert out == codec.sync()
    assert len(link.pending) == 2


def test_simple_query_copy_follows_the_servers_copy_in_response() -> None:
    link = make_link()
    sent = start(link, codec.query("COPY t FROM STDIN"))
    assert sent.endswith(b"COPY t FROM STDIN\x00")
    # Data pipelined before the server said it copies is held, not sent or dropped.
    out, _, outcome = client_sends(link, copy_data(b"1\n"))
    assert (out, outcome) == (b"", HOLD)
    assert server_sends(link, INJECTED + COPY_IN_RESPONSE) == COPY_IN_RESPONSE
    assert link.copy_in
    out, _, _ = link.pump_client()
    assert out == copy_data(b"1\n")
    out, _, _ = client_sends(link, codec.sync() + codec.frame(ord("H"), b"") + COPY_DONE)
    assert out == COPY_DONE  # Sync and Flush are ignored in COPY-in mode: not sent
    assert not link.copy_in and len(link.pending) == 1
    assert server_sends(link, cc("COPY 1") + Z_I) == cc("COPY 1") + Z_I
    assert link.can_release


def test_extended_copy_reopens_the_batch_whose_sync_the_server_ignores() -> None:
    """libpq: Parse/Bind/Execute/Sync, then data, CopyDone, Sync: one ReadyForQuery."""
    link = make_link()
    batch = (codec.parse("", "COPY t FROM STDIN") + codec.bind("", "", [])
             + codec.execute("", 0) + codec.sync())
    start(link, batch, ctx_state=CTX_READY)
    assert server_sends(link, EXT_INJECTED + PARSE_COMPLETE + BIND_COMPLETE
                        + COPY_IN_RESPONSE) == PARSE_COMPLETE + BIND_COMPLETE + COPY_IN_RESPONSE
    assert link.copy_in and link.open_extended
    out, _, _ = client_sends(link, copy_data(b"1\n") + COPY_DONE + codec.sync())
    assert out == copy_data(b"1\n") + COPY_DONE + codec.sync()
    assert len(link.pending) == 1  # that Sync closes the COPY's own batch
    assert server_sends(link, cc("COPY 1") + Z_I) == cc("COPY 1") + Z_I
    assert link.can_release


def test_a_copy_the_model_did_not_expect_ends_the_link() -> None:
    link = make_link()
    start(link, codec.query("SELECT 1") + codec.query("SELECT 2"))
    with pytest.raises(ServerProtocolError, match="COPY"):
        server_sends(link, INJECTED + COPY_IN_RESPONSE)


def test_only_copy_messages_are_accepted_during_copy_in() -> None:
    link = make_link()
    start(link, codec.query("COPY t FROM STDIN"))
    server_sends(link, INJECTED + COPY_IN_RESPONSE)
    with pytest.raises(ClientProtocolError, match="during COPY"):
        client_sends(link, codec.query("SELECT 1"))


def test_ready_for_query_before_the_replies_owed_ends_the_link() -> None:
    # (Where every reply is matched: a named statement's batch. A synced batch naming
    # nothing is forwarded unmatched once the proxy's part is answered: fast path.)
    link = make_link()
    start(link, codec.parse("s", "SELECT 1") + codec.bind("", "s", []) + codec.execute("", 0)
          + codec.sync(), ctx_state=CTX_READY)
    with pytest.raises(ServerProtocolError, match="ReadyForQuery before"):
        server_sends(link, EXT_INJECTED + PARSE_COMPLETE + Z_I)


def test_a_reply_with_nothing_outstanding_ends_the_link() -> None:
    link = make_link()
    start(link, codec.query("SELECT 1"))
    server_sends(link, INJECTED + cc("SELECT 1") + Z_I)
    assert not link.pending
    assert server_sends(link, codec.frame(ord("N"), b"SNOTICE\x00\x00")) != b""  # async: fine
    with pytest.raises(ServerProtocolError, match="no request outstanding"):
        server_sends(link, codec.frame(ord("D"), b"\x00\x00"))


@pytest.mark.parametrize("name, value", [("standard_conforming_strings", "off"),
                                         ("client_encoding", "SJIS")])
def test_a_setting_the_guard_relies_on_changed_by_any_path_ends_the_link(
        name: str, value: str) -> None:
    link = make_link()
    start(link, codec.query("SELECT app.harmless()"))
    with pytest.raises(ServerProtocolError, match="statement guard"):
        server_sends(link, INJECTED + codec.parameter_status(name, value))


def test_a_server_that_changes_tenant_is_emptied_before_the_first_request() -> None:
    link = make_link()
    link.cbuf += codec.query("SELECT 1")
    link.pump_client()
    prepared: OrderedDict[bytes, bool] = OrderedDict({b"__pgtenant_pold": True})
    link.attach(CTX_READY, prepared, reset=True, reset_encoding="UTF8")
    out, _, _ = link.pump_client()
    assert out.startswith(codec.query("DISCARD ALL"))
    assert not prepared and link.ctx_state == CTX_NONE  # DISCARD ALL dropped them
    # Its replies, ParameterStatus included, are the proxy's own.
    reply = server_sends(link, cc("DISCARD ALL") + codec.parameter_status("DateStyle", "ISO")
                         + Z_I + INJECTED + cc("SELECT 1") + Z_I)
    assert reply == cc("SELECT 1") + Z_I


def test_a_failed_reset_ends_the_link() -> None:
    link = make_link()
    link.cbuf += codec.query("SELECT 1")
    link.pump_client()
    link.attach(CTX_READY, reset=True)
    link.pump_client()
    with pytest.raises(ServerProtocolError, match="reset"):
        server_sends(link, codec.error_response("25001", "cannot run inside a block"))


def test_same_tenant_reuse_is_not_reset() -> None:
    link = make_link()
    out = start(link, codec.query("SELECT 1"))
    assert b"DISCARD ALL" not in out


def test_a_pipelined_bind_of_the_unnamed_statement_reparses_it() -> None:
    """The Parse "" of a batch still in flight may be skipped by the server after an error:
    a later batch's Bind "" re-parses the client's text first, so the server runs exactly
    the statement whose flags the tracker used."""
    link: Link = make_link()
    first = (codec.parse("x", "SELECT 1/0") + codec.bind("", "x", []) + codec.execute("", 0)
             + codec.parse("", "SELECT 2") + codec.sync())
    second = codec.bind("", "", []) + codec.execute("", 0) + codec.sync()
    sent = start(link, first + second, ctx_state=CTX_READY)
    reparse = codec.parse("", "SELECT 2")
    assert sent.count(reparse) == 2
    assert sent.rindex(reparse) > sent.index(codec.sync())


def test_after_an_error_the_unnamed_statement_is_reparsed_before_use() -> None:
    link = make_link()
    start(link, codec.parse("x", "SELECT 1/0") + codec.bind("", "x", []) + codec.execute("", 0)
          + codec.parse("", "SELECT 2") + codec.sync(), ctx_state=CTX_READY)
    server_sends(link, EXT_INJECTED + PARSE_COMPLETE + BIND_COMPLETE
                 + codec.error_response("22012", "division by zero") + Z_T)
    out, _, _ = client_sends(link, codec.bind("", "", []) + codec.execute("", 0)
                             + codec.sync())
    assert out.startswith(codec.parse("", "SELECT 2"))


@pytest.mark.parametrize("sql", [b"PREPARE TRANSACTION 'x'", b"COMMIT PREPARED 'x'",
                                 b"rollback prepared 'x'", b'EXECUTE "__pgtenant_pdeadbeef"',
                                 b"DEALLOCATE __PGTENANT_CTX_0",
                                 b"PREPARE __pgtenant_x AS SELECT 1"])
def test_the_guard_refuses_two_phase_commit_and_proxy_statement_names(sql: bytes) -> None:
    from pgtenant.guard import Guard
    assert Guard().check(sql) is not None
    assert Guard().check(b"EXECUTE my_statement") is None


def test_inside_a_block_a_pipelined_request_waits_for_the_status_before_skipping_context(
        ) -> None:
    """The context is skipped only on a status the server reported with nothing in flight:
    inside a transaction block, a second pipelined request waits for the first's answer."""
    link = make_link()
    start(link, codec.query("BEGIN"))
    server_sends(link, INJECTED + cc("BEGIN") + Z_T)
    out, _, outcome = client_sends(link, codec.query("SELECT 1") + codec.query("SELECT 2"))
    assert out == codec.query("SELECT 1") and outcome == HOLD  # no context: a block is open
    assert link.cbuf == codec.query("SELECT 2")
    _, resume = link.feed_server(cc("SELECT 1") + Z_T)
    assert resume
    out, _, _ = link.pump_client()
    assert out == codec.query("SELECT 2")


@pytest.mark.parametrize("sql", [b"SELECT setseed(0.5)", b"SET seed = 0", b"RESET seed",
                                 b"select pg_catalog.SETSEED(0)"])
def test_the_guard_refuses_seeding_random_on_a_shared_server(sql: bytes) -> None:
    from pgtenant.guard import Guard
    refusal = Guard().check(sql)
    assert refusal is not None and "seed" in refusal
