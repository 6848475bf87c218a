"""One exception tree for pgtenant; every error carries the SQLSTATE the client will see.

Exceptions become an ErrorResponse in exactly one place per session (``client.py``). This
module owns the classes and the SQLSTATE table; it does no I/O.

| class                 | SQLSTATE | meaning                                              |
|-----------------------|----------|------------------------------------------------------|
| ClientProtocolError   | 08P01    | protocol_violation: the client sent malformed bytes  |
| ServerProtocolError   | 08P01    | the backend sent something we cannot follow          |
| UnsupportedProtocol   | 0A000    | feature_not_supported: protocol version/request kind |
| InvalidParameter      | 22023    | invalid_parameter_value: a startup parameter's value |
| MessageTooLarge       | 08P01    | a frame above ``max_message_size``                   |
| AuthFailed            | 28P01    | invalid_password: wrong, expired or revoked token    |
| AuthRefused           | 28000    | invalid_authorization_specification (policy refusal) |
| UnknownDatabase       | 3D000    | invalid_catalog_name: dbname not in the config       |
| ContextError          | 42501    | the tenant's context cannot be rendered: fail closed |
| PoolTimeout           | 53300    | too_many_connections: pool exhausted past the wait   |
| TooManyConnections    | 53300    | too_many_connections: a per-tenant client limit      |
| TooManyLogins         | 53300    | too_many_connections: max_login_clients reached      |
| ProgramLimitExceeded  | 54000    | program_limit_exceeded: max_parsed_query_size        |
| QueryTimeout          | 57014    | query_canceled: query_timeout                        |
| IdleInTransactionTimeout | 25P03 | idle_in_transaction_session_timeout                  |
| ClientIdleTimeout     | 57P05    | idle_session_timeout: client_idle_timeout            |
| PoolClosed            | 57P01    | admin_shutdown: the pool or proxy is going away      |
| AdminShutdown         | 57P01    | admin_shutdown: KILL or SHUTDOWN from the console    |
| QueryCanceled         | 57014    | query_canceled: cancelled while waiting for a server |
| ServerUnavailable     | 08006    | connection_failure: backend unreachable/lost         |
| ServerLoginFailed     | 08004    | sqlserver_rejected_establishment_of_sqlconnection    |
| LoginTimeout          | 08P01    | client did not finish startup in time                |
| ConfigError           | F0000    | config_file_error (never sent to a client)           |
"""

from __future__ import annotations

import errno
from typing import Final

__all__ = [
    "AdminShutdown",
    "AuthError",
    "AuthFailed",
    "AuthRefused",
    "ClientIdleTimeout",
    "ClientProtocolError",
    "ConfigError",
    "ContextError",
    "IdleInTransactionTimeout",
    "InvalidParameter",
    "LoginTimeout",
    "MessageTooLarge",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ProgramLimitExceeded",
    "ProtocolError",
    "ProxyError",
    "QueryCanceled",
    "QueryTimeout",
    "ServerLoginFailed",
    "ServerProtocolError",
    "ServerUnavailable",
    "TooManyConnections",
    "TooManyLogins",
    "UnknownDatabase",
    "UnsupportedProtocol",
    "WrongUser",
    "connect_failure",
    "connect_failure_kind",
]


class ProxyError(Exception):
    """Base of every error pgtenant raises on purpose.

    ``sqlstate`` is what the client sees in the ErrorResponse ``C`` field; ``reason`` is the
    short grep-able disconnect reason for logs (defaults to the class name).
    """

    sqlstate: str = "XX000"
    severity: str = "FATAL"

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint

    @property
    def reason(self) -> str:
        return type(self).__name__


class ProtocolError(ProxyError):
    sqlstate = "08P01"


class ClientProtocolError(ProtocolError):
    """The client broke the wire protocol; only that client is ended."""


class ServerProtocolError(ProtocolError):
    """The backend sent bytes we cannot follow; its connection is closed, never pooled."""


class MessageTooLarge(ClientProtocolError):
    pass


class UnsupportedProtocol(ProtocolError):
    sqlstate = "0A000"


class InvalidParameter(ProtocolError):
    sqlstate = "22023"


class LoginTimeout(ProtocolError):
    pass


class AuthError(ProxyError):
    sqlstate = "28000"


class AuthFailed(AuthError):
    """Wrong, expired or revoked token: one message for all three, on purpose."""

    sqlstate = "28P01"


class AuthRefused(AuthError):
    sqlstate = "28000"


class WrongUser(AuthRefused):
    """A valid token presented under a user name that is not its tenant's slug (nor one of
    ``any_user``): refused rather than ignored, so a client's ``user`` means what it says."""


class UnknownDatabase(ProxyError):
    sqlstate = "3D000"


class ContextError(ProxyError):
    """The tenant context cannot be proven; the transaction must not run."""

    sqlstate = "42501"


class PoolError(ProxyError):
    pass


class PoolTimeout(PoolError):
    sqlstate = "53300"


class PoolClosed(PoolError):
    sqlstate = "57P01"


class QueryCanceled(PoolError):
    """A CancelRequest arrived while the statement still waited for a server."""

    sqlstate = "57014"


class ServerUnavailable(PoolError):
    sqlstate = "08006"


class ServerLoginFailed(PoolError):
    sqlstate = "08004"


class ConfigError(ProxyError):
    sqlstate = "F0000"


class AdminShutdown(ProxyError):
    sqlstate = "57P01"


class TooManyConnections(AuthError):
    sqlstate = "53300"


class QueryTimeout(ProxyError):
    sqlstate = "57014"


class IdleInTransactionTimeout(ProxyError):
    sqlstate = "25P03"


class ClientIdleTimeout(ProxyError):
    sqlstate = "57P05"


class TooManyLogins(ProxyError):
    """Connections that have not authenticated yet are at ``max_login_clients``."""

    sqlstate = "53300"


class ProgramLimitExceeded(ProxyError):
    """A text the statement guard would have to parse is above ``max_parsed_query_size``."""

    sqlstate = "54000"


def connect_failure_kind(exc: BaseException) -> str | None:
    """Returns: "connection refused", "unknown host" or "timed out" for a failed connection
    to Postgres, None for any other error."""
    if (isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED
            or "Connect call failed" in str(exc)):
        return "connection refused"
    import socket  # here: protocol/ imports this module and must load no I/O module

    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return None


_CONNECT_HINTS: Final = {
    "connection refused": "connection refused: is PostgreSQL running and listening there?",
    "unknown host": "unknown host name",
    "timed out": "timed out: is the host reachable and the port right?",
}


def connect_failure(exc: BaseException) -> str:
    """Returns: a sentence for a failed connection to Postgres (asyncpg's and the socket
    layer's own texts, "[Errno 111] Connect call failed ...", name no cause a person can act
    on)."""
    kind = connect_failure_kind(exc)
    return _CONNECT_HINTS[kind] if kind else (str(exc) or type(exc).__name__)
