"""The planner's inputs, measured, and the placement table and density they give.

    python benchmarks/placement_bench.py [--out benchmarks/results/placement.json]

Measured here (CPU, ONNX Runtime): the size of each precision variant the model
build writes (the weights a GPU instance loads), and the activation memory of
synthesising one sentence, as peak-RSS growth per second of audio, in FP32, each
sentence length in a fresh process. The planner's `MEASURED` footprint must equal
what this writes (tests/unit/test_planner.py checks).

Then, from the planner (`ttsfleet.gpu.planner`), the placement table (voice x
precision x streams per replica -> the slice it picks on an H100 and on an L4)
and a density figure: real-time streams per GPU within the TTFA target, seven
1g.10gb replicas against one whole-GPU replica, MODELLED from the real-time factor of
one FP16 instance measured on an H100 (`benchmarks/gpu_bench.py`); MIG slices were
not measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ttsfleet import harness
from ttsfleet.gpu import planner
from ttsfleet.gpu.catalog import GPUS
from ttsfleet.serving import variants

REPO = Path(__file__).resolve().parent.parent
VOICE = planner.MEASURED.voice
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank while the band plays. "
LENGTHS = (60, 120, 240)
STREAMS = (8, 16, 40, 80, 160, 320)

# The density model: a Python-backend instance synthesises one sentence at a time, at
# the real-time factor one FP16 instance measured on an H100 (benchmarks/gpu_bench.py,
# results/gpu.json); launch-bound, so assumed the same on a 1g slice as on a whole GPU
# (MIG could not be switched on where it was measured); kept at 70 % utilisation so
# that queueing stays within the TTFA target.
GPU_RESULTS = REPO / "benchmarks/results/gpu.json"
UTILISATION_FOR_TTFA = 0.7


@functools.cache
def gpu_results() -> dict[str, Any]:
    """What `benchmarks/gpu_bench.py` measured on a GPU, read once."""
    results: dict[str, Any] = json.loads(GPU_RESULTS.read_text())
    return results


def measured_realtime_factor() -> tuple[float, str]:
    """Seconds of audio per second of one FP16 instance on the GPU, and where from."""
    gpu = gpu_results()
    row = next(r for r in gpu["latency"] if (r["precision"], r["device"]) == ("fp16", "cuda"))
    source = f"{gpu['environment']['gpu']}, onnxruntime {gpu['environment']['onnxruntime']}"
    return round(1 / row["real_time_factor"], 1), source


_PROBE = """
import resource, sys
from ttsfleet.serving.engine import Synthesizer
engine = Synthesizer(sys.argv[1], "fp32")
engine.synthesize("Hello.")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
audio = engine.synthesize(sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(audio) / engine.sample_rate, (peak - base) / 1024)
"""


def activation_probe(chars: int) -> tuple[float, float]:
    """(audio seconds, peak MiB growth) of one sentence of `chars` characters, fresh process."""
    text = (SENTENCE * 10)[:chars].rstrip() + "."
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, VOICE, text], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def weights() -> dict[str, float]:
    sizes = {}
    with tempfile.TemporaryDirectory() as scratch:
        for precision in ("fp32", "fp16", "int8"):
            path = variants.convert(VOICE, precision, "cpu", Path(scratch) / f"{precision}.onnx")
            sizes[precision] = round(path.stat().st_size / 2**20, 1)
    return sizes


def gpu_check() -> dict[str, Any]:
    """One instance's modelled memory (context + workspace + weights; activations of one
    sentence) beside what NVML measured on the GPU of results/gpu.json."""
    gpu = gpu_results()
    rows = {}
    for precision, measured in gpu["memory"].items():
        weights = planner.MEASURED.weights_mib[precision]
        activations = (
            planner.MEASURED.activation_mib_per_audio_second
            * planner.SENTENCE_AUDIO_SECONDS
            * planner.ELEMENT_BYTES[precision]
            / planner.ELEMENT_BYTES["fp32"]
        )
        rows[precision] = {
            "modelled_load_mib": planner.CUDA_CONTEXT_MIB + planner.RUNTIME_WORKSPACE_MIB + weights,
            "measured_load_mib": measured["after_first_sentence_mib"],
            "modelled_sentence_mib": round(activations, 1),
            "measured_sentence_mib": max(r["growth_mib"] for r in measured["sentences"]),
        }
    return {"gpu": gpu["environment"]["gpu"], "per_instance": rows}


def placement_table() -> list[dict[str, Any]]:
    rows = []
    for gpu in ("H100-80GB", "L4"):
        options = planner.catalogue_options([GPUS[gpu]])
        for precision in ("fp32", "fp16", "int8"):
            for streams in STREAMS:
                row: dict[str, Any] = {"gpu": gpu, "precision": precision, "streams": streams}
                try:
                    plan = planner.plan(VOICE, precision, streams, options)
                    row |= {"choice": plan.option.name, "memory_gib": plan.memory.as_dict()}
                except planner.PlanError as err:
                    row |= {"choice": None, "refused": str(err)}
                rows.append(row)
    return rows


def max_streams(option: planner.Option, precision: str) -> int:
    """The most streams one replica on `option` holds by memory (0 if none)."""
    lo, hi = 0, 4096
    while lo < hi:
        mid = (lo + hi + 1) // 2
        memory, _ = planner.estimate(planner.MEASURED, precision, mid, option)
        lo, hi = (mid, hi) if planner.fits(memory) else (lo, mid - 1)
    return lo


def density(precision: str) -> dict[str, Any]:
    """Modelled real-time streams per H100 within the TTFA target: 7 x 1g.10gb vs whole.

    The whole-GPU row is also measured: FP16 replies per second at the planner's
    instances, from results/gpu.json (`whole_gpu_measured_replies_per_s`)."""
    h100 = GPUS["H100-80GB"]
    per_instance = measured_realtime_factor()[0] * UTILISATION_FOR_TTFA
    slice_ = planner.Option("mig", h100, h100.profile("1g.10gb"))
    whole = planner.Option("whole", h100)
    per_slice = min(slice_.default_instances() * per_instance, max_streams(slice_, precision))
    per_whole = min(whole.default_instances() * per_instance, max_streams(whole, precision))
    slices = h100.profile("1g.10gb").max_instances  # type: ignore[union-attr]
    return {
        "precision": precision,
        "mig_1g10gb_streams_per_gpu": math.floor(slices * per_slice),
        "whole_gpu_streams_per_gpu": math.floor(per_whole),
        "ratio": round(slices * per_slice / per_whole, 2),
        "modelled": True,
        "whole_gpu_measured_replies_per_s": next(
            (
                r["replies_per_s"]
                for r in gpu_results()["throughput"]
                if (r["precision"], r["instances"]) == (precision, whole.default_instances())
            ),
            None,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/placement.json")
    args = parser.parse_args()
    probes = [activation_probe(n) for n in LENGTHS]
    per_second = max(mib / seconds for seconds, mib in probes)
    realtime_factor, measured_on = measured_realtime_factor()
    result: dict[str, Any] = {
        "machine": {"cpus": 2, "gpu": None},
        "footprint": {
            "voice": VOICE,
            "weights_mib": weights(),
            "activation_mib_per_audio_second": round(per_second, 1),
            "activation_probes": [
                {"chars": n, "audio_s": round(s, 2), "peak_growth_mib": round(m, 1)}
                for n, (s, m) in zip(LENGTHS, probes, strict=True)
            ],
        },
        "model": {
            "cuda_context_mib": planner.CUDA_CONTEXT_MIB,
            "runtime_workspace_mib": planner.RUNTIME_WORKSPACE_MIB,
            "sentence_audio_seconds": planner.SENTENCE_AUDIO_SECONDS,
            "headroom": planner.HEADROOM,
            "usable_fraction": planner.USABLE_FRACTION,
            "checked_on_gpu": gpu_check(),
        },
        "placement_table": placement_table(),
        "density": {
            "label": "MODELLED from one instance measured on a GPU; MIG slices not measured",
            "batch1_realtime_factor": realtime_factor,
            "batch1_realtime_factor_measured_on": measured_on,
            "utilisation_for_ttfa": UTILISATION_FOR_TTFA,
            "rows": [density(p) for p in ("fp32", "fp16", "int8")],
        },
    }
    harness.write_results(args.out, result)
    print(json.dumps(result["footprint"], indent=2))
    for row in result["density"]["rows"]:
        print(row)


if __name__ == "__main__":
    main()
