"""Backend login driven by hand: scripted server frames go in, the client's bytes come out.

``server_login`` is a generator (yield ``Send``/``RECV``, resumed with ``(type, body)``), so
these tests play the backend without a socket. SCRAM-SHA-256 is checked twice over: against
RFC 7677's published vector, and against a small server written here from RFC 5802.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest

from pgtenant.errors import ServerLoginFailed, ServerProtocolError
from pgtenant.protocol import codec
from pgtenant.protocol.handshake import (
    RECV,
    Frame,
    Handshake,
    LoginResult,
    ScramClient,
    Send,
    md5_password,
    server_login,
)

# ---------------------------------------------------------------------- a hand-cranked driver


class Driver:
    """Runs a handshake one backend frame at a time, collecting what it sends."""

    def __init__(self, gen: Handshake):
        self.gen = gen
        self.result: LoginResult | None = None
        self.sent: list[bytes] = []
        self._step(None)

    def _step(self, frame: Frame | None) -> list[bytes]:
        out: list[bytes] = []
        try:
            op = next(self.gen) if frame is None else self.gen.send(frame)
            while isinstance(op, Send):
                out.append(op.data)
                op = self.gen.send(None)
        except StopIteration as done:
            self.result = done.value
            return out
        finally:
            self.sent.extend(out)
        assert op is RECV
        return out

    def feed(self, frame: Frame) -> list[bytes]:
        """Returns: what the client sent in reply to ``frame``."""
        assert self.result is None, "handshake already finished"
        return self._step(frame)


def f(msg: bytes) -> Frame:
    """A whole backend message -> the ``(type, body)`` the generator is resumed with."""
    assert struct.unpack("!i", msg[1:5])[0] == len(msg) - 1
    return msg[0], msg[5:]


def auth(code: int, extra: bytes = b"") -> Frame:
    return ord("R"), struct.pack("!i", code) + extra


AUTH_OK = auth(0)
READY = f(codec.ready_for_query(b"I"))


def startup_params(sent: bytes) -> dict[str, str]:
    length, version = struct.unpack("!ii", sent[:8])
    assert (length, version) == (len(sent), 3 << 16)
    return codec.parse_startup_params(sent[8:])


def password_body(sent: bytes) -> bytes:
    assert sent[:1] == b"p"
    assert struct.unpack("!i", sent[1:5])[0] == len(sent) - 1
    return sent[5:]


def sasl_initial(sent: bytes) -> tuple[str, bytes]:
    body = password_body(sent)
    mechanism, pos = codec.read_cstring(body, 0)
    (length,) = struct.unpack_from("!i", body, pos)
    data = body[pos + 4 :]
    assert length == len(data)
    return mechanism.decode(), data


# ---------------------------------------------------------------------- startup and trust


def test_startup_message_carries_user_database_and_extra_params() -> None:
    d = Driver(server_login("alice", None, "app", [("application_name", "pgtenant")]))
    assert len(d.sent) == 1
    assert startup_params(d.sent[0]) == {
        "user": "alice",
        "database": "app",
        "application_name": "pgtenant",
    }


def test_trust_login_returns_parameters_pid_and_secret() -> None:
    d = Driver(server_login("alice", None, "app"))
    assert d.feed(AUTH_OK) == []
    assert d.feed(f(codec.parameter_status("server_version", "16.2"))) == []
    assert d.feed(f(codec.parameter_status("client_encoding", "UTF8"))) == []
    assert d.feed(f(codec.backend_key_data(4242, -99))) == []
    assert d.feed(READY) == []
    assert d.result == LoginResult(
        parameters={"server_version": "16.2", "client_encoding": "UTF8"},
        backend_pid=4242,
        backend_secret=-99,
    )


def test_notice_and_negotiate_protocol_version_during_login_are_skipped() -> None:
    d = Driver(server_login("alice", None, "app"))
    d.feed(AUTH_OK)
    d.feed(f(codec.notice_response("01000", "hello")))
    d.feed((ord("v"), struct.pack("!ii", 0x30000, 1) + b"_pq_.x\x00"))
    d.feed(READY)
    assert d.result == LoginResult()


def test_later_parameter_status_overrides_earlier() -> None:
    d = Driver(server_login("alice", None, "app"))
    d.feed(f(codec.parameter_status("TimeZone", "UTC")))
    d.feed(f(codec.parameter_status("TimeZone", "Europe/Paris")))
    d.feed(READY)
    assert d.result is not None
    assert d.result.parameters == {"TimeZone": "Europe/Paris"}


# ---------------------------------------------------------------------- cleartext and md5


def test_cleartext_request_sends_password_message() -> None:
    d = Driver(server_login("alice", "s3cret", "app"))
    assert d.feed(auth(3)) == [b"p\x00\x00\x00\x0bs3cret\x00"]
    d.feed(AUTH_OK)
    d.feed(READY)
    assert d.result == LoginResult()


def test_md5_password_matches_hand_computed_value() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
    assert md5_password("alice", "secret", salt) == expected
    assert len(expected) == 35


def test_md5_request_sends_salted_md5_password_message() -> None:
    salt = b"\xde\xad\xbe\xef"
    d = Driver(server_login("alice", "secret", "app"))
    (sent,) = d.feed(auth(5, salt))
    inner = hashlib.md5(b"secretalice").hexdigest()
    digest = hashlib.md5(inner.encode() + salt).hexdigest()
    assert password_body(sent) == b"md5" + digest.encode() + b"\x00"
    d.feed(AUTH_OK)
    d.feed(READY)
    assert d.result is not None


# ---------------------------------------------------------------------- SCRAM-SHA-256

RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_client_first_message_has_empty_username_like_libpq() -> None:
    assert ScramClient("pencil", nonce=RFC_NONCE).client_first() == b"n,,n=,r=" + RFC_NONCE.encode()


def test_scram_client_matches_rfc7677_vector_with_the_rfc_username() -> None:
    # The RFC's client-first-bare is "n=user,r=..."; ours is "n=,r=..." (PostgreSQL ignores
    # the SCRAM user name). Put the RFC's bare message in to check the math byte for byte.
    client = ScramClient("pencil", nonce=RFC_NONCE)
    client._client_first_bare = "n=user,r=" + RFC_NONCE  # type: ignore[attr-defined]
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def _proof_for(bare: str, server_first: bytes, password: bytes) -> tuple[bytes, bytes]:
    """RFC 5802 section 3, written out: Returns (ClientProof, ServerSignature)."""
    attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    auth_message = f"{bare},{server_first.decode()},c=biws,r={attrs['r']}".encode()
    client_signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return proof, hmac.new(server_key, auth_message, hashlib.sha256).digest()


def test_scram_client_with_empty_username_matches_independent_computation() -> None:
    proof, server_sig = _proof_for("n=,r=" + RFC_NONCE, RFC_SERVER_FIRST, b"pencil")
    client = ScramClient("pencil", nonce=RFC_NONCE)
    final = client.client_final(RFC_SERVER_FIRST)
    nonce = RFC_SERVER_FIRST.split(b",")[0].decode()
    assert final == f"c=biws,{nonce},p={base64.b64encode(proof).decode()}".encode()
    assert final != RFC_CLIENT_FINAL  # the user name is part of the signed AuthMessage
    client.verify_server_final(b"v=" + base64.b64encode(server_sig))


class ScramServer:
    """The server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677), as Postgres runs it."""

    def __init__(self, password: str, *, salt: bytes = b"pgtenant-salt", iterations: int = 4096,
                 nonce: str = "ServerNonce+/=0123"):
        self.salt = salt
        self.iterations = iterations
        self.server_nonce = nonce
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        self.stored_key = hashlib.sha256(
            hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        ).digest()
        self.server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.client_first_bare = ""
        self.server_first = ""

    def first(self, client_first: bytes) -> bytes:
        text = client_first.decode()
        assert text.startswith("n,,"), "no channel binding: gs2 header must be 'n,,'"
        self.client_first_bare = text[3:]
        attrs = dict(item.split("=", 1) for item in self.client_first_bare.split(","))
        assert attrs["n"] == ""
        salt = base64.b64encode(self.salt).decode()
        self.server_first = f"r={attrs['r']}{self.server_nonce},s={salt},i={self.iterations}"
        return self.server_first.encode()

    def final(self, client_final: bytes) -> tuple[bool, bytes]:
        """Returns: (proof verified, server-final-message)."""
        without_proof, _, proof_b64 = client_final.decode().rpartition(",p=")
        attrs = dict(item.split("=", 1) for item in without_proof.split(","))
        assert attrs["c"] == base64.b64encode(b"n,,").decode()
        assert attrs["r"].endswith(self.server_nonce)
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(self.stored_key, auth_message, hashlib.sha256).digest()
        proof = base64.b64decode(proof_b64)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if hashlib.sha256(client_key).digest() != self.stored_key:
            return False, b"e=invalid-proof"
        server_sig = hmac.new(self.server_key, auth_message, hashlib.sha256).digest()
        return True, b"v=" + base64.b64encode(server_sig)


def scram_until_final(client_password: str, server: ScramServer) -> tuple[Driver, bool, bytes]:
    """Run a login up to the server-final message. Returns (driver, proof ok, server-final)."""
    d = Driver(server_login("alice", client_password, "app"))
    (initial,) = d.feed(auth(10, b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"))
    mechanism, client_first = sasl_initial(initial)
    assert mechanism == "SCRAM-SHA-256"
    (response,) = d.feed(auth(11, server.first(client_first)))
    ok, server_final = server.final(password_body(response))
    return d, ok, server_final


def test_scram_login_proves_the_password_and_verifies_the_server() -> None:
    d, ok, server_final = scram_until_final("pencil", ScramServer("pencil"))
    assert ok
    assert d.feed(auth(12, server_final)) == []
    d.feed(AUTH_OK)
    d.feed(f(codec.backend_key_data(7, 8)))
    d.feed(READY)
    assert d.result == LoginResult(backend_pid=7, backend_secret=8)


def test_scram_with_the_wrong_password_fails_the_server_check() -> None:
    d, ok, _ = scram_until_final("not-pencil", ScramServer("pencil"))
    assert not ok
    err = codec.error_response(
        "28P01", 'password authentication failed for user "alice"', severity="FATAL"
    )
    with pytest.raises(ServerLoginFailed, match="password authentication failed"):
        d.feed(f(err))


def test_scram_wrong_server_signature_raises_server_login_failed() -> None:
    d, ok, _ = scram_until_final("pencil", ScramServer("pencil"))
    assert ok
    forged = b"v=" + base64.b64encode(b"\x00" * 32)
    with pytest.raises(ServerLoginFailed, match="does not verify"):
        d.feed(auth(12, forged))


def test_scram_server_error_attribute_raises_server_login_failed() -> None:
    d, _, _ = scram_until_final("pencil", ScramServer("pencil"))
    with pytest.raises(ServerLoginFailed, match="invalid-proof"):
        d.feed(auth(12, b"e=invalid-proof"))


def test_scram_server_nonce_must_extend_the_client_nonce() -> None:
    d = Driver(server_login("alice", "pencil", "app"))
    d.feed(auth(10, b"SCRAM-SHA-256\x00\x00"))
    with pytest.raises(ServerProtocolError, match="nonce"):
        d.feed(auth(11, b"r=someoneelse,s=c2FsdA==,i=4096"))


@pytest.mark.parametrize(
    "server_first",
    [b"garbage", b"r=x", b"s=c2FsdA==,i=4096", b"r={n}abc,s=c2FsdA==,i=many", b"\xff\xfe"],
)
def test_malformed_scram_server_first_raises_server_protocol_error(server_first: bytes) -> None:
    client = ScramClient("pencil", nonce="abc")
    with pytest.raises(ServerProtocolError):
        client.client_final(server_first.replace(b"{n}", b"abc"))


def test_scram_zero_iterations_is_refused() -> None:
    with pytest.raises(ServerProtocolError):
        ScramClient("pencil", nonce="abc").client_final(b"r=abcdef,s=c2FsdA==,i=0")


def test_scram_server_final_before_client_final_is_refused() -> None:
    with pytest.raises(ServerLoginFailed):
        ScramClient("pencil", nonce="abc").verify_server_final(RFC_SERVER_FINAL)


def test_sasl_without_scram_sha_256_is_refused() -> None:
    d = Driver(server_login("alice", "pencil", "app"))
    with pytest.raises(ServerLoginFailed, match="no SCRAM-SHA-256"):
        d.feed(auth(10, b"SCRAM-SHA-256-PLUS\x00\x00"))


def test_sasl_continue_without_sasl_start_is_refused() -> None:
    d = Driver(server_login("alice", "pencil", "app"))
    with pytest.raises(ServerLoginFailed, match=r"unsupported authentication \(11\)"):
        d.feed(auth(11, b"r=x,s=c2FsdA==,i=1"))


def test_scram_server_final_with_bad_base64_raises_server_login_failed() -> None:
    d, _, _ = scram_until_final("pencil", ScramServer("pencil"))
    with pytest.raises(ServerLoginFailed):
        d.feed(auth(12, b"v=abc"))


# ---------------------------------------------------------------------- refusals


def test_error_response_during_login_raises_with_its_message_and_sqlstate() -> None:
    d = Driver(server_login("alice", None, "app"))
    err = codec.error_response("3D000", 'database "app" does not exist', severity="FATAL")
    with pytest.raises(ServerLoginFailed) as info:
        d.feed(f(err))
    assert str(info.value) == (
        "backend refused login of 'alice': database \"app\" does not exist (3D000)"
    )
    assert info.value.sqlstate == "08004"


def test_error_response_after_password_raises_server_login_failed() -> None:
    d = Driver(server_login("alice", "wrong", "app"))
    d.feed(auth(3))
    with pytest.raises(ServerLoginFailed, match=r"password authentication failed.*\(28P01\)"):
        d.feed(f(codec.error_response("28P01", "password authentication failed")))


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 42])
def test_unsupported_auth_code_raises_server_login_failed(code: int) -> None:
    d = Driver(server_login("alice", "pw", "app"))
    with pytest.raises(ServerLoginFailed, match=rf"unsupported authentication \({code}\)"):
        d.feed(auth(code))


@pytest.mark.parametrize(
    "request_frame",
    [auth(3), auth(5, b"salt"), auth(10, b"SCRAM-SHA-256\x00\x00")],
    ids=["cleartext", "md5", "sasl"],
)
def test_password_request_without_a_password_raises(request_frame: Frame) -> None:
    d = Driver(server_login("alice", None, "app"))
    with pytest.raises(ServerLoginFailed, match="the dsn has none"):
        d.feed(request_frame)


def test_unexpected_message_during_login_is_a_server_protocol_error() -> None:
    d = Driver(server_login("alice", None, "app"))
    with pytest.raises(ServerProtocolError, match="unexpected message 'D'"):
        d.feed((ord("D"), b"\x00\x00"))


def test_short_backend_key_data_is_a_server_protocol_error() -> None:
    d = Driver(server_login("alice", None, "app"))
    with pytest.raises(ServerProtocolError, match="short BackendKeyData"):
        d.feed((ord("K"), b"\x00\x00\x00\x01"))


def test_malformed_parameter_status_during_login_is_a_server_protocol_error() -> None:
    d = Driver(server_login("alice", None, "app"))
    with pytest.raises(ServerProtocolError):
        d.feed((ord("S"), b"TimeZone"))


def test_short_authentication_message_is_a_server_protocol_error() -> None:
    d = Driver(server_login("alice", "pw", "app"))
    with pytest.raises(ServerProtocolError):
        d.feed((ord("R"), b"\x00\x00"))
