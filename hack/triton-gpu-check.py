#!/usr/bin/env python3
"""Serve ttsfleet's models as Triton KIND_GPU instances on this machine's GPU 0 and
measure them through Triton's HTTP API: what the operator renders for a whole GPU
(FP16, four instances), started as the local cluster's runner starts Triton
(`ttsfleet.cluster.images`: the nvidia-pytriton wheel's tritonserver and Python stub).

    python hack/triton-gpu-check.py MODEL_DIR OUT.json [--seconds 10]

Needs an NVIDIA GPU and, in this Python: ttsfleet, nvidia-pytriton, onnxruntime-gpu,
piper-tts, the voice and numpy 1.26 (Triton 24.10's Python backend predates numpy 2);
the FP16 variant in MODEL_DIR. Writes OUT.json: the instances that logged loading the
voice on a GPU, each process's GPU memory (NVML), and replies/s and request latency
(p50/p95) of tts_batch at 1 and 4 concurrent clients, one reply each at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ttsfleet import harness
from ttsfleet.cluster import images
from ttsfleet.serving.text import SAMPLE_REPLIES
from ttsfleet.triton.config import ModelConfig, render

REPO = Path(__file__).resolve().parent.parent
HTTP, GRPC, METRICS = 18000, 18001, 18002
URL = f"http://127.0.0.1:{HTTP}/v2/models/tts_batch/infer"


def model_repository(root: Path) -> Path:
    """Both models, as the operator renders them for a whole GPU in FP16."""
    for streaming in (False, True):
        config = ModelConfig(streaming=streaming, precision="fp16", instances=4, gpu=True)
        (root / config.name / "1").mkdir(parents=True)
        (root / config.name / "config.pbtxt").write_text(render(config))
        shutil.copy(
            REPO / "triton_models" / config.name / "1" / "model.py", root / config.name / "1"
        )
    return root


def infer(text: str) -> float:
    body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
    request = urllib.request.Request(
        URL, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        reply = json.load(urllib.request.urlopen(request, timeout=120))  # noqa: S310 - loopback
    except urllib.error.HTTPError as err:
        raise SystemExit(f"tts_batch answered {err.code}: {err.read().decode()[:500]}") from err
    audio = next(o for o in reply["outputs"] if o["name"] == "AUDIO")
    if len(audio["data"]) < 1000:
        raise SystemExit(f"tts_batch answered {len(audio['data'])} samples for {text!r}")
    return time.perf_counter() - start


def level(clients: int, seconds: float) -> dict[str, Any]:
    """`clients` closed-loop clients for `seconds`: replies/s and latency."""
    times: list[float] = []
    lock, deadline = threading.Lock(), time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            took = infer(SAMPLE_REPLIES[i % len(SAMPLE_REPLIES)])
            with lock:
                times.append(took)
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(times)
    return {
        "clients": clients,
        "replies_per_s": round(len(times) / seconds, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1),
    }


def nvidia_smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [[cell.strip() for cell in row.split(",")] for row in out.strip().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        # Keep what the environment already had on the library path (CUDA from wheels).
        library_path = images.triton_environment()["LD_LIBRARY_PATH"]
        library_path += ":" + os.environ.get("LD_LIBRARY_PATH", "")
        server = harness.TritonProcess(
            HTTP, GRPC, METRICS, Path(scratch) / "triton.log",
            repository=model_repository(Path(scratch) / "models"),
            env={"TTSFLEET_MODEL_DIR": str(args.model_dir), "LD_LIBRARY_PATH": library_path},
        )  # fmt: skip
        server.start(timeout=180)
        try:
            for text in SAMPLE_REPLIES * 2:  # every instance warmed a little
                infer(text)
            result = {
                "gpu": ", ".join(nvidia_smi("--query-gpu=name,driver_version")[0]),
                "config": "tts_batch and tts_stream, fp16, "
                "instance_group [ { count: 4 kind: KIND_GPU } ]",
                "loaded_on_gpu": [
                    line.split('"')[1] for line in server.log.read_text().splitlines()
                    if "Loaded voice" in line and " on GPU " in line
                ],
                "gpu_memory_mib_by_process": [
                    {"process": Path(name).name, "mib": int(mib)}
                    for name, mib in nvidia_smi("--query-compute-apps=process_name,used_memory")
                ],
                "tts_batch_http": [level(1, args.seconds), level(4, args.seconds)],
            }  # fmt: skip
        finally:
            server.stop()
    harness.write_results(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
