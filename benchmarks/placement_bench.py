"""The planner's inputs, measured, and the placement table and density they give.

    python benchmarks/placement_bench.py [--out benchmarks/results/placement.json]

Measured here (this machine's CPU, ONNX Runtime; no GPU): the size of each precision
variant the model build writes (the weights a GPU instance loads), and the activation
memory of synthesising one sentence, as peak-RSS growth per second of audio, in FP32,
each sentence length in a fresh process. The planner's `MEASURED` footprint must equal
what this writes (tests/unit/test_planner.py checks).

Then, from the planner (`ttsfleet.gpu.planner`), the placement table (voice x
precision x streams per replica -> the slice it picks on an H100 and on an L4) and a
density figure: real-time streams per H100 within the TTFA target, seven 1g.10gb
replicas against one whole-GPU replica, each side from its own measurement on the H100
of `benchmarks/results/gpu_sentence.json` (read, not run here): the whole GPU from its four
instances measured together, the slices MODELLED from one instance measured alone
(MIG slices were not measured). Neither side is derived from the other, so their
ratio is what the two measurements say, not a constant of the model.
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

# The density figure: real-time streams = replies per second x seconds of audio per
# reply, kept at 70 % utilisation so that queueing stays within the TTFA target. The
# replies per second of N instances on the whole H100 are gpu_sentence_bench.py's `throughput`
# (results/gpu_sentence.json). A 1g slice is assumed to run one instance as fast as one instance
# alone on the whole GPU (launch-bound; MIG could not be switched on where it was
# measured): that side is modelled.
GPU_RESULTS = REPO / "benchmarks/results/gpu_sentence.json"
# What GPU slices are planned for: int8 runs on CPU only (the planner refuses it).
GPU_PRECISIONS = ("fp32", "fp16")
UTILISATION_FOR_TTFA = 0.7


@functools.cache
def gpu_results() -> dict[str, Any]:
    """What `benchmarks/gpu_sentence_bench.py` measured on a GPU, read once."""
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
        for precision in GPU_PRECISIONS:
            path = variants.convert(VOICE, precision, "cpu", Path(scratch) / f"{precision}.onnx")
            sizes[precision] = round(path.stat().st_size / 2**20, 1)
    return sizes


def gpu_check() -> dict[str, Any]:
    """One instance's modelled memory (context + workspace + weights; activations of one
    sentence) beside what NVML measured on the GPU of results/gpu_sentence.json."""
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
        for precision in GPU_PRECISIONS:
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


def replies_per_second(precision: str, instances: int) -> float | None:
    """What `instances` instances on the whole GPU served together (None: not measured)."""
    return next(
        (
            float(r["replies_per_s"])
            for r in gpu_results()["throughput"]
            if (r["precision"], r["instances"]) == (precision, instances)
        ),
        None,
    )


def audio_seconds_per_reply(precision: str) -> float | None:
    """Mean seconds of audio in one of the benchmark's replies (None: not measured), from
    the GPU latency run: mean seconds per reply / (seconds per second of audio)."""
    row = next(
        (
            r
            for r in gpu_results()["latency"]
            if (r["precision"], r["device"]) == (precision, "cuda")
        ),
        None,
    )
    if row is None:
        return None
    return float(row["whole_reply"]["mean_ms"]) / 1000 / float(row["real_time_factor"])


def density(precision: str) -> dict[str, Any]:
    """Real-time streams per H100 within the TTFA target: 7 x 1g.10gb against one whole-GPU
    replica, each side from its own measurement (None where it was not measured), each
    capped by what its replica's memory holds (`max_streams`)."""
    h100 = GPUS["H100-80GB"]
    profile = h100.profile("1g.10gb")
    assert profile is not None
    slice_ = planner.Option("mig", h100, profile)
    whole = planner.Option("whole", h100)
    audio = audio_seconds_per_reply(precision)
    alone = replies_per_second(precision, slice_.default_instances())
    together = replies_per_second(precision, whole.default_instances())

    def streams(replies: float | None, option: planner.Option) -> float | None:
        if replies is None or audio is None:
            return None
        return min(replies * audio * UTILISATION_FOR_TTFA, max_streams(option, precision))

    per_slice, per_whole = streams(alone, slice_), streams(together, whole)
    mig = None if per_slice is None else profile.max_instances * per_slice
    return {
        "precision": precision,
        "mig_1g10gb_streams_per_gpu": None if mig is None else math.floor(mig),
        "mig_1g10gb_basis": (
            f"MODELLED: {profile.max_instances} slices x {slice_.default_instances()} "
            "instance as fast as one instance measured alone on the whole GPU; "
            "MIG not measured"
        ),
        "whole_gpu_streams_per_gpu": None if per_whole is None else math.floor(per_whole),
        "whole_gpu_basis": (
            f"{whole.default_instances()} instances measured together on the whole GPU"
        ),
        "ratio": None if mig is None or not per_whole else round(mig / per_whole, 2),
        "inputs": {
            "audio_seconds_per_reply": None if audio is None else round(audio, 2),
            "replies_per_s_one_instance_alone": alone,
            f"replies_per_s_{whole.default_instances()}_instances_together": together,
            "memory_holds_streams_per_replica": {
                "mig_1g10gb": max_streams(slice_, precision),
                "whole_gpu": max_streams(whole, precision),
            },
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/placement.json")
    args = parser.parse_args()
    probes = [activation_probe(n) for n in LENGTHS]
    per_second = max(mib / seconds for seconds, mib in probes)
    realtime_factor, measured_on = measured_realtime_factor()
    gpu = gpu_results()["environment"]
    result: dict[str, Any] = {
        # What this run ran on: this machine's CPU, no GPU. The GPU figures below are read
        # from results/gpu_sentence.json (measured there) or modelled from it, and say which.
        "machine": harness.machine() | {"gpu": None},
        "gpu_figures_from": {
            "file": str(GPU_RESULTS.relative_to(REPO)),
            "gpu": gpu["gpu"],
            "onnxruntime": gpu["onnxruntime"],
        },
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
            "label": (
                "whole GPU: 4 instances measured together on the H100; 1g.10gb slices: "
                "MODELLED from one instance measured alone on it (MIG not measured)"
            ),
            "batch1_realtime_factor": realtime_factor,
            "batch1_realtime_factor_measured_on": measured_on,
            "utilisation_for_ttfa": UTILISATION_FOR_TTFA,
            "rows": [density(p) for p in GPU_PRECISIONS],
        },
    }
    harness.write_results(args.out, result)
    print(json.dumps(result["footprint"], indent=2))
    for row in result["density"]["rows"]:
        print(row)


if __name__ == "__main__":
    main()
