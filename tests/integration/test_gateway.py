"""The speech gateway in front of a real tritonserver, called as developers call it:
the official `openai` client, plain HTTP, and bad requests of every kind."""

from __future__ import annotations

import base64
import http.server
import io
import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx2
import jwt
import numpy as np
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ttsfleet.cluster import local
from ttsfleet.gateway import auth
from ttsfleet.harness import GatewayProcess, TritonProcess, wait_for
from ttsfleet.triton import contract

ISSUER = "https://issuer.ttsfleet.test"
AUDIENCE = "ttsfleet-gateway"
VOICE = "en_US-joe-medium"
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
OPENAI_VOICES = ("alloy", "ash", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer")
TEXT = "Hello from the gateway. This sentence streams as it is spoken."


def gateway_config(endpoints: list[str], jwks_file: Path, **extra: Any) -> dict[str, Any]:
    route = {
        "models": list(OPENAI_MODELS),
        "voices": list(OPENAI_VOICES),
        "fleet": {"namespace": "speech", "name": "joe", "voice": VOICE, "endpoints": endpoints},
    }
    return {
        "routes": [route],
        "auth": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksFile": str(jwks_file)},
    } | extra


class Setup:
    def __init__(self, tmp: Path, triton: TritonProcess) -> None:
        self.key = auth.new_signing_key()
        self.jwks = tmp / "jwks.json"
        auth.write_jwks(self.jwks, [self.key])
        self.config = tmp / "gateway.json"
        self.gateway = GatewayProcess(self.config, local.free_port(), tmp / "gateway.log")
        self.write([triton.grpc_address])

    def write(self, endpoints: list[str], **extra: Any) -> None:
        self.gateway.configure(gateway_config(endpoints, self.jwks, **extra))

    def token(self, key: ec.EllipticCurvePrivateKey | None = None, **claims: Any) -> str:
        options = {"issuer": ISSUER, "audience": AUDIENCE, "subject": "tester"} | claims
        return auth.sign(key or self.key, **options)

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=token or self.token())

    def post(self, body: Any, token: str | None = "valid", **kwargs: Any) -> httpx2.Response:
        headers = {} if token is None else {"authorization": f"Bearer {self.bearer(token)}"}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["content-type"] = "application/json"
        return httpx2.post(
            f"{self.gateway.url}/v1/audio/speech", content=content, headers=headers, timeout=60,
            **kwargs,
        )  # fmt: skip

    def bearer(self, token: str) -> str:
        return self.token() if token == "valid" else token


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[Setup]:
    made = Setup(tmp_path_factory.mktemp("gateway"), triton)
    made.gateway.start()
    yield made
    made.gateway.stop()


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Samples and rate of an encoded stream, decoded by FFmpeg."""
    with av.open(io.BytesIO(data), format=fmt) as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
        rate = container.streams.audio[0].sample_rate
    return np.concatenate(frames), rate


def seconds(data: bytes, fmt: str) -> float:
    samples, rate = decode(data, fmt)
    return len(samples) / rate


# ---- what a developer calls ----------------------------------------------------------------


def test_the_official_openai_client_speaks_mp3_with_openai_names(setup: Setup) -> None:
    client = setup.client()
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    audio, rate = decode(response.content, "mp3")
    assert rate == 22_050
    assert 2.0 < len(audio) / rate < 8.0
    assert np.abs(audio.astype(np.float32)).mean() > 0.001  # speech, not silence
    # Streaming, as the client's docs show it: bytes arrive before synthesis is over.
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="shimmer", input=TEXT, response_format="wav",
        instructions="Speak cheerfully.",
    ) as streamed:  # fmt: skip
        assert streamed.headers["content-type"] == "audio/wav"
        chunks = list(streamed.iter_bytes())
    assert b"".join(chunks)[:4] == b"RIFF"


def test_wav_streams_one_header_with_streaming_sizes(setup: Setup) -> None:
    with httpx2.stream(
        "POST", f"{setup.gateway.url}/v1/audio/speech", timeout=60,
        headers={"authorization": f"Bearer {setup.token()}"},
        json={"model": "tts-1", "voice": VOICE, "input": TEXT, "response_format": "wav"},
    ) as response:  # fmt: skip
        assert response.status_code == 200
        chunks = [c for c in response.iter_raw() if c]
    data = b"".join(chunks)
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF  # a stream's unknown size
    channels, rate, bits = struct.unpack("<H", data[22:24])[0], *struct.unpack("<I", data[24:28]), 0
    assert (channels, rate) == (1, 22_050)
    assert data[36:40] == b"data" and struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    assert data.count(b"RIFF") == 1  # one header, not one per chunk
    del bits
    samples = np.frombuffer(data[44:], dtype="<i2")
    assert 2.0 < len(samples) / 22_050 < 8.0


@pytest.mark.parametrize(
    ("fmt", "container", "media"),
    [("opus", "ogg", "audio/opus"), ("aac", "adts", "audio/aac"), ("flac", "flac", "audio/flac")],
)
def test_every_openai_format_streams_through_the_official_client(
    setup: Setup, fmt: str, container: str, media: str
) -> None:
    with setup.client().audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="coral",
        input=TEXT,
        response_format=fmt,  # type: ignore[arg-type]
    ) as streamed:
        assert streamed.headers["content-type"] == media
        data = b"".join(streamed.iter_bytes())
    samples, rate = decode(data, container)
    assert 2.0 < len(samples) / rate < 8.0


def test_pcm_is_24khz_and_as_long_as_the_wav(setup: Setup) -> None:
    body = {"model": "tts-1", "voice": "nova", "input": TEXT}
    wav = setup.post(body | {"response_format": "wav"})
    pcm = setup.post(body | {"response_format": "pcm"})
    assert pcm.status_code == 200 and pcm.headers["content-type"] == "audio/pcm"
    wav_seconds = (len(wav.content) - 44) / 2 / 22_050
    pcm_seconds = len(pcm.content) / 2 / 24_000
    assert pcm_seconds == pytest.approx(wav_seconds, abs=0.02)


def test_sse_sends_base64_deltas_then_done_with_usage(setup: Setup) -> None:
    response = setup.post(
        {"model": "tts-1", "voice": "echo", "input": TEXT, "stream_format": "sse",
         "response_format": "wav"}
    )  # fmt: skip
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.split("\n\n")
        if line.startswith("data: ")
    ]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["total_tokens"] > 0
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert data[:4] == b"RIFF" and len(data) > 44 + 22_050


def test_speed_outside_the_engine_range_is_time_stretched(setup: Setup) -> None:
    """The engine makes 0.5x to 2x itself; the gateway stretches the rest by the
    remaining factor, so 4x is the engine's 2x played twice as fast."""
    body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "wav"}

    def samples(speed: float) -> float:
        return (len(setup.post(body | {"speed": speed}).content) - 44) / 2

    normal, engine_fast, engine_slow = samples(1.0), samples(2.0), samples(0.5)
    assert engine_fast < 0.7 * normal and engine_slow > 1.5 * normal
    assert samples(4.0) / engine_fast == pytest.approx(0.5, rel=0.05)
    assert samples(0.25) / engine_slow == pytest.approx(2.0, rel=0.05)


def test_models_voices_openapi_probes_and_metrics(setup: Setup) -> None:
    client = setup.client()
    assert {m.id for m in client.models.list()} == set(OPENAI_MODELS)
    headers = {"authorization": f"Bearer {setup.token()}"}
    voices = httpx2.get(f"{setup.gateway.url}/v1/voices", headers=headers).json()["data"]
    assert {v["id"] for v in voices} == {*OPENAI_VOICES, VOICE}
    assert httpx2.get(f"{setup.gateway.url}/v1/voices").status_code == 401
    document = httpx2.get(f"{setup.gateway.url}/openapi.json").json()
    schema = document["components"]["schemas"]["SpeechRequest"]["properties"]
    assert schema["input"]["maxLength"] == 4096 and "tts-1" in schema["model"]["enum"]
    assert httpx2.get(f"{setup.gateway.url}/healthz").status_code == 200
    assert httpx2.get(f"{setup.gateway.url}/readyz").status_code == 200
    fleet = {"fleet": "speech/joe"}
    before = setup.gateway.metric(contract.GATEWAY_TIME_TO_FIRST_AUDIO + "_count", **fleet)
    ok = setup.gateway.metric(contract.GATEWAY_REQUESTS, code="200", **fleet)
    setup.post({"model": "tts-1", "voice": "alloy", "input": "Counted."})
    assert setup.gateway.metric(contract.GATEWAY_TIME_TO_FIRST_AUDIO + "_count", **fleet) == (
        before + 1
    )
    assert setup.gateway.metric(contract.GATEWAY_REQUESTS, code="200", **fleet) == ok + 1
    assert setup.gateway.metric(contract.GATEWAY_INFLIGHT_STREAMS, **fleet) == 0
    assert setup.gateway.metric(contract.GATEWAY_QUEUED_CHARACTERS, **fleet) == 0


# ---- bad input -----------------------------------------------------------------------------

GOOD = {"model": "tts-1", "voice": "alloy", "input": "Fine."}
BAD_BODIES = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"voice": "alloy", "input": "x"}, 400, "model"),
    (GOOD | {"model": "tts-9"}, 404, "model"),
    (GOOD | {"model": 7}, 400, "model"),
    ({"model": "tts-1", "voice": "alloy"}, 400, "input"),
    (GOOD | {"input": "   "}, 400, "input"),
    (GOOD | {"input": "?! ..."}, 400, "input"),
    (GOOD | {"input": "a" * 4097}, 400, "input"),
    ({"model": "tts-1", "input": "x"}, 400, "voice"),
    (GOOD | {"voice": "marvin"}, 400, "voice"),
    (GOOD | {"response_format": "ogg"}, 400, "response_format"),
    (GOOD | {"response_format": "MP3"}, 400, "response_format"),
    (GOOD | {"speed": 5}, 400, "speed"),
    (GOOD | {"speed": 0.1}, 400, "speed"),
    (GOOD | {"speed": "fast"}, 400, "speed"),
    (GOOD | {"stream_format": "chunks"}, 400, "stream_format"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_requests_get_openais_error_shape_naming_the_field(
    setup: Setup, body: Any, status: int, param: str | None
) -> None:
    response = setup.post(body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if param is not None:
        assert param in error["message"]


def test_the_openai_client_raises_its_own_errors(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError, match="4096"):
        setup.client().audio.speech.create(model="tts-1", voice="alloy", input="a" * 5000)
    with pytest.raises(openai.AuthenticationError):
        setup.client(token="not-a-token").audio.speech.create(
            model="tts-1", voice="alloy", input="Hello."
        )


def unsigned(claims: dict[str, Any]) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    return f"{header.decode()}.{payload.decode()}."


def bad_tokens(setup: Setup) -> dict[str, str | None]:
    now = time.time()
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(now + 600)}
    return {
        "missing": None,
        "expired": setup.token(ttl_seconds=-120, now=now - 60),
        "wrong key": setup.token(key=auth.new_signing_key()),
        "alg none": unsigned(claims),
        "wrong audience": setup.token(audience="someone-else"),
        "wrong issuer": setup.token(issuer="https://evil.test"),
        "HS256 with the public key": jwt.encode(
            claims, "s" * 32, algorithm="HS256", headers={"kid": auth.key_id(setup.key)}
        ),
        "garbage": "abc.def.ghi",
    }


def test_bad_tokens_get_401_while_a_good_client_keeps_succeeding(setup: Setup) -> None:
    failures: list[str] = []
    done = threading.Event()
    good = 0

    def well_behaved() -> None:
        nonlocal good
        client = setup.client()
        while not done.is_set():
            try:
                client.audio.speech.create(model="tts-1", voice="alloy", input="Still here.")
                good += 1
            except openai.OpenAIError as err:
                failures.append(repr(err))

    thread = threading.Thread(target=well_behaved)
    thread.start()
    try:
        for name, token in bad_tokens(setup).items():
            response = setup.post(GOOD, token=token)
            assert response.status_code == 401, f"{name}: {response.text}"
            assert response.json()["error"]["code"] == "invalid_api_key", name
        for body, status, _ in BAD_BODIES:
            assert setup.post(body).status_code == status
        wait_for("the good client to finish some requests", lambda: good >= 3, timeout=60)
    finally:
        done.set()
        thread.join()
    assert failures == []


def test_a_token_without_the_scope_is_forbidden(setup: Setup) -> None:
    response = setup.post(GOOD, token=setup.token(scopes=["other"]))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"


# ---- replicas failing, config and keys changing --------------------------------------------


def test_a_dead_replica_is_retried_around_and_ejected(setup: Setup, triton: TritonProcess) -> None:
    """Every request succeeds (a failure before audio is retried on the live replica),
    and ejection keeps the dead one from costing half the requests a retry."""
    fleet = {"fleet": "speech/joe"}
    client = setup.client()

    def retried() -> bool:
        client.audio.speech.create(model="tts-1", voice="alloy", input=f"Retry {time.time()}.")
        return setup.gateway.metric(contract.GATEWAY_RETRIES, **fleet) > before

    before = setup.gateway.metric(contract.GATEWAY_RETRIES, **fleet)
    setup.write([triton.grpc_address, f"127.0.0.1:{local.free_port()}"])
    try:
        wait_for("a request retried on the live replica", retried, timeout=30)
        start = setup.gateway.metric(contract.GATEWAY_RETRIES, **fleet)
        for i in range(30):  # different words each time: nothing comes from the cache
            client.audio.speech.create(model="tts-1", voice="alloy", input=f"Fine, {i}.")
        # Without ejection about 15 of 30 would be retried; with it, ~3 per re-admission.
        assert setup.gateway.metric(contract.GATEWAY_RETRIES, **fleet) - start <= 8
    finally:
        setup.write([triton.grpc_address])


def test_a_new_config_reaches_the_running_gateway(setup: Setup, triton: TritonProcess) -> None:
    setup.write([triton.grpc_address], maxInputCharacters=100)
    try:
        wait_for(
            "the new limit",
            lambda: setup.post(GOOD | {"input": "a" * 101}).status_code == 400,
            timeout=15,
        )
    finally:
        setup.write([triton.grpc_address])
    wait_for("the old limit", lambda: setup.post(GOOD | {"input": "a" * 101}).status_code == 200)


def test_a_bad_new_config_is_refused_and_the_last_good_one_kept(setup: Setup) -> None:
    good = setup.config.read_text()
    setup.config.write_text('{"routes": []}')
    try:
        time.sleep(2.5)  # the gateway polls every second; give it two looks
        assert setup.post(GOOD).status_code == 200
        assert "kept the last good config" in setup.gateway.log.read_text()
    finally:
        setup.config.write_text(good)


def test_rotated_keys_apply_without_a_restart(setup: Setup) -> None:
    old = setup.token()
    new_key = auth.new_signing_key()
    auth.write_jwks(setup.jwks, [new_key])
    try:
        wait_for(
            "the old key to stop working", lambda: setup.post(GOOD, token=old).status_code == 401
        )
        assert setup.post(GOOD, token=setup.token(key=new_key)).status_code == 200
    finally:
        auth.write_jwks(setup.jwks, [setup.key])
    wait_for("the first key back", lambda: setup.post(GOOD).status_code == 200)


def test_keys_from_a_jwks_url_are_fetched_in_the_background(
    tmp_path: Path, triton: TritonProcess
) -> None:
    """A JWKS URL (an identity provider's): fetched at start and every refreshSeconds;
    a rotated key is accepted after the next fetch, and while the URL is down the keys
    loaded before keep working."""
    first, second = auth.new_signing_key(), auth.new_signing_key()
    served = {"doc": json.dumps(auth.jwks([first])).encode(), "up": True}

    class Keys(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not served["up"]:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(served["doc"])  # type: ignore[arg-type]

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = GatewayProcess(tmp_path / "gateway.json", local.free_port(), tmp_path / "gw.log")
    document = gateway_config([triton.grpc_address], tmp_path / "unused.json")
    document["auth"] = {
        "issuer": ISSUER, "audiences": [AUDIENCE], "refreshSeconds": 5,
        "jwksUrl": f"http://127.0.0.1:{server.server_address[1]}/keys",
    }  # fmt: skip
    gateway.configure(document)
    gateway.start()
    try:

        def status(key: ec.EllipticCurvePrivateKey) -> int:
            token = auth.sign(key, issuer=ISSUER, audience=AUDIENCE, subject="u")
            return httpx2.get(
                f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {token}"}
            ).status_code

        assert status(first) == 200 and status(second) == 401
        served["up"] = False
        time.sleep(6)  # a refresh fails: the loaded keys stay
        assert status(first) == 200
        served["doc"], served["up"] = json.dumps(auth.jwks([second])).encode(), True
        wait_for("the rotated key", lambda: status(second) == 200, timeout=20)
        assert status(first) == 401
    finally:
        gateway.stop()
        server.shutdown()


def test_a_reply_spoken_before_is_replayed_from_the_cache(
    setup: Setup, triton: TritonProcess
) -> None:
    """The same words again stream the same bytes from the cache (no replica asked);
    a new config empties it."""
    fleet = {"fleet": "speech/joe"}
    body = {"model": "tts-1", "voice": "alloy", "input": "Cached  reply, please.",
            "response_format": "wav"}  # fmt: skip
    first = setup.post(body)
    assert first.status_code == 200 and "upstream" in first.headers["server-timing"]
    hits = setup.gateway.metric(contract.GATEWAY_CACHE_REQUESTS, result="hit", **fleet)
    again = setup.post(body | {"input": "Cached reply,   please."})  # the same words
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["server-timing"] == "cache;desc=hit"
    assert setup.gateway.metric(contract.GATEWAY_CACHE_REQUESTS, result="hit", **fleet) == (
        hits + 1
    )
    setup.write([triton.grpc_address], maxInputCharacters=4000)
    try:
        wait_for(
            "the new config",
            lambda: setup.post(GOOD | {"input": "a" * 4001}).status_code == 400,
            timeout=15,
        )
        fresh = setup.post(body)
        assert fresh.status_code == 200 and "upstream" in fresh.headers["server-timing"]
    finally:
        setup.write([triton.grpc_address])


def test_each_request_is_synthesised_once(setup: Setup, triton: TritonProcess) -> None:
    """At most once: a request the replica answers is sent to it once (retries happen
    only before the first audio, on a replica that failed)."""
    before = triton.metric("nv_inference_request_success", model="tts_stream")
    client = setup.client()
    for i in range(5):  # new words each time: nothing from the cache
        client.audio.speech.create(model="tts-1", voice="alloy", input=f"Once only, {i}.")
    after = triton.metric("nv_inference_request_success", model="tts_stream")
    assert after - before == 5
