#!/usr/bin/env bash
# Serve ttsfleet's models as Triton KIND_GPU instances on this machine's GPU 0 and measure
# them through Triton's HTTP API: what the operator renders for a whole GPU (FP16, four
# instances). Needs an NVIDIA GPU; the `python3` on PATH with onnxruntime-gpu, piper-tts,
# the voice and numpy 1.26 installed, and this repository's `operator/` importable;
# the nvidia-pytriton wheel unpacked in PYTRITON_DIR; the FP16 variant in MODEL_DIR.
#
#   hack/triton-gpu-check.sh PYTRITON_DIR MODEL_DIR OUT.json [SECONDS]
#
# Writes OUT.json: the instances that logged loading the voice on a GPU, each Triton
# process's GPU memory (NVML), and replies/s and request latency (p50/p95) of tts_batch
# at 1 and 4 concurrent clients, one reply each at a time.
set -euo pipefail
pytriton=$1 model_dir=$2 out=$3 seconds=${4:-10}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
home=$pytriton/pytriton/tritonserver
py=$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
mkdir -p "$work/backends" && cp -r "$home/backends/python" "$work/backends/"
cp "$home/python_backend_stubs/$py/triton_python_backend_stub" "$work/backends/python/"
libdir=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
export LD_LIBRARY_PATH="$pytriton/nvidia_pytriton.libs:$libdir:${LD_LIBRARY_PATH:-}"
export TTSFLEET_MODEL_DIR=$model_dir
python3 - "$work/models" "$repo" <<'PY'
import shutil, sys
from pathlib import Path
from ttsfleet.triton.config import ModelConfig, render
models, repo = Path(sys.argv[1]), Path(sys.argv[2])
for streaming in (False, True):
    config = ModelConfig(streaming=streaming, precision="fp16", instances=4, gpu=True)
    (models / config.name / "1").mkdir(parents=True)
    (models / config.name / "config.pbtxt").write_text(render(config))
    shutil.copy(repo / "triton_models" / config.name / "1" / "model.py", models / config.name / "1")
PY
"$home/bin/tritonserver" --model-repository="$work/models" --backend-directory="$work/backends" \
  --cache-directory="$home/caches" --http-address=127.0.0.1 --grpc-address=127.0.0.1 \
  --metrics-address=127.0.0.1 --http-port=18000 --grpc-port=18001 --metrics-port=18002 \
  >"$work/triton.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 180); do curl -sf 127.0.0.1:18000/v2/health/ready && break; sleep 1; done
curl -sf 127.0.0.1:18000/v2/health/ready || { tail -30 "$work/triton.log"; exit 1; }
python3 - "$work/triton.log" "$out" "$seconds" <<'PY'
import json, statistics, subprocess, sys, threading, time, urllib.error, urllib.request
from ttsfleet.serving.text import SAMPLE_REPLIES

log, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
URL = "http://127.0.0.1:18000/v2/models/tts_batch/infer"

def infer(text: str) -> float:
    body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
    request = urllib.request.Request(URL, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        reply = json.load(urllib.request.urlopen(request, timeout=120))
    except urllib.error.HTTPError as err:
        raise SystemExit(f"tts_batch answered {err.code}: {err.read().decode()[:500]}")
    audio = next(o for o in reply["outputs"] if o["name"] == "AUDIO")
    assert len(audio["data"]) > 1000, "no audio"
    return time.perf_counter() - start

def level(clients: int) -> dict:
    times, lock, deadline = [], threading.Lock(), time.perf_counter() + seconds
    def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            took = infer(SAMPLE_REPLIES[i % len(SAMPLE_REPLIES)])
            with lock:
                times.append(took)
            i += 1
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads: t.start()
    for t in threads: t.join()
    ordered = sorted(times)
    return {"clients": clients, "replies_per_s": round(len(times) / seconds, 2),
            "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1)}

for text in SAMPLE_REPLIES * 2:  # warm every instance a little
    infer(text)
smi = subprocess.run(["nvidia-smi", "--query-compute-apps=process_name,used_memory",
                      "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
result = {
    "gpu": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip(),
    "config": "tts_batch and tts_stream, fp16, instance_group [ { count: 4 kind: KIND_GPU } ]",
    "loaded_on_gpu": [line.split('"')[1] for line in open(log) if "Loaded voice" in line],
    "gpu_memory_mib_by_process": [
        {"process": row.split(",")[0].rsplit("/", 1)[-1], "mib": int(row.split(",")[1])}
        for row in smi.strip().splitlines()
    ],
    "tts_batch_http": [level(1), level(4)],
}
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
