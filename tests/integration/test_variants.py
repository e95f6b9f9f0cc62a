"""Precision variants built with onnxruntime's tools and gated against FP32 (real model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ttsfleet
from ttsfleet.serving import streaming, variants
from ttsfleet.serving.engine import RequestError, Synthesizer

VOICE = "en_US-joe-medium"


def test_fp16_loads_runs_and_passes_the_gate(tmp_path: Path) -> None:
    report = variants.build(VOICE, "fp16", "cpu", tmp_path)
    assert report.passed, report
    assert report.size_mib < 0.6 * 60  # half the bytes of FP32's 60 MiB, give or take
    assert report.mel_distance_db < variants.MAX_MEL_DISTANCE_DB
    assert Path(report.path).exists()
    half = Synthesizer(VOICE, "fp16", model_dir=tmp_path).synthesize("Half precision speaks too.")
    full = Synthesizer(VOICE).synthesize("Half precision speaks too.")
    assert abs(len(half) - len(full)) / len(full) < variants.MAX_DURATION_DIFFERENCE


def test_static_int8_of_the_frame_part_is_built_from_the_shipped_voice_and_passes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.json"
    result = ttsfleet(
        "models", "build", "--precision", "int8", "--out", str(tmp_path), "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    assert "against fp32 (chunked engine)" in said and "x its speed" in said
    report = json.loads(out.read_text())
    assert report["passed"] and report["engine"] == "chunked"
    assert report["mel_distance_db"] < variants.MAX_MEL_DISTANCE_DB
    built = variants.variant_path(VOICE, "int8", tmp_path)
    assert built.exists() and built.name.endswith(".frames.int8.onnx")
    # Static: calibrated scales in QDQ pairs, nothing quantised at run time.
    import onnx  # noqa: PLC0415

    ops = Counter(node.op_type for node in onnx.load(str(built)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DynamicQuantizeLinear"] == 0
    # The chunked engine serves it: the same audio length as FP32, and close in level.
    int8 = streaming.ChunkedSynthesizer(VOICE, tmp_path, precision="int8")
    fp32 = streaming.ChunkedSynthesizer(VOICE, tmp_path)
    text = "Eight bits of weights speak too."
    low, full = int8.synthesize(text), fp32.synthesize(text)
    assert len(low) == len(full)
    assert 0.8 < np.abs(low.astype(float)).mean() / np.abs(full.astype(float)).mean() < 1.25


def test_a_variant_that_fails_the_gate_is_refused_with_figures_and_removed(tmp_path: Path) -> None:
    # The decoder's convolutions in INT8: measured far from FP32 (docs/precision.md).
    report = variants.build(VOICE, "int8", "cpu", tmp_path, int8_parts=("/dec/",))
    assert not report.passed
    assert "mel distance" in report.reason and report.mel_distance_db > 1.5
    assert not variants.variant_path(VOICE, "int8", tmp_path).exists()
    assert not list(tmp_path.glob(".building-*"))  # judged aside, and nothing left there
    with pytest.raises(RequestError, match="ttsfleet models build --precision int8"):
        streaming.ChunkedSynthesizer(VOICE, tmp_path, precision="int8")


def test_int8_for_cuda_is_refused_up_front() -> None:
    with pytest.raises(variants.VariantError, match="use fp16 on GPUs"):
        variants.build(VOICE, "int8", "cuda")


def test_int8_calibration_never_sees_a_gate_sentence() -> None:
    assert not set(streaming.INT8_CALIBRATION) & set(variants.GATE_SENTENCES)


def test_the_mel_distance_is_zero_for_the_same_audio_and_grows_with_noise() -> None:
    audio = Synthesizer(VOICE).synthesize("Distance from itself is zero.")
    mel = variants.log_mel(audio, 22050)
    assert variants.mel_distance_db(mel, mel) == 0.0
    noisy = (audio + np.random.default_rng(1).normal(0, 2000, len(audio))).clip(-32768, 32767)
    assert variants.mel_distance_db(mel, variants.log_mel(noisy.astype(np.int16), 22050)) > 3.0
