"""JWT verification (pgtenant/identity/jwt.py): keys generated here, no network, no database."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from pgtenant.config import JwtConfig
from pgtenant.errors import ConfigError
from pgtenant.identity.jwt import (
    JWT_TOKEN_NAMESPACE,
    JwtVerifier,
    build_verifier,
    jwt_token_id,
    looks_like_jwt,
)

__all__: list[str] = []

SECRET = "s3cret-for-tests-only-0123456789abcdef"  # >= 32 bytes (RFC 7518)
ORG = uuid.uuid4()
ENTITY = uuid.uuid4()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"org_id": str(ORG), "tenant_type": "sme", "exp": int(time.time()) + 60}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def hs_verifier(**cfg: Any) -> JwtVerifier:
    verifier = build_verifier(JwtConfig(secret=SECRET, **cfg))
    assert verifier is not None
    return verifier


def pem_verifier(tmp_path: Path, key: Any, **cfg: Any) -> JwtVerifier:
    path = tmp_path / "pub.pem"
    path.write_bytes(pem(key))
    verifier = build_verifier(JwtConfig(public_key_file=str(path), **cfg))
    assert verifier is not None
    return verifier


# ----------------------------------------------------------------------------- accepted


def test_hs256_token_yields_org_type_entity_and_a_stable_token_id() -> None:
    token = jwt.encode(claims(entity_id=str(ENTITY), jti="abc", iss="idp"), SECRET, "HS256")
    got = hs_verifier().verify(token)
    assert got is not None
    assert (got.org_id, got.tenant_type, got.entity_id) == (ORG, "sme", ENTITY)
    assert got.token_id == uuid.uuid5(JWT_TOKEN_NAMESPACE, "jti:idp:abc")
    assert hs_verifier().verify(token) == got


def test_token_id_without_jti_is_derived_from_the_token_and_differs_per_token() -> None:
    a = jwt.encode(claims(), SECRET, "HS256")
    b = jwt.encode(claims(exp=int(time.time()) + 120), SECRET, "HS256")
    ida, idb = hs_verifier().verify(a), hs_verifier().verify(b)
    assert ida is not None and idb is not None
    assert ida.token_id != idb.token_id
    assert ida.token_id == jwt_token_id(a, {})
    assert ida.token_id.version == 5  # never equal to a gen_random_uuid() (v4) token id


def test_type_and_entity_claims_are_optional() -> None:
    token = jwt.encode(claims(tenant_type=None), SECRET, "HS256")
    got = hs_verifier().verify(token)
    assert got is not None and got.tenant_type is None and got.entity_id is None


def test_claim_names_come_from_the_config() -> None:
    token = jwt.encode({"org": str(ORG), "kind": "agency", "exp": int(time.time()) + 60},
                       SECRET, "HS256")
    got = hs_verifier(org_claim="org", type_claim="kind").verify(token)
    assert got is not None and got.tenant_type == "agency"


def test_rs256_with_a_pem_public_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, "RS256")
    assert pem_verifier(tmp_path, rsa_key).verify(token) is not None


def test_es256_with_a_pem_public_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = jwt.encode(claims(), ec_key, "ES256")
    assert pem_verifier(tmp_path, ec_key).verify(token) is not None


def test_jwks_key_is_chosen_by_kid(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                                   ec_key: ec.EllipticCurvePrivateKey) -> None:
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = []
    for kid, key, algo in (("r1", rsa_key, RSAAlgorithm), ("e1", ec_key, ECAlgorithm),
                           ("r2", other_rsa, RSAAlgorithm)):
        jwk = algo.to_jwk(key.public_key(), as_dict=True)
        keys.append({**jwk, "kid": kid})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    verifier = build_verifier(JwtConfig(jwks_file=str(path)))
    assert verifier is not None
    assert verifier.verify(jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "r1"}))
    assert verifier.verify(jwt.encode(claims(), ec_key, "ES256", headers={"kid": "e1"}))
    assert verifier.verify(jwt.encode(claims(), other_rsa, "RS256", headers={"kid": "r2"}))
    # Signed by r1's key but naming r2: the signature is checked against r2 and fails.
    assert verifier.verify(jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "r2"})) is None
    assert verifier.verify(jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "nope"})) is None
    assert verifier.verify(jwt.encode(claims(), rsa_key, "RS256")) is None  # no kid, no PEM


def test_leeway_accepts_a_just_expired_token() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, "HS256")
    assert hs_verifier(leeway=30.0).verify(token) is not None


def test_matching_issuer_and_audience_are_accepted() -> None:
    token = jwt.encode(claims(iss="https://idp", aud="pgtenant"), SECRET, "HS256")
    assert hs_verifier(issuer="https://idp", audience="pgtenant").verify(token) is not None


# ----------------------------------------------------------------------------- refused


def test_expired_token_is_refused() -> None:
    assert hs_verifier().verify(jwt.encode(claims(exp=int(time.time()) - 5), SECRET,
                                           "HS256")) is None


def test_token_without_exp_is_refused() -> None:
    assert hs_verifier().verify(jwt.encode(claims(exp=None), SECRET, "HS256")) is None


def test_token_not_yet_valid_is_refused() -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 300), SECRET, "HS256")
    assert hs_verifier().verify(token) is None


@pytest.mark.parametrize("token_claims, cfg", [
    ({"iss": "https://evil"}, {"issuer": "https://idp"}),
    ({}, {"issuer": "https://idp"}),
    ({"aud": "someone-else"}, {"audience": "pgtenant"}),
    ({}, {"audience": "pgtenant"}),
    ({"aud": "someone-else"}, {}),  # a token meant for another audience, proxy names none
], ids=["wrong-iss", "missing-iss", "wrong-aud", "missing-aud", "aud-not-expected"])
def test_wrong_or_missing_issuer_and_audience_are_refused(
    token_claims: dict[str, Any], cfg: dict[str, Any]
) -> None:
    token = jwt.encode(claims(**token_claims), SECRET, "HS256")
    assert hs_verifier(**cfg).verify(token) is None


def test_alg_none_is_refused() -> None:
    token = jwt.encode(claims(), None, "none")
    assert looks_like_jwt(token)  # reaches the verifier, which refuses it
    assert hs_verifier().verify(token) is None


def test_algorithm_not_configured_is_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, "RS256")
    assert pem_verifier(tmp_path, rsa_key, algorithms=("ES256",)).verify(token) is None
    hs = jwt.encode(claims(), SECRET, "HS256")
    assert hs_verifier(algorithms=("RS256",)).verify(hs) is None


def test_hs256_signed_with_the_rsa_public_key_is_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Algorithm confusion: the public key must never serve as an HMAC secret.
    public_pem = pem(rsa_key)
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    sig = hmac.new(public_pem, header + b"." + body, hashlib.sha256).digest()
    token = (header + b"." + body + b"." + jwt.utils.base64url_encode(sig)).decode()
    assert pem_verifier(tmp_path, rsa_key).verify(token) is None


def test_es256_token_against_an_rsa_key_is_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims(), ec_key, "ES256")
    assert pem_verifier(tmp_path, rsa_key).verify(token) is None


def test_bad_signature_is_refused() -> None:
    token = jwt.encode(claims(), SECRET + "x", "HS256")
    assert hs_verifier().verify(token) is None
    head, _body, sig = jwt.encode(claims(), SECRET, "HS256").split(".")
    tampered = jwt.utils.base64url_encode(json.dumps(claims(org_id=str(uuid.uuid4()))).encode())
    assert hs_verifier().verify(f"{head}.{tampered.decode()}.{sig}") is None


@pytest.mark.parametrize("token", [
    "", "abc", "a.b", "a.b.c", "a.b.c.d", "pgt_" + "x" * 43, "!!.??.##",
    "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",  # payload is not JSON
    "x" * 5000,
])
def test_malformed_tokens_are_refused(token: str) -> None:
    assert hs_verifier().verify(token) is None


@pytest.mark.parametrize("bad", [
    {"org_id": "not-a-uuid"}, {"org_id": None}, {"org_id": 42},
    {"entity_id": "nope"}, {"entity_id": 7}, {"tenant_type": ["sme"]},
], ids=["org-not-uuid", "org-missing", "org-int", "entity-not-uuid", "entity-int",
        "type-not-str"])
def test_bad_tenant_claims_are_refused(bad: dict[str, Any]) -> None:
    token = jwt.encode(claims(**bad), SECRET, "HS256")
    assert hs_verifier().verify(token) is None


# ----------------------------------------------------------------------------- config


def test_no_key_configured_means_jwts_are_disabled() -> None:
    assert build_verifier(JwtConfig()) is None


def test_short_hmac_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"jwt\.secret"):
        build_verifier(JwtConfig(secret="short"))


def test_unreadable_or_bad_key_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"jwt\.public_key_file"):
        build_verifier(JwtConfig(public_key_file=str(tmp_path / "missing.pem")))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(ConfigError, match=r"jwt\.public_key_file"):
        build_verifier(JwtConfig(public_key_file=str(junk)))
    with pytest.raises(ConfigError, match=r"jwt\.jwks_file"):
        build_verifier(JwtConfig(jwks_file=str(junk)))


def test_weak_rsa_key_and_jwks_without_kid_are_config_errors(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        pem_verifier(tmp_path, weak)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [RSAAlgorithm.to_jwk(rsa_key.public_key(),
                                                             as_dict=True)]}))
    with pytest.raises(ConfigError, match="kid"):
        build_verifier(JwtConfig(jwks_file=str(path)))


def test_jwt_shape_check() -> None:
    assert looks_like_jwt(jwt.encode(claims(), SECRET, "HS256"))
    assert not looks_like_jwt("pgt_abcdef")
    assert not looks_like_jwt("a.b.c.d")
