"""Streamed encodings: each plays from its first bytes and decodes to the audio sent."""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Callable

import av
import numpy as np
import pytest

from ttsfleet.gateway import audio
from ttsfleet.serving.engine import Synthesizer
from ttsfleet.serving.quality import join_energy

RATE = 22_050


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data), format=fmt) as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
        return np.concatenate(frames), container.streams.audio[0].sample_rate


def chunks(seconds: float = 2.0, size: int = 4410) -> list[np.ndarray]:
    signal = tone(seconds)
    return [signal[i : i + size] for i in range(0, len(signal), size)]


def test_wav_has_one_streaming_header_then_the_samples() -> None:
    encoder = audio.Wav(RATE)
    parts = [encoder.encode(c) for c in chunks()] + [encoder.finish()]
    data = b"".join(parts)
    assert data.count(b"RIFF") == 1 and parts[0][:4] == b"RIFF"
    assert struct.unpack("<I", data[4:8])[0] == audio.STREAMING_SIZE
    assert struct.unpack("<I", data[24:28])[0] == RATE
    assert np.array_equal(np.frombuffer(data[44:], "<i2"), tone(2.0))


def test_an_empty_wav_stream_is_still_a_header() -> None:
    assert audio.Wav(RATE).finish() == audio.wav_header(RATE)


def test_mp3_frames_decode_from_the_first_chunks_and_in_full() -> None:
    encoder = audio.Mp3(RATE)
    parts = [encoder.encode(c) for c in chunks()]
    parts.append(encoder.finish())
    data = b"".join(parts)
    assert not data.startswith(b"ID3") and b"Xing" not in data and b"Info" not in data[:200]
    early = b"".join(parts[:3])  # 0.6 s in: already playable frames
    assert len(decode(early, "mp3")[0]) > 0
    samples, rate = decode(data, "mp3")
    assert rate == RATE
    assert len(samples) / RATE == pytest.approx(2.0, abs=0.08)  # MP3 adds priming/padding


CONTAINERS = {"mp3": "mp3", "opus": "ogg", "aac": "adts", "flac": "flac"}


@pytest.mark.parametrize("fmt", sorted(CONTAINERS))
def test_compressed_formats_stream_from_their_first_frames_and_keep_their_length(
    fmt: str,
) -> None:
    encoder = audio.FORMATS[fmt](RATE)
    parts = [encoder.encode(c) for c in chunks()]
    parts.append(encoder.finish())
    data = b"".join(parts)
    # Playable early: within the first 0.6 s of input (three chunks), not at the end.
    samples, _ = decode(b"".join(parts[:3]), CONTAINERS[fmt])
    assert len(samples) > 0
    samples, rate = decode(data, CONTAINERS[fmt])
    # Within 2 % of the input, or the codec's own priming and padding (<= 100 ms).
    assert abs(len(samples) / rate - 2.0) <= max(0.02 * 2.0, 0.1), fmt
    pitch = np.abs(np.fft.rfft(samples.astype(np.float32))).argmax() * rate / len(samples)
    assert pitch == pytest.approx(220.0, abs=3)  # the same tone, at any output rate


def test_every_openai_format_has_an_encoder_and_a_media_type() -> None:
    assert set(audio.FORMATS) == {"mp3", "opus", "aac", "flac", "wav", "pcm"}
    assert audio.FORMATS_MEDIA["opus"] == "audio/opus"
    assert audio.FORMATS_MEDIA["mp3"] == "audio/mpeg"


def test_pcm_is_resampled_to_24khz_without_losing_length() -> None:
    encoder = audio.Pcm(RATE)
    data = b"".join(encoder.encode(c) for c in chunks()) + encoder.finish()
    assert len(data) / 2 == pytest.approx(2.0 * audio.PCM_RATE, abs=48)
    pitch = np.abs(np.fft.rfft(np.frombuffer(data, "<i2"))).argmax() / 2.0  # bins per Hz: 2 s
    assert pitch == pytest.approx(220.0, abs=2)  # the same tone, not sped up


@pytest.mark.parametrize("factor", [0.125, 0.5, 2.0, 3.5])
def test_tempo_changes_length_not_pitch(factor: float) -> None:
    stretch = audio.Tempo(RATE, factor)
    out = np.concatenate([stretch.process(c) for c in chunks()] + [stretch.finish()])
    assert len(out) / (2.0 * RATE) == pytest.approx(1 / factor, rel=0.03)
    seconds = len(out) / RATE
    pitch = np.abs(np.fft.rfft(out)).argmax() / seconds
    assert pitch == pytest.approx(220.0, abs=3)


def test_the_pipeline_stretches_then_encodes() -> None:
    pipeline = audio.Pipeline("wav", RATE, tempo=2.0)
    data = b"".join(pipeline.feed(c) for c in chunks()) + pipeline.finish()
    assert (len(data) - 44) / 2 == pytest.approx(RATE, rel=0.03)


@pytest.mark.parametrize("fmt", sorted(audio.FORMATS))
def test_every_format_takes_the_empty_pieces_a_slow_stretch_gives(fmt: str) -> None:
    """At speed 0.25 the stretch holds its first input back (an empty piece comes out):
    PCM's resampler once failed on it (FFmpeg's ENOMEM), ending the response early."""
    pipeline = audio.Pipeline(fmt, RATE, tempo=0.5)
    data = b"".join(pipeline.feed(c) for c in chunks()) + pipeline.finish()
    if fmt == "pcm":
        assert len(data) / 2 == pytest.approx(4.0 * audio.PCM_RATE, rel=0.03)
    assert len(data) > 1000


# ---- no clicks at chunk joins, on real speech -------------------------------------------------

VOICE = "en_US-joe-medium"
SPEECH = (
    "Thanks for calling, how can I help you today? Your order shipped this morning and "
    "should arrive on Thursday. She sells seashells by the seashore."
)
# Chunk sizes the engine never sends, in a cycle: joins fall mid codec frame (MP3 1,152
# samples, AAC 1,024, Opus 20 ms) and at every phase of one.
UNEVEN = (1000, 2048, 4096, 333)
LOSSLESS = {"flac", "wav"}


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """About 7 s of the shipped voice (as in test_engine, loaded once here)."""
    engine = Synthesizer(VOICE)
    assert engine.sample_rate == RATE
    return engine.synthesize(SPEECH)


def uneven(signal: np.ndarray) -> list[np.ndarray]:
    cuts = itertools.accumulate(itertools.cycle(UNEVEN))
    inside: list[int] = list(itertools.takewhile(lambda cut: cut < len(signal), cuts))
    return np.split(signal, inside)


def ends(parts: list[np.ndarray]) -> np.ndarray:
    """The joins between `parts`: where each part but the last ends."""
    return np.cumsum([len(p) for p in parts])[:-1]


def dropped(parts: list[np.ndarray], count: int = 37) -> list[np.ndarray]:
    """A broken stream: each chunk's last `count` samples lost."""
    return [p[:-count] for p in parts[:-1]] + parts[-1:]


def stepped(parts: list[np.ndarray], step: int = 1000) -> list[np.ndarray]:
    """A broken stream: its level jumps by `step` (3 % of full scale), up then down, at
    every join."""
    return [
        np.clip(p.astype(np.int32) + step * (i % 2), -32768, 32767).astype(np.int16)
        for i, p in enumerate(parts)
    ]


def streamed(fmt: str, parts: list[np.ndarray]) -> bytes:
    pipeline = audio.Pipeline(fmt, RATE)
    return b"".join(pipeline.feed(p) for p in parts) + pipeline.finish()


def decoded(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2"), audio.PCM_RATE
    return decode(data, CONTAINERS.get(fmt, fmt))


def delay(sent: np.ndarray, got: np.ndarray, rate: int) -> int:
    """The codec's priming delay in `got` (at `rate`), in samples: where `sent`
    (resampled to `rate`) correlates best with it, within 200 ms."""
    times = np.arange(int(len(sent) * rate / RATE)) / rate
    reference = np.interp(times, np.arange(len(sent)) / RATE, sent.astype(np.float64))
    size = 1 << int(np.ceil(np.log2(len(got) + len(reference))))
    spectrum = np.fft.rfft(got.astype(np.float64), size) * np.conj(np.fft.rfft(reference, size))
    correlation = np.fft.irfft(spectrum, size)
    limit = int(0.2 * rate)
    lags = np.r_[np.arange(limit), np.arange(-limit, 0)]
    return int(lags[np.argmax(correlation[lags])])


def joins_heard(parts: list[np.ndarray], got: np.ndarray, rate: int) -> float:
    """`join_energy` of `got`, the stream of `parts` decoded, at the joins between the
    parts: moved to the decoded rate and by the codec's delay (known to within 0.5 ms)."""
    joins = np.round(ends(parts) * rate / RATE).astype(int)
    joins += delay(np.concatenate(parts), got, rate)
    return join_energy(got, joins, rate, reach_s=0.0005)


@pytest.mark.parametrize("broken", [dropped, stepped], ids=["37-samples-dropped", "level-step"])
def test_the_join_detector_flags_broken_joins_in_speech_and_not_the_speech(
    speech: np.ndarray, broken: Callable[[list[np.ndarray]], list[np.ndarray]]
) -> None:
    parts = uneven(speech)
    assert join_energy(speech, ends(parts), RATE) < 0.6  # speech cut nowhere: no clicks
    bad = broken(parts)
    assert join_energy(np.concatenate(bad), ends(bad), RATE) > 3


@pytest.mark.parametrize("fmt", sorted(audio.FORMATS))
def test_every_format_streamed_in_uneven_chunks_has_no_clicks_and_is_the_one_piece_stream(
    speech: np.ndarray, fmt: str
) -> None:
    parts = uneven(speech)
    chunked, rate = decoded(streamed(fmt, parts), fmt)
    whole, _ = decoded(streamed(fmt, [speech]), fmt)
    # One encoder state spans the stream: chunking changes nothing that is decoded.
    assert chunked.shape == whole.shape
    if fmt in LOSSLESS:
        assert np.array_equal(chunked, speech)
    tolerance = 0 if fmt in LOSSLESS else 1e-4 * (32768 if chunked.dtype == np.int16 else 1)
    assert np.abs(chunked.astype(np.float64) - whole).max() <= tolerance, fmt
    assert len(chunked) / rate == pytest.approx(len(speech) / RATE, abs=0.1)
    # No join clicks louder than the voice does anywhere else (about 0.3 here) ...
    assert joins_heard(parts, chunked, rate) < 0.6, fmt
    # ... where the same measure, through the same codec, hears a broken stream.
    broken = dropped(parts)
    assert joins_heard(broken, *decoded(streamed(fmt, broken), fmt)) > 2, fmt
