"""The engine with the real Piper voice (no Triton): checks, determinism, duration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from ttsfleet.serving.engine import (
    MAX_TEXT_CHARS,
    RequestError,
    Synthesizer,
    check_request,
    voices,
)
from ttsfleet.triton import contract

VOICE = "en_US-joe-medium"


@pytest.fixture(scope="module")
def engine() -> Synthesizer:
    return Synthesizer(VOICE)


@pytest.mark.parametrize(
    ("text", "voice", "rate", "fmt", "message"),
    [
        ("", None, None, None, "TEXT is empty"),
        ("   ", None, None, None, "TEXT is empty"),
        ("a" * (MAX_TEXT_CHARS + 1), None, None, None, f"at most {MAX_TEXT_CHARS}"),
        (b"\xff\xfe bad", None, None, None, "TEXT is not valid UTF-8"),
        ("hi", "de_DE-thorsten-medium", None, None, "VOICE 'de_DE-thorsten-medium' is not served"),
        ("hi", None, 5.0, None, "SPEAKING_RATE 5.0 is outside"),
        ("hi", None, None, "mp3", "FORMAT 'mp3' is not supported: use one of pcm16"),
    ],
)
def test_bad_requests_say_what_to_fix(
    text: str | bytes, voice: str | None, rate: float | None, fmt: str | None, message: str
) -> None:
    with pytest.raises(RequestError, match=message):
        check_request(text, voice, rate, fmt, default_voice=VOICE)


def test_a_good_request_gets_defaults() -> None:
    req = check_request(b"Hello", None, None, None, default_voice=VOICE)
    assert (req.text, req.voice, req.rate, req.format) == ("Hello", VOICE, 1.0, "pcm16")


def test_audio_is_deterministic_audible_and_one_chunk_per_sentence(engine: Synthesizer) -> None:
    text = "The fleet is ready. Every replica is warm. Speak now."
    chunks = list(engine.chunks(text))
    assert len(chunks) == 3
    again = engine.synthesize(text)
    assert np.array_equal(np.concatenate(chunks), again)
    assert np.abs(again.astype(np.int32)).mean() > 100  # not silence


def test_duration_grows_with_the_text(engine: Synthesizer) -> None:
    short = engine.synthesize("Hello there.")
    long = engine.synthesize("Hello there. " * 6)
    ratio = len(long) / len(short)
    assert 4.0 < ratio < 8.0, ratio
    seconds_per_char = len(long) / engine.sample_rate / len("Hello there. " * 6)
    assert 0.03 < seconds_per_char < 0.15


def test_a_faster_rate_is_shorter(engine: Synthesizer) -> None:
    normal = engine.synthesize("Speaking rate changes the length of the audio.")
    fast = engine.synthesize("Speaking rate changes the length of the audio.", rate=1.5)
    assert len(fast) < 0.8 * len(normal)


def test_a_precision_variant_that_is_not_built_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="ttsfleet models build --precision fp16"):
        Synthesizer(VOICE, precision="fp16", model_dir=tmp_path)


def test_int8_on_the_sentence_engine_is_refused_naming_the_chunked_engine() -> None:
    with pytest.raises(RequestError, match=r"set spec\.runtime\.engine to chunked"):
        Synthesizer(VOICE, precision="int8")


def test_a_gpu_instance_without_onnxruntime_gpu_is_refused_not_run_on_the_cpu() -> None:
    """A KIND_GPU instance with the CPU wheel would hold a GPU and synthesize on the CPU."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: benchmarks/gpu_bench.py covers it")
    with pytest.raises(RequestError, match=r"needs onnxruntime-gpu.*KIND_CPU"):
        Synthesizer(VOICE, device="cuda", device_id=0)


def test_int8_on_a_gpu_instance_is_refused_with_fp16_as_the_fix() -> None:
    with pytest.raises(RequestError, match="serve fp16 on GPUs"):
        Synthesizer(VOICE, precision="int8", device="cuda")


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(RequestError, match="device 'tpu' is not supported: use one of cpu, cuda"):
        Synthesizer(VOICE, device="tpu")


def test_the_voices_installed_are_the_ones_the_serving_contract_names() -> None:
    """The operator refuses voices the model image lacks from contract.IMAGE_VOICES: the
    serving install (what triton.Dockerfile installs) must have exactly those."""
    assert sorted(voices()) == sorted(contract.IMAGE_VOICES)
