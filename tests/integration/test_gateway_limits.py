"""Per-tenant limits shared by two gateway replicas through a real redis-server, what
happens when Redis dies, and the breaker, fallback and shedding in front of a real
tritonserver."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from websockets.sync.client import ClientConnection, connect

from ttsfleet.cluster import local
from ttsfleet.gateway import auth
from ttsfleet.harness import GatewayProcess, RedisProcess, TritonProcess, wait_for
from ttsfleet.triton import contract

ISSUER = "https://issuer.ttsfleet.test"
AUDIENCE = "ttsfleet-gateway"
VOICE = "en_US-joe-medium"
SHORT = "Hello there."
TIERS = [
    # 4 at once, then one every 10 s: a burst is all a test can spend.
    {"name": "free", "requestsPerSecond": 0.1, "requestBurst": 4},
    {"name": "streams", "requestsPerSecond": 100, "requestBurst": 100, "concurrentStreams": 2},
    {"name": "chars", "requestsPerSecond": 100, "requestBurst": 100,
     "charactersPerSecond": 1, "characterBurst": 300},
]  # fmt: skip
LONG = " ".join(f"Sentence number {i} keeps this stream busy for a while." for i in range(40))


def fleet(name: str, endpoints: list[str], **extra: Any) -> dict[str, Any]:
    return {"namespace": "speech", "name": name, "voice": VOICE, "endpoints": endpoints} | extra


class Pair:
    """Two gateway replicas with one config, sharing limits through one Redis."""

    def __init__(self, tmp: Path, triton: TritonProcess, redis: RedisProcess) -> None:
        self.key = auth.new_signing_key()
        self.jwks = tmp / "jwks.json"
        auth.write_jwks(self.jwks, [self.key])
        route = {
            "models": ["tts-1"],
            "voices": ["alloy"],
            "fleet": fleet("joe", [triton.grpc_address]),
        }
        self.document = {
            "routes": [route],
            "auth": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksFile": str(self.jwks)},
            "maxInputCharacters": 300,
            "rateLimits": {
                "tiers": TIERS, "defaultTier": "free", "redisUrl": redis.url, "localShare": 0.5,
                "tenants": {"gamma": "streams", "delta": "chars"},
            },
        }  # fmt: skip
        self.gateways = [
            GatewayProcess(tmp / f"gateway-{i}.json", local.free_port(), tmp / f"gateway-{i}.log")
            for i in range(2)
        ]
        for gateway in self.gateways:
            gateway.configure(self.document)

    def token(self, tenant: str) -> str:
        return auth.sign(self.key, issuer=ISSUER, audience=AUDIENCE, subject="t", tenant=tenant)

    def post(self, replica: int, tenant: str, text: str = SHORT) -> httpx2.Response:
        return httpx2.post(
            f"{self.gateways[replica].url}/v1/audio/speech", timeout=60,
            headers={"authorization": f"Bearer {self.token(tenant)}"},
            json={"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"},
        )  # fmt: skip


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    tmp = tmp_path_factory.mktemp("redis")
    server = RedisProcess(local.free_port(), tmp / "redis.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess, redis: RedisProcess
) -> Iterator[Pair]:
    made = Pair(tmp_path_factory.mktemp("limits"), triton, redis)
    with ExitStack() as stack:
        for gateway in made.gateways:
            gateway.start()
            stack.callback(gateway.stop)
        yield made


def params(header: str) -> dict[str, dict[str, str]]:
    """A RateLimit or RateLimit-Policy field as {policy: {param: value}}."""
    out = {}
    for member in header.split(", "):
        name, *pairs = member.split(";")
        out[name.strip('"')] = dict(pair.split("=", 1) for pair in pairs)
    return out


def test_a_tenants_burst_is_shared_by_every_replica_then_429_with_retry_after(
    pair: Pair,
) -> None:
    answers = [pair.post(i % 2, "alpha") for i in range(7)]
    assert [a.status_code for a in answers] == [200] * 4 + [429] * 3
    # Every answer says the policy; each admitted one what is left of the burst.
    for answer in answers:
        policy = params(answer.headers["ratelimit-policy"])
        assert policy["requests"] == {"q": "4", "w": "40"}
    remaining = [int(params(a.headers["ratelimit"])["requests"]["r"]) for a in answers[:4]]
    assert remaining == [3, 2, 1, 0]
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 10
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "tenant 'alpha'" in error["message"] and "tier 'free'" in error["message"]
    # Another tenant is not touched by alpha's burst.
    assert pair.post(1, "beta").status_code == 200


def test_the_openai_client_sees_its_rate_limit_error(pair: Pair) -> None:
    client = openai.OpenAI(
        base_url=f"{pair.gateways[0].url}/v1", api_key=pair.token("epsilon"), max_retries=0
    )
    for _ in range(4):
        client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
    with pytest.raises(openai.RateLimitError) as raised:
        client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
    assert raised.value.status_code == 429
    assert raised.value.response.headers["retry-after"].isdigit()


def test_characters_are_limited_apart_from_requests(pair: Pair) -> None:
    text = "Words to count, " * 9  # 144 characters: two fit the burst of 300, three do not
    statuses = [pair.post(i % 2, "delta", text).status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    refused = pair.post(0, "delta", text)
    assert "for characters" in refused.json()["error"]["message"]
    assert params(refused.headers["ratelimit-policy"])["characters"]["qu"] == '"characters"'


def test_a_tenant_may_hold_only_its_cap_of_streams_across_replicas(pair: Pair) -> None:
    """A WebSocket context is a stream until it ends: two open on two replicas are
    gamma's cap, so a third context and an HTTP request are refused until one ends."""
    auth_header = {"authorization": f"Bearer {pair.token('gamma')}"}
    settings = {"model": "tts-1", "voice": "alloy", "response_format": "pcm"}

    def socket(replica: int) -> ClientConnection:
        url = pair.gateways[replica].url.replace("http", "ws") + "/v1/audio/speech/stream"
        return connect(url, additional_headers=auth_header, open_timeout=10, close_timeout=5)

    def open_context(connection: ClientConnection, context_id: str) -> None:
        assert json.loads(connection.recv(timeout=10))["type"] == "ready"
        message = {"type": "continue", "context_id": context_id, "text": ""} | settings
        connection.send(json.dumps(message))
        connection.send(json.dumps({"type": "ping"}))
        assert json.loads(connection.recv(timeout=10))["type"] == "pong"  # no error: it is open

    with socket(0) as first, socket(1) as second:
        open_context(first, "a")
        open_context(second, "b")
        second.send(json.dumps({"type": "continue", "context_id": "c", "text": ""} | settings))
        refused = json.loads(second.recv(timeout=10))
        assert refused["type"] == "error" and refused["context_id"] == "c"
        assert refused["error"]["code"] == "concurrency_limit_exceeded"
        over = pair.post(0, "gamma", "Not spoken before, so a stream.")
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert params(over.headers["ratelimit"])["streams"]["r"] == "0"
        assert params(over.headers["ratelimit-policy"])["streams"] == {
            "q": "2", "qu": '"concurrent-requests"'
        }  # fmt: skip
        first.send(json.dumps({"type": "cancel", "context_id": "a"}))
        wait_for(
            "a stream slot given back",
            lambda: pair.post(0, "gamma", f"Again at {time.time()}.").status_code == 200,
        )
        # "b" and this request itself hold the two slots while it streams.
        fresh = pair.post(1, "gamma", f"Fresh at {time.time()}.")
        assert params(fresh.headers["ratelimit"])["streams"]["r"] == "0"
        # A reply from the cache is a request, not a stream: it passes the full cap.
        pair.post(1, "gamma", "Not spoken before, so a stream.")  # spoken: now cached
        cached = pair.post(1, "gamma", "Not spoken before, so a stream.")
        assert cached.headers["server-timing"] == "cache;desc=hit"
        assert "streams" not in params(cached.headers["ratelimit"])


def test_with_redis_down_each_replica_limits_on_its_own_share(
    pair: Pair, redis: RedisProcess
) -> None:
    gateway = pair.gateways[0]
    assert gateway.metric(contract.GATEWAY_RATELIMIT_SHARED) == 1
    redis.stop()
    try:
        # Under load from two threads: nothing crashes, no 5xx, and the replica
        # admits at most its share (0.5) of the burst of 4 with no Redis to ask.
        statuses: list[int] = []

        def load() -> None:
            for _ in range(6):
                statuses.append(pair.post(0, "zeta").status_code)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(set(statuses)) == [200, 429]
        assert statuses.count(200) == 2
        assert gateway.metric(contract.GATEWAY_RATELIMIT_SHARED) == 0
        assert gateway.process is not None and gateway.process.poll() is None
        assert re.search(r"Redis failed .* at 50% of every limit", gateway.log.read_text())
    finally:
        redis.start()
    # Redis is back: limits are shared again (a tenant new to this Redis gets its burst).
    wait_for(
        "limits shared through Redis again",
        lambda: (
            pair.post(0, f"eta-{time.time()}").status_code == 200
            and gateway.metric(contract.GATEWAY_RATELIMIT_SHARED) == 1
        ),
        timeout=15,
    )


# ---- breaker, fallback, shedding ----------------------------------------------------------


@pytest.fixture(scope="module")
def breaking(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("breaker")
    gateway = GatewayProcess(tmp / "gateway.json", local.free_port(), tmp / "gateway.log")
    dead = f"127.0.0.1:{local.free_port()}"

    def configure(primary: str) -> None:
        gateway.configure({
            "routes": [
                {"models": ["tts-1"], "fleet": fleet("joe", [primary]),
                 "fallback": fleet("joe-cpu", [triton.grpc_address])},
                {"models": ["solo"], "fleet": fleet("solo", [dead])},
                {"models": ["tiny"],
                 "fleet": fleet("tiny", [triton.grpc_address], maxStreamsPerReplica=1)},
            ],
            "breaker": {"minRequests": 3, "openSeconds": 1, "maxOpenSeconds": 2, "probes": 1},
            "cacheBytes": 0,
        })  # fmt: skip

    configure(dead)
    gateway.start()
    yield gateway, configure, dead
    gateway.stop()


def speak(url: str, model: str, text: str = SHORT) -> httpx2.Response:
    return httpx2.post(
        f"{url}/v1/audio/speech", timeout=60,
        json={"model": model, "voice": VOICE, "input": text, "response_format": "pcm"},
    )  # fmt: skip


def test_a_failing_fleet_falls_back_then_opens_its_breaker_and_recovers(
    breaking: Any, triton: TritonProcess
) -> None:
    gateway, configure, _ = breaking
    answers = [speak(gateway.url, "tts-1", f"Fallback {i}.") for i in range(5)]
    assert [a.status_code for a in answers] == [200] * 5  # nobody saw the failure
    assert all(a.headers["x-ttsfleet-fallback"] == "speech/joe-cpu" for a in answers)
    reasons = [a.headers["x-ttsfleet-fallback-reason"] for a in answers]
    assert reasons[:3] == ["failed"] * 3 and reasons[-1] == "breaker-open"
    assert len(answers[-1].content) > 10_000  # real audio, from the fallback
    fleet = {"fleet": "speech/joe"}
    assert gateway.metric(contract.GATEWAY_BREAKER_STATE, state="open", **fleet) == 1
    fallbacks = {"fleet": "speech/joe", "fallback": "speech/joe-cpu"}
    assert gateway.metric(contract.GATEWAY_FALLBACKS, reason="breaker-open", **fallbacks) >= 1
    # The fleet comes back: a trial after the open time closes the breaker.
    configure(triton.grpc_address)
    wait_for(
        "the primary fleet serving again",
        lambda: "x-ttsfleet-fallback" not in speak(gateway.url, "tts-1", "Back.").headers,
        timeout=15,
    )
    assert gateway.metric(contract.GATEWAY_BREAKER_STATE, state="closed", **fleet) == 1


def test_without_a_fallback_an_open_breaker_answers_503_with_retry_after(breaking: Any) -> None:
    gateway, _, _ = breaking
    statuses = []
    for i in range(5):
        answer = speak(gateway.url, "solo", f"Solo {i}.")
        statuses.append(answer.status_code)
        assert answer.json()["error"]["code"] == "service_unavailable"
        assert answer.headers["retry-after"].isdigit()
    assert statuses == [503] * 5
    assert "circuit breaker open" in answer.json()["error"]["message"]
    assert 1 <= int(answer.headers["retry-after"]) <= 2


def test_a_fleet_at_its_queue_limit_sheds_new_requests_at_once(breaking: Any) -> None:
    gateway, _, _ = breaking
    url = f"{gateway.url}/v1/audio/speech"
    # Slowed down 4x, far more audio than the sockets' buffers hold: the stream stays
    # open while nobody reads it.
    body = {"model": "tiny", "voice": VOICE, "input": LONG, "response_format": "pcm",
            "speed": 0.25}  # fmt: skip
    with httpx2.stream("POST", url, json=body, timeout=60) as held:
        assert held.status_code == 200
        chunks = held.iter_raw()  # kept: a dropped iterator closes the response
        next(chunks)
        shed = speak(gateway.url, "tiny")
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
        assert "queue limit" in shed.json()["error"]["message"]
    wait_for("the slot free again", lambda: speak(gateway.url, "tiny").status_code == 200)
