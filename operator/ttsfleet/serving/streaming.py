"""The chunked engine: a voice split in two, audio sent chunk by chunk as it is made.

A Piper (VITS) voice is cut at the input of its flow, into
- a **text part** (encoder, duration predictor, expansion to frames): phonemes in,
  the flow's input `z` (192 channels per 11.6 ms frame) and the frame mask out;
- a **frame part** (flow and HiFi-GAN decoder, convolutions only): frames in, audio
  out (256 samples per frame).
Run one after the other they are the whole voice. The frame part is run on windows of
frames with `CONTEXT` frames of the neighbours on each side, which it needs to make a
chunk's audio as the whole run would (32 frames reproduce it within 1e-5 of its peak;
16 do not): the first chunk is `FIRST_CHUNK` frames (its audio leaves after the text
part and one small window), the next ones twice as long up to `CHUNK` (fewer context
frames computed twice). Between chunks the engine asks `cancelled()`, so a cancelled
stream stops within one chunk's compute (a 192-frame window: ~90 ms on this CPU).
`synthesize` (the batch model) runs the frame part on whole sentences: no context
recomputed, the same samples within one int16 step.

Audio is scaled by one gain per voice (measured when the split is built: the loudest
of a set of sentences reaches `TARGET_PEAK`), not by each sentence's own peak as Piper
does, which a stream cannot know before the sentence ends; loudness is then the same
from sentence to sentence.

The split is built from the shipped voice by `build_split` (`ttsfleet models split`,
or on first load), nothing downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.serving.engine import Audio, RequestError, default_model_dir, installed_voice
from ttsfleet.serving.text import normalize

# The flow's input and the frame mask, as Piper's VITS export names them.
SPLIT_POINT = ("/Add_output_0", "/Cast_2_output_0")
TEXT_INPUTS = ("input", "input_lengths", "scales")
FIRST_CHUNK = 32  # frames (0.37 s at 22,050 Hz): the first audio waits for this much
CHUNK = 128  # frames (1.5 s): chunks double from FIRST_CHUNK up to this
CONTEXT = 32  # frames of neighbours on each side of a chunk's window
TARGET_PEAK = 0.95
CALIBRATION = (
    "The quick brown fox jumps over the lazy dog.",
    "Your order number is 4512, and it ships on Friday.",
    "Thanks for calling. How can I help you today?",
    "She sells seashells by the seashore, doesn't she?",
    "Wow! That is absolutely fantastic news!",
    "Please hold.",
)


@dataclass(frozen=True)
class SplitPaths:
    text: Path
    frames: Path
    meta: Path

    def exist(self) -> bool:
        return self.text.exists() and self.frames.exists() and self.meta.exists()


def split_paths(voice: str, directory: Path | None = None) -> SplitPaths:
    base = directory or default_model_dir()
    return SplitPaths(
        base / f"{voice}.text.onnx", base / f"{voice}.frames.onnx", base / f"{voice}.split.json"
    )


def build_split(voice: str, directory: Path | None = None) -> SplitPaths:
    """Cut `voice` in two at the flow's input, measure its gain, and write both parts
    and their metadata (each file written aside, then renamed into place)."""
    import onnx  # noqa: PLC0415 - build-time tools only
    from onnx.utils import Extractor  # noqa: PLC0415

    source, _ = installed_voice(voice)
    paths = split_paths(voice, directory)
    paths.text.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    names = {o for node in model.graph.node for o in node.output}
    if missing := [name for name in SPLIT_POINT if name not in names]:
        raise RequestError(
            f"{voice}'s graph has no {', '.join(missing)}: it is not a Piper VITS export this "
            "engine can split; serve it with the sentence engine"
        )
    extractor = Extractor(model)
    parts = {
        paths.text: extractor.extract_model(list(TEXT_INPUTS), list(SPLIT_POINT)),
        paths.frames: extractor.extract_model(list(SPLIT_POINT), ["output"]),
    }
    for path, part in parts.items():
        staged = path.with_suffix(f".{os.getpid()}.building")  # two builders never collide
        onnx.save(part, str(staged))
        staged.replace(path)
    engine = ChunkedSynthesizer(voice, directory, gain=1.0)
    peak = max(float(np.max(np.abs(engine.raw(text)))) for text in CALIBRATION)
    meta = {
        "voice": voice, "split_point": list(SPLIT_POINT), "gain": TARGET_PEAK / peak,
        "calibration_peak": peak, "source_bytes": source.stat().st_size,
    }  # fmt: skip
    staged = paths.meta.with_suffix(f".{os.getpid()}.building")
    staged.write_text(json.dumps(meta, indent=2) + "\n")
    staged.replace(paths.meta)
    return paths


def ensure_split(voice: str, directory: Path | None = None) -> Path:
    """The directory holding `voice`'s split, built there on first use (or, when that
    directory cannot be written, in a temporary one)."""
    base = directory or default_model_dir()
    if split_paths(voice, base).exist():
        return base
    try:
        build_split(voice, base)
    except OSError:
        base = Path(tempfile.mkdtemp(prefix="ttsfleet-split-"))
        build_split(voice, base)
    return base


def windows(frames: int, first: int = FIRST_CHUNK, size: int = CHUNK) -> list[tuple[int, int]]:
    """The chunks of a sentence of `frames` frames, (start, end): the first `first`
    long, each next one twice the last up to `size`, and a tail shorter than half a
    chunk joined to the chunk before it. The first is small for an early first audio;
    the later ones grow because each window also computes 2 x CONTEXT frames it does
    not keep (the bigger the chunk, the less of that), while the audio already sent
    covers their compute many times over."""
    out: list[tuple[int, int]] = []
    start, step = 0, first
    while start < frames:
        end = min(start + step, frames)
        if out and end - start < step // 2 and end == frames:
            out[-1] = (out[-1][0], end)  # a short tail rides with the chunk before
        else:
            out.append((start, end))
        start, step = end, min(step * 2, size)
    return out


def _session(path: Path) -> Any:
    import onnxruntime  # noqa: PLC0415 - optional: the serving extra

    options = onnxruntime.SessionOptions()
    # Two sessions run one after the other: threads of one spinning while the other
    # works only take cores from it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = os.environ.get("TTSFLEET_INTRA_OP_THREADS")
    if threads:
        options.intra_op_num_threads = int(threads)
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


class ChunkedSynthesizer:
    """One voice, split; `chunks` yields audio a chunk (not a sentence) at a time."""

    precision = "fp32"

    def __init__(
        self, voice: str, directory: Path | None = None, *, gain: float | None = None
    ) -> None:
        from piper import PiperConfig, PiperVoice  # noqa: PLC0415 - optional: the serving extra

        _, config = installed_voice(voice)
        paths = split_paths(voice, directory)
        if not paths.text.exists() or not paths.frames.exists():
            raise RequestError(
                f"{voice} is not split in {paths.text.parent}: run `ttsfleet models split`"
            )
        self.voice_name = voice
        self._text = _session(paths.text)
        self._frames = _session(paths.frames)
        # Piper's front end only (espeak-ng phonemes, ids); its session is not used.
        self._voice: Any = PiperVoice(
            session=None,
            config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))),
        )
        self.sample_rate = int(self._voice.config.sample_rate)
        self.hop = int(getattr(self._voice.config, "hop_length", 256) or 256)
        if gain is None:
            gain = float(json.loads(paths.meta.read_text())["gain"])
        self.gain = gain

    def _sentences(self, text: str) -> list[list[int]]:
        ids = []
        for phonemes in self._voice.phonemize(normalize(text)):
            if phonemes:
                ids.append(self._voice.phonemes_to_ids(phonemes))
        return ids

    def _text_part(self, ids: list[int], rate: float) -> tuple[npt.NDArray[np.float32], Any]:
        inputs = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            # noise 0 (deterministic: equal text, equal audio), length 1/rate, noise_w 0
            "scales": np.array([0.0, 1.0 / rate, 0.0], dtype=np.float32),
        }
        z, mask = self._text.run(list(SPLIT_POINT), inputs)
        return z, mask

    def _frame_part(self, z: npt.NDArray[np.float32], mask: Any) -> npt.NDArray[np.float32]:
        """The audio of frames `z` (a window, or a whole sentence), as the voice makes it."""
        (audio,) = self._frames.run(["output"], {SPLIT_POINT[0]: z, SPLIT_POINT[1]: mask})
        return np.asarray(audio, dtype=np.float32).reshape(-1)

    def _frame_chunks(
        self, z: npt.NDArray[np.float32], mask: Any, cancelled: Callable[[], bool],
        context: int = CONTEXT,
    ) -> Iterator[npt.NDArray[np.float32]]:  # fmt: skip
        frames = z.shape[2]
        for start, end in windows(frames):
            if cancelled():
                return
            left, right = max(0, start - context), min(frames, end + context)
            samples = self._frame_part(z[:, :, left:right], mask[:, :, left:right])
            yield samples[(start - left) * self.hop : (end - left) * self.hop]

    def raw(self, text: str, rate: float = 1.0) -> npt.NDArray[np.float32]:
        """The model's own float output for `text`, chunked, no gain (for calibration
        and the exactness tests)."""
        parts = [
            chunk
            for ids in self._sentences(text)
            for chunk in self._frame_chunks(*self._text_part(ids, rate), lambda: False)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def chunks(
        self, text: str, rate: float = 1.0, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[Audio]:
        """Int16 PCM, a chunk at a time, the first after the first sentence's text part
        and one small window; stops at the next chunk once `cancelled()` is true."""
        stop = cancelled or (lambda: False)
        for ids in self._sentences(text):
            if stop():
                return
            z, mask = self._text_part(ids, rate)
            for audio in self._frame_chunks(z, mask, stop):
                yield _int16(audio * self.gain)

    def synthesize(self, text: str, rate: float = 1.0) -> Audio:
        """The whole utterance (the batch model): each sentence's frames in one run."""
        parts = []
        for ids in self._sentences(text):
            z, mask = self._text_part(ids, rate)
            parts.append(_int16(self._frame_part(z, mask) * self.gain))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def _int16(audio: npt.NDArray[np.float32]) -> Audio:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
