"""The sentence engine on a real GPU: one KIND_GPU instance's memory, and its speed.

    python benchmarks/gpu_sentence_bench.py [--out benchmarks/results/gpu_sentence.json]

Kept for the record of the H100 run it made (the planner's memory model reads it);
the chunked engine's GPU figures come from `benchmarks/gpu_bench.py` (`make bench-gpu`).

Needs an NVIDIA GPU, its driver's NVML, and onnxruntime-gpu (the CPU wheel has no
CUDA provider: the engine refuses a GPU instance then, and so does this script).
Every measurement runs in a fresh process, as each Triton KIND_GPU instance of the
Python backend is one (its own CUDA context). Memory is the GPU's used memory from
NVML, so the GPU should be otherwise idle.

Writes, with the GPU, driver and onnxruntime version:
- `memory`: per precision, MiB the GPU's used memory grows by when one instance loads
  the voice (CUDA context, cuDNN/cuBLAS handles, weights, onnxruntime's arena) and by
  how much more after sentences of growing length (activations, per second of audio);
- `latency`: time to the first chunk (one sentence) and to the whole reply for the
  voice-agent replies of `ttsfleet bench`, p50/p95 (nearest rank, `harness.percentile`;
  results written before it used a rounded-index rank), on the GPU, with the same code on
  this machine's CPU as the baseline of the same run;
- `throughput`: N instances (processes) on the one GPU, each synthesising one reply at
  a time (closed loop), for N in 1, 2, 4, 8: replies per second and first-chunk p50/p95;
- `quality`: FP32 and FP16 on the GPU against FP32 on the CPU, by the variant gate
  (`ttsfleet.serving.variants.measure`: mel distance, duration difference).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ttsfleet import harness
from ttsfleet.serving import variants
from ttsfleet.serving.engine import Synthesizer, voices
from ttsfleet.serving.text import SAMPLE_REPLIES

REPO = Path(__file__).resolve().parent.parent
VOICE = "en_US-joe-medium"
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank while the band plays. "
LENGTHS = (60, 120, 240)
INSTANCES = (1, 2, 4, 8)
ROUNDS = 5


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1000 * harness.percentile(values, 0.5), 2),
        "p95_ms": round(1000 * harness.percentile(values, 0.95), 2),
        "mean_ms": round(1000 * statistics.fmean(values), 2),
    }


def _timed(engine: Synthesizer, text: str) -> tuple[float, float, float]:
    """(seconds to the first chunk, seconds to the whole reply, seconds of audio)."""
    start = time.perf_counter()
    first, samples = 0.0, 0
    for chunk in engine.chunks(text):
        if not samples:
            first = time.perf_counter() - start
        samples += len(chunk)
    return first, time.perf_counter() - start, samples / engine.sample_rate


def _used_mib() -> float:
    import pynvml  # noqa: PLC0415 - a GPU machine's package

    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**20


def _memory(precision: str, model_dir: str) -> dict[str, Any]:
    """In a fresh process: used-memory growth from loading, then per sentence length."""
    import pynvml  # noqa: PLC0415

    pynvml.nvmlInit()
    before = _used_mib()
    engine = Synthesizer(VOICE, precision, Path(model_dir), device="cuda")
    loaded = _used_mib()
    engine.synthesize("Hello.")
    warm = _used_mib()
    sentences = []
    for chars in LENGTHS:
        text = (SENTENCE * 10)[:chars].rstrip() + "."
        audio = engine.synthesize(text)
        seconds = len(audio) / engine.sample_rate
        growth = _used_mib() - warm
        sentences.append(
            {
                "chars": chars,
                "audio_s": round(seconds, 2),
                "growth_mib": round(growth, 1),
                "mib_per_audio_s": round(growth / seconds, 2),
            }
        )
    return {
        "load_mib": round(loaded - before, 1),
        "after_first_sentence_mib": round(warm - before, 1),
        "sentences": sentences,
    }


def _latency(precision: str, device: str, model_dir: str) -> dict[str, Any]:
    """In a fresh process: first-chunk and whole-reply times of the sample replies."""
    engine = Synthesizer(VOICE, precision, Path(model_dir), device=device)
    for text in SAMPLE_REPLIES:  # warm-up: one pass, each length once
        engine.synthesize(text)
    firsts, totals, audio = [], [], 0.0
    for _ in range(ROUNDS):
        for text in SAMPLE_REPLIES:
            first, total, seconds = _timed(engine, text)
            firsts.append(first)
            totals.append(total)
            audio += seconds
    return {
        "precision": precision,
        "device": device,
        "replies": len(totals),
        "first_chunk": _ms(firsts),
        "whole_reply": _ms(totals),
        "real_time_factor": round(sum(totals) / audio, 5),
    }


def _conv_search(precision: str, algo: str, model_dir: str) -> dict[str, Any]:
    """In a fresh process: the replies with onnxruntime's cuDNN algorithm search `algo`
    (the engine's default is DEFAULT), on the GPU; an error is a result too."""
    row: dict[str, Any] = {"precision": precision, "cudnn_conv_algo_search": algo}
    try:
        engine = Synthesizer(
            VOICE, precision, Path(model_dir), device="cuda", conv_algo_search=algo
        )
        for text in SAMPLE_REPLIES:
            engine.synthesize(text)
        timed = [_timed(engine, text) for text in SAMPLE_REPLIES * 3]
    except Exception as err:  # the error is the result
        row["error"] = str(err).splitlines()[0][:240]
        return row
    row["first_chunk"] = _ms([t[0] for t in timed])
    row["real_time_factor"] = round(sum(t[1] for t in timed) / sum(t[2] for t in timed), 5)
    return row


def _instance(
    precision: str, model_dir: str, seconds: float, barrier: Any, results: Any, offset: int
) -> None:
    """One instance: load, warm up, wait for the others, then one reply at a time."""
    engine = Synthesizer(VOICE, precision, Path(model_dir), device="cuda")
    for text in SAMPLE_REPLIES:
        engine.synthesize(text)
    barrier.wait()
    deadline = time.perf_counter() + seconds
    firsts, index = [], offset
    while time.perf_counter() < deadline:
        first, _, _ = _timed(engine, SAMPLE_REPLIES[index % len(SAMPLE_REPLIES)])
        firsts.append(first)
        index += 1
    results.put(firsts)


def _throughput(precision: str, model_dir: str, instances: int, seconds: float) -> dict[str, Any]:
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(instances), context.Queue()
    workers = [
        context.Process(target=_instance, args=(precision, model_dir, seconds, barrier, results, i))
        for i in range(instances)
    ]
    for worker in workers:
        worker.start()
    firsts: list[float] = []
    for _ in workers:
        firsts += results.get(timeout=600)
    for worker in workers:
        worker.join()
    return {
        "precision": precision,
        "instances": instances,
        "replies_per_s": round(len(firsts) / seconds, 2),
        "first_chunk": _ms(firsts),
    }


def _in_fresh_process(function: Any, *args: Any) -> Any:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def environment() -> dict[str, Any]:
    import onnxruntime  # noqa: PLC0415
    import pynvml  # noqa: PLC0415

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return {
        "gpu": pynvml.nvmlDeviceGetName(handle),
        "gpu_memory_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "cpu_cores": mp.cpu_count(),
        "python": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu_sentence.json")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--model-dir", type=Path, help="Use the fp16 variant built there.")
    args = parser.parse_args()
    result: dict[str, Any] = {"environment": environment(), "voice": VOICE}
    print(json.dumps(result["environment"]), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        built = args.model_dir and variants.variant_path(VOICE, "fp16", args.model_dir)
        if built and built.exists():  # built by `ttsfleet models build` with the pinned tools
            shutil.copy(built, variants.variant_path(VOICE, "fp16", Path(scratch)))
        else:
            variants.convert(
                VOICE, "fp16", "cuda", variants.variant_path(VOICE, "fp16", Path(scratch))
            )
        result["memory"] = {p: _in_fresh_process(_memory, p, scratch) for p in ("fp32", "fp16")}
        print(json.dumps(result["memory"]), flush=True)
        result["latency"] = [
            _in_fresh_process(_latency, p, d, scratch)
            for p, d in (("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"))
        ]
        print(json.dumps(result["latency"]), flush=True)
        result["conv_search"] = [
            _in_fresh_process(_conv_search, p, a, scratch)
            for p in ("fp32", "fp16")
            for a in ("DEFAULT", "HEURISTIC")
        ]
        print(json.dumps(result["conv_search"]), flush=True)
        result["throughput"] = [
            _throughput(p, scratch, n, args.seconds)
            for p, n in [("fp16", n) for n in INSTANCES] + [("fp32", 1), ("fp32", 2)]
        ]
        print(json.dumps(result["throughput"]), flush=True)
        fp32 = voices()[VOICE][0]
        fp16 = variants.variant_path(VOICE, "fp16", Path(scratch))
        result["quality"] = [
            _in_fresh_process(variants.measure, VOICE, p, "cuda", path, "cuda").as_dict()
            for p, path in (("fp32", fp32), ("fp16", fp16))
        ]
        for row in result["quality"]:
            row["path"] = Path(row["path"]).name
    harness.write_results(args.out, result)
    print(json.dumps(result["quality"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
