"""The chunked engine on a GPU, with the same machine's CPU cores in the same run.

    python benchmarks/gpu_bench.py [--device auto|cuda|cpu] [--quick] [--out FILE]

One prepared script for a GPU session (`make bench-gpu`, a few minutes on a GPU);
`--device cpu --quick` runs every step on this machine's CPU in well under a minute
(tests/integration/test_gpu_bench.py), so the script is known to run before a GPU is
at hand. `auto` (the default) is cuda where onnxruntime has the CUDA provider, else
cpu; what the device could not measure is written as not measured, with why.

- `frame_part`: the frame part's audio seconds per second on full windows at batch 1,
  8, 16 and 32 (`serving.frames.FixedFrames`: fixed shapes, bound buffers, on CUDA one
  captured graph per shape; FP16 on the GPU), beside FP32 on all the machine's CPU
  cores, same windows, same run;
- `first_chunk`: a real tritonserver serving `tts_stream` as the operator renders it
  for the device (chunked engine; on a GPU `KIND_GPU`, FP16, batches up to 16), 16
  concurrent streams of the sample replies, time to the first audio p50/p95;
- `memory`: the GPU's used memory (NVML) before the server and once its instance has
  loaded and served: one instance's memory;
- `quality`: the device's FP16 frame part against FP32 on the CPU, by the variant gate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ttsfleet import client, harness
from ttsfleet.cluster import local
from ttsfleet.serving import streaming, variants
from ttsfleet.serving.frames import FixedFrames
from ttsfleet.serving.text import SAMPLE_REPLIES
from ttsfleet.triton.config import ModelConfig, render

REPO = Path(__file__).resolve().parent.parent
VOICE = "en_US-joe-medium"
BATCHES = (1, 8, 16, 32)
STREAMS = 16
PRECISION = {"cuda": "fp16", "cpu": "fp32"}  # what the engine serves on each


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1000 * harness.percentile(values, 0.5), 1),
        "p95_ms": round(1000 * harness.percentile(values, 0.95), 1),
        "mean_ms": round(1000 * statistics.fmean(values), 1),
    }


def _nvml() -> Any:
    """pynvml, initialised; None without a GPU driver (or without nvidia-ml-py)."""
    try:
        import pynvml  # noqa: PLC0415 - a GPU machine's package

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: nothing to read
        return None
    return pynvml


def _used_mib(nvml: Any) -> float:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    return float(nvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**20


def environment(device: str) -> dict[str, Any]:
    import onnxruntime  # noqa: PLC0415

    env: dict[str, Any] = {
        "device": device,
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "cpu_cores": os.cpu_count(),
    }
    nvml = _nvml()
    if nvml is not None:
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        env["gpu"] = nvml.nvmlDeviceGetName(handle)
        env["gpu_memory_mib"] = nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
        env["driver"] = nvml.nvmlSystemGetDriverVersion()
    return env


def _windows(split: Path, count: int) -> tuple[Any, Any]:
    """`count` full windows of real speech (the sample replies, as a stream runs them)."""
    engine = streaming.ChunkedSynthesizer(VOICE, split)
    found: list[dict[str, Any]] = []
    while len(found) < count:
        for text in SAMPLE_REPLIES:
            found += [
                w
                for w in engine.windows(text * 3)
                if w[streaming.SPLIT_POINT[0]].shape[2] == streaming.WINDOW
            ]
    z = np.concatenate([w[streaming.SPLIT_POINT[0]] for w in found[:count]])
    mask = np.concatenate([w[streaming.SPLIT_POINT[1]] for w in found[:count]])
    return z, mask


def frame_part(split: Path, device: str, batches: tuple[int, ...], rounds: int) -> list[Any]:
    """Audio seconds per second of the frame part at each batch size, on `device` and on
    all the CPU cores (FP32), the same windows, alternated."""
    paths = streaming.split_paths(VOICE, split)
    z, mask = _windows(split, max(batches))
    seconds_per_window = streaming.WINDOW * 256 / 22050
    runners = {"cpu": FixedFrames(paths.frames, (streaming.WINDOW,), batches, 256)}
    if device == "cuda":
        runners["cuda"] = FixedFrames(
            paths.frame_part(PRECISION["cuda"]), (streaming.WINDOW,), batches, 256, device="cuda"
        )
    rows = []
    for batch in batches:
        took = dict.fromkeys(runners, 0.0)
        for _ in range(rounds):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner.run(z[:batch], mask[:batch])
                took[name] += time.perf_counter() - start
        audio = rounds * batch * seconds_per_window
        row: dict[str, Any] = {"batch": batch} | {
            f"{name}_audio_seconds_per_second": round(audio / t, 1) for name, t in took.items()
        }
        if device == "cuda":
            row["gpu_over_cpu"] = round(took["cpu"] / took["cuda"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def first_chunk(
    split: Path, device: str, streams: int, rounds: int, scratch: Path, nvml: Any
) -> dict[str, Any]:
    """A real tritonserver with `tts_stream` as rendered for `device`; `streams`
    concurrent streams, `rounds` each; first audio p50/p95, and the GPU's memory."""
    repository = scratch / "models"
    shutil.copytree(REPO / "triton_models" / "tts_stream", repository / "tts_stream")
    config = ModelConfig(precision=PRECISION[device], instances=1, gpu=device == "cuda")
    text = render(config)
    if device == "cuda":  # the chunked engine on a GPU is opt-in until measured
        text += 'parameters { key: "gpu_engine" value: { string_value: "chunked" } }\n'
    (repository / "tts_stream" / "config.pbtxt").write_text(text)
    before = _used_mib(nvml) if nvml is not None else None
    server = harness.TritonProcess(
        local.free_port(), local.free_port(), local.free_port(), scratch / "triton.log",
        models=("tts_stream",), repository=repository, extra_args=("--exit-timeout-secs=5",),
        env={"TTSFLEET_MODEL_DIR": str(split)},
    )  # fmt: skip
    server.start(timeout=300)
    try:
        client.stream(server.grpc_address, SAMPLE_REPLIES[0])  # warm: every shape is loaded
        texts = [SAMPLE_REPLIES[i % len(SAMPLE_REPLIES)] for i in range(streams * rounds)]
        with ThreadPoolExecutor(streams) as pool:
            replies = list(pool.map(lambda t: client.stream(server.grpc_address, t), texts))
        loaded = _used_mib(nvml) if nvml is not None else None
    finally:
        server.stop()
    log = (scratch / "triton.log").read_text(errors="replace")
    out: dict[str, Any] = {
        "device": device,
        "precision": PRECISION[device],
        "streams": streams,
        "requests": len(replies),
        "engine_loaded": next(
            (
                line.split("Loaded voice ", 1)[1].rstrip('"')
                for line in log.splitlines()
                if "Loaded" in line
            ),
            None,
        ),
        "first_audio": _ms([r.seconds_to_first_audio for r in replies]),
    }
    if before is not None and loaded is not None:
        out["gpu_memory_per_instance_mib"] = round(loaded - before, 1)
    return out


def quality(split: Path) -> dict[str, Any]:
    """The GPU's FP16 frame part against FP32 on the CPU (the gate's sentences)."""
    reference = streaming.ChunkedSynthesizer(VOICE, split)
    engine = streaming.ChunkedSynthesizer(VOICE, split, precision="fp16", device="cuda")
    distances = []
    for sentence in variants.GATE_SENTENCES:
        expected, got = reference.synthesize(sentence), engine.synthesize(sentence)
        distances.append(variants.audio_distance_db(expected, got, engine.sample_rate))
    mel = float(np.mean(distances))
    return {"mel_distance_db": round(mel, 3), "passed": mel <= variants.MAX_MEL_DISTANCE_DB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="Fewer rounds, batches and streams.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu.json")
    args = parser.parse_args()
    if args.device == "auto":
        import onnxruntime  # noqa: PLC0415

        gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        args.device = "cuda" if gpu else "cpu"
    batches = (1, 8) if args.quick else BATCHES
    streams, rounds = (4, 1) if args.quick else (STREAMS, 4)
    nvml = _nvml() if args.device == "cuda" else None
    result: dict[str, Any] = {"environment": environment(args.device), "voice": VOICE}
    not_measured: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ttsfleet-gpu-") as scratch:
        split = Path(scratch) / "variants"
        streaming.build_split(VOICE, split)
        result["frame_part"] = frame_part(split, args.device, batches, 2 if args.quick else 10)
        result["first_chunk"] = first_chunk(
            split, args.device, streams, rounds, Path(scratch), nvml
        )
        print(json.dumps(result["first_chunk"]), flush=True)
        if args.device == "cuda":
            result["quality"] = quality(split)
        else:
            not_measured["quality"] = "no GPU: the FP16 frame part runs on a GPU"
    if args.device != "cuda":
        not_measured["frame_part_on_gpu"] = "no GPU at hand: CPU only"
    if "gpu_memory_per_instance_mib" not in result["first_chunk"]:
        not_measured["gpu_memory_per_instance"] = "no GPU (or no NVML) at hand"
    result["not_measured"] = not_measured
    harness.write_results(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
