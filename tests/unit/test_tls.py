"""TLS building blocks without sockets: contexts per mode, the cleartext rule, demo certs.

Handshakes run over ``ssl.MemoryBIO`` pairs, so certificate checks are real OpenSSL checks
while nothing touches the network.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from pgtenant.config import TlsConfig
from pgtenant.errors import ConfigError
from pgtenant.tls import backend_tls, cleartext_token_allowed, client_context, make_self_signed


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("certs"), ("127.0.0.1", "localhost"))


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str | None) -> str:
    """Run a TLS handshake in memory. Returns: the negotiated protocol version.

    Raises: ssl.SSLError when either side refuses.
    """
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    done_c = done_s = False
    for _ in range(20):
        for side, outbox, peer_inbox in ((cli, c_out, s_in), (srv, s_out, c_in)):
            try:
                side.do_handshake()
                if side is cli:
                    done_c = True
                else:
                    done_s = True
            except ssl.SSLWantReadError:
                pass
            finally:
                data = outbox.read()
                if data:
                    peer_inbox.write(data)
        if done_c and done_s:
            version = cli.version()
            assert version is not None
            return version
    raise AssertionError("handshake did not finish")


# ------------------------------------------------------------------------------ client side

def test_no_cert_means_no_client_tls() -> None:
    assert client_context(TlsConfig()) is None


def test_client_context_loads_cert_and_refuses_below_tls_1_2(
    certs: tuple[Path, Path, Path],
) -> None:
    _, cert, key = certs
    ctx = client_context(TlsConfig(cert_file=str(cert), key_file=str(key)))
    assert ctx is not None
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_missing_cert_file_is_a_config_error_naming_tls_cert_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        client_context(TlsConfig(cert_file=str(tmp_path / "nope.crt"),
                                 key_file=str(tmp_path / "nope.key")))
    assert "tls.cert_file" in err.value.message
    assert "nope.crt" in err.value.message


def test_key_not_matching_cert_is_a_config_error(tmp_path: Path,
                                                 certs: tuple[Path, Path, Path]) -> None:
    _, cert, _ = certs
    _, _, other_key = make_self_signed(tmp_path)
    with pytest.raises(ConfigError) as err:
        client_context(TlsConfig(cert_file=str(cert), key_file=str(other_key)))
    assert "tls.cert_file" in err.value.message


def test_garbage_pem_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls\.cert_file"):
        client_context(TlsConfig(cert_file=str(bad), key_file=str(bad)))


# ------------------------------------------------------------------------------ backend side

def test_server_tls_disable_builds_nothing() -> None:
    assert backend_tls(TlsConfig(server_tls="disable")) is None


@pytest.mark.parametrize(
    ("mode", "verify", "check_hostname", "required"),
    [("prefer", ssl.CERT_NONE, False, False),
     ("require", ssl.CERT_NONE, False, True),
     ("verify-ca", ssl.CERT_REQUIRED, False, True),
     ("verify-full", ssl.CERT_REQUIRED, True, True)],
)
def test_backend_context_follows_libpq_sslmode(
    certs: tuple[Path, Path, Path], mode: str, verify: ssl.VerifyMode, check_hostname: bool,
    required: bool,
) -> None:
    tls = backend_tls(TlsConfig(server_tls=mode, server_ca_file=str(certs[0])))
    assert tls is not None
    assert tls.mode == mode
    assert tls.required is required
    assert tls.context.verify_mode == verify
    assert tls.context.check_hostname is check_hostname
    assert tls.context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_bad_server_ca_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.server_ca_file"):
        backend_tls(TlsConfig(server_tls="verify-full", server_ca_file=str(tmp_path / "x")))


def test_verify_full_accepts_the_demo_cert_for_ip_and_name(
    certs: tuple[Path, Path, Path],
) -> None:
    ca, cert, key = certs
    server = client_context(TlsConfig(cert_file=str(cert), key_file=str(key)))
    tls = backend_tls(TlsConfig(server_tls="verify-full", server_ca_file=str(ca)))
    assert server is not None and tls is not None
    assert handshake(server, tls.context, "127.0.0.1") in ("TLSv1.2", "TLSv1.3")
    assert handshake(server, tls.context, "localhost") in ("TLSv1.2", "TLSv1.3")


def test_verify_full_refuses_a_host_name_not_in_the_cert(
    certs: tuple[Path, Path, Path],
) -> None:
    ca, cert, key = certs
    server = client_context(TlsConfig(cert_file=str(cert), key_file=str(key)))
    tls = backend_tls(TlsConfig(server_tls="verify-full", server_ca_file=str(ca)))
    assert server is not None and tls is not None
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(server, tls.context, "db.example.com")


def test_verify_ca_ignores_the_name_but_refuses_another_ca(
    tmp_path: Path, certs: tuple[Path, Path, Path],
) -> None:
    ca, cert, key = certs
    server = client_context(TlsConfig(cert_file=str(cert), key_file=str(key)))
    assert server is not None
    good = backend_tls(TlsConfig(server_tls="verify-ca", server_ca_file=str(ca)))
    assert good is not None
    handshake(server, good.context, "db.example.com")
    other_ca, _, _ = make_self_signed(tmp_path)
    bad = backend_tls(TlsConfig(server_tls="verify-ca", server_ca_file=str(other_ca)))
    assert bad is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, bad.context, "127.0.0.1")


def test_require_encrypts_without_checking_the_cert(certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    server = client_context(TlsConfig(cert_file=str(cert), key_file=str(key)))
    tls = backend_tls(TlsConfig(server_tls="require"))
    assert server is not None and tls is not None
    handshake(server, tls.context, "anything.invalid")


# ------------------------------------------------------------------------------ demo certs

def test_demo_key_file_is_private(certs: tuple[Path, Path, Path]) -> None:
    _, _, key = certs
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------ the rule

@pytest.mark.parametrize(
    ("encrypted", "loopback", "allow", "allowed"),
    [
        (False, True, False, True),    # loopback / unix socket: never leaves the machine
        (False, False, False, False),  # remote cleartext: refused by default
        (False, False, True, True),    # ... unless the operator opted in
        (True, False, False, True),    # remote over TLS: fine
        (True, True, False, True),
    ],
)
def test_cleartext_token_rule(encrypted: bool, loopback: bool, allow: bool,
                              allowed: bool) -> None:
    assert cleartext_token_allowed(encrypted=encrypted, loopback=loopback,
                                   allow_plaintext_remote=allow) is allowed
