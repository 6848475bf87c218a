"""Multi-step exchanges as generators: the backend login (trust, cleartext, md5, SCRAM-SHA-256).

A handshake yields ``Send(data)`` or ``RECV`` and is resumed with ``(type, body)`` of the
next backend frame; its return value is the result (psycopg's ``generators.py`` pattern).
``server.py`` holds the one coroutine that drives it. SCRAM follows RFC 5802/7677 as
PostgreSQL implements it (channel binding not offered: "n,,").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Final

from ..errors import ServerLoginFailed, ServerProtocolError
from . import codec
from .constants import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    AUTHENTICATION,
    BACKEND_KEY_DATA,
    ERROR_RESPONSE,
    FIELD_MESSAGE,
    FIELD_SQLSTATE,
    NEGOTIATE_PROTOCOL_VERSION,
    NOTICE_RESPONSE,
    PARAMETER_STATUS,
    READY_FOR_QUERY,
)

__all__ = [
    "RECV",
    "Frame",
    "Handshake",
    "LoginResult",
    "Recv",
    "ScramClient",
    "Send",
    "md5_password",
    "server_login",
]

Frame = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Recv:
    pass


RECV = Recv()
Handshake = Generator[Send | Recv, Frame | None, "LoginResult"]


@dataclass(slots=True)
class LoginResult:
    """What a backend told us during login."""

    parameters: dict[str, str] = field(default_factory=dict)
    backend_pid: int = 0
    backend_secret: int = 0


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """Returns: the md5 auth response ``md5`` + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


class ScramClient:
    """Client side of SCRAM-SHA-256 (no channel binding), as libpq does it."""

    MECHANISM: Final = "SCRAM-SHA-256"  # Final: mypyc reads it through the class

    def __init__(self, password: str, nonce: str | None = None):
        self._password = password.encode()
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._client_first_bare = f"n=,r={self._nonce}"
        self._server_signature: bytes | None = None

    def client_first(self) -> bytes:
        """Returns: the client-first-message."""
        return ("n,," + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        """Returns: the client-final-message for ``server_first``.

        Raises: ServerProtocolError on a malformed or dishonest server-first-message.
        """
        try:
            attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
            nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        except (ValueError, KeyError) as exc:
            raise ServerProtocolError("malformed SCRAM server-first-message") from exc
        if not nonce.startswith(self._nonce) or iterations < 1:
            raise ServerProtocolError("SCRAM server nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        final_without_proof = f"c=biws,r={nonce}"
        auth_message = ",".join(
            (self._client_first_bare, server_first.decode(), final_without_proof)
        ).encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{final_without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        """Raises: ServerLoginFailed unless the server proved it knows the password too."""
        text = server_final.decode(errors="replace")
        if not text.startswith("v=") or self._server_signature is None:
            raise ServerLoginFailed(f"SCRAM authentication failed: {text}")
        try:
            signature = base64.b64decode(text[2:], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ServerLoginFailed("SCRAM server signature is not base64") from exc
        if not hmac.compare_digest(signature, self._server_signature):
            raise ServerLoginFailed("SCRAM server signature does not verify")


_unpack_i32 = struct.Struct("!i").unpack_from


def _error_text(body: bytes) -> tuple[str, str]:
    fields = dict(codec.parse_error_fields(body))
    sqlstate = fields.get(FIELD_SQLSTATE, b"").decode("ascii", "replace")
    return sqlstate, fields.get(FIELD_MESSAGE, b"").decode("utf-8", "replace")


def server_login(user: str, password: str | None, database: str,
                 params: Sequence[tuple[str, str]] = ()) -> Handshake:
    """Log in to a backend as ``user``.

    Returns (as the generator's value): the ``LoginResult``.
    Raises: ServerLoginFailed (auth refused, unsupported method, ErrorResponse) or
    ServerProtocolError (unexpected frame).
    """
    startup = [("user", user), ("database", database), *params]
    yield Send(codec.startup_message(startup))
    result = LoginResult()
    scram: ScramClient | None = None
    while True:
        msg = yield RECV
        assert msg is not None
        msg_type, body = msg
        if msg_type == AUTHENTICATION:
            if len(body) < 4:
                raise ServerProtocolError("short Authentication message from backend")
            (code,) = _unpack_i32(body, 0)
            if code == AUTH_OK:
                continue
            if code in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL) and scram is not None:
                if code == AUTH_SASL_CONTINUE:
                    yield Send(codec.sasl_response(scram.client_final(body[4:])))
                else:
                    scram.verify_server_final(body[4:])
                continue
            if code not in (AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL):
                raise ServerLoginFailed(f"backend asks for unsupported authentication ({code})")
            if password is None:
                raise ServerLoginFailed(
                    f"backend asks a password for role {user!r}, but the dsn has none"
                )
            if code == AUTH_CLEARTEXT:
                yield Send(codec.password_message(password.encode()))
            elif code == AUTH_MD5:
                if len(body) != 8:
                    raise ServerProtocolError("md5 Authentication message without a 4-byte salt")
                yield Send(codec.password_message(md5_password(user, password, body[4:8])))
            else:
                mechanisms = body[4:].split(b"\x00")
                if ScramClient.MECHANISM.encode() not in mechanisms:
                    raise ServerLoginFailed(f"backend offers no SCRAM-SHA-256: {mechanisms!r}")
                scram = ScramClient(password)
                yield Send(codec.sasl_initial_response(ScramClient.MECHANISM, scram.client_first()))
        elif msg_type == PARAMETER_STATUS:
            name, value = codec.parse_parameter_status(body)
            result.parameters[name] = value
        elif msg_type == BACKEND_KEY_DATA:
            if len(body) < 8:
                raise ServerProtocolError("short BackendKeyData")
            result.backend_pid, result.backend_secret = struct.unpack_from("!ii", body, 0)
        elif msg_type == READY_FOR_QUERY:
            return result
        elif msg_type == ERROR_RESPONSE:
            sqlstate, message = _error_text(body)
            raise ServerLoginFailed(f"backend refused login of {user!r}: {message} ({sqlstate})")
        elif msg_type in (NOTICE_RESPONSE, NEGOTIATE_PROTOCOL_VERSION):
            continue
        else:
            raise ServerProtocolError(f"unexpected message {chr(msg_type)!r} during backend login")
