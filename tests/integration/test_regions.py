"""A client region's real Envoy in front of three regions' real gateways (one tritonserver
behind them all), programmed through the EDS file the operator writes: nearest region
first, a dead region's traffic moved with no failed request, a ramp split by weight, and
residency held by the gateways even when Envoy sends a request to the wrong region."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml

from tests.helpers import certificate
from ttsfleet.api.v1alpha1 import ResidencySet
from ttsfleet.cluster import local
from ttsfleet.failover import envoy, traffic
from ttsfleet.gateway import auth
from ttsfleet.harness import (
    EnvoyProcess,
    GatewayProcess,
    TritonProcess,
    regional_gateway_config,
    stop_process,
    wait_for,
)
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
                regional_gateway_config(
                    region,
                    self.triton.grpc_address,
                    self.jwks,
                    ISSUER,
                    AUDIENCE,
                    healthy,
                    [APAC.wire()],
                )
            )

    def token(self, tenant: str = "acme") -> str:
        return auth.sign(self.key, issuer=ISSUER, audience=AUDIENCE, subject="t", tenant=tenant)

    def upstreams(self) -> dict[str, envoy.Upstream]:
        return {r: envoy.upstream(g.url) for r, g in self.gateways.items()}


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
        doc = envoy.load_assignment(levels, self.regions.upstreams(), str(self.version))
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


def test_an_https_gateway_is_reached_by_name_and_one_with_an_untrusted_certificate_is_not(
    tmp_path: Path, regions: Regions, triton: TritonProcess
) -> None:
    """eu's gateway on HTTPS (a certificate for localhost from a private CA), us's on
    HTTP: Envoy speaks TLS to eu with SNI localhost (its endpoint's name, whatever Host
    the client sent) and checks the certificate against that name and the CA it was
    given; an Envoy trusting another CA refuses eu and moves to us."""
    ca = certificate(tmp_path, "ca")
    certificate(tmp_path, "tls", ca)
    certificate(tmp_path, "other-ca")
    secure = GatewayProcess(
        tmp_path / "eu-tls.json", local.free_port(), tmp_path / "eu-tls.log", tls=True
    )
    secure.configure(
        regional_gateway_config(
            "eu", triton.grpc_address, regions.jwks, ISSUER, AUDIENCE, REGIONS, [APAC.wire()]
        )
        | {"tls": {"certFile": str(tmp_path / "tls.crt"), "keyFile": str(tmp_path / "tls.key")}}
    )
    eds = tmp_path / "xds" / "eds.json"
    upstreams = {
        "eu": envoy.upstream(f"https://localhost:{secure.port}"),
        "us": envoy.upstream(regions.gateways["us"].url),
    }
    assert upstreams["eu"].tls and upstreams["eu"].host == "localhost"
    levels = traffic.priorities(["eu", "us"], {"eu": 100, "us": 100})
    envoy.write_atomic(eds, envoy.load_assignment(levels, upstreams, "1"))
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello.", "response_format": "pcm"}
    # The clients' Host is the edge's own name; the certificate names only localhost.
    headers = {"authorization": f"Bearer {regions.token()}", "host": "speech.edge.example"}
    served = {}
    secure.start()
    try:
        for trusted in ("ca", "other-ca"):
            port, boot = local.free_port(), tmp_path / f"envoy-{trusted}.json"
            config = envoy.bootstrap(
                "eu", port, local.free_port(), eds, ca_file=str(tmp_path / f"{trusted}.crt")
            )
            envoy.write_atomic(boot, config)
            proxy = EnvoyProcess(
                boot, envoy.bootstrap_admin_port(boot), tmp_path / f"{trusted}.log"
            )
            proxy.start()
            try:
                reply = httpx2.post(
                    f"http://127.0.0.1:{port}/v1/audio/speech", json=body, headers=headers,
                    timeout=30,
                )  # fmt: skip
            finally:
                proxy.stop()
            assert reply.status_code == 200, reply.text
            assert len(reply.content) > 10_000
            served[trusted] = reply.headers["x-ttsfleet-region"]
    finally:
        secure.stop()
    assert served == {"ca": "eu", "other-ca": "us"}


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


# ---- the region agents: probes, votes, quorum, failback, this region's Envoy ------------


class Agents:
    """`ttsfleet region` for each region (eu's programs the edge's Envoy)."""

    def __init__(self, tmp: Path, regions: Regions, edge: Edge) -> None:
        self.ports = {r: local.free_port() for r in REGIONS}
        token = tmp / "probe-token"
        token.write_text(regions.token(tenant="probe"))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        for region in REGIONS:
            peers = [
                {"name": p, "gatewayUrl": regions.gateways[p].url, "statusUrl": self.url(p)}
                for p in REGIONS if p != region
            ]  # fmt: skip
            spec = {
                "region": region, "gateway": "speech", "peers": peers,
                "detection": {"probeIntervalSeconds": 1, "failuresToDown": 2, "recoverAfter": 3},
                "failback": {"stabilisationSeconds": 8, "steps": [50, 100], "stepSeconds": 2},
            }  # fmt: skip
            manifest = tmp / f"{region}-region.yaml"
            manifest.write_text(yaml.safe_dump({"kind": "TtsRegion", "spec": spec}))
            argv = [
                sys.executable, "-m", "ttsfleet", "region", "--spec", str(manifest),
                "--gateway-url", regions.gateways[region].url, "--host", "127.0.0.1",
                "--port", str(self.ports[region]), "--token-file", str(token),
                *(["--eds", str(edge.eds)] if region == "eu" else []),
            ]  # fmt: skip
            with (tmp / f"{region}-agent.log").open("ab") as out:
                self.processes[region] = subprocess.Popen(argv, stdout=out, stderr=out)

    def url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.ports[region]}/status"

    def view(self, observer: str) -> dict[str, dict[str, Any]]:
        try:
            doc = httpx2.get(self.url(observer), timeout=2).json()
        except httpx2.HTTPError:
            return {}
        return {r["name"]: r for r in doc["regions"]}

    def states(self, observer: str) -> dict[str, str]:
        return {name: r["state"] for name, r in self.view(observer).items()}

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process)


@pytest.fixture
def agents(tmp_path: Path, regions: Regions, edge: Edge) -> Iterator[Agents]:
    made = Agents(tmp_path, regions, edge)
    yield made
    made.stop()


def test_a_lost_region_goes_down_by_quorum_everywhere_and_comes_back_ramped(
    agents: Agents, regions: Regions, edge: Edge
) -> None:
    every = {r: "Healthy" for r in REGIONS}
    wait_for("every agent to see every region healthy",
             lambda: all(agents.states(o) == every for o in REGIONS), timeout=60)  # fmt: skip
    # What peers read of each other is read-only: a write to the status endpoint is refused.
    for verb in ("POST", "PUT", "PATCH", "DELETE"):
        refused = httpx2.request(verb, agents.url("eu"), json={"regions": []}, timeout=5)
        assert refused.status_code == 405, (verb, refused.status_code)
    assert agents.states("eu") == every

    regions.gateways["us"].stop()
    wait_for("eu and ap to agree that us is down",
             lambda: agents.states("eu").get("us") == "Down"
             and agents.states("ap").get("us") == "Down", timeout=30)  # fmt: skip
    assert sorted(agents.view("eu")["us"]["downVotes"]) == ["ap", "eu"]
    # us's own agent (its gateway gone, itself alive) hears the quorum too.
    wait_for("us to see itself down", lambda: agents.states("us").get("us") == "Down", timeout=15)

    regions.gateways["us"].start()
    seen: list[str] = []

    def back() -> bool:
        state = agents.states("eu").get("us", "")
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "Healthy"

    wait_for("us to come back", back, timeout=60, every=0.2)
    assert seen[-3:] == ["Stabilising", "Ramping", "Healthy"], seen


def test_the_client_regions_own_loss_moves_its_envoy_to_the_next_region(
    agents: Agents, regions: Regions, edge: Edge
) -> None:
    every = {r: "Healthy" for r in REGIONS}
    wait_for("every region healthy", lambda: agents.states("eu") == every, timeout=60)
    assert edge.served_by(10) == {"eu": 10}
    regions.gateways["eu"].stop()
    wait_for("eu to be down by quorum", lambda: agents.states("eu").get("eu") == "Down",
             timeout=30)  # fmt: skip
    # eu's gateway came back: the agent keeps it out of its Envoy until it has stabilised.
    regions.gateways["eu"].start()
    wait_for("eu stabilising", lambda: agents.states("eu").get("eu") == "Stabilising", timeout=30)
    assert edge.served_by(20) == {"us": 20}
    wait_for("eu ramping", lambda: agents.states("eu").get("eu") == "Ramping", timeout=30)
    wait_for("eu healthy", lambda: agents.states("eu").get("eu") == "Healthy", timeout=30)
    assert edge.served_by(10) == {"eu": 10}


def test_a_flapping_region_never_takes_traffic_back_while_it_flaps(
    agents: Agents, regions: Regions, edge: Edge
) -> None:
    every = {r: "Healthy" for r in REGIONS}
    wait_for("every region healthy", lambda: agents.states("eu") == every, timeout=60)

    def us_in_envoy() -> bool:  # what eu's agent last wrote into its Envoy's EDS file
        doc = json.loads(edge.eds.read_text())
        endpoints = doc["resources"][0]["endpoints"]
        return any(e["locality"]["region"] == "us" for e in endpoints)

    seen: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            now = us_in_envoy()
            if not seen or seen[-1] != now:
                seen.append(now)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(4):  # down ~4 s, up ~4 s: never healthy for a whole window
            regions.gateways["us"].stop()
            time.sleep(4)
            regions.gateways["us"].start()
            time.sleep(4)
        regions.gateways["us"].stop()
        wait_for("us out", lambda: agents.states("eu").get("us") == "Down", timeout=15)
    finally:
        stop.set()
        watcher.join()
    # Out once, and never back in while it flapped: no oscillation.
    assert seen == [True, False], seen
    # ap's agent decides on its own rounds: it may hear the quorum a round after eu.
    wait_for("us out in ap's view", lambda: agents.states("ap").get("us") == "Down", timeout=10)
