"""The real tritonserver serving the real voice: streaming, batching, cache, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient import grpc

from tests.conftest import Triton, wait_for
from ttsfleet import client

TEXT = "The fleet is ready. Every replica is warm, and the queue is empty. Speak now."


def test_streamed_chunks_arrive_as_made_and_equal_the_whole(triton: Triton) -> None:
    streamed = client.stream(triton.grpc_address, TEXT)
    whole = client.synthesize(triton.grpc_address, TEXT)
    assert streamed.chunks >= 3  # at least one a sentence (test_chunked_engine: more)
    assert streamed.sample_rate == whole.sample_rate == 22050
    # Deterministic synthesis: the chunks join into the non-streamed audio (to the
    # int16 step: the batch model runs each piece in its own windows).
    assert len(streamed.audio) == len(whole.audio)
    difference = streamed.audio.astype(np.int32) - whole.audio.astype(np.int32)
    assert np.abs(difference).max() <= 4  # -78 dB
    assert streamed.seconds_to_first_audio < streamed.seconds_total
    assert np.abs(streamed.audio.astype(np.int32)).mean() > 100  # not silence


def test_duration_is_proportional_to_the_text(triton: Triton) -> None:
    one = client.stream(triton.grpc_address, "Hello there, how are you today?")
    four = client.stream(triton.grpc_address, "Hello there, how are you today? " * 4)
    assert 3.0 < four.audio_seconds / one.audio_seconds < 5.0


def test_a_repeated_request_is_a_cache_hit_with_identical_audio(triton: Triton) -> None:
    text = "Cache me if you can."
    hits = triton.metric("nv_cache_num_hits_per_model", model="tts_batch")
    first = client.synthesize(triton.grpc_address, text)
    second = client.synthesize(triton.grpc_address, text)
    assert triton.metric("nv_cache_num_hits_per_model", model="tts_batch") == hits + 1
    assert first.audio.tobytes() == second.audio.tobytes()


def test_the_serving_contract_metrics_are_exported(triton: Triton) -> None:
    client.stream(triton.grpc_address, "Metrics, please.")
    assert triton.metric("ttsfleet_time_to_first_audio_seconds_count", model="tts_stream") >= 1
    assert triton.metric("ttsfleet_audio_seconds_total", model="tts_stream") > 0
    # Back to none open once the model has finished the request (just after its last reply).
    wait_for(
        "no open streams",
        lambda: triton.metric("ttsfleet_inflight_streams", model="tts_stream") == 0,
        timeout=10,
    )
    assert triton.metric("nv_inference_request_success", model="tts_stream") >= 1


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("", {}, "TEXT is empty"),
        ("x" * 100_000, {}, "at most 5000"),
        ("hello", {"voice": "de_DE-thorsten-medium"}, "is not served by this model"),
        ("hello", {"fmt": "mp3"}, "FORMAT 'mp3' is not supported"),
        ("hello", {"rate": 9.0}, "SPEAKING_RATE 9.0 is outside"),
    ],
)
@pytest.mark.parametrize("mode", ["stream", "batch"])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(
    triton: Triton, text: str, options: dict[str, object], message: str, mode: str
) -> None:
    call = client.stream if mode == "stream" else client.synthesize
    with pytest.raises(client.SynthesisError, match=message):
        call(triton.grpc_address, text, **options)  # type: ignore[arg-type]
    still = client.stream(triton.grpc_address, "Still here.")
    assert still.chunks >= 1 and still.audio_seconds > 0.3


def test_invalid_utf8_is_refused(triton: Triton) -> None:
    c = grpc.InferenceServerClient(triton.grpc_address)
    tensor = grpc.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"\xff\xfe broken"]], dtype=object))
    with pytest.raises(Exception, match="not valid UTF-8"):
        c.infer("tts_batch", [tensor])
    c.close()
