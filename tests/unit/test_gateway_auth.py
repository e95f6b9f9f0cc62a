"""JWT bearer tokens: what is accepted, what is refused and why, and the cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ttsfleet.gateway.auth import (
    AuthConfig,
    AuthError,
    ConfigError,
    KeySet,
    Verifier,
    jwks,
    key_id,
    new_signing_key,
    sign,
)

ISSUER, AUDIENCE = "https://ttsfleet.local/pytest", "ttsfleet-gateway"
CONFIG = AuthConfig(ISSUER, (AUDIENCE,), algorithms=("ES256", "RS256"))
KEY = new_signing_key()


def verifier(*keys: object) -> Verifier:
    return Verifier(CONFIG, KeySet.from_jwks(jwks(keys or (KEY,))))  # type: ignore[arg-type]


def token(**changes: object) -> str:
    args: dict[str, object] = {"issuer": ISSUER, "audience": AUDIENCE, "subject": "app-1"}
    return sign(KEY, **(args | changes))  # type: ignore[arg-type]


def test_a_good_token_names_the_caller_tenant_and_scopes() -> None:
    who = verifier().verify(f"Bearer {token(tenant='acme', scopes=('speech', 'batch'))}")
    assert (who.subject, who.tenant, who.scopes) == ("app-1", "acme", {"speech", "batch"})


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (None, "didn't provide an API key"),
        ("", "didn't provide an API key"),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer <token>'"),
        ("Bearer ", "must be 'Bearer <token>'"),
        ("Bearer not-a-jwt", "not a JWT"),
    ],
)
def test_missing_and_malformed_headers(header: str | None, words: str) -> None:
    with pytest.raises(AuthError, match=words):
        verifier().verify(header)


def test_expired_wrong_issuer_wrong_audience_and_missing_claims_are_refused() -> None:
    check = verifier()
    long_ago = time.time() - 7200
    with pytest.raises(AuthError, match="expired"):
        check.verify(f"Bearer {token(now=long_ago, ttl_seconds=3600)}")
    with pytest.raises(AuthError, match="Invalid issuer"):
        check.verify(f"Bearer {token(issuer='https://evil.example')}")
    with pytest.raises(AuthError, match="Audience doesn't match"):
        check.verify(f"Bearer {token(audience='someone-else')}")
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x"}  # no exp
    no_exp = jwt.encode(claims, KEY, algorithm="ES256", headers={"kid": key_id(KEY)})
    with pytest.raises(AuthError, match="exp"):
        check.verify(f"Bearer {no_exp}")


def test_a_little_clock_skew_is_tolerated() -> None:
    just_expired = token(now=time.time() - 3610, ttl_seconds=3600)  # 10 s past, leeway 30
    assert verifier().verify(f"Bearer {just_expired}").subject == "app-1"


def test_alg_none_a_forged_signature_and_an_unknown_key_are_refused() -> None:
    check = verifier()
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60}
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": key_id(KEY)})
    with pytest.raises(AuthError, match="algorithm 'none' is not accepted"):
        check.verify(f"Bearer {unsigned}")
    other = new_signing_key()
    forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": key_id(KEY)})
    with pytest.raises(AuthError, match="not valid"):
        check.verify(f"Bearer {forged}")
    stranger = sign(other, issuer=ISSUER, audience=AUDIENCE, subject="x")
    with pytest.raises(AuthError, match="is unknown"):
        check.verify(f"Bearer {stranger}")
    good = token()
    head, _, signature = good.split(".")
    tampered_body = base64.urlsafe_b64encode(
        json.dumps(jwt.decode(good, options={"verify_signature": False}) | {"tenant": "victim"})
        .encode()
    ).rstrip(b"=").decode()  # fmt: skip
    with pytest.raises(AuthError, match="not valid"):
        check.verify(f"Bearer {head}.{tampered_body}.{signature}")


def test_a_public_key_used_as_an_hmac_secret_is_refused() -> None:
    """The key-confusion attack: an HS256 token 'signed' with the RSA public key."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = rsa_key.public_key()
    entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public)) | {"kid": "r1", "alg": "RS256"}
    check = Verifier(CONFIG, KeySet.from_jwks({"keys": [entry]}))
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60}
    assert check.verify(f"Bearer {jwt.encode(claims, rsa_key, 'RS256', {'kid': 'r1'})}")
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = _hs256(claims, pem, "r1")
    with pytest.raises(AuthError, match="'HS256' is not accepted"):
        check.verify(f"Bearer {forged}")


def _hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """An HS256 JWT built by hand (PyJWT itself refuses a PEM as an HMAC secret)."""

    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{part(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


@pytest.mark.parametrize(
    ("algorithms", "words"),
    [
        ((), "is empty"),
        (("none",), "not allowed"),
        (("HS256", "RS256"), "mixes HS"),
    ],
)
def test_unsafe_algorithm_lists_are_refused_with_the_field(
    algorithms: tuple[str, ...], words: str
) -> None:
    with pytest.raises(ConfigError, match=f"auth.algorithms.*{words}|{words}"):
        AuthConfig(ISSUER, (AUDIENCE,), algorithms=algorithms)


def test_a_verified_token_is_cached_until_it_expires_and_a_new_key_set_empties_it() -> None:
    check = verifier()
    good = f"Bearer {token(ttl_seconds=120)}"
    first = check.verify(good)
    assert check.verify(good) is first  # from the cache: the same object
    with pytest.raises(AuthError, match="expired"):
        check.verify(good, now=time.time() + 120 + 31)  # cached, yet past exp + leeway
    rotated = new_signing_key()
    check.use_keys(KeySet.from_jwks(jwks([rotated])))  # KEY rotated out
    with pytest.raises(AuthError, match="is unknown"):
        check.verify(good)
