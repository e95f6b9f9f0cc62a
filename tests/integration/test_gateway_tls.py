"""HTTPS on the gateway's listener, from a certificate and key as a cert-manager Secret
holds them, called by the official `openai` client that trusts only its CA."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.helpers import certificate
from ttsfleet.cluster import local
from ttsfleet.harness import GatewayProcess, TritonProcess, wait_for

VOICE = "en_US-joe-medium"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = certificate(tmp, "ca")
    certificate(tmp, "tls", ca)
    gateway = GatewayProcess(tmp / "gateway.json", local.free_port(), tmp / "gateway.log", tls=True)
    fleet = {"name": "joe", "voice": VOICE, "endpoints": [triton.grpc_address]}
    gateway.configure({
        "routes": [{"models": ["tts-1"], "voices": ["alloy"], "fleet": fleet}],
        "tls": {"certFile": str(tmp / "tls.crt"), "keyFile": str(tmp / "tls.key")},
    })  # fmt: skip
    gateway.start()
    yield gateway, tmp, ca
    gateway.stop()


def served_serial(gateway: GatewayProcess, cafile: Path) -> int:
    """The serial number of the certificate a new connection is shown."""
    context = ssl.create_default_context(cafile=str(cafile))
    import socket  # noqa: PLC0415

    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509  # noqa: PLC0415

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_openai_client_speaks_over_https_trusting_only_the_ca(served: Any) -> None:
    gateway, tmp, _ = served
    assert gateway.url.startswith("https://")
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="none",
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(
            cafile=str(tmp / "ca.crt"))),
    )  # fmt: skip
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Over TLS.")
    assert len(speech.content) > 1000
    # Plain HTTP on the same port is not served, and a client without the CA refuses it.
    with pytest.raises(httpx2.HTTPError):
        httpx2.get(f"http://127.0.0.1:{gateway.port}/healthz", timeout=5)
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{gateway.url}/healthz", timeout=5)


def test_a_renewed_certificate_reaches_new_connections_without_a_restart(served: Any) -> None:
    gateway, tmp, ca = served
    pid = gateway.process.pid
    before = served_serial(gateway, tmp / "ca.crt")
    renewal = tmp / "renewal"
    renewal.mkdir(exist_ok=True)
    _, renewed = certificate(renewal, "tls", ca)
    # As a Secret volume swaps its files: each new file renamed into place.
    for name in ("tls.key", "tls.crt"):
        (renewal / name).replace(tmp / name)
    wait_for(
        "the renewed certificate on new connections",
        lambda: served_serial(gateway, tmp / "ca.crt") == renewed.serial_number,
        timeout=15,
    )
    assert renewed.serial_number != before
    assert gateway.process.pid == pid
