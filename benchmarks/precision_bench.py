"""The precision table: every variant of the voice, built, measured on this CPU, gated.

    python benchmarks/precision_bench.py [--out benchmarks/results/precision.json] [--quick]

Per precision and target: size, load time, RTF and time to first chunk on this CPU,
mel distance and duration difference against FP32 of the same engine, the speed against
that FP32 timed in the same run, and whether the gate passed. Nothing here runs on a
GPU: `cuda` rows say so. Also records how far FP32 is from itself with Piper's default
sampling noise, to put the mel distances in scale.

For static INT8 (the chunked engine's frame part), how its parts were chosen and what
bounds it:
- `int8_search`: parts added in graph order (flow, then the decoder's parts), each kept
  while the calibration sentences stay within `SELECTION_BUDGET_DB` of FP32; the gate
  then judges the choice on its own sentences. It should equal `streaming.INT8_PARTS`;
- `int8_parts`: each part of the frame part (the flow, each decoder stage, the whole
  decoder, everything) quantised on its own, gated and timed;
- `int8_decoder_convs_alone`: every decoder convolution quantised alone (the last
  stage's each fail the gate); skipped with --quick;
- `frame_part`: the frame part's audio seconds per second at batch 1 and 8, FP32, the
  served INT8 and everything in INT8, and each part's share of FP32's time
  (onnxruntime's profile); with the last stage in float32 (it must be), the best any
  mix could do is 1 / (last stage's share + the rest / everything-INT8's speedup).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ttsfleet import harness
from ttsfleet.serving import streaming, variants
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
        distances.append(variants.audio_distance_db(clean, sampled, engine.sample_rate))
    return round(float(np.mean(distances)), 2)


# The frame part's parts, by the names of their convolutions (Piper's VITS export).
DECODER_STAGES = {
    "decoder stage 1 (ups.0, resblocks 0-2)": ("/dec/conv_pre/", "/dec/ups.0/",
        "/dec/resblocks.0/", "/dec/resblocks.1/", "/dec/resblocks.2/"),
    "decoder stage 2 (ups.1, resblocks 3-5)": ("/dec/ups.1/", "/dec/resblocks.3/",
        "/dec/resblocks.4/", "/dec/resblocks.5/"),
    "decoder stage 3 (ups.2, resblocks 6-8, conv_post)": ("/dec/ups.2/", "/dec/resblocks.6/",
        "/dec/resblocks.7/", "/dec/resblocks.8/", "/dec/conv_post/"),
}  # fmt: skip
PARTS = {
    "served (streaming.INT8_PARTS)": streaming.INT8_PARTS,
    "flow": ("/flow/",),
    **DECODER_STAGES,
    "decoder": ("/dec/",),
    "flow and decoder": ("/flow/", "/dec/"),
}


SELECTION_BUDGET_DB = 1.0
CANDIDATES = ("/flow/", "/dec/conv_pre/", "/dec/ups.0/", "/dec/resblocks.0/",
    "/dec/resblocks.1/", "/dec/resblocks.2/", "/dec/ups.1/", "/dec/resblocks.3/",
    "/dec/resblocks.4/", "/dec/resblocks.5/", "/dec/ups.2/", "/dec/resblocks.6/",
    "/dec/resblocks.7/", "/dec/resblocks.8/", "/dec/conv_post/")  # fmt: skip


def int8_search(scratch: Path) -> dict[str, Any]:
    """Greedy, in graph order: a part stays in INT8 while the calibration sentences'
    mean mel distance to FP32 stays within the budget."""
    variants.ensure_int8(VOICE, scratch)  # the split and a served INT8 in `scratch`
    fp32 = streaming.ChunkedSynthesizer(VOICE, scratch)
    expected = {text: fp32.synthesize(text) for text in streaming.INT8_CALIBRATION}
    trial = scratch / "search"
    trial.mkdir(exist_ok=True)
    variants.share_split(VOICE, scratch, trial)
    chosen: list[str] = []
    steps = []
    for part in CANDIDATES:
        streaming.build_int8(VOICE, trial, (*chosen, part))
        engine = streaming.ChunkedSynthesizer(VOICE, trial, precision="int8")
        distance = float(np.mean([
            variants.audio_distance_db(audio, engine.synthesize(text), engine.sample_rate)
            for text, audio in expected.items()
        ]))  # fmt: skip
        kept = distance <= SELECTION_BUDGET_DB
        steps.append({"part": part, "selection_mel_distance_db": round(distance, 3), "kept": kept})
        print(json.dumps(steps[-1]), flush=True)
        if kept:
            chosen.append(part)
    return {
        "budget_db": SELECTION_BUDGET_DB,
        "steps": steps,
        "chosen": chosen,
        "served_is_the_choice": tuple(chosen) == streaming.INT8_PARTS,
    }


def _gated(parts: tuple[str, ...], scratch: Path) -> dict[str, Any]:
    report = variants.build(VOICE, "int8", "cpu", scratch, int8_parts=parts)
    return {
        "mel_distance_db": report.mel_distance_db,
        "speedup": report.speedup,
        "passed": report.passed,
    }


def int8_parts(scratch: Path) -> list[dict[str, Any]]:
    rows = []
    for name, parts in PARTS.items():
        row = {"part": name, "prefixes": list(parts), **_gated(parts, scratch)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decoder_convs_alone(scratch: Path) -> dict[str, Any]:
    import onnx  # noqa: PLC0415

    frames = streaming.split_paths(VOICE, scratch).frames
    names = [
        n.name for n in onnx.load(str(frames)).graph.node
        if n.op_type in streaming.CONVS and n.name.startswith("/dec/")
    ]  # fmt: skip
    rows = []
    for name in names:
        row = {"conv": name, **_gated((name,), scratch)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    least = min(rows, key=lambda r: float(r["mel_distance_db"]))
    return {"convs": rows, "least": least}


def frame_part(scratch: Path) -> dict[str, Any]:
    """Audio seconds per second of the frame part, FP32 and the served INT8, on full
    windows at batch 1 and 8, one thread each (the same windows, alternated); and the
    flow's share of FP32's time from onnxruntime's profile."""
    import onnxruntime  # noqa: PLC0415

    paths = streaming.split_paths(VOICE, scratch)
    variants.ensure_int8(VOICE, scratch)
    engine = streaming.ChunkedSynthesizer(VOICE, scratch)
    full = [
        w for text in streaming.INT8_CALIBRATION for w in engine.windows(text)
        if w[streaming.SPLIT_POINT[0]].shape[2] == streaming.WINDOW
    ]  # fmt: skip

    def session(path: Path, profile: bool = False) -> Any:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = profile
        options.profile_file_prefix = str(scratch / "profile")
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    everything = scratch / "everything.int8.onnx"
    streaming.build_int8(VOICE, scratch, ("/flow/", "/dec/"), out=everything)
    sessions = {
        "fp32": session(paths.frames),
        "int8": session(paths.frames_int8),
        "all_int8": session(everything),
    }
    seconds_per_window = streaming.WINDOW * engine.hop / engine.sample_rate
    out: dict[str, Any] = {"window_frames": streaming.WINDOW, "threads": 1, "batches": []}
    for batch in (1, 8):
        feeds = [
            {k: np.concatenate([w[k] for w in full[i : i + batch]]) for k in full[0]}
            for i in range(0, len(full) - batch + 1, batch)
        ]
        took = dict.fromkeys(sessions, 0.0)
        for _ in range(3):
            for feed in feeds:
                for precision, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, feed)
                    took[precision] += time.perf_counter() - start
        audio = 3 * len(feeds) * batch * seconds_per_window
        row = {"batch": batch} | {
            f"{p}_audio_seconds_per_second": round(audio / t, 1) for p, t in took.items()
        }
        row["int8_speedup"] = round(took["fp32"] / took["int8"], 2)
        row["all_int8_speedup"] = round(took["fp32"] / took["all_int8"], 2)
        out["batches"].append(row)
        print(json.dumps(row), flush=True)
    profiled = session(paths.frames, profile=True)
    for feed in full:
        profiled.run(None, feed)
    events = json.loads(Path(profiled.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(float(e["dur"]) for e in kernels)

    def share(prefixes: tuple[str, ...]) -> float:
        return sum(float(e["dur"]) for e in kernels if e["name"].startswith(prefixes)) / total

    shares = {"flow": share(("/flow/",))} | {
        name: share(prefixes) for name, prefixes in DECODER_STAGES.items()
    }
    out["share_of_fp32_time"] = {name: round(value, 3) for name, value in shares.items()}
    last = shares[list(DECODER_STAGES)[-1]]
    k = out["batches"][0]["all_int8_speedup"]
    out["best_mix_speedup_bound"] = round(1 / (last + (1 - last) / k), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "precision.json"
    )
    parser.add_argument(
        "--quick", action="store_true", help="Leave out the decoder's convolutions one by one."
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
        bounds = {
            "int8_search": int8_search(Path(scratch)),
            "int8_parts": int8_parts(Path(scratch)),
            "int8_decoder_convs_alone": (
                "skipped (--quick)" if args.quick else decoder_convs_alone(Path(scratch))
            ),
            "frame_part": frame_part(Path(scratch)),
        }
    results: dict[str, Any] = {
        "voice": VOICE,  # the machine: in its provenance
        "gate": {
            "max_mel_distance_db": variants.MAX_MEL_DISTANCE_DB,
            "max_duration_difference": variants.MAX_DURATION_DIFFERENCE,
            "sentences": list(variants.GATE_SENTENCES),
        },
        "fp32_vs_itself_with_sampling_noise_db": sampling_noise_distance(),
        "variants": rows,
        "int8_calibration_sentences": list(streaming.INT8_CALIBRATION),
        **bounds,
    }
    harness.write_results(args.out, results)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
