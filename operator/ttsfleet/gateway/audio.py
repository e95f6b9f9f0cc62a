"""Audio as the speech API returns it, encoded while it streams.

An `Encoder` takes 16-bit mono samples chunk by chunk and returns the bytes to send
now; `finish` returns the rest. Every format plays from its first bytes:
- `wav`: one RIFF header, sent with the first audio, with the sizes a stream uses
  (0xFFFFFFFF: unknown; players read to the end), then raw samples;
- `mp3`: MPEG audio frames from libmp3lame (FFmpeg, through PyAV), with no ID3 tag
  and no Xing header (a stream cannot go back to patch one in);
- `opus` (Ogg, 48 kHz, 20 ms pages), `aac` (ADTS), `flac`: FFmpeg's encoders too;
- `pcm`: raw 24 kHz signed 16-bit little-endian mono, as OpenAI's `pcm` is.
`Tempo` time-stretches (FFmpeg's `atempo`: rate without changing pitch) the part of a
requested speed the engine cannot make itself.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

Audio = npt.NDArray[np.int16]

PCM_RATE = 24_000  # OpenAI's pcm: 24 kHz, s16le, mono
MP3_BIT_RATE = 64_000
STREAMING_SIZE = 0xFFFFFFFF


DRAIN_SECONDS = 0.15  # silence that pushes out what any codec here holds back


class Encoder(Protocol):
    def encode(self, audio: Audio) -> bytes: ...

    def finish(self) -> bytes: ...


def _frame(audio: Audio, sample_rate: int) -> Any:
    import av  # noqa: PLC0415 - heavy; only the gateway encodes

    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = sample_rate
    return frame


def _samples(frames: Any) -> Audio:
    parts = [frame.to_ndarray().reshape(-1) for frame in frames]
    return np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)


def wav_header(sample_rate: int) -> bytes:
    """A RIFF/WAVE header for a stream of unknown length, s16 mono."""
    return (
        b"RIFF" + struct.pack("<I", STREAMING_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", STREAMING_SIZE)
    )  # fmt: skip


class Wav:
    media_type = "audio/wav"

    def __init__(self, sample_rate: int) -> None:
        self._header = wav_header(sample_rate)

    def encode(self, audio: Audio) -> bytes:
        head, self._header = self._header, b""
        return head + audio.astype("<i2").tobytes()

    def finish(self) -> bytes:
        head, self._header = self._header, b""
        return head  # an empty stream is still a WAV file


class Pcm:
    media_type = "audio/pcm"

    def __init__(self, sample_rate: int) -> None:
        import av  # noqa: PLC0415

        self._rate = sample_rate
        self._resampler = (
            None
            if sample_rate == PCM_RATE
            else av.AudioResampler(format="s16", layout="mono", rate=PCM_RATE)
        )

    def encode(self, audio: Audio) -> bytes:
        if self._resampler is None:
            return audio.astype("<i2").tobytes()
        if not audio.size:  # FFmpeg refuses an empty frame (ENOMEM); time-stretch gives them
            return b""
        return _samples(self._resampler.resample(_frame(audio, self._rate))).astype("<i2").tobytes()

    def finish(self) -> bytes:
        if self._resampler is None:
            return b""
        return _samples(self._resampler.resample(None)).astype("<i2").tobytes()


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file: what the muxer wrote since the last `take`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class _Muxed:
    """A compressed format: an FFmpeg encoder into a streaming muxer (PyAV). PyAV
    converts the engine's s16 samples to the encoder's sample format and rate and cuts
    them into its frame size; each call returns what the muxer wrote since the last."""

    media_type: ClassVar[str]
    container: ClassVar[str]
    codec: ClassVar[str]
    rate: ClassVar[int | None] = None  # the encoder's rate; the source's when None
    bit_rate: ClassVar[int | None] = None
    options: ClassVar[dict[str, str]] = {}

    def __init__(self, sample_rate: int) -> None:
        import av  # noqa: PLC0415

        self._rate = sample_rate
        self._sink = _Sink()
        self._container: Any = av.open(
            self._sink, "w", format=self.container, options=dict(self.options)
        )
        stream: Any = self._container.add_stream(
            self.codec, rate=self.rate or sample_rate, layout="mono"
        )
        if self.bit_rate:
            stream.bit_rate = self.bit_rate
        self._stream = stream

    def encode(self, audio: Audio) -> bytes:
        if audio.size:
            for packet in self._stream.encode(_frame(audio, self._rate)):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


class Mp3(_Muxed):
    """MPEG audio frames from libmp3lame, with no ID3 tag and no Xing header."""

    media_type = "audio/mpeg"
    container, codec, bit_rate = "mp3", "libmp3lame", MP3_BIT_RATE
    options: ClassVar[dict[str, str]] = {"id3v2_version": "0", "write_xing": "0"}


class Opus(_Muxed):
    """Opus in Ogg at 48 kHz, a page every 20 ms (Ogg's default holds ~1 s back)."""

    media_type = "audio/opus"
    container, codec, rate, bit_rate = "ogg", "libopus", 48_000, 32_000
    options: ClassVar[dict[str, str]] = {"page_duration": "20000"}


class Aac(_Muxed):
    """AAC-LC in ADTS frames (each carries its own header: playable mid-stream)."""

    media_type = "audio/aac"
    container, codec, bit_rate = "adts", "aac", 64_000


class Flac(_Muxed):
    """FLAC; a stream's header cannot be patched, so it says 0 total samples."""

    media_type = "audio/flac"
    container, codec = "flac", "flac"


class Tempo:
    """Plays audio `factor` times faster (slower below 1) at the same pitch."""

    def __init__(self, sample_rate: int, factor: float) -> None:
        import av  # noqa: PLC0415

        self._rate = sample_rate
        self._graph: Any = av.filter.Graph()
        source = self._graph.add_abuffer(format="s16", sample_rate=sample_rate, layout="mono")
        last = source
        # atempo takes 0.5 to 100 per stage; chain stages for slower factors.
        for stage in _stages(factor):
            node = self._graph.add("atempo", f"{stage:.6f}")
            last.link_to(node)
            last = node
        sink = self._graph.add("abuffersink")
        last.link_to(sink)
        self._graph.configure()

    def process(self, audio: Audio) -> Audio:
        self._graph.push(_frame(audio, self._rate))
        return self._drain()

    def finish(self) -> Audio:
        self._graph.push(None)
        return self._drain()

    def _drain(self) -> Audio:
        import av  # noqa: PLC0415

        frames = []
        while True:
            try:
                frames.append(self._graph.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return _samples(frames)


def _stages(factor: float) -> list[float]:
    stages = []
    while factor < 0.5:
        stages.append(0.5)
        factor /= 0.5
    return [*stages, factor]


_ENCODERS: tuple[tuple[str, type[Wav | Pcm | _Muxed]], ...] = (
    ("mp3", Mp3), ("opus", Opus), ("aac", Aac), ("flac", Flac), ("wav", Wav), ("pcm", Pcm),
)  # fmt: skip
FORMATS: dict[str, Callable[[int], Encoder]] = dict(_ENCODERS)
FORMATS_MEDIA = {name: encoder.media_type for name, encoder in _ENCODERS}


class Pipeline:
    """Engine audio in, response bytes out: time-stretch (if asked), then encode."""

    def __init__(self, fmt: str, sample_rate: int, tempo: float = 1.0) -> None:
        self.encoder = FORMATS[fmt](sample_rate)
        self._rate = sample_rate
        self._tempo = Tempo(sample_rate, tempo) if abs(tempo - 1.0) > 1e-6 else None

    def feed(self, audio: Audio) -> bytes:
        if self._tempo is not None:
            audio = self._tempo.process(audio)
        return self.encoder.encode(audio)

    def drain(self) -> bytes:
        """What the encoder holds back, pushed out with a little silence, the stream
        going on (a WebSocket `flush`: the listener hears all of what was said so far).
        Raw formats hold nothing back."""
        if isinstance(self.encoder, Wav | Pcm):
            return b""
        return self.feed(np.zeros(round(self._rate * DRAIN_SECONDS), np.int16))

    def finish(self) -> bytes:
        tail = b""
        if self._tempo is not None:
            tail = self.encoder.encode(self._tempo.finish())
        return tail + self.encoder.finish()
