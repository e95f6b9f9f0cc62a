"""Tokens for a local cluster's gateways: `ttsfleet token --cluster NAME`.

Each local cluster keeps its own ES256 signing key (made on first use, in the
cluster's state directory, readable by its owner only). Its public half goes into
the cluster as the Secret `ttsfleet-local-jwks` (key `jwks.json`), which the example
TtsGateways name in `spec.auth.jwksSecretRef`; tokens are issued by `ISSUER` for
`AUDIENCE`, so a token of one local cluster is refused by every other.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ttsfleet.cluster import local
from ttsfleet.gateway import auth

ISSUER = "https://ttsfleet.local"
AUDIENCE = "ttsfleet-gateway"
SECRET = "ttsfleet-local-jwks"  # noqa: S105 - the name of a Secret of public keys
KEY_FILE = "gateway-signing-key.pem"


def signing_key(cluster: str) -> ec.EllipticCurvePrivateKey:
    """The cluster's signing key, made on first use."""
    record = local.load(cluster)
    if record is None:
        raise local.ClusterError(f"no local cluster {cluster!r}: run `ttsfleet cluster up`")
    path = record.dir / KEY_FILE
    if not path.exists():
        record.dir.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(".new")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(auth.private_pem(auth.new_signing_key()))
        staged.replace(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def jwks_secret(cluster: str, namespace: str) -> dict[str, Any]:
    """The Secret that lets gateways in `namespace` verify this cluster's tokens."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": namespace},
        "stringData": {"jwks.json": json.dumps(auth.jwks([signing_key(cluster)]))},
    }


def token(
    cluster: str, *, tenant: str = "default", ttl_seconds: float = 3600,
    subject: str = "local-user", scopes: tuple[str, ...] = ("speech",),
) -> str:  # fmt: skip
    return auth.sign(
        signing_key(cluster), issuer=ISSUER, audience=AUDIENCE, subject=subject,
        tenant=tenant, scopes=scopes, ttl_seconds=ttl_seconds,
    )  # fmt: skip
