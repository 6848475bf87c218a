"""Wire constants, named as in PostgreSQL's src/include/libpq/protocol.h.

Frontend and backend type bytes overlap ('S' is Sync from a client, ParameterStatus from a
server), hence two enums. Hot loops use the module-level ``int`` aliases, not enum members.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "ADMIN_DATABASE",
    "AUTHENTICATION",
    "BACKEND_KEY_DATA",
    "BIND",
    "BIND_COMPLETE",
    "CANCEL_REQUEST_CODE",
    "CLOSE",
    "CLOSE_COMPLETE",
    "COMMAND_COMPLETE",
    "COPY_BOTH_RESPONSE",
    "COPY_DATA",
    "COPY_DONE",
    "COPY_FAIL",
    "COPY_IN_RESPONSE",
    "COPY_OUT_RESPONSE",
    "DATA_ROW",
    "DESCRIBE",
    "EMPTY_QUERY_RESPONSE",
    "ERROR_RESPONSE",
    "EXECUTE",
    "FIELD_DETAIL",
    "FIELD_HINT",
    "FIELD_MESSAGE",
    "FIELD_POSITION",
    "FIELD_SEVERITY",
    "FIELD_SEVERITY_NONLOCALIZED",
    "FIELD_SQLSTATE",
    "FLUSH",
    "FUNCTION_CALL",
    "FUNCTION_CALL_RESPONSE",
    "GSSENC_REQUEST_CODE",
    "NEGOTIATE_PROTOCOL_VERSION",
    "NOTICE_RESPONSE",
    "NOTIFICATION_RESPONSE",
    "NO_DATA",
    "PARAMETER_DESCRIPTION",
    "PARAMETER_STATUS",
    "PARSE",
    "PARSE_COMPLETE",
    "PASSWORD",
    "PORTAL_SUSPENDED",
    "PROTOCOL_3_0",
    "QUERY",
    "READY_FOR_QUERY",
    "ROW_DESCRIPTION",
    "SSL_REQUEST_CODE",
    "SYNC",
    "TARGET_PORTAL",
    "TARGET_STATEMENT",
    "TEMP_NOTICE",
    "TERMINATE",
    "TXN_BLOCK",
    "TXN_FAILED",
    "TXN_IDLE",
    "BackendMsg",
    "FrontendMsg",
]


class FrontendMsg(IntEnum):
    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendMsg(IntEnum):
    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


# Plain ``int`` aliases for hot loops (psycopg's ``WAIT_R = Wait.R`` habit): comparing a
# frame's type byte with a module-level int costs nothing more than with a literal.
# Frontend messages (what a client sends).
BIND: Final = FrontendMsg.BIND.value
CLOSE: Final = FrontendMsg.CLOSE.value
COPY_FAIL: Final = FrontendMsg.COPY_FAIL.value
DESCRIBE: Final = FrontendMsg.DESCRIBE.value
EXECUTE: Final = FrontendMsg.EXECUTE.value
FLUSH: Final = FrontendMsg.FLUSH.value
FUNCTION_CALL: Final = FrontendMsg.FUNCTION_CALL.value
PARSE: Final = FrontendMsg.PARSE.value
PASSWORD: Final = FrontendMsg.PASSWORD.value
QUERY: Final = FrontendMsg.QUERY.value
SYNC: Final = FrontendMsg.SYNC.value
TERMINATE: Final = FrontendMsg.TERMINATE.value
# Backend messages (what a server sends). CopyData/CopyDone go both ways.
AUTHENTICATION: Final = BackendMsg.AUTHENTICATION.value
BACKEND_KEY_DATA: Final = BackendMsg.BACKEND_KEY_DATA.value
BIND_COMPLETE: Final = BackendMsg.BIND_COMPLETE.value
CLOSE_COMPLETE: Final = BackendMsg.CLOSE_COMPLETE.value
COMMAND_COMPLETE: Final = BackendMsg.COMMAND_COMPLETE.value
COPY_BOTH_RESPONSE: Final = BackendMsg.COPY_BOTH_RESPONSE.value
COPY_DATA: Final = BackendMsg.COPY_DATA.value
COPY_DONE: Final = BackendMsg.COPY_DONE.value
COPY_IN_RESPONSE: Final = BackendMsg.COPY_IN_RESPONSE.value
COPY_OUT_RESPONSE: Final = BackendMsg.COPY_OUT_RESPONSE.value
DATA_ROW: Final = BackendMsg.DATA_ROW.value
EMPTY_QUERY_RESPONSE: Final = BackendMsg.EMPTY_QUERY_RESPONSE.value
ERROR_RESPONSE: Final = BackendMsg.ERROR_RESPONSE.value
FUNCTION_CALL_RESPONSE: Final = BackendMsg.FUNCTION_CALL_RESPONSE.value
NEGOTIATE_PROTOCOL_VERSION: Final = BackendMsg.NEGOTIATE_PROTOCOL_VERSION.value
NO_DATA: Final = BackendMsg.NO_DATA.value
NOTICE_RESPONSE: Final = BackendMsg.NOTICE_RESPONSE.value
NOTIFICATION_RESPONSE: Final = BackendMsg.NOTIFICATION_RESPONSE.value
PARAMETER_DESCRIPTION: Final = BackendMsg.PARAMETER_DESCRIPTION.value
PARAMETER_STATUS: Final = BackendMsg.PARAMETER_STATUS.value
PARSE_COMPLETE: Final = BackendMsg.PARSE_COMPLETE.value
PORTAL_SUSPENDED: Final = BackendMsg.PORTAL_SUSPENDED.value
READY_FOR_QUERY: Final = BackendMsg.READY_FOR_QUERY.value
ROW_DESCRIPTION: Final = BackendMsg.ROW_DESCRIPTION.value
# CopyFail is frontend only; ReadyForQuery's transaction status bytes.
TXN_IDLE: Final = ord("I")  # not in a transaction block
TXN_BLOCK: Final = ord("T")  # in a transaction block
TXN_FAILED: Final = ord("E")  # in a failed transaction block

# ErrorResponse/NoticeResponse field codes (PostgreSQL's PG_DIAG_*, protocol-error-fields).
FIELD_SEVERITY: Final = ord("S")  # localized
FIELD_SEVERITY_NONLOCALIZED: Final = ord("V")
FIELD_SQLSTATE: Final = ord("C")
FIELD_MESSAGE: Final = ord("M")
FIELD_DETAIL: Final = ord("D")
FIELD_HINT: Final = ord("H")
FIELD_POSITION: Final = ord("P")
# What a Describe or Close names: a prepared statement or a portal.
TARGET_STATEMENT: Final = ord("S")
TARGET_PORTAL: Final = ord("P")

# Special startup-packet codes (the "protocol version" field of untyped first packets).
PROTOCOL_3_0: Final = 196608  # 3 << 16
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

# Authentication request sub-codes (AuthenticationXXX 'R' messages).
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# The database name that reaches pgtenant's admin console instead of a tenant's database.
ADMIN_DATABASE: Final = "pgtenant"

# The message of the NOTICE the database's ``pgtenant_temp_objects`` event trigger raises
# after a command that created a temporary object (control/hardening.py installs it). The
# proxy swallows it and has that server's temp schema emptied before anyone else uses it
# (protocol/backend.py, session.py): the server's word, since SQL the classifier cannot see
# (a tenant's function) may create temp objects too.
TEMP_NOTICE: Final = "pgtenant_temp_objects: this command created a temporary object"
