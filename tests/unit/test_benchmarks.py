"""The benchmarks share one harness: every results file records where it came from,
and no benchmark keeps its own poll loop, percentile, operator or Triton start."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ttsfleet import harness

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def calls(tree: ast.AST) -> list[str]:
    """Every call in `tree` as dotted text: `harness.write_results`, `path.write_text`..."""
    return [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_there_are_benchmarks() -> None:
    assert len(SCRIPTS) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_writes_its_results_only_through_the_harness(script: Path) -> None:
    tree = ast.parse(script.read_text())
    found = calls(tree)
    assert "harness.write_results" in found, f"{script.name} writes no results with provenance"
    # No other way to a results file: no json.dump to a file, no write_text of JSON.
    assert "json.dump" not in found
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".write_text"):
            assert not any("json.dumps" in ast.unparse(arg) for arg in node.args), (
                f"{script.name}:{node.lineno} writes JSON without provenance"
            )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_keeps_no_harness_of_its_own(script: Path) -> None:
    text = script.read_text()
    tree = ast.parse(text)
    own = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not own & {"percentile", "percentiles", "_quantile", "quantile", "wait"}
    found = calls(tree)
    assert "subprocess.Popen" not in found, (
        "start processes with harness.OperatorProcess/TritonProcess"
    )
    assert "images.triton_argv" not in found
    assert "--for=condition=Established" not in text
    # A poll loop: a while loop that sleeps between probes. (A watch that is started again
    # after a pause in its `except`, or a sampler that waits on an Event, is not one.)
    for node in ast.walk(tree):
        if isinstance(node, ast.While):
            assert "time.sleep" not in calls_outside_handlers(node), (
                f"{script.name}:{node.lineno}: poll with harness.wait_for"
            )


def calls_outside_handlers(loop: ast.While) -> list[str]:
    handled = {
        id(n) for h in ast.walk(loop) if isinstance(h, ast.ExceptHandler) for n in ast.walk(h)
    }
    return [
        ast.unparse(n.func)
        for n in ast.walk(loop)
        if isinstance(n, ast.Call) and id(n) not in handled
    ]


def test_results_are_written_with_provenance_first(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "r.json"
    harness.write_results(out, {"figure": 1.5, "provenance": "stale"}, command=["python", "b.py"])
    doc = json.loads(out.read_text())
    assert next(iter(doc)) == "provenance" and doc["figure"] == 1.5
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert doc["provenance"]["git_commit"].startswith(head)
    assert doc["provenance"]["command"] == "python b.py"
    assert doc["provenance"]["machine"]["cores"] >= 1
    assert str(REPO) not in json.dumps(doc["provenance"])  # no machine path in a results file


def load_placement_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "placement_bench", REPO / "benchmarks/placement_bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_doc(alone: float, together: float) -> dict[str, Any]:
    return {
        "latency": [
            {"precision": "fp16", "device": "cuda", "whole_reply": {"mean_ms": 400.0},
             "real_time_factor": 0.1},
        ],
        "throughput": [
            {"precision": "fp16", "instances": 1, "replies_per_s": alone},
            {"precision": "fp16", "instances": 4, "replies_per_s": together},
        ],
    }  # fmt: skip


def test_the_density_sides_come_from_their_own_measurements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = load_placement_bench()
    ratios = []
    for together in (6.0, 12.0):
        monkeypatch.setattr(bench, "gpu_results", lambda t=together: gpu_doc(3.0, t))
        row = bench.density("fp16")
        # 4 s of audio per reply (0.4 s at 0.1 s per second), kept at 70 % utilisation.
        assert row["whole_gpu_streams_per_gpu"] == math.floor(together * 4 * 0.7)
        assert row["mig_1g10gb_streams_per_gpu"] == math.floor(7 * 3.0 * 4 * 0.7)
        ratios.append(row["ratio"])
    # Not fixed by the model: the ratio is what the two measurements say.
    assert ratios == [3.5, 1.75]


def test_a_side_that_was_not_measured_has_no_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_placement_bench()
    monkeypatch.setattr(bench, "gpu_results", lambda: gpu_doc(3.0, 12.0))
    row = bench.density("fp32")  # no fp32 rows in this GPU run
    assert row["mig_1g10gb_streams_per_gpu"] is None
    assert row["whole_gpu_streams_per_gpu"] is None and row["ratio"] is None
    assert row["mig_1g10gb_basis"].startswith("MODELLED")
