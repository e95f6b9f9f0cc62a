"""Small helpers shared by the suites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def _examples(kind: str) -> list[Path]:
    return [
        path
        for path in sorted((REPO / "examples").glob("*.yaml"))
        if yaml.safe_load(path.read_text()).get("kind") == kind
    ]


EXAMPLES = _examples("TtsDeployment")
GATEWAY_EXAMPLES = _examples("TtsGateway")
REGION_EXAMPLES = _examples("TtsRegion")


class _LiteralDumper(yaml.SafeDumper):
    """Dumps multi-line strings as literal blocks, so golden files read like the real thing."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str)


def dump_yaml(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_LiteralDumper, sort_keys=False, width=100)


def load_example(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def certificate(directory: Path, name: str, ca: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """A CA (without `ca`) or a server certificate for 127.0.0.1 and localhost signed by
    `ca` (its key and certificate), written as `<name>.crt` and `<name>.key` (PEM), as a
    cert-manager Secret's tls.crt and tls.key would be. Returns (key, certificate)."""
    import datetime  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer = (key, subject) if ca is None else (ca[0], ca[1].subject)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is not None:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    made = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{name}.crt").write_bytes(made.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, made
