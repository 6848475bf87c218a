"""Golden bytes for every codec encoder, decoder round trips, and malformed-input errors.

Every expected byte string below is written out by hand from the PostgreSQL docs ("Message
Formats", protocol-message-formats.html): type byte, int32 length counting itself but not
the type byte, then the body. None of them is computed by calling the code under test.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtenant.errors import ClientProtocolError, ServerProtocolError
from pgtenant.protocol import codec

GOLDEN: list[tuple[str, bytes, bytes]] = [
    # ---------------------------------------------------------------- backend messages
    (
        "error_response",
        codec.error_response("42P01", "no such table"),
        b"E\x00\x00\x00\x29"
        b"SERROR\x00VERROR\x00C42P01\x00Mno such table\x00\x00",
    ),
    (
        "error_response with detail and hint",
        codec.error_response("28P01", "bad", detail="d", hint="h"),
        b"E\x00\x00\x00\x25SERROR\x00VERROR\x00C28P01\x00Mbad\x00Dd\x00Hh\x00\x00",
    ),
    (
        "error_response FATAL",
        codec.error_response("57P01", "bye", severity="FATAL"),
        b"E\x00\x00\x00\x1fSFATAL\x00VFATAL\x00C57P01\x00Mbye\x00\x00",
    ),
    (
        "error_response strips NUL from the message",
        codec.error_response("XX000", "a\x00b"),
        b"E\x00\x00\x00\x1eSERROR\x00VERROR\x00CXX000\x00Mab\x00\x00",
    ),
    (
        "notice_response",
        codec.notice_response("00000", "hi"),
        b"N\x00\x00\x00\x20SNOTICE\x00VNOTICE\x00C00000\x00Mhi\x00\x00",
    ),
    ("auth_request ok", codec.auth_request(0), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (
        "auth_request md5 with salt",
        codec.auth_request(5, b"\x01\x02\x03\x04"),
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
    ),
    (
        "auth_request sasl mechanism list",
        codec.auth_request(10, b"SCRAM-SHA-256\x00\x00"),
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
    ),
    (
        "parameter_status",
        codec.parameter_status("client_encoding", "UTF8"),
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",
    ),
    (
        "backend_key_data",
        codec.backend_key_data(1234, 5678),
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x00\x00\x16\x2e",
    ),
    (
        "backend_key_data negative secret",
        codec.backend_key_data(1, -2),
        b"K\x00\x00\x00\x0c\x00\x00\x00\x01\xff\xff\xff\xfe",
    ),
    ("ready_for_query idle", codec.ready_for_query(b"I"), b"Z\x00\x00\x00\x05I"),
    ("ready_for_query in transaction", codec.ready_for_query(b"T"), b"Z\x00\x00\x00\x05T"),
    ("ready_for_query failed", codec.ready_for_query(b"E"), b"Z\x00\x00\x00\x05E"),
    ("empty_query_response", codec.empty_query_response(), b"I\x00\x00\x00\x04"),
    (
        "command_complete",
        codec.command_complete("SELECT 1"),
        b"C\x00\x00\x00\x0dSELECT 1\x00",
    ),
    # ---------------------------------------------------------------- frontend messages
    (
        "startup_message",
        codec.startup_message([("user", "alice"), ("database", "app")]),
        b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00alice\x00database\x00app\x00\x00",
    ),
    (
        "startup_message without parameters",
        codec.startup_message([]),
        b"\x00\x00\x00\x09\x00\x03\x00\x00\x00",
    ),
    (
        "cancel_request",
        codec.cancel_request(1234, 5678),
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\x00\x00\x16\x2e",
    ),
    (
        "password_message",
        codec.password_message(b"secret"),
        b"p\x00\x00\x00\x0bsecret\x00",
    ),
    (
        "sasl_initial_response",
        codec.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"),
        b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc",
    ),
    ("sasl_response", codec.sasl_response(b"c=biws"), b"p\x00\x00\x00\x0ac=biws"),
    ("query", codec.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    ("query from bytes", codec.query(b"SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    ("empty query", codec.query(""), b"Q\x00\x00\x00\x05\x00"),
    (
        "parse unnamed without types",
        codec.parse("", "SELECT 1"),
        b"P\x00\x00\x00\x10\x00SELECT 1\x00\x00\x00",
    ),
    (
        "parse named with a text parameter",
        codec.parse("s1", "SELECT $1", (25,)),
        b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x19",
    ),
    (
        "bind with a NULL parameter",
        codec.bind("", "s1", [b"42", None]),
        b"B\x00\x00\x00\x18"
        b"\x00s1\x00"  # portal "", statement "s1"
        b"\x00\x00"  # no parameter format codes: all text
        b"\x00\x02"  # two parameters
        b"\x00\x00\x00\x0242"  # length 2, "42"
        b"\xff\xff\xff\xff"  # length -1: NULL
        b"\x00\x00",  # no result format codes: all text
    ),
    (
        "bind with an empty (not NULL) parameter",
        codec.bind("", "", [b""]),
        b"B\x00\x00\x00\x10\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00",
    ),
    (
        "bind named portal without parameters",
        codec.bind("p", "", []),
        b"B\x00\x00\x00\x0dp\x00\x00\x00\x00\x00\x00\x00\x00",
    ),
    ("execute unnamed", codec.execute(), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    (
        "execute named with row limit",
        codec.execute("p1", 10),
        b"E\x00\x00\x00\x0bp1\x00\x00\x00\x00\x0a",
    ),
    ("sync", codec.sync(), b"S\x00\x00\x00\x04"),
    ("terminate", codec.terminate(), b"X\x00\x00\x00\x04"),
    ("frame flush", codec.frame(ord("H"), b""), b"H\x00\x00\x00\x04"),
]


@pytest.mark.parametrize(
    ("encoded", "expected"), [(e, x) for _, e, x in GOLDEN], ids=[n for n, _, _ in GOLDEN]
)
def test_encoder_output_matches_hand_written_bytes(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected


@pytest.mark.parametrize("expected", [x for _, _, x in GOLDEN], ids=[n for n, _, _ in GOLDEN])
def test_hand_written_golden_lengths_are_self_consistent(expected: bytes) -> None:
    # Guards the table itself: typed frames count length from after the type byte, untyped
    # (startup, cancel) ones from the first byte.
    if expected[:1] == b"\x00":
        assert struct.unpack("!i", expected[:4])[0] == len(expected)
    else:
        assert struct.unpack("!i", expected[1:5])[0] == len(expected) - 1


def test_every_public_encoder_has_a_golden_entry() -> None:
    encoders = {
        "error_response", "notice_response", "auth_request", "parameter_status",
        "backend_key_data", "ready_for_query", "empty_query_response", "command_complete",
        "startup_message", "cancel_request", "password_message", "sasl_initial_response",
        "sasl_response", "query", "parse", "bind", "execute", "sync", "terminate",
    }
    covered = {name.split(" ")[0] for name, _, _ in GOLDEN}
    assert encoders <= covered
    assert all(callable(getattr(codec, name)) for name in encoders)


@pytest.mark.parametrize(
    "call",
    [
        lambda: codec.parameter_status("a\x00b", "v"),
        lambda: codec.parameter_status("a", "v\x00"),
        lambda: codec.command_complete("SELECT\x001"),
        lambda: codec.query("SELECT 1\x00; DROP TABLE t"),
        lambda: codec.parse("s\x00", "SELECT 1"),
        lambda: codec.startup_message([("user", "a\x00b")]),
        lambda: codec.bind("p\x00", "", []),
        lambda: codec.execute("p\x00"),
        lambda: codec.sasl_initial_response("SCRAM\x00", b""),
    ],
)
def test_nul_inside_a_protocol_string_is_refused(call: object) -> None:
    with pytest.raises(ValueError, match="NUL"):
        call()  # type: ignore[operator]


# ---------------------------------------------------------------------- read_cstring


def test_read_cstring_returns_bytes_and_position_after_nul() -> None:
    buf = b"abc\x00def\x00"
    assert codec.read_cstring(buf, 0) == (b"abc", 4)
    assert codec.read_cstring(buf, 4) == (b"def", 8)
    assert codec.read_cstring(b"\x00", 0) == (b"", 1)


def test_read_cstring_accepts_bytearray_and_returns_bytes() -> None:
    value, pos = codec.read_cstring(bytearray(b"xy\x00"), 0)
    assert (value, pos) == (b"xy", 3)
    assert type(value) is bytes


def test_unterminated_cstring_is_a_client_protocol_error_by_default() -> None:
    with pytest.raises(ClientProtocolError, match="unterminated"):
        codec.read_cstring(b"abc", 0)


def test_unterminated_cstring_is_a_server_protocol_error_when_server() -> None:
    with pytest.raises(ServerProtocolError, match="unterminated"):
        codec.read_cstring(b"abc\x00def", 4, server=True)


# ---------------------------------------------------------------------- parse_error_fields


def test_parse_error_fields_decodes_hand_written_body_in_wire_order() -> None:
    body = b"SERROR\x00VERROR\x00C42601\x00Msyntax error\x00P8\x00\x00"
    assert codec.parse_error_fields(body) == [
        (ord("S"), b"ERROR"),
        (ord("V"), b"ERROR"),
        (ord("C"), b"42601"),
        (ord("M"), b"syntax error"),
        (ord("P"), b"8"),
    ]


def test_parse_error_fields_of_empty_list_is_empty() -> None:
    assert codec.parse_error_fields(b"\x00") == []


def test_error_response_round_trips_through_parse_error_fields() -> None:
    msg = codec.error_response("28000", "nope", detail="why", hint="fix")
    assert codec.parse_error_fields(msg[5:]) == [
        (ord("S"), b"ERROR"),
        (ord("V"), b"ERROR"),
        (ord("C"), b"28000"),
        (ord("M"), b"nope"),
        (ord("D"), b"why"),
        (ord("H"), b"fix"),
    ]


def test_error_message_is_utf8_on_the_wire() -> None:
    msg = codec.error_response("XX000", "caf\u00e9")
    assert dict(codec.parse_error_fields(msg[5:]))[ord("M")] == "caf\u00e9".encode()


@pytest.mark.parametrize(
    "body",
    [b"", b"SERROR", b"SERROR\x00", b"SERROR\x00C42601"],
    ids=["empty", "unterminated value", "no list terminator", "second value unterminated"],
)
def test_malformed_error_fields_raise_server_protocol_error(body: bytes) -> None:
    with pytest.raises(ServerProtocolError):
        codec.parse_error_fields(body)


@pytest.mark.parametrize("body", [b"", b"SERROR", b"SERROR\x00"])
def test_malformed_error_fields_from_a_client_raise_client_protocol_error(body: bytes) -> None:
    with pytest.raises(ClientProtocolError):
        codec.parse_error_fields(body, server=False)


def test_error_fields_with_trailing_bytes_raise_server_protocol_error() -> None:
    with pytest.raises(ServerProtocolError):
        codec.parse_error_fields(b"SERROR\x00\x00junk")


@settings(database=None)  # no example database: nothing to commit by accident
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=255),
            st.binary(max_size=40).filter(lambda b: b"\x00" not in b),
        ),
        max_size=12,
    )
)
def test_error_fields_round_trip_for_any_codes_and_nul_free_values(
    fields: list[tuple[int, bytes]],
) -> None:
    assert codec.parse_error_fields(codec.encode_error_fields(fields)) == fields


# ---------------------------------------------------------------------- parse_parameter_status


def test_parse_parameter_status_decodes_hand_written_body() -> None:
    assert codec.parse_parameter_status(b"TimeZone\x00Europe/Paris\x00") == (
        "TimeZone",
        "Europe/Paris",
    )


def test_parameter_status_round_trips() -> None:
    msg = codec.parameter_status("application_name", "caf\u00e9")
    assert codec.parse_parameter_status(msg[5:]) == ("application_name", "caf\u00e9")


@pytest.mark.parametrize("body", [b"", b"TimeZone", b"TimeZone\x00UTC"])
def test_malformed_parameter_status_raises_server_protocol_error(body: bytes) -> None:
    with pytest.raises(ServerProtocolError):
        codec.parse_parameter_status(body)


def test_parameter_status_with_trailing_bytes_raises_server_protocol_error() -> None:
    with pytest.raises(ServerProtocolError):
        codec.parse_parameter_status(b"TimeZone\x00UTC\x00junk")


# ---------------------------------------------------------------------- parse_startup_params


def test_parse_startup_params_decodes_hand_written_body() -> None:
    body = b"user\x00alice\x00database\x00app\x00application_name\x00\x00\x00"
    assert codec.parse_startup_params(body) == {
        "user": "alice",
        "database": "app",
        "application_name": "",
    }


def test_parse_startup_params_of_empty_list_is_empty() -> None:
    assert codec.parse_startup_params(b"\x00") == {}


def test_startup_message_round_trips_after_length_and_version() -> None:
    params = [("user", "bob"), ("database", "app"), ("options", "-c x=1")]
    msg = codec.startup_message(params)
    assert struct.unpack("!ii", msg[:8]) == (len(msg), 196608)
    assert codec.parse_startup_params(msg[8:]) == dict(params)


def test_duplicate_startup_key_is_refused() -> None:
    with pytest.raises(ClientProtocolError, match="'user' given twice"):
        codec.parse_startup_params(b"user\x00a\x00user\x00b\x00\x00")


@pytest.mark.parametrize(
    "body",
    [b"user\x00a\x00\x00x", b"\x00\x00", b"\x00user\x00a\x00\x00"],
    ids=["junk after terminator", "double terminator", "params after terminator"],
)
def test_trailing_bytes_after_startup_params_are_refused(body: bytes) -> None:
    with pytest.raises(ClientProtocolError, match="trailing"):
        codec.parse_startup_params(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"user\x00alice\x00", b"user\x00alice", b"user", b"user\x00\x00"],
    ids=["empty", "no terminator", "unterminated value", "unterminated key", "key only"],
)
def test_unterminated_startup_params_are_refused(body: bytes) -> None:
    with pytest.raises(ClientProtocolError):
        codec.parse_startup_params(body)
