"""Encoders and decoders for the protocol 3.0 messages pgtenant makes or must look inside.

Pure functions over ``bytes``; frames the proxy only forwards are never decoded here.
Layouts follow the PostgreSQL docs, "Message Formats" (protocol-message-formats.html).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final

from ..errors import ClientProtocolError, ServerProtocolError
from .constants import (
    AUTHENTICATION,
    BACKEND_KEY_DATA,
    BIND,
    COMMAND_COMPLETE,
    DATA_ROW,
    EMPTY_QUERY_RESPONSE,
    ERROR_RESPONSE,
    EXECUTE,
    FIELD_DETAIL,
    FIELD_HINT,
    FIELD_MESSAGE,
    FIELD_SEVERITY,
    FIELD_SEVERITY_NONLOCALIZED,
    FIELD_SQLSTATE,
    NEGOTIATE_PROTOCOL_VERSION,
    NOTICE_RESPONSE,
    PARAMETER_STATUS,
    PARSE,
    PASSWORD,
    PROTOCOL_3_0,
    QUERY,
    READY_FOR_QUERY,
    ROW_DESCRIPTION,
    SYNC,
    TERMINATE,
)

__all__ = [
    "HEADER",
    "auth_request",
    "backend_key_data",
    "bind",
    "cancel_request",
    "command_complete",
    "empty_query_response",
    "encode_error_fields",
    "error_response",
    "execute",
    "frame",
    "negotiate_protocol_version",
    "notice_response",
    "parameter_status",
    "parse",
    "parse_error_fields",
    "parse_parameter_status",
    "parse_startup_params",
    "password_message",
    "query",
    "read_cstring",
    "ready_for_query",
    "sasl_initial_response",
    "sasl_response",
    "startup_message",
    "sync",
    "terminate",
]

HEADER = struct.Struct("!Bi")  # type byte + int32 length (the length includes itself)
_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_pack_i32 = _I32.pack
_pack_i16 = _I16.pack
_pack_header = HEADER.pack


def frame(msg_type: int, body: bytes) -> bytes:
    """Returns: one typed message: type byte, int32 length, body."""
    return _pack_header(msg_type, len(body) + 4) + body


def _cstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    if b"\x00" in raw:
        raise ValueError("NUL byte in a protocol string")
    return raw + b"\x00"


def read_cstring(buf: bytes | bytearray, pos: int, *, server: bool = False,
                 limit: int | None = None) -> tuple[bytes, int]:
    """Read a NUL-terminated string at ``pos`` that must end before ``limit`` (a frame end).

    Returns: (the bytes without the NUL, position after the NUL).
    Raises: ClientProtocolError (or ServerProtocolError when ``server``) if unterminated.
    """
    end = buf.find(b"\x00", pos, len(buf) if limit is None else limit)
    if end < 0:
        err = ServerProtocolError if server else ClientProtocolError
        raise err("unterminated string in protocol message")
    return bytes(buf[pos:end]), end + 1


# ------------------------------------------------------------------ backend messages we make

def encode_error_fields(fields: Iterable[tuple[int, bytes]]) -> bytes:
    """Returns: an ErrorResponse/NoticeResponse body from (field code, value) pairs."""
    return b"".join(bytes((code,)) + value + b"\x00" for code, value in fields) + b"\x00"


def _report(msg_type: int, severity: str, sqlstate: str, message: str,
            detail: str | None, hint: str | None) -> bytes:
    fields: list[tuple[int, bytes]] = [
        (FIELD_SEVERITY, severity.encode()),
        (FIELD_SEVERITY_NONLOCALIZED, severity.encode()),
        (FIELD_SQLSTATE, sqlstate.encode()),
        (FIELD_MESSAGE, message.encode("utf-8", "replace").replace(b"\x00", b"")),
    ]
    if detail:
        fields.append((FIELD_DETAIL, detail.encode("utf-8", "replace").replace(b"\x00", b"")))
    if hint:
        fields.append((FIELD_HINT, hint.encode("utf-8", "replace").replace(b"\x00", b"")))
    return frame(msg_type, encode_error_fields(fields))


def error_response(sqlstate: str, message: str, *, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    """Returns: an ErrorResponse ('E') message."""
    return _report(ERROR_RESPONSE, severity, sqlstate, message, detail, hint)


def notice_response(sqlstate: str, message: str, *, severity: str = "NOTICE",
                    detail: str | None = None, hint: str | None = None) -> bytes:
    """Returns: a NoticeResponse ('N') message."""
    return _report(NOTICE_RESPONSE, severity, sqlstate, message, detail, hint)


def auth_request(code: int, extra: bytes = b"") -> bytes:
    """Returns: an Authentication ('R') message with sub-code ``code``."""
    return frame(AUTHENTICATION, _pack_i32(code) + extra)


def parameter_status(name: str, value: str) -> bytes:
    """Returns: a ParameterStatus ('S') message."""
    return frame(PARAMETER_STATUS, _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    """Returns: a BackendKeyData ('K') message (protocol 3.0: two int32)."""
    return frame(BACKEND_KEY_DATA, _pack_i32(pid) + _pack_i32(secret))


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str]) -> bytes:
    """Returns: a NegotiateProtocolVersion ('v') message."""
    body = _pack_i32(newest_minor) + _pack_i32(len(unrecognized))
    return frame(NEGOTIATE_PROTOCOL_VERSION, body + b"".join(_cstr(name) for name in unrecognized))


def ready_for_query(status: bytes) -> bytes:
    """Returns: a ReadyForQuery ('Z') message with status b'I', b'T' or b'E'."""
    return frame(READY_FOR_QUERY, status)


def empty_query_response() -> bytes:
    """Returns: an EmptyQueryResponse ('I') message."""
    return frame(EMPTY_QUERY_RESPONSE, b"")


def command_complete(tag: str) -> bytes:
    """Returns: a CommandComplete ('C') message."""
    return frame(COMMAND_COMPLETE, _cstr(tag))


_TEXT_OID: Final = 25
_INT8_OID: Final = 20


def row_description(columns: Sequence[tuple[str, bool]]) -> bytes:
    """Returns: a RowDescription ('T') of text-format columns, (name, is_integer) each:
    int8 for integers (clients align them as numbers), text otherwise."""
    body = bytearray(struct.pack("!h", len(columns)))
    for name, is_int in columns:
        oid, size = (_INT8_OID, 8) if is_int else (_TEXT_OID, -1)
        body += _cstr(name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0)
    return frame(ROW_DESCRIPTION, bytes(body))


def data_row(values: Sequence[object]) -> bytes:
    """Returns: a DataRow ('D') with each value as text (None as SQL NULL)."""
    body = bytearray(struct.pack("!h", len(values)))
    for value in values:
        if value is None:
            body += b"\xff\xff\xff\xff"
            continue
        data = str(value).encode()
        body += _pack_i32(len(data)) + data
    return frame(DATA_ROW, bytes(body))


# ------------------------------------------------------------------ frontend messages we make

def startup_message(params: Sequence[tuple[str, str]]) -> bytes:
    """Returns: an untyped StartupMessage for protocol 3.0."""
    body = _pack_i32(PROTOCOL_3_0) + b"".join(_cstr(k) + _cstr(v) for k, v in params) + b"\x00"
    return _pack_i32(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    """Returns: an untyped CancelRequest packet."""
    return _pack_i32(16) + _pack_i32(80877102) + _pack_i32(pid) + _pack_i32(secret)


def password_message(password: bytes) -> bytes:
    """Returns: a PasswordMessage ('p'), NUL-terminated."""
    return frame(PASSWORD, password + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """Returns: a SASLInitialResponse ('p')."""
    return frame(PASSWORD, _cstr(mechanism) + _pack_i32(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    """Returns: a SASLResponse ('p')."""
    return frame(PASSWORD, data)


def query(text: str | bytes) -> bytes:
    """Returns: a simple Query ('Q')."""
    return frame(QUERY, _cstr(text))


def parse(name: str, text: str, param_types: Sequence[int] = ()) -> bytes:
    """Returns: a Parse ('P') message."""
    body = _cstr(name) + _cstr(text) + _pack_i16(len(param_types))
    body += b"".join(_pack_i32(t) for t in param_types)
    return frame(PARSE, body)


def bind(portal: str, statement: str, params: Sequence[bytes | None]) -> bytes:
    """Returns: a Bind ('B') message with all parameters in text format, text results."""
    body = _cstr(portal) + _cstr(statement) + _pack_i16(0) + _pack_i16(len(params))
    for value in params:
        body += _pack_i32(-1) if value is None else _pack_i32(len(value)) + value
    body += _pack_i16(0)
    return frame(BIND, body)


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    """Returns: an Execute ('E') message."""
    return frame(EXECUTE, _cstr(portal) + _pack_i32(max_rows))


def sync() -> bytes:
    """Returns: a Sync ('S') message."""
    return frame(SYNC, b"")


def terminate() -> bytes:
    """Returns: a Terminate ('X') message."""
    return frame(TERMINATE, b"")


# ------------------------------------------------------------------ decoders

def parse_error_fields(body: bytes, *, server: bool = True) -> list[tuple[int, bytes]]:
    """Decode an ErrorResponse/NoticeResponse body.

    Returns: the (field code, value) pairs in wire order.
    Raises: ServerProtocolError (ClientProtocolError when not ``server``) if malformed.
    """
    fields: list[tuple[int, bytes]] = []
    pos, end = 0, len(body)
    while pos < end:
        code = body[pos]
        if code == 0:
            if pos != end - 1:
                err = ServerProtocolError if server else ClientProtocolError
                raise err("trailing bytes after ErrorResponse fields")
            return fields
        value, pos = read_cstring(body, pos + 1, server=server)
        fields.append((code, value))
    err = ServerProtocolError if server else ClientProtocolError
    raise err("unterminated ErrorResponse field list")


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    """Returns: (name, value) of a ParameterStatus body.

    Raises: ServerProtocolError if malformed.
    """
    name, pos = read_cstring(body, 0, server=True)
    value, pos = read_cstring(body, pos, server=True)
    if pos != len(body):
        raise ServerProtocolError("trailing bytes after ParameterStatus")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_startup_params(body: bytes) -> dict[str, str]:
    """Decode the key/value list of a StartupMessage (after the version int32).

    Returns: the parameters.
    Raises: ClientProtocolError if the list is malformed or repeats a key.
    """
    params: dict[str, str] = {}
    pos, end = 0, len(body)
    while pos < end:
        if body[pos] == 0:
            if pos != end - 1:
                raise ClientProtocolError("trailing bytes after startup parameters")
            return params
        key, pos = read_cstring(body, pos)
        value, pos = read_cstring(body, pos)
        name = key.decode("utf-8", "replace")
        if name in params:
            raise ClientProtocolError(f"startup parameter {name!r} given twice")
        params[name] = value.decode("utf-8", "replace")
    raise ClientProtocolError("startup parameters not terminated")
