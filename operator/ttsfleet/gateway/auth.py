"""JWT bearer tokens: who calls, for which tenant, with which scopes.

- An algorithm allow-list that can never hold `none` and never mixes symmetric (HS*)
  with asymmetric algorithms (the key-confusion attack: a public key used as an HMAC
  secret); each key is used only with the algorithm family of its own type.
- `exp`, `iss` and `aud` are required; `leeway` seconds of clock skew are tolerated.
- Keys come from a JWKS document (a Secret or a URL: the adapter refreshes it in the
  background and swaps the `KeySet` in; nothing here fetches).
- A verified token is cached until it expires (RS256 verification costs ~130 µs on this
  machine's cores, a dict lookup far less); a new key set empties the cache, so a key
  rotated out stops its tokens at once.

`Tickets` lets a browser's WebSocket (which cannot carry an `Authorization` header)
authenticate: an authenticated HTTP call gets a ticket, short-lived and single-use,
and the socket's URL carries it.

`sign` and `new_signing_key` make tokens for a local cluster (`ttsfleet token`) and for
tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
CACHE_ENTRIES = 10_000


class ConfigError(ValueError):
    """An auth configuration that would be unsafe or cannot work; names the field."""


class AuthError(Exception):
    """A request that is not authenticated (401), with the reason in OpenAI's words."""

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class AuthConfig:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    tenant_claim: str = "tenant"
    scope_claim: str = "scope"
    leeway_seconds: float = 30.0

    def __post_init__(self) -> None:
        algorithms = set(self.algorithms)
        if not algorithms:
            raise ConfigError("auth.algorithms is empty: allow at least one, e.g. RS256")
        unknown = algorithms - SYMMETRIC - ASYMMETRIC
        if unknown:
            raise ConfigError(
                f"auth.algorithms: {', '.join(sorted(unknown))} not allowed (never 'none'): "
                f"use some of {', '.join(sorted(ASYMMETRIC | SYMMETRIC))}"
            )
        if algorithms & SYMMETRIC and algorithms & ASYMMETRIC:
            raise ConfigError(
                "auth.algorithms mixes HS* with asymmetric algorithms, which lets a public "
                "key be used as an HMAC secret: keep one family"
            )
        if not self.issuer:
            raise ConfigError("auth.issuer is required")
        if not self.audiences:
            raise ConfigError("auth.audiences needs at least one audience")


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str]
    expires_at: float


@dataclass(frozen=True)
class KeySet:
    """Verification keys by `kid`, from a JWKS document."""

    keys: Mapping[str, jwt.PyJWK] = field(default_factory=dict)

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any] | str) -> KeySet:
        """Parse a JWKS (`{"keys": [...]}`); every key needs a `kid` and an `alg`."""
        doc = json.loads(jwks) if isinstance(jwks, str) else dict(jwks)
        keys = {}
        for index, entry in enumerate(doc.get("keys") or []):
            if "kid" not in entry or "alg" not in entry:
                raise ConfigError(f"jwks.keys[{index}]: every key needs 'kid' and 'alg'")
            keys[entry["kid"]] = jwt.PyJWK(entry)
        return cls(keys)


class Verifier:
    """Checks bearer tokens against the current key set; thread-safe."""

    def __init__(self, config: AuthConfig, keys: KeySet) -> None:
        self.config = config
        self._keys = keys
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    @property
    def keys(self) -> KeySet:
        with self._lock:
            return self._keys

    def use_keys(self, keys: KeySet) -> None:
        """A refreshed key set: tokens are verified against it from now on."""
        with self._lock:
            self._keys = keys
            self._cache.clear()

    def verify(self, header: str | None, now: float | None = None) -> Principal:
        """The caller of a request with this `Authorization` header, or AuthError."""
        now = time.time() if now is None else now
        if not header:
            raise AuthError("You didn't provide an API key: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("The Authorization header must be 'Bearer <token>'")
        token = token.strip()
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(digest)
            keys = self._keys
        if cached is not None:
            if now > cached.expires_at + self.config.leeway_seconds:
                raise AuthError("The token has expired: get a new one")
            return cached
        principal = self._verify(token, keys, now)
        with self._lock:
            if keys is self._keys:  # not from a key set replaced meanwhile
                self._cache[digest] = principal
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str, keys: KeySet, now: float) -> Principal:
        cfg = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("The token is not a JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in cfg.algorithms:
            raise AuthError(f"The token's algorithm {algorithm!r} is not accepted")
        key = keys.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError(f"The token's key {kid!r} is unknown")
        if key.algorithm_name != algorithm:
            raise AuthError(f"The token's key {kid!r} is not for {algorithm}")
        try:
            claims = jwt.decode(
                token, key=key, algorithms=[algorithm], audience=list(cfg.audiences),
                issuer=cfg.issuer, leeway=cfg.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise AuthError("The token has expired: get a new one") from None
        except jwt.PyJWTError as err:
            raise AuthError(f"The token is not valid: {err}") from None
        exp = float(claims["exp"])
        if now > exp + cfg.leeway_seconds:  # `now` is a parameter; PyJWT read the clock
            raise AuthError("The token has expired: get a new one")
        scopes = claims.get(cfg.scope_claim) or ""
        return Principal(
            subject=str(claims.get("sub") or ""),
            tenant=str(claims.get(cfg.tenant_claim) or "default"),
            scopes=frozenset(scopes.split() if isinstance(scopes, str) else scopes),
            expires_at=exp,
        )


# ---- tickets --------------------------------------------------------------------------------

TICKET_SECONDS = 30.0


class Tickets:
    """Short-lived, single-use tickets standing for a verified principal.

    A ticket is `payload.mac`: the principal and an expiry in base64url JSON, and an
    HMAC-SHA256 of it under `key`. Replicas given the same key redeem each other's
    tickets; each replica remembers the tickets it redeemed until they expire (a ticket
    replayed on another replica within its 30 s is the documented residue). A ticket
    grants no more than the token it came from, and never outlives it.
    """

    def __init__(self, key: bytes | None = None, ttl_seconds: float = TICKET_SECONDS) -> None:
        self.key = key or secrets.token_bytes(32)
        self.ttl_seconds = ttl_seconds
        self._redeemed: dict[str, float] = {}

    def issue(self, principal: Principal, now: float | None = None) -> tuple[str, float]:
        """A ticket for `principal`, and when it expires."""
        now = time.time() if now is None else now
        expires = min(now + self.ttl_seconds, principal.expires_at)
        payload = {
            "sub": principal.subject, "tenant": principal.tenant,
            "scopes": sorted(principal.scopes), "token_exp": principal.expires_at,
            "exp": expires, "nonce": secrets.token_urlsafe(12),
        }  # fmt: skip
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._mac(body))}", expires

    def redeem(self, ticket: str, now: float | None = None) -> Principal:
        """The principal of a valid, unused ticket; AuthError otherwise."""
        now = time.time() if now is None else now
        body, _, mac = ticket.partition(".")
        try:
            valid = hmac.compare_digest(_unb64(mac), self._mac(body))
            payload = json.loads(_unb64(body)) if valid else None
        except (ValueError, json.JSONDecodeError):
            valid, payload = False, None
        if not valid or not isinstance(payload, dict):
            raise AuthError("The ticket is not one this gateway issued: get a new one")
        if now > float(payload["exp"]):
            raise AuthError("The ticket has expired (they last 30 s): get a new one")
        for nonce in [n for n, exp in self._redeemed.items() if exp < now]:
            del self._redeemed[nonce]
        if payload["nonce"] in self._redeemed:
            raise AuthError("The ticket was used already (each is good once): get a new one")
        self._redeemed[payload["nonce"]] = float(payload["exp"])
        return Principal(
            subject=str(payload["sub"]), tenant=str(payload["tenant"]),
            scopes=frozenset(payload["scopes"]), expires_at=float(payload["token_exp"]),
        )  # fmt: skip

    def _mac(self, body: str) -> bytes:
        return hmac.new(self.key, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---- signing (local clusters and tests) ----------------------------------------------------


def new_signing_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ES256 (P-256) key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


def key_id(key: ec.EllipticCurvePrivateKey) -> str:
    """A stable kid: a hash of the public key."""
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(public).hexdigest()[:16]


def jwks(keys: Iterable[ec.EllipticCurvePrivateKey]) -> dict[str, Any]:
    """The public JWKS of `keys` (ES256)."""
    out = []
    for key in keys:
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        out.append(entry | {"kid": key_id(key), "alg": "ES256", "use": "sig"})
    return {"keys": out}


def write_jwks(path: Path, keys: Iterable[ec.EllipticCurvePrivateKey]) -> None:
    """Write the public JWKS of `keys` to `path` (a gateway's `jwksFile`)."""
    path.write_text(json.dumps(jwks(keys)))


def sign(
    key: ec.EllipticCurvePrivateKey, *, issuer: str, audience: str, subject: str,
    tenant: str = "default", scopes: Iterable[str] = ("speech",), ttl_seconds: float = 3600,
    now: float | None = None, tenant_claim: str = "tenant",
) -> str:  # fmt: skip
    """An ES256 token for `subject`, valid `ttl_seconds` from `now`."""
    issued = time.time() if now is None else now
    claims = {
        "iss": issuer, "aud": audience, "sub": subject, tenant_claim: tenant,
        "scope": " ".join(scopes), "iat": int(issued), "nbf": int(issued),
        "exp": int(issued + ttl_seconds), "jti": uuid.uuid4().hex,
    }  # fmt: skip
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": key_id(key)})
