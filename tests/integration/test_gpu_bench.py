"""`make bench-gpu`'s script runs here before a GPU is at hand: every step on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ttsfleet.harness import REPO


def test_the_gpu_bench_runs_on_the_cpu_and_says_what_it_could_not_measure(
    tmp_path: Path,
) -> None:
    out = tmp_path / "gpu.json"
    script = REPO / "benchmarks" / "gpu_bench.py"
    argv = [sys.executable, str(script), "--device", "cpu", "--quick", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu"
    assert [row["batch"] for row in result["frame_part"]] == [1, 8]
    assert all(row["cpu_audio_seconds_per_second"] > 1 for row in result["frame_part"])
    first = result["first_chunk"]
    assert first["requests"] == 4 and first["first_audio"]["p95_ms"] > 0
    assert "(fp32, chunked engine) on CPU" in first["engine_loaded"]
    assert set(result["not_measured"]) == {
        "quality", "frame_part_on_gpu", "gpu_memory_per_instance",
    }  # fmt: skip
