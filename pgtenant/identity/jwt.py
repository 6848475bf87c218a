"""JSON Web Tokens presented as the password: shape check, key loading and verification.

Owns turning a ``[jwt]`` config into verification keys (HS256 shared secret, RS256/ES256
PEM public key, or a JWKS file whose keys are picked by ``kid``) and turning a token into
``JwtClaims`` — or ``None`` for anything that does not verify. It does not own the lookup of
the organization the token names (``registry.py`` resolves ``org_id`` through
``pgtenant.resolve_org``) nor what a failure looks like on the wire (``client.py``). No I/O
after construction (key files are read once, in ``build_verifier``).

Rules, all fail-closed:

- only the configured algorithms, never ``none``; the key is chosen by the algorithm's
  family (HMAC -> ``secret``, RSA/EC -> ``public_key_file`` or JWKS), so an RSA public key
  can never be used as an HMAC secret (algorithm confusion);
- ``exp`` is required (a JWT cannot be revoked through ``pgtenant.tokens``, so its lifetime is
  its only bound); ``exp``/``nbf``/``iat`` are checked with ``leeway``; ``iss``/``aud`` must
  match when configured, and a token that names an audience is refused by a proxy configured
  without one (PyJWT's rule: the token was meant for someone else);
- the org claim must be a UUID; the entity claim, when present, too; the type claim, when
  present, must be a string (the registry compares it with the organization's type).

``token_id``: a JWT has no row in ``pgtenant.tokens``, but a ``TenantIdentity`` needs an id
for logs and the revocation check. It is ``uuid5(JWT_TOKEN_NAMESPACE, "jti:<iss>:<jti>")``
when the token has a ``jti`` (so every presentation of one issued token has one id, and an
issuer's ids cannot collide with another issuer's), else
``uuid5(JWT_TOKEN_NAMESPACE, "sha256:<hex digest of the token text>")``. Being name-based
(version 5) it can never equal a ``gen_random_uuid()`` (version 4) id of an opaque token.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..config import JwtConfig
from ..errors import ConfigError

__all__ = [
    "JWT_TOKEN_NAMESPACE",
    "JwtClaims",
    "JwtVerifier",
    "build_verifier",
    "jwt_token_id",
    "looks_like_jwt",
]

# Fixed namespace for JWT token ids (uuid5); changing it would change every JWT's token_id.
JWT_TOKEN_NAMESPACE = UUID("6f1b7c2e-0d4a-5e8b-9c61-3a2f4d5e6b70")

# header.payload.signature, base64url without padding. The signature may be empty only for
# alg "none", which is refused later; matching it here keeps such tokens on the JWT path so
# they get the same answer as any other bad JWT. 4096 is the password message limit.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_JWT = 4096
# RFC 7518 §3.2: an HMAC key MUST be at least as long as the hash output.
_MIN_HMAC_SECRET = 32
_MIN_RSA_BITS = 2048

_HMAC_ALGS = frozenset({"HS256"})
# Asymmetric algorithm -> (key class it needs, EC curve name or None).
_ASYM_ALGS: dict[str, tuple[type[Any], str | None]] = {
    "RS256": (rsa.RSAPublicKey, None),
    "ES256": (ec.EllipticCurvePublicKey, "secp256r1"),
}


@dataclass(frozen=True, slots=True)
class JwtClaims:
    """What a verified JWT says about its caller; the organization is not yet looked up."""

    org_id: UUID
    token_id: UUID
    tenant_type: str | None = None
    entity_id: UUID | None = None


def looks_like_jwt(token: str) -> bool:
    """Returns: whether the text has the compact JWS shape (cheap pre-check, not auth)."""
    return len(token) <= _MAX_JWT and _JWT_SHAPE.fullmatch(token) is not None


def jwt_token_id(token: str, payload: dict[str, Any]) -> UUID:
    """Returns: the deterministic token id of a verified JWT (see the module docstring)."""
    jti = payload.get("jti")
    if isinstance(jti, str) and jti:
        iss = payload.get("iss")
        return uuid.uuid5(JWT_TOKEN_NAMESPACE, f"jti:{iss if isinstance(iss, str) else ''}:{jti}")
    digest = hashlib.sha256(token.encode()).hexdigest()
    return uuid.uuid5(JWT_TOKEN_NAMESPACE, f"sha256:{digest}")


def _as_uuid(value: Any) -> UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return UUID(value)
    except ValueError:
        return None


class JwtVerifier:
    """Verifies JWTs against fixed keys; build it with ``build_verifier``."""

    def __init__(
        self,
        config: JwtConfig,
        *,
        secret: bytes | None = None,
        public_key: Any = None,
        jwks: jwt.PyJWKSet | None = None,
    ):
        self.config = config
        self._secret = secret
        self._public_key = public_key
        self._jwks = jwks
        # Verification options. enforce_minimum_key_length is a backstop: build_verifier
        # already refuses short keys with a clear config error.
        self._options: dict[str, Any] = {
            "require": ["exp"],
            "enforce_minimum_key_length": True,
        }

    def _key_for(self, header: dict[str, Any]) -> Any:
        """Returns: the key to verify a token with this header, or None (refuse it)."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            return None  # "none" is never configurable, so it always ends here
        if alg in _HMAC_ALGS:
            return self._secret
        if alg not in _ASYM_ALGS:
            return None
        kid = header.get("kid")
        key = self._public_key
        if self._jwks is not None and isinstance(kid, str):
            try:
                jwk = self._jwks[kid]
            except KeyError:
                return None
            if jwk.algorithm_name != alg:  # a key serves the one algorithm it was made for
                return None
            key = jwk.key
        key_class, curve = _ASYM_ALGS[alg]
        if not isinstance(key, key_class):
            return None
        if curve is not None and key.curve.name != curve:
            return None
        return key

    def verify(self, token: str) -> JwtClaims | None:
        """Verify signature, algorithm and registered claims, and read the tenant claims.

        Returns: the claims, or None for anything that does not verify (malformed, wrong
        signature or algorithm, expired, not yet valid, wrong issuer/audience, missing or
        non-UUID org claim, bad entity or type claim). Callers must not tell these apart.
        """
        if not looks_like_jwt(token):
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        key = self._key_for(header)
        if key is None:
            return None
        cfg = self.config
        try:
            payload = jwt.decode(
                token, key, algorithms=[header["alg"]], issuer=cfg.issuer,
                audience=cfg.audience, leeway=cfg.leeway, options=self._options,  # type: ignore[arg-type]
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            # PyJWTError covers signature, claims and decoding; the others guard against
            # odd payload values PyJWT does not wrap (a malformed token must never escape).
            return None
        org_id = _as_uuid(payload.get(cfg.org_claim))
        if org_id is None:
            return None
        tenant_type = payload.get(cfg.type_claim)
        if tenant_type is not None and not isinstance(tenant_type, str):
            return None
        entity_id: UUID | None = None
        raw_entity = payload.get(cfg.entity_claim)
        if raw_entity is not None:
            entity_id = _as_uuid(raw_entity)
            if entity_id is None:
                return None
        return JwtClaims(
            org_id=org_id, token_id=jwt_token_id(token, payload), tenant_type=tenant_type,
            entity_id=entity_id,
        )


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r}: {exc.strerror or exc}") from exc


def _check_public_key(key: Any, where: str) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ConfigError(f"{where}: RSA key of {key.key_size} bits; at least "
                              f"{_MIN_RSA_BITS} are required")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name != "secp256r1":
            raise ConfigError(f"{where}: EC key on curve {key.curve.name}; ES256 needs P-256")
    else:
        raise ConfigError(f"{where}: expected an RSA or EC (P-256) public key")


def build_verifier(config: JwtConfig) -> JwtVerifier | None:
    """Load the keys named by ``[jwt]``.

    Returns: a ``JwtVerifier``, or None when JWTs are not enabled (no secret, key or JWKS).
    Raises: ConfigError naming the key when a file cannot be read or parsed, the secret is
    shorter than 32 bytes, or a public key is too weak or of an unusable type.
    """
    if not config.enabled:
        return None
    secret: bytes | None = None
    if config.secret is not None:
        secret = config.secret.encode()
        if len(secret) < _MIN_HMAC_SECRET:
            raise ConfigError(f"jwt.secret: must be at least {_MIN_HMAC_SECRET} bytes for "
                              "HS256 (RFC 7518 section 3.2)")
    public_key: Any = None
    if config.public_key_file is not None:
        raw = _read(config.public_key_file, "jwt.public_key_file")
        try:
            public_key = load_pem_public_key(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"jwt.public_key_file: {config.public_key_file!r} is not a PEM "
                              f"public key: {exc}") from exc
        _check_public_key(public_key, "jwt.public_key_file")
    jwks: jwt.PyJWKSet | None = None
    if config.jwks_file is not None:
        raw = _read(config.jwks_file, "jwt.jwks_file")
        try:
            jwks = jwt.PyJWKSet.from_json(raw.decode())
        except (ValueError, jwt.PyJWTError) as exc:
            raise ConfigError(f"jwt.jwks_file: {config.jwks_file!r} is not a usable JWK "
                              f"set: {exc}") from exc
        for jwk in jwks.keys:
            if jwk.key_id is None:
                raise ConfigError(f"jwt.jwks_file: every key needs a 'kid' (keys are chosen "
                                  f"by kid); one of type {jwk.key_type} has none")
            if jwk.algorithm_name not in _ASYM_ALGS:
                raise ConfigError(f"jwt.jwks_file: key {jwk.key_id!r} is for "
                                  f"{jwk.algorithm_name}; only RS256 and ES256 keys are used")
            _check_public_key(jwk.key, f"jwt.jwks_file key {jwk.key_id!r}")
    return JwtVerifier(config, secret=secret, public_key=public_key, jwks=jwks)

