"""The precision table: every variant of the voice, built, measured on this CPU, gated.

    python benchmarks/precision_bench.py [--out benchmarks/results/precision.json]

Per precision and target: size, load time, RTF and time to first chunk on this CPU,
mel distance and duration difference against FP32, and whether the gate passed.
Nothing here runs on a GPU: `cuda` rows say so. Also records how far FP32 is from
itself with Piper's default sampling noise, to put the mel distances in scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ttsfleet import harness
from ttsfleet.serving import variants
from ttsfleet.serving.engine import Synthesizer

REPO = Path(__file__).resolve().parent.parent
VOICE = "en_US-joe-medium"


def sampling_noise_distance() -> float:
    """Mel distance between FP32 without noise and FP32 with Piper's default noise."""
    from piper import SynthesisConfig  # noqa: PLC0415

    engine = Synthesizer(VOICE)
    noisy = SynthesisConfig(noise_scale=0.667, noise_w_scale=0.8, length_scale=1.0)
    distances = []
    for sentence in variants.GATE_SENTENCES:
        clean = engine.synthesize(sentence)
        chunks = engine._voice.synthesize(sentence, syn_config=noisy)
        sampled = np.concatenate([np.asarray(c.audio_int16_array) for c in chunks])
        distances.append(
            variants.mel_distance_db(
                variants.log_mel(clean, engine.sample_rate),
                variants.log_mel(sampled, engine.sample_rate),
            )
        )
    return round(float(np.mean(distances)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "precision.json"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ttsfleet-variants-") as scratch:
        for target in variants.TARGETS:
            for precision in variants.PRECISIONS:
                row: dict[str, Any] = {"precision": precision, "target": target}
                try:
                    report = variants.build(VOICE, precision, target, Path(scratch))
                except variants.VariantError as err:
                    row |= {"built": False, "reason": str(err)}
                else:
                    row |= {"built": True, **report.as_dict()}
                    row.pop("path")
                    if target == "cuda":
                        row["note"] = "speed measured on this CPU: not measured on a GPU"
                rows.append(row)
                print(json.dumps(row), flush=True)
    results: dict[str, Any] = {
        "voice": VOICE,  # the machine: in its provenance
        "gate": {
            "max_mel_distance_db": variants.MAX_MEL_DISTANCE_DB,
            "max_duration_difference": variants.MAX_DURATION_DIFFERENCE,
            "sentences": list(variants.GATE_SENTENCES),
        },
        "fp32_vs_itself_with_sampling_noise_db": sampling_noise_distance(),
        "variants": rows,
    }
    harness.write_results(args.out, results)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
