"""TLS for both sides of the proxy: SSL contexts, the cleartext-token rule, demo certificates.

Owns building the server-side context offered to clients (``[tls] cert_file``/``key_file``),
the client-side context used towards the backend (``[tls] server_tls``, libpq's ``sslmode``
semantics), the decision whether a cleartext token may be accepted on a connection, and a
throwaway CA + server certificate generator for the demo and the tests. It does no socket
I/O: ``client.py`` and ``server.py`` run the handshakes with ``loop.start_tls``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import TlsConfig
from .errors import ConfigError

__all__ = [
    "BackendTls",
    "backend_tls",
    "cleartext_token_allowed",
    "client_context",
    "make_self_signed",
]

# libpq 17 offers this ALPN protocol id and Postgres 17 checks it for direct TLS; older
# servers ignore ALPN, so offering it costs nothing and keeps us future-proof.
_ALPN = ["postgresql"]


@dataclass(frozen=True, slots=True)
class BackendTls:
    """How a ``ServerConnection`` negotiates TLS with its backend (``server_tls`` != disable)."""

    mode: str  # prefer, require, verify-ca or verify-full
    context: ssl.SSLContext

    @property
    def required(self) -> bool:
        """Whether a backend that answers 'N' to SSLRequest must be refused."""
        return self.mode != "prefer"


def client_context(config: TlsConfig) -> ssl.SSLContext | None:
    """The server-side context offered to clients that send SSLRequest.

    Returns: the context, or None when ``cert_file``/``key_file`` are not configured (the
    proxy then answers 'N' to SSLRequest, as a Postgres with ``ssl = off`` does).
    Raises: ConfigError naming ``tls.cert_file`` when the files cannot be read or do not match.
    """
    if not config.cert_file or not config.key_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as exc:
        # ssl.SSLError is an OSError too, but its useful text is ``reason``, not strerror.
        why = (exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror) or str(exc)
        raise ConfigError(
            f"tls.cert_file / tls.key_file: cannot load {config.cert_file!r} with "
            f"{config.key_file!r}: {why}"
        ) from exc
    return context


def backend_tls(config: TlsConfig) -> BackendTls | None:
    """The client-side context towards the backend, per ``server_tls``.

    ``verify-full`` checks the chain and the host name, ``verify-ca`` the chain only,
    ``require``/``prefer`` encrypt without checking (as libpq without a root certificate).
    The chain is checked against ``server_ca_file``, else the system's trust store.

    Returns: a ``BackendTls``, or None for ``disable``.
    Raises: ConfigError naming ``tls.server_ca_file`` when the CA file cannot be loaded.
    """
    mode = config.server_tls
    if mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)
    if mode in ("verify-ca", "verify-full"):
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = mode == "verify-full"
        if config.server_ca_file:
            try:
                context.load_verify_locations(cafile=config.server_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"tls.server_ca_file: cannot load {config.server_ca_file!r}: {exc}"
                ) from exc
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        # check_hostname must be turned off before verify_mode may drop to CERT_NONE.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return BackendTls(mode=mode, context=context)


def cleartext_token_allowed(*, encrypted: bool, loopback: bool,
                            allow_plaintext_remote: bool) -> bool:
    """Whether a client may send its token as a cleartext password on this connection.

    A token is a bearer credential: on an unencrypted link from another host anyone on the
    path could replay it, so that is refused unless the operator opted in. Loopback and Unix
    sockets never leave the machine.

    Returns: True when TLS is in use, the peer is local, or ``allow_plaintext_remote`` is set.
    """
    return encrypted or loopback or allow_plaintext_remote


def make_self_signed(directory: str | os.PathLike[str],
                     hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                     *, days: int = 30) -> tuple[Path, Path, Path]:
    """Write a throwaway CA and a server certificate for ``hosts`` signed by it.

    For demos and tests only: the CA key is discarded, so nothing else can ever be signed
    with it. IP addresses in ``hosts`` become IP SANs, names DNS SANs (libpq and Python's
    ssl check both for verify-full).

    Returns: (ca_file, cert_file, key_file) under ``directory``; the key file is mode 0600.
    Raises: OSError when the files cannot be written.
    """
    # Imported here: only the demo and the tests need it, not the proxy's start-up.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # A little in the past, so a clock a few minutes behind still accepts the certificate.
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgtenant throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_file, cert_file, key_file = out / "ca.crt", out / "server.crt", out / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Created 0600 from the start: Postgres refuses a key readable by others, and so should we.
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()))
    os.chmod(key_file, 0o600)  # O_CREAT's mode does not apply to an existing file
    return ca_file, cert_file, key_file
