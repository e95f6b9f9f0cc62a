"""Precision variants built with onnxruntime's tools and gated against FP32 (real model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ttsfleet
from ttsfleet.serving import variants
from ttsfleet.serving.engine import Synthesizer

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


def test_a_variant_that_fails_the_gate_is_refused_with_figures_and_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = ttsfleet(
        "models", "build", "--precision", "int8", "--out", str(tmp_path), "--json", str(out)
    )
    # Dynamic INT8 of this model's convolutions: further from FP32 than the gate allows.
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "refused" in line and "mel distance" in line and "RTF" in line
    assert not variants.variant_path(VOICE, "int8", tmp_path).exists()


def test_int8_for_cuda_is_refused_up_front() -> None:
    with pytest.raises(variants.VariantError, match="no CUDA kernels"):
        variants.build(VOICE, "int8", "cuda")


def test_the_mel_distance_is_zero_for_the_same_audio_and_grows_with_noise() -> None:
    audio = Synthesizer(VOICE).synthesize("Distance from itself is zero.")
    mel = variants.log_mel(audio, 22050)
    assert variants.mel_distance_db(mel, mel) == 0.0
    noisy = (audio + np.random.default_rng(1).normal(0, 2000, len(audio))).clip(-32768, 32767)
    assert variants.mel_distance_db(mel, variants.log_mel(noisy.astype(np.int16), 22050)) > 3.0
