"""The chunked engine on the shipped voice: the split is exact, chunks join into what
the whole voice makes, the first audio comes early, and a cancel stops it."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ttsfleet.serving import streaming
from ttsfleet.serving.engine import voices
from ttsfleet.serving.quality import join_energy

VOICE = "en_US-joe-medium"
LONG = (
    "Your order shipped this morning and should arrive on Thursday, unless the weather "
    "gets in the way of the trucks that carry it across the mountains."
)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("split")
    streaming.build_split(VOICE, directory)
    return directory


@pytest.fixture(scope="module")
def engine(split: Path) -> streaming.ChunkedSynthesizer:
    return streaming.ChunkedSynthesizer(VOICE, split)


@functools.cache
def _whole() -> Any:
    import onnxruntime  # noqa: PLC0415

    return onnxruntime.InferenceSession(str(voices()[VOICE][0]), providers=["CPUExecutionProvider"])


def whole_voice(engine: streaming.ChunkedSynthesizer, ids: list[int]) -> np.ndarray:
    """The unsplit voice's own output (Piper's ONNX, one run)."""
    session = _whole()
    inputs = {
        "input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
        "scales": np.array([0.0, 1.0, 0.0], np.float32),
    }  # fmt: skip
    return np.asarray(session.run(None, inputs)[0]).reshape(-1)


def test_the_two_parts_run_one_after_the_other_are_the_whole_voice(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    (ids,) = engine._sentences(LONG)
    expected = whole_voice(engine, ids)
    z, mask = engine._text_part(ids, 1.0)
    feed = {streaming.SPLIT_POINT[0]: z, streaming.SPLIT_POINT[1]: mask}
    (audio,) = engine._frames.run(["output"], feed)
    assert np.array_equal(np.asarray(audio).reshape(-1), expected)


def test_chunks_with_32_frames_of_context_reproduce_the_whole_run(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    (ids,) = engine._sentences(LONG)
    expected = whole_voice(engine, ids)
    z, mask = engine._text_part(ids, 1.0)
    assert len(streaming.windows(z.shape[2])) > 3  # several chunks, not one
    chunked = np.concatenate(list(engine._frame_chunks(z, mask, lambda: False)))
    peak = np.abs(expected).max()
    assert len(chunked) == len(expected)
    assert np.abs(chunked - expected).max() <= 1e-5 * peak
    # 16 frames of context are not enough: the context is what makes the chunks exact.
    short = np.concatenate(list(engine._frame_chunks(z, mask, lambda: False, context=16)))
    assert np.abs(short - expected).max() > 1e-3 * peak


def test_windows_cover_every_frame_once_the_first_small_then_growing() -> None:
    assert streaming.windows(500) == [(0, 32), (32, 96), (96, 224), (224, 352), (352, 500)]
    assert streaming.windows(240) == [(0, 32), (32, 96), (96, 240)]  # a short tail joins
    assert streaming.windows(20) == [(0, 20)]
    assert streaming.windows(0) == []
    for frames in range(1, 700, 7):
        spans = streaming.windows(frames)
        assert spans[0][0] == 0 and spans[-1][1] == frames
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_the_first_audio_is_one_small_chunk_not_the_sentence(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    chunks = list(engine.chunks(LONG))
    assert len(chunks) > 4
    assert len(chunks[0]) == streaming.FIRST_CHUNK * engine.hop
    assert len(chunks[1]) == 2 * streaming.FIRST_CHUNK * engine.hop
    assert all(len(c) <= 1.5 * streaming.CHUNK * engine.hop for c in chunks)


def test_chunk_joins_are_as_smooth_as_the_voice_itself(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    chunks = list(engine.chunks(LONG))
    audio = np.concatenate(chunks)
    joins = np.cumsum([len(c) for c in chunks])[:-1]
    assert join_energy(audio, joins, engine.sample_rate) < 0.6
    # And the stream is the whole run, scaled by the voice's gain (to the int16 step).
    (ids,) = engine._sentences(LONG)
    scaled = np.clip(whole_voice(engine, ids) * engine.gain, -1, 1) * 32767
    assert np.abs(audio.astype(np.float64) - scaled).max() <= 2


def test_a_cancel_stops_the_stream_at_the_next_chunk(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    made: list[np.ndarray] = []
    for chunk in engine.chunks(LONG + " " + LONG, cancelled=lambda: len(made) >= 2):
        made.append(chunk)  # the client cancels once it has two chunks
    assert len(made) == 2


def test_one_gain_per_voice_keeps_the_calibration_set_under_full_scale(split: Path) -> None:
    meta = json.loads(streaming.split_paths(VOICE, split).meta.read_text())
    assert meta["split_point"] == list(streaming.SPLIT_POINT)
    assert meta["gain"] * meta["calibration_peak"] == pytest.approx(streaming.TARGET_PEAK)
    engine = streaming.ChunkedSynthesizer(VOICE, split)
    for text in streaming.CALIBRATION:
        peak = np.abs(engine.synthesize(text).astype(np.int32)).max()
        assert 0.3 * 32767 < peak <= streaming.TARGET_PEAK * 32767 + 2


def test_a_missing_split_is_built_on_first_use(tmp_path: Path) -> None:
    assert not streaming.split_paths(VOICE, tmp_path).exist()
    assert streaming.ensure_split(VOICE, tmp_path) == tmp_path
    assert streaming.split_paths(VOICE, tmp_path).exist()
    with pytest.raises(Exception, match="not split"):
        streaming.ChunkedSynthesizer(VOICE, tmp_path / "elsewhere")
