"""Streamed encodings: each plays from its first bytes and decodes to the audio sent."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from ttsfleet.gateway import audio

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
