"""Wire constants, named as in PostgreSQL's src/include/libpq/protocol.h.

Frontend and backend type bytes overlap ('S' is Sync from a client, ParameterStatus from a
server), hence two enums. Hot loops use the module-level ``int`` aliases, not enum members.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "ADMIN_DATABASE",
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "PROTOCOL_3_0",
    "SSL_REQUEST_CODE",
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
