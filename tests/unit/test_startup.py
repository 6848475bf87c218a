"""A client's startup driven by hand: bytes go in, ops and decisions come out.

``client_startup`` is a generator (yield ``Send``/``RECV``/``START_TLS``, resumed with the
client's next bytes), so these tests play the client without a socket, hostile clients
included: every refusal is asserted with the SQLSTATE and words the client sees.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pgtenant.errors import (
    AuthRefused,
    ClientProtocolError,
    InvalidParameter,
    ProxyError,
    UnknownDatabase,
    UnsupportedProtocol,
)
from pgtenant.protocol import codec
from pgtenant.protocol.constants import (
    AUTH_CLEARTEXT,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
)
from pgtenant.protocol.handshake import RECV, Send
from pgtenant.protocol.startup import (
    MAX_STARTUP,
    START_TLS,
    Authenticate,
    Cancel,
    Goodbye,
    Identify,
    Startup,
    StartupRules,
    client_startup,
    parse_options,
    startup_settings,
)

ASK_PASSWORD = codec.auth_request(AUTH_CLEARTEXT)
SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)
GSSENC_REQUEST = struct.pack("!ii", 8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True)
class FakeDatabase:
    names_backends: bool = False


def _protected(name: str) -> bool:
    return name in ("role", "search_path", "session_authorization") or name.startswith("app.")


BASE = StartupRules(
    peer="127.0.0.1",
    tls_available=False,
    cleartext_allowed=lambda encrypted: True,
    databases={"app": FakeDatabase(), "named": FakeDatabase(names_backends=True)},
    is_protected=_protected,
    admin_token_set=True,
    admin_users=("admin",),
)


def rules(**overrides: Any) -> StartupRules:
    return dataclasses.replace(BASE, **overrides)


def startup(*params: tuple[str, str], version: int = 196608) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
    return struct.pack("!ii", len(body) + 8, version) + body


def password(token: str) -> bytes:
    return codec.password_message(token.encode())


@dataclass
class Run:
    """What a startup did with the bytes it was given."""

    sent: list[bytes | str]  # bytes for Send, "TLS" for START_TLS
    outcome: Authenticate | Cancel | Goodbye | None = None  # None: still wants bytes
    error: ProxyError | None = None
    who: Identify | None = None  # what the client said it is, before any refusal


def run(*chunks: bytes, given: StartupRules | None = None) -> Run:
    """Drive a fresh startup with ``chunks``, one chunk per RECV, as ``client._advance``."""
    gen: Startup = client_startup(given or rules())
    result = Run(sent=[])
    pending = list(chunks)
    value: bytes | None = None
    try:
        while True:
            op = gen.send(value)
            value = None
            if isinstance(op, Send):
                result.sent.append(op.data)
            elif isinstance(op, Identify):
                assert result.who is None and ASK_PASSWORD not in result.sent
                result.who = op
            elif op is START_TLS:
                result.sent.append("TLS")
            else:
                assert op is RECV
                if not pending:
                    gen.close()
                    return result
                value = pending.pop(0)
    except StopIteration as done:
        result.outcome = done.value
    except ProxyError as exc:
        result.error = exc
    return result


def refused(run_: Run, kind: type[ProxyError], sqlstate: str, words: str) -> None:
    assert run_.outcome is None
    assert isinstance(run_.error, kind), run_.error
    assert run_.error.sqlstate == sqlstate
    assert words in run_.error.message, run_.error.message


# ---------------------------------------------------------------------- the happy paths


def test_startup_asks_for_a_password_and_returns_the_token() -> None:
    r = run(startup(("user", "acme"), ("database", "app")), password("tok"))
    assert r.sent == [ASK_PASSWORD]
    assert r.who == Identify("acme", "app")
    assert r.outcome == Authenticate("acme", "app", "tok")


def test_database_defaults_to_the_user_name() -> None:
    r = run(startup(("user", "app")), password("t"))
    assert isinstance(r.outcome, Authenticate) and r.outcome.database == "app"


def test_startup_fed_one_byte_at_a_time_gives_the_same_login() -> None:
    data = startup(("user", "acme"), ("database", "app")) + password("tok")
    r = run(*(data[i : i + 1] for i in range(len(data))))
    assert r.sent == [ASK_PASSWORD]
    assert r.outcome == Authenticate("acme", "app", "tok")


def test_bytes_pipelined_after_the_password_are_handed_on() -> None:
    query = codec.query("select 1")
    r = run(startup(("user", "acme"), ("database", "app")) + password("tok") + query)
    assert isinstance(r.outcome, Authenticate) and r.outcome.rest == query


def test_a_truncated_startup_packet_waits_for_more() -> None:
    data = startup(("user", "acme"))
    for cut in (3, 7, 8, len(data) - 1):
        r = run(data[:cut])
        assert r.sent == [] and r.outcome is None and r.error is None


def test_a_truncated_password_message_waits_for_more() -> None:
    r = run(startup(("user", "acme"), ("database", "app")), password("tok")[:-1])
    assert r.sent == [ASK_PASSWORD] and r.outcome is None and r.error is None


def test_startup_settings_and_options_are_kept() -> None:
    r = run(startup(("user", "acme"), ("database", "app"), ("DateStyle", "ISO"),
                    ("options", "-c work_mem=64MB --statement-timeout=5s"),
                    ("client_encoding", "latin1")), password("t"))
    assert isinstance(r.outcome, Authenticate)
    assert r.outcome.settings == (("DateStyle", "ISO"), ("work_mem", "64MB"),
                                  ("statement_timeout", "5s"))
    assert r.outcome.client_encoding == "LATIN1"


def test_a_database_whose_backends_are_named_gets_an_empty_application_name() -> None:
    r = run(startup(("user", "acme"), ("database", "named")), password("t"))
    assert isinstance(r.outcome, Authenticate)
    assert r.outcome.settings == (("application_name", ""),)
    r = run(startup(("user", "acme"), ("database", "named"), ("application_name", "me")),
            password("t"))
    assert isinstance(r.outcome, Authenticate)
    assert r.outcome.settings == (("application_name", "me"),)


def test_newer_minor_version_and_pq_options_are_negotiated_down() -> None:
    r = run(startup(("user", "acme"), ("database", "app"), ("_pq_.x", "1"), version=196610),
            password("t"))
    assert r.sent == [codec.negotiate_protocol_version(0, ["_pq_.x"]), ASK_PASSWORD]
    assert isinstance(r.outcome, Authenticate) and r.outcome.settings == ()


def test_admin_console_login() -> None:
    r = run(startup(("user", "admin"), ("database", "pgtenant")), password("secret"))
    assert r.sent == [ASK_PASSWORD]
    assert r.outcome == Authenticate("admin", "pgtenant", "secret", admin=True)


def test_terminate_before_startup_says_goodbye_without_an_error() -> None:
    r = run(codec.terminate())
    assert r.sent == [] and r.outcome == Goodbye("client sent Terminate before startup")


# ---------------------------------------------------------------------- encryption requests


def test_ssl_request_without_tls_is_answered_n_then_startup_goes_on() -> None:
    r = run(SSL_REQUEST, startup(("user", "acme"), ("database", "app")), password("t"))
    assert r.sent == [b"N", ASK_PASSWORD]
    assert isinstance(r.outcome, Authenticate)


def test_gssenc_request_is_answered_n_even_with_tls() -> None:
    r = run(GSSENC_REQUEST, given=rules(tls_available=True))
    assert r.sent == [b"N"] and r.outcome is None and r.error is None


def test_ssl_request_with_tls_is_answered_s_then_tls_starts() -> None:
    seen: list[bool] = []

    def allowed(encrypted: bool) -> bool:
        seen.append(encrypted)
        return encrypted

    r = run(SSL_REQUEST, startup(("user", "acme"), ("database", "app")), password("t"),
            given=rules(tls_available=True, cleartext_allowed=allowed))
    assert r.sent == [b"S", "TLS", ASK_PASSWORD]
    assert isinstance(r.outcome, Authenticate) and seen == [True]


def test_ssl_request_twice_on_an_encrypted_connection_is_refused() -> None:
    r = run(SSL_REQUEST, SSL_REQUEST, given=rules(tls_available=True))
    assert r.sent == [b"S", "TLS"]
    refused(r, ClientProtocolError, "08P01", "encryption request on an encrypted connection")


def test_ssl_request_twice_without_tls_is_answered_n_twice() -> None:
    r = run(SSL_REQUEST, SSL_REQUEST)
    assert r.sent == [b"N", b"N"] and r.error is None


def test_bytes_sent_with_the_ssl_request_are_refused() -> None:
    """A buffer-stuffing attack: cleartext bytes queued before the answer to SSLRequest
    would be read as if they came over TLS (CVE-2021-23222's pattern)."""
    r = run(SSL_REQUEST + startup(("user", "acme")), given=rules(tls_available=True))
    refused(r, ClientProtocolError, "08P01", "unexpected data after encryption request")
    assert r.sent == []


# ---------------------------------------------------------------------- CancelRequest


def test_cancel_request_returns_its_key() -> None:
    r = run(codec.cancel_request(1234, -5678))
    assert r.sent == [] and r.outcome == Cancel((1234, -5678))


def test_cancel_request_of_the_wrong_length_cancels_nothing() -> None:
    short = struct.pack("!iii", 12, CANCEL_REQUEST_CODE, 1234)
    assert run(short).outcome == Cancel(None)
    long = struct.pack("!iiiii", 20, CANCEL_REQUEST_CODE, 1, 2, 3)
    assert run(long).outcome == Cancel(None)


# ---------------------------------------------------------------------- hostile packets


@pytest.mark.parametrize("length", [MAX_STARTUP + 1, 0x7FFFFFFF, 7, 0, -1])
def test_startup_packet_of_absurd_length_is_refused_before_it_is_read(length: int) -> None:
    r = run(struct.pack("!ii", length, 196608))
    refused(r, ClientProtocolError, "08P01", f"invalid startup packet length {length}")


@pytest.mark.parametrize("version, shown", [(0x00020000, "2.0"), (0x00040000, "4.0"),
                                            (1234, "0.1234")])
def test_unknown_protocol_version_is_refused(version: int, shown: str) -> None:
    r = run(startup(("user", "acme"), version=version))
    refused(r, UnsupportedProtocol, "0A000", f"unsupported frontend protocol {shown}")


def test_startup_message_without_user_is_refused() -> None:
    r = run(startup(("database", "app")))
    refused(r, ClientProtocolError, "08P01", "no user name in the startup packet")
    r = run(startup(("user", ""), ("database", "app")))
    refused(r, ClientProtocolError, "08P01", "no user name in the startup packet")


def test_malformed_startup_parameters_are_refused() -> None:
    body = b"user\0acme"  # no terminators
    r = run(struct.pack("!ii", len(body) + 8, 196608) + body)
    assert isinstance(r.error, ClientProtocolError) and r.outcome is None


def test_password_message_before_startup_is_refused() -> None:
    # 'p' and its length read as a startup length: 0x70000000-odd bytes.
    r = run(password("tok"))
    refused(r, ClientProtocolError, "08P01", "invalid startup packet length")


def test_something_else_instead_of_the_password_is_refused() -> None:
    r = run(startup(("user", "acme"), ("database", "app")), codec.query("select 1"))
    refused(r, ClientProtocolError, "08P01", "expected a password message, got 'Q'")


@pytest.mark.parametrize("length", [4, 4097, 0x7FFFFFFF])
def test_password_message_of_absurd_length_is_refused(length: int) -> None:
    r = run(startup(("user", "acme"), ("database", "app")), b"p" + struct.pack("!i", length))
    refused(r, ClientProtocolError, "08P01", f"invalid password message length {length}")


def test_unterminated_password_is_refused() -> None:
    r = run(startup(("user", "acme"), ("database", "app")), b"p" + struct.pack("!i", 7) + b"abc")
    refused(r, ClientProtocolError, "08P01", "unterminated string")


def test_replication_connections_are_refused() -> None:
    r = run(startup(("user", "acme"), ("database", "app"), ("replication", "database")))
    refused(r, UnsupportedProtocol, "0A000", "replication connections are not supported")
    r = run(startup(("user", "acme"), ("database", "app"), ("replication", "off")))
    assert r.sent == [ASK_PASSWORD]


def test_unknown_database_is_refused_with_the_configured_ones() -> None:
    r = run(startup(("user", "acme"), ("database", "nope")))
    refused(r, UnknownDatabase, "3D000", 'database "nope" is not configured in pgtenant')
    assert r.who == Identify("acme", "nope")  # so the refusal is logged with them
    assert r.error is not None and r.error.hint == "configured databases: app, named"


@pytest.mark.parametrize("param", [("search_path", "evil"), ("app.tenant_id", "1"),
                                   ("options", "-c role=postgres"),
                                   ("options", "--search-path=x")])
def test_settings_pgtenant_owns_are_refused(param: tuple[str, str]) -> None:
    r = run(startup(("user", "acme"), ("database", "app"), param))
    refused(r, AuthRefused, "28000", "is set by pgtenant for every transaction")


def test_client_only_encoding_and_unknown_encoding_are_refused() -> None:
    r = run(startup(("user", "acme"), ("database", "app"), ("client_encoding", "SJIS")))
    refused(r, UnsupportedProtocol, "0A000", "client_encoding 'SJIS' is not supported")
    r = run(startup(("user", "acme"), ("database", "app"), ("client_encoding", "klingon")))
    refused(r, InvalidParameter, "22023", 'invalid value for parameter "client_encoding"')


def test_standard_conforming_strings_off_is_refused() -> None:
    r = run(startup(("user", "acme"), ("database", "app"),
                    ("standard_conforming_strings", "off")))
    refused(r, UnsupportedProtocol, "0A000", "standard_conforming_strings must be on")


def test_cleartext_token_over_an_unencrypted_remote_connection_is_refused() -> None:
    for tls, hint in ((True, "sslmode=require"), (False, "configure [tls] cert_file")):
        r = run(startup(("user", "acme"), ("database", "app")),
                given=rules(peer="10.0.0.9", tls_available=tls,
                            cleartext_allowed=lambda encrypted: encrypted))
        refused(r, AuthRefused, "28000", "refuses cleartext tokens over an unencrypted "
                "connection from 10.0.0.9")
        assert r.error is not None and r.error.hint is not None and hint in r.error.hint
        assert r.sent == []  # no password asked for


def test_admin_console_refusals() -> None:
    r = run(startup(("user", "admin"), ("database", "pgtenant")),
            given=rules(admin_token_set=False))
    refused(r, AuthRefused, "28000", "the admin console is not configured")
    r = run(startup(("user", "mallory"), ("database", "pgtenant")))
    refused(r, AuthRefused, "28000", 'user "mallory" may not use the admin console')


def test_refusal_order_user_before_replication_before_database() -> None:
    """The first problem found is the one reported, as before the move to a generator."""
    r = run(startup(("database", "nope"), ("replication", "true")))
    assert isinstance(r.error, ClientProtocolError)
    r = run(startup(("user", "a"), ("database", "nope"), ("replication", "true")))
    assert isinstance(r.error, UnsupportedProtocol)


# ---------------------------------------------------------------------- the pure helpers


def test_parse_options_reads_pg_split_opts_syntax() -> None:
    assert parse_options(r"-c a=1 -cb=2 --c-d=3 -c e=x\ y") == [
        ("a", "1"), ("b", "2"), ("c_d", "3"), ("e", "x y")]
    with pytest.raises(ClientProtocolError, match="unsupported option"):
        parse_options("-X")
    with pytest.raises(ClientProtocolError, match="has no value"):
        parse_options("-c a")


def test_startup_settings_leave_out_what_is_not_a_setting() -> None:
    protected: Callable[[str], bool] = _protected
    settings, encoding = startup_settings(
        {"user": "u", "database": "d", "replication": "false", "options": "", "x": "1"},
        protected)
    assert settings == (("x", "1"),) and encoding == "UTF8"
