"""Abuse of a real gateway in front of a real tritonserver, all at once, while a
well-behaved tenant keeps speaking: every abusive request gets a clean refusal (4xx,
429) or is closed, nothing crashes, and the good tenant is served throughout. (How
much the abuse costs the good tenant's TTFA is measured by `make bench-gateway`'s
`abuse` part, not asserted here.)"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path

import httpx2
import pytest

from ttsfleet import abuse
from ttsfleet.cluster import local
from ttsfleet.gateway import auth
from ttsfleet.gateway.server import REQUEST_SECONDS
from ttsfleet.harness import GatewayProcess, TritonProcess

ISSUER, AUDIENCE = "https://issuer.abuse.test", "abuse"
VOICE = "en_US-joe-medium"


def test_abuse_gets_clean_refusals_while_a_good_tenant_is_served(
    tmp_path: Path, triton: TritonProcess
) -> None:
    key = auth.new_signing_key()
    jwks = tmp_path / "jwks.json"
    auth.write_jwks(jwks, [key])
    gateway = GatewayProcess(tmp_path / "gateway.json", local.free_port(), tmp_path / "gw.log")
    fleet = {"name": "joe", "voice": VOICE, "endpoints": [triton.grpc_address]}
    gateway.configure({
        "routes": [{"models": ["tts-1"], "voices": ["alloy"], "fleet": fleet}],
        "auth": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksFile": str(jwks)},
        "rateLimits": {"defaultTier": "t", "tiers": [
            {"name": "t", "requestsPerSecond": 20, "requestBurst": 40, "concurrentStreams": 8}]},
    })  # fmt: skip

    def token(tenant: str) -> str:
        return auth.sign(key, issuer=ISSUER, audience=AUDIENCE, subject="s", tenant=tenant)

    gateway.start()
    good: Counter[int] = Counter()
    stop = threading.Event()

    def well_behaved() -> None:
        with httpx2.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                answer = client.post(
                    f"{gateway.url}/v1/audio/speech",
                    headers={"authorization": f"Bearer {token('good')}"},
                    json={"model": "tts-1", "voice": "alloy", "input": f"Still here, {i}.",
                          "response_format": "pcm"},
                )  # fmt: skip
                good[answer.status_code] += 1
                i += 1

    async def all_at_once() -> dict[str, Counter[str]]:
        url = gateway.url
        results = await asyncio.gather(
            abuse.bad_tokens(url, 1000),
            abuse.idle_flood(url, 300, within=REQUEST_SECONDS + 5),
            abuse.trickling_bodies(url, 50, within=REQUEST_SECONDS + 5),
            abuse.slow_readers(url, token("slow"), 200, hold=3),
            abuse.big_bodies(url, token("big"), 10),
        )
        kinds = ("bad_tokens", "flood", "trickle", "slow", "big")
        return dict(zip(kinds, results, strict=True))

    speaker = threading.Thread(target=well_behaved)
    speaker.start()
    try:
        seen = asyncio.run(all_at_once())
    finally:
        stop.set()
        speaker.join()
        alive = gateway.process is not None and gateway.process.poll() is None
        gateway.stop()
    assert alive, gateway.log.read_text()[-3000:]
    assert seen["bad_tokens"] == Counter({"401": 1000})
    # Connections that send nothing are closed after the request deadline, none held.
    assert seen["flood"] == Counter({"closed": 300})
    assert seen["trickle"] == Counter({"closed": 50})  # a body a byte a second: cut off
    # One tenant's 200 unread streams: its cap of 8 open, the rest refused at once.
    assert seen["slow"] == Counter({"200": 8, "429": 192})
    assert set(seen["big"]) <= {"413", "closed"} and seen["big"].total() == 10
    assert set(good) == {200} and good[200] >= 3, good


@pytest.mark.parametrize("size", [64 * 1024 + 1, 1024 * 1024])
def test_a_body_over_the_limit_is_refused_without_being_read(
    tmp_path: Path, triton: TritonProcess, size: int
) -> None:
    gateway = GatewayProcess(tmp_path / "gateway.json", local.free_port(), tmp_path / "gw.log")
    fleet = {"name": "joe", "voice": VOICE, "endpoints": [triton.grpc_address]}
    gateway.configure({"routes": [{"models": ["tts-1"], "fleet": fleet}]})
    gateway.start()
    try:
        answer = httpx2.post(
            f"{gateway.url}/v1/audio/speech", content=b"x" * size, timeout=30,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        assert answer.status_code == 413
        assert answer.headers["connection"] == "close"
        assert "send less text" in answer.json()["error"]["message"]
    finally:
        gateway.stop()
