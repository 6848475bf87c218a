"""A client's startup as a generator: encryption requests, CancelRequest, StartupMessage,
protocol version, startup settings and the cleartext password exchange.

Bytes in, ops out (STYLE rule 1, like ``handshake.py`` for the backend login): it yields
``Send`` (bytes for the client), ``RECV`` (resume with the next bytes the client sent) or
``START_TLS`` (the driver upgrades the connection, then resumes with None) or ``Identify``
(who the client says it is, for the logs; resume with None), and returns what
the connection asks for: ``Authenticate`` (check this token), ``Cancel`` (forward this key)
or ``Goodbye``. A refusal is raised as a ``ProxyError`` carrying the client-visible SQLSTATE.
``client.py`` holds the one method that drives it. It does not look tokens up, route
tenants or apply limits: that needs I/O and the proxy's tables.

Theory of operation: the client speaks first. Until a StartupMessage, every packet is
untyped (int32 length, int32 code): SSLRequest/GSSENCRequest are answered 'S' (then TLS)
or 'N', a CancelRequest ends the exchange, a 3.x StartupMessage moves on to the password
(AuthenticationCleartextPassword, then a typed 'p' message). Sizes are capped before any
byte is kept (untrusted input has bounded cost: ARCHITECTURE §5).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection, Generator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from ..errors import (
    AuthRefused,
    ClientProtocolError,
    InvalidParameter,
    UnknownDatabase,
    UnsupportedProtocol,
)
from . import codec
from .constants import (
    ADMIN_DATABASE,
    AUTH_CLEARTEXT,
    AUTH_OK,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PASSWORD,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
)
from .encoding import UNSAFE, canonical, encoding_key
from .frames import (
    HEADER_SIZE,
    MIN_PASSWORD,
    PASSWORD_LIMIT,
    STARTUP_HEADER_SIZE,
    STARTUP_LIMIT,
    FrameError,
    frame_at,
    startup_at,
)
from .handshake import RECV, Recv, Send
from .sql import is_on

__all__ = [
    "MAX_STARTUP",
    "START_TLS",
    "Authenticate",
    "Cancel",
    "Database",
    "Goodbye",
    "Identify",
    "StartTls",
    "Startup",
    "StartupRules",
    "admin_greeting",
    "client_startup",
    "greeting",
    "parse_options",
]

# The startup packet's cap (frames.py holds every frame limit; kept here as it was public).
MAX_STARTUP: Final = STARTUP_LIMIT
# A whole Terminate message ('X', length 4), as the first bytes of a connection.
_TERMINATE: Final = b"X\x00\x00\x00\x04"
_P: Final = PASSWORD
# Parameters reported to clients from the server's set, as Postgres reports them at login.
_REPORTED: Final = (
    "server_version", "server_encoding", "client_encoding", "DateStyle", "IntervalStyle",
    "TimeZone", "integer_datetimes", "standard_conforming_strings", "in_hot_standby",
    "default_transaction_read_only", "scram_iterations",
)
_unpack_i32 = struct.Struct("!i").unpack_from
_unpack_ii = struct.Struct("!ii").unpack


@dataclass(frozen=True, slots=True)
class StartTls:
    """Upgrade the connection to TLS (after 'S' went out), then resume with None."""


START_TLS: Final = StartTls()


@dataclass(frozen=True, slots=True)
class Identify:
    """The client named its user and database (resume with None): the driver keeps them, so
    that a refusal of the rest of its StartupMessage is logged with them."""

    user: str
    database: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """The client asks to log in: look ``token`` up (or check it against the admin token)."""

    user: str
    database: str
    token: str
    # The settings to re-apply with every transaction (``options`` -c included), and the
    # client_encoding it asked for (canonical name), which is session state of servers.
    settings: tuple[tuple[str, str], ...] = ()
    client_encoding: str = "UTF8"
    admin: bool = False  # dbname=pgtenant: the admin console
    rest: bytes = b""  # bytes pipelined after the password message


@dataclass(frozen=True, slots=True)
class Cancel:
    """A CancelRequest: forward it (``key`` is None when it was malformed), then close."""

    key: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Close without an ErrorResponse (``reason`` is the disconnect's log reason)."""

    reason: str


class Database(Protocol):
    """What startup needs to know of a configured database (a ``Pool``)."""

    @property
    def names_backends(self) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StartupRules:
    """What the proxy allows, as of the connection's start (no live tables needed)."""

    peer: str  # the client's address, for messages
    tls_available: bool  # [tls] is configured: SSLRequest is answered 'S'
    # Whether a cleartext token may cross this connection, given whether it is encrypted
    # (tls.cleartext_token_allowed, bound to the peer and the config).
    cleartext_allowed: Callable[[bool], bool]
    databases: Mapping[str, Database]
    is_protected: Callable[[str], bool]  # the guard's settings pgtenant owns
    admin_token_set: bool = False
    admin_users: Collection[str] = ()


StartupOp = Send | Recv | StartTls | Identify
Startup = Generator[StartupOp, bytes | None, Authenticate | Cancel | Goodbye]


def client_startup(rules: StartupRules) -> Startup:
    """Run a client's startup up to the point where its token must be checked.

    Returns (as the generator's value): ``Authenticate``, ``Cancel`` or ``Goodbye``.
    Raises: ClientProtocolError (08P01) for malformed packets, UnsupportedProtocol (0A000)
    for a protocol other than 3.x, replication or an unsafe setting, AuthRefused (28000),
    UnknownDatabase (3D000) or InvalidParameter (22023), as ``startup_settings`` says.
    """
    buf = bytearray()
    encrypted = False
    while True:
        if buf[:5] == _TERMINATE:
            # A Terminate before any startup packet (node-postgres's end() of a client that
            # never connected): Postgres just closes, and a client that said goodbye does
            # not expect an ErrorResponse (node-pg crashes on one).
            return Goodbye("client sent Terminate before startup")
        if len(buf) < STARTUP_HEADER_SIZE:
            buf += yield from _recv()
            continue
        try:
            length = startup_at(buf, 0, MAX_STARTUP)
        except FrameError as exc:
            raise ClientProtocolError(f"invalid startup packet length {exc.length}") from None
        if length < 0:
            buf += yield from _recv()
            continue
        (code,) = _unpack_i32(buf, 4)
        body = bytes(buf[8:length])
        del buf[:length]
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            if buf:  # bytes after the request before our answer: a buffer-stuffing attack
                raise ClientProtocolError("unexpected data after encryption request")
            if encrypted:  # as Postgres: one negotiation per connection
                raise ClientProtocolError("encryption request on an encrypted connection")
            if code == SSL_REQUEST_CODE and rules.tls_available:
                yield Send(b"S")
                yield START_TLS
                encrypted = True
            else:
                yield Send(b"N")
        elif code == CANCEL_REQUEST_CODE:
            return Cancel(_unpack_ii(body) if len(body) == 8 else None)
        elif code >> 16 == 3:
            # Like Postgres (ProcessStartupPacket): a newer 3.x minor or _pq_.* options
            # are negotiated down to 3.0 with NegotiateProtocolVersion, not refused.
            params = codec.parse_startup_params(body)
            unknown = sorted(k for k in params if k.startswith("_pq_."))
            if code != PROTOCOL_3_0 or unknown:
                yield Send(codec.negotiate_protocol_version(0, unknown))
            params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
            user = params.get("user")
            if not user:
                raise ClientProtocolError("no user name in the startup packet")
            database = params.get("database") or user
            yield Identify(user, database)
            login = _startup(rules, user, database, params, encrypted)
            yield Send(codec.auth_request(AUTH_CLEARTEXT))
            token = yield from _password(buf)
            return Authenticate(login.user, login.database, token, login.settings,
                                login.client_encoding, login.admin, bytes(buf))
        else:
            raise UnsupportedProtocol(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                "pgtenant speaks 3.0"
            )


def _recv() -> Generator[Recv, bytes | None, bytes]:
    data = yield RECV
    assert data is not None
    return data


def _password(buf: bytearray) -> Generator[Recv, bytes | None, str]:
    """Returns: the token of the client's PasswordMessage, consumed from ``buf``.
    Raises: ClientProtocolError for anything but a sane 'p' message."""
    while len(buf) < HEADER_SIZE:
        buf += yield from _recv()
    if buf[0] != _P:
        raise ClientProtocolError(f"expected a password message, got {chr(buf[0])!r}")
    try:
        while (end := frame_at(buf, 0, PASSWORD_LIMIT, MIN_PASSWORD)) < 0:
            buf += yield from _recv()
    except FrameError as exc:
        raise ClientProtocolError(f"invalid password message length {exc.length}") from None
    raw, _ = codec.read_cstring(bytes(buf[HEADER_SIZE:end]), 0)
    del buf[:end]
    return raw.decode("utf-8", "replace")


def _startup(rules: StartupRules, user: str, database: str, params: dict[str, str],
             encrypted: bool) -> Authenticate:
    """Check the rest of a StartupMessage's parameters.

    Returns: the login so far (an ``Authenticate`` without its token).
    Raises: see ``client_startup``.
    """
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise UnsupportedProtocol("replication connections are not supported by pgtenant")
    if database == ADMIN_DATABASE:
        if not rules.admin_token_set:
            raise AuthRefused("the admin console is not configured",
                              hint="set [admin] token_sha256 (see `pgtenant admin-token`)")
        if user not in rules.admin_users:
            raise AuthRefused(f'user "{user}" may not use the admin console',
                              hint=f"[admin] users = {list(rules.admin_users)}")
        _require_safe_password_channel(rules, encrypted)
        return Authenticate(user, database, "", admin=True)
    db = rules.databases.get(database)
    if db is None:
        raise UnknownDatabase(
            f'database "{database}" is not configured in pgtenant',
            hint=f"configured databases: {', '.join(sorted(rules.databases))}",
        )
    settings, client_encoding = startup_settings(params, rules.is_protected,
                                                 names_backends=db.names_backends)
    _require_safe_password_channel(rules, encrypted)
    return Authenticate(user, database, "", settings, client_encoding)


def _require_safe_password_channel(rules: StartupRules, encrypted: bool) -> None:
    """Raises: AuthRefused when a cleartext token would cross an unencrypted network."""
    if not rules.cleartext_allowed(encrypted):
        raise AuthRefused(
            "pgtenant refuses cleartext tokens over an unencrypted connection from "
            f"{rules.peer}",
            hint="connect with sslmode=require (or verify-full)"
            if rules.tls_available
            else "configure [tls] cert_file and key_file and connect with TLS, connect "
                 "over loopback, or set allow_plaintext_remote = true",
        )


def startup_settings(params: Mapping[str, str], is_protected: Callable[[str], bool], *,
                     names_backends: bool = False
                     ) -> tuple[tuple[tuple[str, str], ...], str]:
    """The settings a client asked for at startup, to re-apply with every transaction.

    Returns: ((name, value) pairs, `options` ``-c name=value`` included; the canonical
    client_encoding, "UTF8" unless asked for).
    Raises: AuthRefused (28000) for settings pgtenant owns (role, search_path, app.*);
    UnsupportedProtocol for a client-only client_encoding (SJIS...) or
    standard_conforming_strings off (the statement guard lexes like Postgres only
    without them); InvalidParameter for an encoding Postgres does not know.
    """
    pairs = [(k, v) for k, v in params.items()
             if k not in ("user", "database", "replication", "options")]
    pairs += parse_options(params.get("options", ""))
    settings = []
    client_encoding = "UTF8"
    for name, value in pairs:
        lname = name.lower()
        if is_protected(lname):
            raise AuthRefused(f"startup parameter {name!r} is set by pgtenant for every "
                              "transaction and cannot be chosen by the client")
        if lname == "client_encoding":
            name_ = canonical(value)
            if name_ is None:
                if encoding_key(value) in UNSAFE:
                    raise UnsupportedProtocol(
                        f"client_encoding {value!r} is not supported: its multibyte "
                        "characters can contain ASCII bytes, which defeats the statement "
                        "guard", hint="connect with client_encoding=UTF8")
                raise InvalidParameter(
                    f'invalid value for parameter "client_encoding": "{value}"',
                    hint="use an encoding Postgres knows, such as UTF8 or LATIN1")
            client_encoding = name_  # session state of the servers, not replayed
            continue
        if lname == "standard_conforming_strings" and not is_on(value):
            raise UnsupportedProtocol("standard_conforming_strings must be on")
        settings.append((name, value))
    if names_backends and not any(name.lower() == "application_name" for name, _ in settings):
        # Postgres shows a client that named itself nothing an empty application_name;
        # backends named by their dsn would report theirs, so '' is re-applied with each
        # transaction (backends are unnamed by default: then this costs nothing).
        settings.append(("application_name", ""))
    return tuple(settings), client_encoding


def parse_options(options: str) -> list[tuple[str, str]]:
    """Returns: the ``-c name=value`` / ``--name=value`` settings of a libpq ``options`` string
    (space separated, backslash escapes a space), as Postgres's pg_split_opts reads it.

    Raises: ClientProtocolError for anything else in it.
    """
    tokens: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        tokens.append("".join(current))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "-c" and i + 1 < len(tokens):
            token, i = tokens[i + 1], i + 1
        elif token.startswith("-c"):
            token = token[2:]
        elif token.startswith("--"):
            token = token[2:]
        else:
            raise ClientProtocolError(f"unsupported option {token!r} in startup options")
        name, sep, value = token.partition("=")
        if not sep:
            raise ClientProtocolError(f"startup option {token!r} has no value")
        pairs.append((name.replace("-", "_"), value))
        i += 1
    return pairs


def greeting(login: Authenticate, server_params: Mapping[str, str],
             cancel_key: tuple[int, int]) -> bytes:
    """Returns: what a logged-in tenant client gets, as from Postgres: AuthenticationOk,
    ParameterStatus (the server's values, overridden by the client's own), BackendKeyData
    and ReadyForQuery."""
    out = [codec.auth_request(AUTH_OK)]
    chosen = {name.lower(): value for name, value in login.settings}
    chosen["client_encoding"] = login.client_encoding
    for name in _REPORTED:
        if name.lower() in chosen:
            out.append(codec.parameter_status(name, chosen[name.lower()]))
        elif name in server_params:
            out.append(codec.parameter_status(name, server_params[name]))
    out.append(codec.parameter_status("application_name", chosen.get("application_name", "")))
    out.append(codec.parameter_status("is_superuser", "off"))
    out.append(codec.parameter_status("session_authorization", login.user))
    out.append(codec.backend_key_data(*cancel_key))
    out.append(codec.ready_for_query(b"I"))
    return b"".join(out)


def admin_greeting(version: str) -> bytes:
    """Returns: what a logged-in admin console client gets (no cancel key: nothing runs)."""
    return (codec.auth_request(AUTH_OK)
            + codec.parameter_status("server_version", f"pgtenant {version}")
            + codec.parameter_status("client_encoding", "UTF8")
            + codec.parameter_status("server_encoding", "UTF8")
            + codec.parameter_status("standard_conforming_strings", "on")
            + codec.parameter_status("DateStyle", "ISO, MDY")
            + codec.backend_key_data(0, 0) + codec.ready_for_query(b"I"))
