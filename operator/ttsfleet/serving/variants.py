"""Precision variants of a voice (FP32, FP16, INT8), built with onnxruntime's tools and
judged against FP32 before they may be served.

- FP16 (`onnxruntime.transformers.float16`): weights and activations in float16,
  inputs and outputs kept float32, and the ops that misbehave in float16 (random
  sampling, shape arithmetic, the duration predictor's exponentials and cumulative
  sums) left in float32. Served by the sentence engine.
- INT8 for `cpu`: static INT8 of the chunked engine's frame part
  (`streaming.build_int8`: QDQ, int8 weights per channel, uint8 activations calibrated
  on shipped sentences), the text part left in float32. Served by the chunked engine.
  It has no CUDA kernels here, so INT8 for `cuda` is refused: use FP16 on GPUs.

The quality gate synthesises a fixed sentence set with the variant and with FP32 of the
same engine (the chunked engine's audio is levelled by one gain per voice, the sentence
engine's by each sentence's peak, so each is judged against its own FP32) and compares
log-mel spectrograms (mean absolute difference in dB, after stretching the variant's
frames to FP32's length) and durations. A variant over either threshold is refused
with the figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.serving import streaming
from ttsfleet.serving.engine import Synthesizer, default_model_dir, voices

PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("cpu", "cuda")
FP16_KEEP_FP32 = streaming.FP16_KEEP_FP32  # kept in float32 in the FP16 variant
GATE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Your order number is 4512, and it ships on Friday.",
    "Thanks for calling. How can I help you today?",
    "She sells seashells by the seashore, doesn't she?",
)
MAX_MEL_DISTANCE_DB = 1.5
MAX_DURATION_DIFFERENCE = 0.05


class VariantError(RuntimeError):
    """A variant that cannot be built for a target, or that fails the quality gate."""


def variant_path(voice: str, precision: str, directory: Path | None = None) -> Path:
    if precision == "int8":  # the chunked engine's frame part, beside the split
        return streaming.split_paths(voice, directory).frames_int8
    return (directory or default_model_dir()) / f"{voice}.{precision}.onnx"


def convert(
    voice: str, precision: str, target: str, out: Path,
    int8_parts: tuple[str, ...] = streaming.INT8_PARTS,
) -> Path:  # fmt: skip
    """Write the `precision` variant of `voice` for `target` to `out` (INT8: with the
    frame part's convolutions under `int8_parts` quantised)."""
    source, _ = voices()[voice]
    out.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp32":
        out.write_bytes(source.read_bytes())
    elif precision == "fp16":
        import onnx  # noqa: PLC0415 - build-time tools only
        from onnxruntime.transformers.float16 import (  # noqa: PLC0415
            convert_float_to_float16,
        )

        model = onnx.load(str(source))
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32)
        onnx.save(half, str(out))
    elif precision == "int8":
        if target == "cuda":
            raise VariantError(
                "int8 for cuda is not supported: the static INT8 frame part runs on CPU "
                "kernels (VNNI), and TensorRT is not built here; use fp16 on GPUs"
            )
        if not streaming.split_paths(voice, out.parent).exist():
            streaming.build_split(voice, out.parent)
        streaming.build_int8(voice, out.parent, int8_parts, out=out)
    else:
        raise VariantError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return out


Spectrum = npt.NDArray[np.float64]


def log_mel(audio: npt.NDArray[np.int16], sample_rate: int, bands: int = 80) -> Spectrum:
    """Log-mel spectrogram in dB (frames x bands): 1024-sample Hann frames, hop 256."""
    signal = audio.astype(np.float64) / 32768.0
    size, hop = 1024, 256
    if len(signal) < size:
        signal = np.pad(signal, (0, size - len(signal)))
    count = 1 + (len(signal) - size) // hop
    frames = np.stack([signal[i * hop : i * hop + size] for i in range(count)]) * np.hanning(size)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel_points = np.linspace(0, 2595 * np.log10(1 + (sample_rate / 2) / 700), bands + 2)
    hz = 700 * (10 ** (mel_points / 2595) - 1)
    bins = np.floor((size + 1) * hz / sample_rate).astype(int)
    filters = np.zeros((bands, size // 2 + 1))
    for m in range(1, bands + 1):
        left, centre, right = bins[m - 1], bins[m], bins[m + 1]
        for k in range(left, centre):
            filters[m - 1, k] = (k - left) / max(centre - left, 1)
        for k in range(centre, right):
            filters[m - 1, k] = (right - k) / max(right - centre, 1)
    spectrum: Spectrum = 10 * np.log10(np.maximum(power @ filters.T, 1e-10))
    return spectrum


def mel_distance_db(reference: Spectrum, other: Spectrum) -> float:
    """Mean absolute difference in dB, `other`'s frames stretched to `reference`'s count."""
    positions = np.linspace(0, len(other) - 1, len(reference))
    stretched = np.stack(
        [np.interp(positions, np.arange(len(other)), other[:, b]) for b in range(other.shape[1])],
        axis=1,
    )
    # Floor both at 80 dB under the loudest band, so silence does not dominate.
    floor = reference.max() - 80
    return float(np.mean(np.abs(np.maximum(reference, floor) - np.maximum(stretched, floor))))


def audio_distance_db(reference: npt.ArrayLike, other: npt.ArrayLike, sample_rate: int) -> float:
    """The gate's measure between two int16 renditions of the same text at one rate."""
    return mel_distance_db(
        log_mel(np.asarray(reference, np.int16), sample_rate),
        log_mel(np.asarray(other, np.int16), sample_rate),
    )


@dataclass
class Report:
    voice: str
    precision: str
    target: str
    path: str
    size_mib: float
    load_seconds: float
    rtf: float
    first_chunk_ms: float
    mel_distance_db: float
    duration_difference: float
    passed: bool
    reason: str = ""
    engine: str = "sentence"
    fp32_rtf: float = 0.0  # FP32 of the same engine, timed in the same run
    speedup: float = 1.0  # fp32_rtf / rtf

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Engine = Synthesizer | streaming.ChunkedSynthesizer


def measure(voice: str, precision: str, target: str, path: Path, device: str = "cpu") -> Report:
    """Load time, speed and quality of the variant at `path`, run on `device`, against
    FP32 of the same engine on the CPU (the reference every variant is judged by)."""
    chunked = precision == "int8"
    engine: Engine
    reference: Engine
    start = time.perf_counter()
    if chunked:
        engine = streaming.ChunkedSynthesizer(voice, path.parent, precision=precision)
    else:
        engine = Synthesizer(voice, precision, model_dir=path.parent, device=device)
    load = time.perf_counter() - start
    if chunked:
        reference = streaming.ChunkedSynthesizer(voice, path.parent)
    else:
        reference = Synthesizer(voice, "fp32")
    for warm in (engine, reference):  # first runs allocate; neither pays for it below
        warm.synthesize("Hello there.")
    distances, differences, compute, audio_seconds, firsts = [], [], 0.0, 0.0, []
    reference_compute = 0.0
    for sentence in GATE_SENTENCES:
        start = time.perf_counter()
        expected = np.concatenate(list(reference.chunks(sentence)))
        reference_compute += time.perf_counter() - start
        start = time.perf_counter()
        chunks: list[npt.NDArray[np.int16]] = []
        for chunk in engine.chunks(sentence):
            if not chunks:
                firsts.append(time.perf_counter() - start)
            chunks.append(chunk)
        compute += time.perf_counter() - start
        got = np.concatenate(chunks)
        audio_seconds += len(got) / engine.sample_rate
        distances.append(audio_distance_db(expected, got, engine.sample_rate))
        differences.append(abs(len(got) - len(expected)) / len(expected))
    mel = float(np.mean(distances))
    duration = float(max(differences))
    reasons = []
    if mel > MAX_MEL_DISTANCE_DB:
        reasons.append(f"mel distance {mel:.2f} dB > {MAX_MEL_DISTANCE_DB} dB")
    if duration > MAX_DURATION_DIFFERENCE:
        reasons.append(f"duration differs by {duration:.1%} > {MAX_DURATION_DIFFERENCE:.0%}")
    return Report(
        voice=voice,
        precision=precision,
        target=target,
        path=str(path),
        size_mib=round(path.stat().st_size / 2**20, 1),
        load_seconds=round(load, 3),
        rtf=round(compute / audio_seconds, 4),
        first_chunk_ms=round(1000 * float(np.median(firsts)), 1),
        mel_distance_db=round(mel, 3),
        duration_difference=round(duration, 4),
        passed=not reasons,
        reason="; ".join(reasons),
        engine="chunked" if chunked else "sentence",
        fp32_rtf=round(reference_compute / audio_seconds, 4),
        speedup=round(reference_compute / compute, 2),
    )


def build(
    voice: str, precision: str, target: str, directory: Path | None = None,
    int8_parts: tuple[str, ...] = streaming.INT8_PARTS,
) -> Report:  # fmt: skip
    """Build, measure and gate a variant; a refused one is removed, and says why."""
    if voice not in voices():
        raise VariantError(f"voice {voice!r} is not installed (have: {', '.join(voices())})")
    if target not in TARGETS:
        raise VariantError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    final = variant_path(voice, precision, directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Built and gated in a directory of its own beside the final one (with the split the
    # chunked engine needs): only a variant that passed is ever at its final name, so a
    # builder killed mid-gate, or an engine loading meanwhile, never finds an unjudged one.
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".building-") as staging:
        built = Path(staging) / final.name
        if precision == "int8":  # the frame part's variant lives beside its split
            if not streaming.split_paths(voice, final.parent).exist():
                streaming.build_split(voice, final.parent)
            share_split(voice, final.parent, Path(staging))
        convert(voice, precision, target, built, int8_parts)
        try:
            report = measure(voice, precision, target, built)
        except Exception as err:  # a variant that does not load or run is refused too
            raise VariantError(f"the {precision} variant of {voice} does not run: {err}") from err
        if report.passed:
            built.replace(final)
    report.path = str(final)
    return report


def share_split(voice: str, source: Path, staging: Path) -> None:
    """`voice`'s split from `source` in `staging` too (linked where the file system
    allows)."""
    paths, there = streaming.split_paths(voice, source), streaming.split_paths(voice, staging)
    for src, dst in zip(paths.files(), there.files(), strict=True):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def ensure_int8(voice: str, directory: Path) -> None:
    """Build and gate `voice`'s INT8 frame part in `directory` (beside its split) unless
    it is there; VariantError with the figures where the gate refuses it."""
    if variant_path(voice, "int8", directory).exists():
        return
    report = build(voice, "int8", "cpu", directory)
    if not report.passed:
        raise VariantError(f"the int8 variant of {voice} is refused: {report.reason}")
