"""Step-by-step tests of the link tracker: injection, dropped replies, release, holds."""

from __future__ import annotations

import pytest

from pgtenant.errors import ClientProtocolError, MessageTooLarge
from pgtenant.protocol import codec
from pgtenant.protocol.constants import DESCRIBE, TEMP_NOTICE
from pgtenant.protocol.inject import (
    CLOSE_UNNAMED_PORTAL,
    CLOSE_UNNAMED_STATEMENT,
    CTX_CLOSE,
    CTX_PARSE,
    EXECUTE_UNNAMED,
)
from pgtenant.protocol.tracker import (
    CTX_NONE,
    CTX_READY,
    CTX_UNKNOWN,
    HOLD,
    IDLE,
    NEED_SERVER,
    TERMINATE,
    Link,
)

from .links import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    INJECTED,
    INJECTED_SELECT,
    PARSE_COMPLETE,
    ROW,
    ROWDESC,
    Z_E,
    Z_I,
    Z_T,
    cc,
    client_sends,
    make_link,
    server_sends,
    start,
)


def test_simple_query_is_prefixed_and_set_replies_are_dropped() -> None:
    link = make_link()
    to_server = start(link, codec.query("SELECT 1"))
    prefix = link.injection.q_prefix
    assert to_server == codec.query(prefix + b"SELECT 1")
    assert prefix.startswith(b"SET LOCAL app.tenant_id = '11111111-2222-3333-4444-555555555555';")
    assert prefix.endswith(b"SET LOCAL ROLE 'tenant_sme';")
    assert not link.can_release
    seen = server_sends(link, INJECTED + ROWDESC + ROW + cc("SELECT 1") + Z_I)
    assert seen == ROWDESC + ROW + cc("SELECT 1") + Z_I
    assert link.can_release


def test_replies_split_byte_by_byte_give_the_same_client_stream() -> None:
    link = make_link()
    start(link, codec.query("SELECT 1"))
    stream = INJECTED + codec.parameter_status("search_path", "public") + ROWDESC + ROW
    stream += cc("SELECT 1") + Z_I
    seen = b"".join(server_sends(link, stream[i : i + 1]) for i in range(len(stream)))
    assert seen == ROWDESC + ROW + cc("SELECT 1") + Z_I
    assert link.can_release


def test_syntax_error_position_points_into_client_text() -> None:
    link = make_link()
    start(link, codec.query("selec 1"))
    shift = link.injection.q_shift
    err = codec.frame(ord("E"), codec.encode_error_fields(
        [(ord("S"), b"ERROR"), (ord("C"), b"42601"), (ord("M"), b"syntax error"),
         (ord("P"), str(shift + 1).encode())]
    ))
    seen = server_sends(link, err + Z_I)
    fields = dict(codec.parse_error_fields(seen[5 : -len(Z_I)]))
    assert fields[ord("P")] == b"1"
    assert seen.endswith(Z_I)
    assert link.can_release


def test_empty_query_gets_empty_query_response() -> None:
    link = make_link()
    start(link, codec.query(""))
    assert server_sends(link, INJECTED + Z_I) == codec.empty_query_response() + Z_I


def test_explicit_transaction_keeps_server_and_injects_once() -> None:
    link = make_link()
    start(link, codec.query("BEGIN"))
    assert server_sends(link, INJECTED + cc("BEGIN") + Z_T) == cc("BEGIN") + Z_T
    assert not link.can_release
    out, _, outcome = client_sends(link, codec.query("SELECT 1"))
    assert (out, outcome) == (codec.query("SELECT 1"), IDLE)  # no second injection
    server_sends(link, ROWDESC + ROW + cc("SELECT 1") + Z_T)
    out, _, _ = client_sends(link, codec.query("COMMIT"))
    assert out == codec.query("COMMIT")
    assert server_sends(link, cc("COMMIT") + Z_I) == cc("COMMIT") + Z_I
    assert link.can_release


def test_aborted_transaction_gets_no_injection_so_rollback_works() -> None:
    link = make_link()
    start(link, codec.query("BEGIN; SELECT 1/0"))
    error = codec.error_response("22012", "division by zero")
    server_sends(link, INJECTED + cc("BEGIN") + error + Z_E)
    out, _, _ = client_sends(link, codec.query("ROLLBACK"))
    assert out == codec.query("ROLLBACK")
    server_sends(link, cc("ROLLBACK") + Z_I)
    assert link.can_release


def extended_batch(sql: str = "SELECT 1") -> bytes:
    return (codec.parse("", sql) + codec.bind("", "", []) + codec.frame(ord("D"), b"P\x00")
            + codec.execute("", 0) + codec.sync())


def test_extended_batch_gets_parse_bind_execute_of_context_first() -> None:
    link = make_link()
    batch = extended_batch()
    to_server = start(link, batch)
    assert to_server == (CTX_PARSE + link.injection.ext_bind
                         + EXECUTE_UNNAMED + CLOSE_UNNAMED_PORTAL + batch)
    injected = PARSE_COMPLETE + BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE
    replies = PARSE_COMPLETE + BIND_COMPLETE + ROWDESC + ROW + cc("SELECT 1") + Z_I
    assert server_sends(link, injected + replies) == replies
    assert link.can_release
    assert link.detach() == CTX_READY


def test_second_extended_batch_on_a_ready_server_only_binds() -> None:
    link = make_link()
    to_server = start(link, extended_batch(), ctx_state=CTX_READY)
    first = codec.parse("", "SELECT 1")
    assert to_server.startswith(link.injection.ext_bind
                                + EXECUTE_UNNAMED + CLOSE_UNNAMED_PORTAL + first)
    replies = PARSE_COMPLETE + BIND_COMPLETE + ROWDESC + ROW + cc("SELECT 1") + Z_I
    injected = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE
    assert server_sends(link, injected + replies) == replies


def test_failed_injection_marks_context_statement_unknown_and_reparses() -> None:
    link = make_link()
    start(link, extended_batch(), ctx_state=CTX_READY)
    err = codec.error_response("26000", 'prepared statement "__pgtenant_ctx" does not exist')
    assert server_sends(link, err + Z_I) == err + Z_I  # the client learns its batch failed
    assert link.detach() == CTX_UNKNOWN
    to_server = start(link, extended_batch(), ctx_state=CTX_UNKNOWN)
    assert to_server.startswith(CTX_CLOSE + CTX_PARSE + link.injection.ext_bind)
    injected = (CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + ROW + cc("SELECT 1")
                + CLOSE_COMPLETE)
    assert server_sends(link, injected + cc("SELECT 1") + Z_I) == cc("SELECT 1") + Z_I


def test_deallocate_all_makes_the_context_statement_unknown() -> None:
    link = make_link()
    # (Alone, as a Query or a batch, "DEALLOCATE ALL" is answered by the proxy (local.py);
    # in a batch with another statement it reaches Postgres.)
    start(link, _execute_batch("DEALLOCATE ALL", "SELECT 1") + codec.sync(),
          ctx_state=CTX_READY)
    assert link.session_dirty  # which global statements survive is unknown: retire it
    assert link.detach() == CTX_UNKNOWN


@pytest.mark.parametrize(("sql", "tag"), [("DEALLOCATE ALL", "DEALLOCATE ALL"),
                                          ("DISCARD ALL", "DISCARD ALL"),
                                          ("RESET ALL", "RESET"),
                                          ("RESET search_path", "RESET")])
def test_session_commands_in_one_batch_are_answered_by_the_proxy(sql: str, tag: str) -> None:
    link = make_link()
    batch = (codec.parse("", sql) + codec.bind("", "", []) + codec.frame(DESCRIBE, b"P\x00")
             + codec.execute("", 0) + codec.sync())
    out, reply, outcome = client_sends(link, batch)
    assert (out, outcome) == (b"", IDLE)
    assert reply == PARSE_COMPLETE + BIND_COMPLETE + b"n\x00\x00\x00\x04" + cc(tag) + Z_I
    # Not all here yet: nothing is decided before the Sync arrives.
    link = make_link()
    out, reply, outcome = client_sends(link, batch[:-5])
    assert (out, reply, outcome) == (b"", b"", IDLE)
    out, reply, outcome = client_sends(link, batch[-5:])
    assert reply.endswith(cc(tag) + Z_I)


def test_pipelined_queries_without_transaction_control_are_each_injected() -> None:
    link = make_link()
    to_server = start(link, codec.query("SELECT 1") + codec.query("SELECT 2"))
    prefix = link.injection.q_prefix
    assert to_server == codec.query(prefix + b"SELECT 1") + codec.query(prefix + b"SELECT 2")
    seen = server_sends(link, INJECTED + cc("SELECT 1") + Z_I + INJECTED + cc("SELECT 2") + Z_I)
    assert seen == cc("SELECT 1") + Z_I + cc("SELECT 2") + Z_I
    assert link.can_release


def test_segment_after_in_flight_begin_is_held_until_its_reply() -> None:
    link = make_link()
    out, _, outcome = client_sends(link, codec.query("BEGIN") + codec.query("SELECT 2"))
    assert outcome == NEED_SERVER
    link.attach(CTX_NONE)
    out, _, outcome = link.pump_client()
    assert outcome == HOLD
    assert out == codec.query(link.injection.q_prefix + b"BEGIN")
    _, resume = link.feed_server(INJECTED + cc("BEGIN") + Z_T)
    assert resume
    out, _, outcome = link.pump_client()
    assert (out, outcome) == (codec.query("SELECT 2"), IDLE)  # inside BEGIN: no injection


def test_parameter_status_for_search_path_is_hidden() -> None:
    link = make_link()
    start(link, codec.query("BEGIN"))
    tz = codec.parameter_status("TimeZone", "UTC")
    seen = server_sends(link, INJECTED + cc("BEGIN") + codec.parameter_status("search_path", "x")
                        + tz + Z_T)
    assert seen == cc("BEGIN") + tz + Z_T


def test_large_data_row_streams_before_it_is_complete() -> None:
    link = make_link()
    start(link, codec.query("SELECT big"))
    server_sends(link, INJECTED)
    row = codec.frame(ord("D"), b"\x00\x01" + (100_000).to_bytes(4, "big") + b"x" * 100_000)
    assert server_sends(link, ROWDESC) == ROWDESC
    first = server_sends(link, row[:50_000])
    assert first == row[:50_000]
    rest = row[50_000:] + cc("SELECT 1") + Z_I
    assert server_sends(link, rest) == rest
    assert link.can_release


def test_bare_sync_without_server_is_answered_locally() -> None:
    link = make_link()
    out, reply, outcome = client_sends(link, codec.sync())
    assert (out, reply, outcome) == (b"", Z_I, IDLE)
    assert not link.attached


def test_copy_data_without_server_is_ignored_and_terminate_ends() -> None:
    link = make_link()
    out, reply, outcome = client_sends(link, codec.frame(ord("d"), b"1\n") + codec.terminate())
    assert (out, reply, outcome) == (b"", b"", TERMINATE)


def test_partial_client_message_waits_for_the_rest() -> None:
    link = make_link()
    msg = codec.query("SELECT 1")
    out, _, outcome = client_sends(link, msg[:7])
    assert (out, outcome) == (b"", IDLE)
    out, _, outcome = client_sends(link, msg[7:])
    assert outcome == NEED_SERVER


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"Q\x00\x00\x00\x02", ClientProtocolError),  # length below 4
        (b"Q\x7f\x00\x00\x00", MessageTooLarge),
        (b"Q\xff\xff\xff\xff", ClientProtocolError),  # negative length
        (codec.frame(ord("p"), b"pw\x00"), ClientProtocolError),  # password after login
        (codec.frame(ord("?"), b""), ClientProtocolError),
    ],
)
def test_malformed_client_messages_raise_protocol_errors(data: bytes, error: type) -> None:
    link = make_link()
    link.attach(CTX_NONE)
    with pytest.raises(error):
        client_sends(link, data)


def test_copy_in_messages_do_not_start_segments() -> None:
    link = make_link()
    start(link, codec.query("COPY t FROM STDIN"))
    copy_in = codec.frame(ord("G"), b"\x00\x00\x00")
    assert server_sends(link, INJECTED + copy_in) == copy_in
    data = codec.frame(ord("d"), b"1\n") + codec.frame(ord("c"), b"")
    out, _, outcome = client_sends(link, data)
    assert (out, outcome) == (data, IDLE)
    assert server_sends(link, cc("COPY 1") + Z_I) == cc("COPY 1") + Z_I
    assert link.can_release


def test_session_state_marks_the_link_dirty_until_the_next_attach() -> None:
    link = make_link()
    start(link, codec.query("LISTEN jobs"))
    server_sends(link, INJECTED + cc("LISTEN") + Z_I)
    assert link.can_release and link.session_dirty
    link.detach()
    start(link, codec.query("SELECT 1"))
    assert not link.session_dirty


def test_named_parse_is_renamed_to_a_global_statement_not_left_dirty() -> None:
    link = make_link()
    out = start(link, codec.parse("s1", "SELECT 1") + codec.sync())
    global_name = link.client_statements[b"s1"][0]
    assert global_name.startswith(b"__pgtenant_p")
    assert out.endswith(codec.parse(global_name.decode(), "SELECT 1") + codec.sync())
    assert not link.session_dirty and global_name in link.prepared


def guarded_link() -> Link:
    link = make_link()
    link.guard = lambda sql: "pgtenant: no" if b"ROLE" in sql else None
    return link


def test_refused_query_is_replaced_by_a_server_side_refusal() -> None:
    link = guarded_link()
    to_server = start(link, codec.query("SET ROLE other"))
    refusal = b"CALL pgtenant.refuse('pgtenant: no')"
    assert to_server == codec.query(link.injection.q_prefix + refusal)
    assert link.refused == 1


def test_refused_parse_keeps_name_and_parameters() -> None:
    link = guarded_link()
    parse = codec.parse("s", "SELECT set_config('ROLE', $1, $2)", (25,))
    to_server = start(link, parse + codec.sync(), ctx_state=CTX_READY)
    refusal = "CALL pgtenant.refuse('pgtenant: no', $1::pg_catalog.text, $2::pg_catalog.text)"
    global_name = link.client_statements[b"s"][0].decode()
    expected = codec.parse(global_name, refusal, (25,))
    assert to_server == (link.injection.ext_bind + EXECUTE_UNNAMED
                         + CLOSE_UNNAMED_PORTAL + expected + codec.sync())


def test_function_call_message_is_refused_by_the_server() -> None:
    link = make_link()
    to_server = start(link, codec.frame(ord("F"), b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"))
    assert to_server.startswith(codec.HEADER.pack(ord("Q"), len(to_server) - 1)[:1])
    assert b"CALL pgtenant.refuse('pgtenant: the FunctionCall protocol message" in to_server
    error = codec.error_response("42501", "pgtenant: the FunctionCall ...")
    assert server_sends(link, INJECTED + error + Z_I) == error + Z_I


def test_unnamed_statement_is_scrubbed_only_for_a_bind_without_a_parse_of_its_own() -> None:
    link = make_link()
    bare = codec.bind("", "", []) + codec.execute("", 0) + codec.sync()  # never parsed ""
    first = start(link, bare + bare, ctx_state=CTX_READY)
    # The server's unnamed statement may be a previous client's: closed, so the Bind fails
    # as it would on a fresh session; once per attachment.
    assert first.count(CLOSE_UNNAMED_STATEMENT) == 1
    assert first.index(CLOSE_UNNAMED_STATEMENT) < first.index(bare)
    # A statement the proxy never saw parsed may do anything: the next batch waits for the
    # server's answer to this one before it is judged.
    assert link.cbuf == bare
    missing = codec.error_response("26000", "unnamed prepared statement does not exist")
    ext_injected = BIND_COMPLETE + codec.frame(ord("D"), b"\x00\x00") + cc("SELECT 1")
    assert server_sends(link, ext_injected + CLOSE_COMPLETE + CLOSE_COMPLETE + missing
                        + Z_I) == missing + Z_I
    later, _, _ = link.pump_client()
    assert later.endswith(bare) and CLOSE_UNNAMED_STATEMENT not in later
    link.detach()
    second = start(link, bare, ctx_state=CTX_READY)
    assert CLOSE_UNNAMED_STATEMENT + bare in second  # a new attachment: scrub again
    link.detach()
    own = start(link, extended_batch(), ctx_state=CTX_READY)
    assert CLOSE_UNNAMED_STATEMENT not in own  # its own Parse replaces the server's


def _execute_batch(*sqls: str) -> bytes:
    return b"".join(codec.parse("", sql) + codec.bind("", "", []) + codec.execute("", 0)
                    for sql in sqls)


def test_batch_going_on_after_commit_is_split_with_a_hidden_sync() -> None:
    link = make_link()
    out, _, outcome = client_sends(link, _execute_batch("COMMIT", "SELECT 2") + codec.sync())
    assert outcome == NEED_SERVER
    link.attach(CTX_READY)
    out, _, outcome = link.pump_client()
    assert outcome == HOLD
    assert out.endswith(_execute_batch("COMMIT") + codec.sync())  # our Sync, then wait
    ok = PARSE_COMPLETE + BIND_COMPLETE + cc("COMMIT")
    injected = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE
    chunks, resume = link.feed_server(injected + ok + Z_I)
    assert b"".join(bytes(c) for c in chunks) == ok  # the hidden Sync's Z is not forwarded
    assert resume
    out, _, outcome = link.pump_client()
    assert outcome == IDLE
    assert out.startswith(link.injection.ext_bind)  # the rest gets its own context
    assert out.endswith(_execute_batch("SELECT 2") + codec.sync())


def test_batch_after_a_failed_part_is_discarded_up_to_the_clients_sync() -> None:
    link = make_link()
    client_sends(link, _execute_batch("SELECT 1/0", "COMMIT", "SELECT 2") + codec.sync())
    link.attach(CTX_READY)
    link.pump_client()
    error = codec.error_response("22012", "division by zero")
    injected = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE
    seen = server_sends(link, injected + PARSE_COMPLETE + BIND_COMPLETE + error + Z_I)
    assert seen == PARSE_COMPLETE + BIND_COMPLETE + error
    out, reply, outcome = link.pump_client()
    assert (out, reply, outcome) == (b"", Z_I, IDLE)  # "SELECT 2" never runs, as in Postgres
    assert link.can_release


def test_statement_allowed_outside_a_transaction_runs_bare_after_a_hidden_context() -> None:
    link = make_link()
    link.guard = lambda sql: "pgtenant: not in a block" if b"VACUUM" in sql else None
    link.outside_txn = lambda sql: sql == b"VACUUM campaigns"
    to_server = start(link, codec.query("VACUUM campaigns"))
    session = link.injection.q_session
    assert session.count(b", false)") == 6 and b", true)" not in session
    assert to_server == codec.query(session[:-1]) + codec.query("VACUUM campaigns")
    assert link.session_dirty  # that server is retired afterwards
    hidden = INJECTED_SELECT + Z_I
    seen = server_sends(link, hidden + cc("VACUUM") + Z_I)
    assert seen == cc("VACUUM") + Z_I
    assert link.can_release


def test_statement_not_allowed_outside_a_transaction_is_refused() -> None:
    link = make_link()
    link.guard = lambda sql: "pgtenant: not in a block"
    link.outside_txn = lambda sql: False
    to_server = start(link, codec.query("VACUUM campaigns"))
    assert b"CALL pgtenant.refuse('pgtenant: not in a block')" in to_server


@pytest.mark.parametrize(
    "message",
    [
        codec.parse("__pgtenant_ctx", "SELECT 1"),
        codec.bind("", "__pgtenant_ctx", [b"x"] * 6),
        codec.frame(ord("D"), b"S__pgtenant_ctx\x00"),
        codec.frame(ord("C"), b"S__pgtenant_ctx\x00"),
    ],
    ids=["parse", "bind", "describe", "close"],
)
def test_the_proxys_statement_names_are_reserved(message: bytes) -> None:
    link = make_link()
    link.attach(CTX_READY)
    with pytest.raises(ClientProtocolError, match="reserved"):
        client_sends(link, message + codec.sync())


def test_extended_copy_from_stdin_answers_both_syncs_with_one_ready_for_query() -> None:
    link = make_link()
    start(link, _execute_batch("COPY t FROM STDIN") + codec.sync(), ctx_state=CTX_READY)
    injected = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE
    copy_in = codec.frame(ord("G"), b"\x00\x00\x00")
    assert server_sends(link, injected + PARSE_COMPLETE + BIND_COMPLETE + copy_in) == (
        PARSE_COMPLETE + BIND_COMPLETE + copy_in)
    # Postgres ignored the batch's Sync during copy-in; the Sync after CopyDone is answered.
    copy_data = codec.frame(ord("d"), b"x\n") + codec.frame(ord("c"), b"")
    out, _, outcome = client_sends(link, copy_data + codec.sync())
    assert out == copy_data + codec.sync()
    assert outcome == IDLE and len(link.pending) == 1
    assert server_sends(link, cc("COPY 1") + Z_I) == cc("COPY 1") + Z_I
    assert link.can_release


# ------------------------------------------------------------------------------ prepared


INJ_READY = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE


def test_statement_already_on_the_server_gets_a_synthetic_parse_complete_in_order() -> None:
    link = make_link()
    first = start(link, codec.parse("q", "SELECT 1") + codec.sync(), ctx_state=CTX_READY)
    global_name = link.client_statements[b"q"][0]
    assert codec.parse(global_name.decode(), "SELECT 1") in first
    server_sends(link, INJ_READY + PARSE_COMPLETE + Z_I)
    prepared = link.prepared
    link.detach()
    # Same client (or any client with the same text and search_path), same server: no Parse.
    batch = (codec.parse("q", "SELECT 1") + codec.bind("", "q", []) + codec.execute("", 0)
             + codec.sync())
    client_sends(link, batch)
    link.attach(CTX_READY, prepared)
    out, _, _ = link.pump_client()
    assert codec.parse(global_name.decode(), "SELECT 1") not in out
    assert codec.bind("", global_name.decode(), []) in out
    seen = server_sends(link, INJ_READY + BIND_COMPLETE + ROW + cc("SELECT 1") + Z_I)
    assert seen == PARSE_COMPLETE + BIND_COMPLETE + ROW + cc("SELECT 1") + Z_I


def test_statement_missing_on_this_server_is_prepared_again_quietly() -> None:
    link = make_link()
    start(link, codec.parse("q", "SELECT 2") + codec.sync(), ctx_state=CTX_READY)
    server_sends(link, INJ_READY + PARSE_COMPLETE + Z_I)
    link.detach()
    client_sends(link, codec.bind("", "q", []) + codec.execute("", 0) + codec.sync())
    link.attach(CTX_READY)  # another server: nothing prepared there
    out, _, _ = link.pump_client()
    global_name = link.client_statements[b"q"][0].decode()
    assert (codec.parse(global_name, "SELECT 2") + codec.bind("", global_name, [])) in out
    seen = server_sends(link, INJ_READY + PARSE_COMPLETE + BIND_COMPLETE + ROW
                        + cc("SELECT 1") + Z_I)
    assert seen == BIND_COMPLETE + ROW + cc("SELECT 1") + Z_I  # the quiet Parse is dropped


# Injected replies of a later segment on the same attachment (no unnamed-statement scrub).
INJ_AGAIN = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE
PLAN_CHANGED = codec.error_response("0A000", "cached plan must not change result type")
DESCRIBE_PORTAL = codec.frame(ord("D"), b"P\x00")


def _prepared_link(sql: str) -> tuple[Link, str]:
    link = make_link()
    start(link, codec.parse("q", sql) + codec.sync(), ctx_state=CTX_READY)
    server_sends(link, INJ_READY + PARSE_COMPLETE + Z_I)
    return link, link.client_statements[b"q"][0].decode()


def test_plan_change_is_healed_when_the_batch_describes_its_portal() -> None:
    """libpq's PQexecPrepared (Bind, Describe portal, Execute, Sync): the client learns the
    new row shape from the retry, so the error is hidden and the batch goes again once."""
    link, global_name = _prepared_link("SELECT * FROM t")
    batch = (codec.bind("", "q", []) + DESCRIBE_PORTAL + codec.execute("", 0)
             + codec.sync())
    out, reply, _ = client_sends(link, batch)
    assert codec.bind("", global_name, []) in out and reply == b""
    # A newer request pipelined behind it must wait for the retry, not overtake it.
    chunks, resume = link.feed_server(INJ_AGAIN + PLAN_CHANGED)
    assert b"".join(bytes(c) for c in chunks) == b""
    out, reply, outcome = client_sends(link, codec.query("SELECT 2"))
    assert (out, reply, outcome) == (b"", b"", HOLD)
    chunks, resume = link.feed_server(Z_I)
    assert chunks == [] and resume
    out, reply, _ = link.pump_client()
    close = codec.frame(ord("C"), b"S" + global_name.encode() + b"\x00")
    retry = close + codec.parse(global_name, "SELECT * FROM t") + codec.bind("", global_name, [])
    assert retry in out
    assert out.count(codec.bind("", global_name, [])) == 1
    assert b"SELECT 2" in out  # the held Query follows the retried batch
    seen = server_sends(link, INJ_AGAIN + CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE
                        + ROWDESC + ROW + cc("SELECT 1") + Z_I)
    assert seen == BIND_COMPLETE + ROWDESC + ROW + cc("SELECT 1") + Z_I


def test_plan_change_is_healed_only_once() -> None:
    link, _ = _prepared_link("SELECT * FROM t")
    client_sends(link, codec.bind("", "q", []) + DESCRIBE_PORTAL + codec.execute("", 0)
                 + codec.sync())
    server_sends(link, INJ_AGAIN + PLAN_CHANGED + Z_I)
    link.pump_client()
    seen = server_sends(link, INJ_AGAIN + CLOSE_COMPLETE + PARSE_COMPLETE + PLAN_CHANGED + Z_I)
    assert seen == PLAN_CHANGED + Z_I


def test_plan_change_is_the_clients_when_it_executes_without_describing() -> None:
    """asyncpg/pgjdbc execute with a cached RowDescription: rows of a new shape would be
    misread, so the error reaches the client, and its next Bind re-prepares."""
    link, global_name = _prepared_link("SELECT * FROM t")
    client_sends(link, codec.bind("", "q", []) + codec.execute("", 0) + codec.sync())
    assert server_sends(link, INJ_AGAIN + PLAN_CHANGED + Z_I) == PLAN_CHANGED + Z_I
    out, _, _ = client_sends(link, codec.bind("", "q", []) + codec.execute("", 0)
                             + codec.sync())
    assert codec.parse(global_name, "SELECT * FROM t") in out


@pytest.mark.parametrize("before", [
    codec.parse("other", "SELECT 1"),  # a Parse earlier in the batch: answered already
    codec.frame(ord("D"), b"Sq\x00"),  # a Describe whose old shape reached the client
])
def test_plan_change_is_not_healed_when_the_bind_is_not_first(before: bytes) -> None:
    link, _ = _prepared_link("SELECT * FROM t")
    batch = before + codec.bind("", "q", []) + DESCRIBE_PORTAL + codec.execute("", 0)
    client_sends(link, batch + codec.sync())
    assert link.pending[-1].replay is None


def test_close_of_a_named_statement_is_answered_by_the_proxy() -> None:
    link = make_link()
    start(link, codec.parse("q", "SELECT 3") + codec.sync(), ctx_state=CTX_READY)
    server_sends(link, INJ_READY + PARSE_COMPLETE + Z_I)
    out, reply, _ = client_sends(link, codec.frame(ord("C"), b"Sq\x00") + codec.sync())
    assert b"Sq\x00" not in out and reply == b""
    assert server_sends(link, INJ_READY + Z_I) == CLOSE_COMPLETE + Z_I
    assert b"q" not in link.client_statements


def test_least_recently_used_statements_are_closed_beyond_the_limit() -> None:
    link = make_link()
    link.max_prepared = 1
    out = start(link, codec.parse("a", "SELECT 4") + codec.parse("b", "SELECT 5")
                + codec.sync(), ctx_state=CTX_READY)
    first = link.client_statements[b"a"][0]
    assert codec.frame(ord("C"), b"S" + first + b"\x00") in out
    assert list(link.prepared) == [link.client_statements[b"b"][0]]
    seen = server_sends(link, INJ_READY + PARSE_COMPLETE + PARSE_COMPLETE + CLOSE_COMPLETE + Z_I)
    assert seen == PARSE_COMPLETE * 2 + Z_I  # the eviction's CloseComplete is not the client's


def test_deallocate_and_discard_all_of_the_clients_view_are_answered_locally() -> None:
    link = make_link()
    start(link, codec.parse("q", "SELECT 1") + codec.sync(), ctx_state=CTX_READY)
    server_sends(link, INJ_READY + PARSE_COMPLETE + Z_I)
    out, reply, outcome = client_sends(link, codec.query("DEALLOCATE q"))
    assert (out, outcome) == (b"", IDLE)
    assert reply == cc("DEALLOCATE") + Z_I and b"q" not in link.client_statements
    out, reply, _ = client_sends(link, codec.query("DEALLOCATE sql_prepared_name"))
    assert out.endswith(b"DEALLOCATE sql_prepared_name\x00") and reply == b""  # Postgres's
    server_sends(link, INJECTED + cc("DEALLOCATE") + Z_I)
    link.injection = link.injection.with_settings((("TimeZone", "UTC"),))
    out, reply, _ = client_sends(link, codec.query("DISCARD ALL"))
    assert (out, reply) == (b"", cc("DISCARD ALL") + Z_I)
    assert link.injection.settings == ()  # back to the startup settings


def test_unnamed_statement_reused_across_syncs_is_reparsed_where_needed() -> None:
    link = make_link()
    start(link, codec.parse("", "SELECT 7") + codec.sync(), ctx_state=CTX_READY)
    server_sends(link, INJ_READY + PARSE_COMPLETE + Z_I)
    # Same attachment: the server still has it.
    out, _, _ = client_sends(link, codec.bind("", "", []) + codec.execute("", 0) + codec.sync())
    assert codec.parse("", "SELECT 7") not in out
    server_sends(link, INJ_READY + BIND_COMPLETE + ROW + cc("SELECT 1") + Z_I)
    link.detach()
    # A later transaction on another server: re-parsed quietly before the Bind.
    client_sends(link, codec.bind("", "", []) + codec.execute("", 0) + codec.sync())
    link.attach(CTX_READY)
    out, _, _ = link.pump_client()
    assert (codec.parse("", "SELECT 7") + codec.bind("", "", [])) in out
    scrub = CLOSE_COMPLETE  # the attachment's first injection closes the previous unnamed one
    seen = server_sends(link, scrub + INJ_READY + PARSE_COMPLETE + BIND_COMPLETE + ROW
                        + cc("SELECT 1") + Z_I)
    assert seen == BIND_COMPLETE + ROW + cc("SELECT 1") + Z_I


def test_local_answer_waits_for_replies_still_owed_then_happens_once() -> None:
    link = make_link()
    start(link, codec.parse("q", "SELECT 1") + codec.sync(), ctx_state=CTX_READY)
    # Pipelined before the Parse's replies arrived: the DEALLOCATE must wait its turn.
    out, reply, outcome = client_sends(link, codec.query("DEALLOCATE q"))
    assert (out, reply, outcome) == (b"", b"", HOLD)
    assert b"q" in link.client_statements  # nothing changed yet
    _, resume = link.feed_server(INJ_READY + PARSE_COMPLETE + Z_I)
    assert resume
    out, reply, outcome = link.pump_client()
    assert (out, reply, outcome) == (b"", cc("DEALLOCATE") + Z_I, IDLE)
    assert b"q" not in link.client_statements


def test_a_parse_without_a_body_is_the_clients_error_not_the_proxys() -> None:
    # Found by test_fuzz: the local-batch check read past an empty Parse.
    link = make_link()
    out, _, outcome = client_sends(link, b"P\x00\x00\x00\x04")
    assert (out, outcome) == (b"", NEED_SERVER)
    link.attach(CTX_NONE)
    with pytest.raises(ClientProtocolError):
        link.pump_client()


TEMP_MARK = codec.notice_response("00000", TEMP_NOTICE)
OTHER_NOTICE = codec.notice_response("00000", "table t does not exist, skipping",
                                     detail=TEMP_NOTICE)  # the marker, but not as message


def test_the_temp_notice_is_swallowed_and_marks_the_server_wherever_it_comes() -> None:
    """The event trigger's notice may arrive among rows, cut by reads at any byte: the
    client never gets it and the link always learns of it (another notice passes)."""
    link = make_link()
    start(link, codec.query("SELECT make_temp(); SELECT 1"))
    stream = (INJECTED + ROWDESC + ROW + TEMP_MARK + ROW + OTHER_NOTICE + cc("SELECT 2")
              + ROWDESC + ROW + cc("SELECT 1") + Z_I)
    seen = b"".join(server_sends(link, stream[i : i + 1]) for i in range(len(stream)))
    assert seen == (ROWDESC + ROW + ROW + OTHER_NOTICE + cc("SELECT 2") + ROWDESC + ROW
                    + cc("SELECT 1") + Z_I)
    assert link.temp_made and link.can_release
    assert not link.session_dirty and not link.pinned  # emptied and pooled, not closed
    link.detach()
    link.attach(CTX_READY)
    assert not link.temp_made  # per attachment: the pool emptied that server


def test_a_notice_with_the_marker_elsewhere_marks_nothing() -> None:
    link = make_link()
    start(link, codec.query("SELECT 1"))
    assert server_sends(link, INJECTED + OTHER_NOTICE + cc("SELECT 1") + Z_I) == (
        OTHER_NOTICE + cc("SELECT 1") + Z_I)
    assert not link.temp_made


def test_the_temp_notice_during_an_extended_execute_is_swallowed() -> None:
    link = make_link()
    start(link, extended_batch(), ctx_state=CTX_READY)
    injected = BIND_COMPLETE + ROW + cc("SELECT 1") + CLOSE_COMPLETE
    replies = PARSE_COMPLETE + BIND_COMPLETE + ROWDESC + ROW
    tail = cc("SELECT 1") + Z_I
    assert server_sends(link, injected + replies + TEMP_MARK + ROW + tail) == (
        replies + ROW + tail)
    assert link.temp_made


@pytest.mark.parametrize(("sql", "tag"), [("DISCARD ALL", "DISCARD ALL"),
                                          ("RESET ALL", "RESET")])
def test_session_commands_prepared_by_name_are_answered_by_the_proxy(sql: str,
                                                                     tag: str) -> None:
    """PQprepare then PQexecPrepared (psycopg with prepare_threshold=0)."""
    link = make_link()
    out, reply, outcome = client_sends(link, codec.parse("s1", sql) + codec.sync())
    assert (out, reply, outcome) == (b"", PARSE_COMPLETE + Z_I, IDLE)
    out, reply, outcome = client_sends(
        link, codec.bind("", "s1", []) + codec.frame(DESCRIBE, b"P\x00") + codec.execute()
        + codec.sync())
    assert (out, outcome) == (b"", IDLE)
    assert reply == BIND_COMPLETE + b"n\x00\x00\x00\x04" + cc(tag) + Z_I
    # Parsed again with another text, the name is an ordinary statement again.
    out, _, outcome = client_sends(link, codec.parse("s1", "SELECT 1") + codec.sync())
    assert outcome == NEED_SERVER


def test_a_commented_session_command_in_a_batch_is_answered_too() -> None:
    link = make_link()
    batch = (codec.parse("", "/* pool reset */ DISCARD ALL") + codec.bind("", "", [])
             + codec.execute() + codec.sync())
    out, reply, outcome = client_sends(link, batch)
    assert (out, outcome) == (b"", IDLE)
    assert reply.endswith(cc("DISCARD ALL") + Z_I)
