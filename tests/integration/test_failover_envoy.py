"""A client region's real Envoy in front of three regions' real gateways (one tritonserver
behind them all), programmed through the EDS file the operator writes: nearest region
first, a dead region's traffic moved with no failed request, a ramp split by weight, and
residency held by the gateways even when Envoy sends a request to the wrong region."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from ttsfleet.api.v1alpha1 import ResidencySet
from ttsfleet.cluster import local
from ttsfleet.failover import envoy, traffic
from ttsfleet.gateway import auth
from ttsfleet.harness import EnvoyProcess, GatewayProcess, TritonProcess, wait_for
from ttsfleet.triton import contract

REGIONS = ["eu", "us", "ap"]  # nearest first for the clients of this Envoy (in eu)
ISSUER, AUDIENCE = "https://issuer.ttsfleet.test", "ttsfleet-gateway"
APAC = ResidencySet(name="apac", tenants=["acme-ap"], regions=["ap"])


class Regions:
    """One gateway per region, each knowing its region and the tenants' residency."""

    def __init__(self, tmp: Path, triton: TritonProcess) -> None:
        self.tmp, self.triton = tmp, triton
        self.key = auth.new_signing_key()
        self.jwks = tmp / "jwks.json"
        auth.write_jwks(self.jwks, [self.key])
        self.gateways = {
            r: GatewayProcess(tmp / f"{r}.json", local.free_port(), tmp / f"{r}.log")
            for r in REGIONS
        }
        self.configure(healthy=REGIONS)

    def configure(self, healthy: list[str]) -> None:
        for region, gateway in self.gateways.items():
            gateway.configure(
                {
                    "routes": [
                        {
                            "models": ["tts-1"],
                            "voices": ["alloy"],
                            "fleet": {
                                "name": "joe",
                                "voice": "en_US-joe-medium",
                                "endpoints": [self.triton.grpc_address],
                            },
                        }
                    ],
                    "auth": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksFile": str(self.jwks)},
                    "region": {"name": region, "healthy": healthy, "residency": [APAC.wire()]},
                }
            )

    def token(self, tenant: str = "acme") -> str:
        return auth.sign(self.key, issuer=ISSUER, audience=AUDIENCE, subject="t", tenant=tenant)

    def addresses(self) -> dict[str, tuple[str, int]]:
        return {r: envoy.address(g.url) for r, g in self.gateways.items()}


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[Regions]:
    made = Regions(tmp_path_factory.mktemp("regions"), triton)
    for gateway in made.gateways.values():
        gateway.start()
    yield made
    for gateway in made.gateways.values():
        gateway.stop()


class Edge:
    """The eu clients' Envoy; `program` writes its EDS file as the operator does."""

    def __init__(self, tmp: Path, regions: Regions) -> None:
        self.regions, self.version = regions, 0
        self.eds = tmp / "xds" / "eds.json"
        self.port = local.free_port()
        boot = tmp / "envoy.json"
        envoy.write_atomic(boot, envoy.bootstrap("eu", self.port, local.free_port(), self.eds))
        self.program({r: 100 for r in REGIONS})
        self.process = EnvoyProcess(boot, envoy.bootstrap_admin_port(boot), tmp / "envoy.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def program(self, percent: dict[str, int]) -> None:
        self.version += 1
        levels = traffic.priorities(REGIONS, percent)
        doc = envoy.load_assignment(levels, self.regions.addresses(), str(self.version))
        envoy.write_atomic(self.eds, doc)

    def get(self, path: str = "/v1/models", tenant: str = "acme") -> httpx2.Response:
        headers = {"authorization": f"Bearer {self.regions.token(tenant)}"}
        return httpx2.get(f"{self.url}{path}", headers=headers, timeout=10)

    def speak(self, tenant: str = "acme") -> httpx2.Response:
        headers = {"authorization": f"Bearer {self.regions.token(tenant)}"}
        body = {"model": "tts-1", "voice": "alloy", "input": "Hello.", "response_format": "pcm"}
        return httpx2.post(f"{self.url}/v1/audio/speech", json=body, headers=headers, timeout=30)

    def served_by(self, n: int) -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        for _ in range(n):
            reply = self.get()
            seen[reply.headers.get("x-ttsfleet-region", str(reply.status_code))] += 1
        return seen


@pytest.fixture
def edge(tmp_path: Path, regions: Regions) -> Iterator[Edge]:
    made = Edge(tmp_path, regions)
    made.process.start()
    yield made
    made.process.stop()
    for gateway in regions.gateways.values():  # the next test starts with every region up
        if gateway.process is None:
            gateway.start()
    regions.configure(healthy=REGIONS)


def test_speech_reaches_the_nearest_region_through_envoy(edge: Edge, regions: Regions) -> None:
    client = openai.OpenAI(base_url=f"{edge.url}/v1", api_key=regions.token())
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Speech from the nearest region.",
        response_format="pcm",
    ) as raw:  # fmt: skip
        assert raw.headers["x-ttsfleet-region"] == "eu"
        audio = raw.read()
    assert len(audio) > 22_050  # over half a second of 16-bit samples at 22,050 Hz
    assert edge.served_by(20) == {"eu": 20}


def test_a_ramp_splits_the_clients_by_weight_as_soon_as_the_file_is_renamed(edge: Edge) -> None:
    edge.program({"eu": 25, "us": 100, "ap": 100})
    wait_for("Envoy to apply the ramp", lambda: "us" in edge.served_by(10), timeout=5)
    seen = edge.served_by(400)
    assert set(seen) == {"eu", "us"}
    assert 0.17 < seen["eu"] / 400 < 0.33  # 25 % (binomial: 0.0217 standard deviation)
    edge.program({"eu": 0, "us": 100, "ap": 100})  # Stabilising again: out at once
    wait_for("eu to be out", lambda: edge.served_by(10) == {"us": 10}, timeout=5)


def test_a_dead_region_fails_over_to_the_next_with_no_failed_request(
    edge: Edge, regions: Regions
) -> None:
    failed: list[str] = []
    served: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def clients() -> None:
        while not stop.is_set():
            reply = edge.get()
            if reply.status_code != 200:
                failed.append(f"{reply.status_code} {reply.text[:200]}")
            served[reply.headers.get("x-ttsfleet-region", "?")] += 1
            time.sleep(0.02)

    load = threading.Thread(target=clients)
    load.start()
    try:
        wait_for("traffic through eu", lambda: served["eu"] >= 20, timeout=10)
        regions.gateways["eu"].stop()  # the whole front door goes, mid-traffic
        wait_for("traffic through us", lambda: served["us"] >= 50, timeout=15)
        speech = edge.speak()  # real speech, from the next region, before any quorum
        assert speech.status_code == 200, speech.text
        assert speech.headers["x-ttsfleet-region"] == "us"
        assert len(speech.content) > 10_000
    finally:
        stop.set()
        load.join()
    assert failed == []
    assert served["ap"] == 0  # us is nearer: ap never saw a request


def test_a_pinned_tenant_is_served_only_in_its_region_even_when_envoy_sends_it_elsewhere(
    edge: Edge, regions: Regions
) -> None:
    # Envoy sends every client to eu first; eu and us refuse (421) and Envoy retries on.
    reply = edge.speak(tenant="acme-ap")
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-ttsfleet-region"] == "ap"
    refused = regions.gateways["eu"].metric(contract.GATEWAY_RESIDENCY_REFUSED, set="apac")
    assert refused >= 1
    # ap is down: no cross-border failover, a 503 that names the set.
    regions.gateways["ap"].stop()
    regions.configure(healthy=["eu", "us"])
    edge.program({"eu": 100, "us": 100, "ap": 0})

    def refusal() -> Any:  # once the gateways have re-read their config (a second or two)
        reply = edge.speak(tenant="acme-ap")
        return reply if "none of those regions is healthy" in reply.text else None

    reply = wait_for("a residency refusal", refusal, timeout=10)
    assert reply.status_code == 503
    message = reply.json()["error"]["message"]
    assert "residency set 'apac' (ap)" in message and "not served outside them" in message
    assert reply.headers["x-ttsfleet-region"] in {"eu", "us"}
    assert edge.speak(tenant="acme").status_code == 200  # others are served as before
