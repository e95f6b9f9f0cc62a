"""`ttsfleet bench` against the real tritonserver: closed and open loop, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Triton, ttsfleet
from ttsfleet import bench, client


def test_closed_and_open_loop_measure_real_requests(triton: Triton) -> None:
    balancer = client.Balancer(lambda: [triton.grpc_address])
    closed = bench.closed_loop(client.stream, balancer, concurrency=2, seconds=30, max_requests=6)
    assert closed.requests == 6 and closed.errors == 0
    ttfa, latency = closed.ttfa_ms["p50"], closed.latency_ms["p50"]
    assert ttfa is not None and latency is not None and 0 < ttfa <= latency
    assert closed.rtf_mean is not None and 0 < closed.rtf_mean < 1
    opened = bench.open_loop(client.synthesize, balancer, rate=2.0, seconds=2.0)
    assert opened.requests >= 1 and opened.errors == 0


def test_errors_are_counted_not_raised(triton: Triton) -> None:
    balancer = client.Balancer(lambda: [triton.grpc_address])
    result = bench.closed_loop(
        client.stream, balancer, concurrency=1, seconds=30, max_requests=2, texts=[""]
    )
    assert result.errors == 2 and "TEXT is empty" in result.error_examples[0]
    assert result.ttfa_ms["p50"] is None and result.rtf_mean is None  # no figure, not a 0


def test_the_cli_writes_json_and_a_plot(triton: Triton, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = ttsfleet(
        "bench", "--target", triton.grpc_address, "--concurrency", "1,2", "--seconds", "2",
        "--requests", "3", "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert [level["concurrency"] for level in doc["levels"]] == [1, 2]
    assert all(level["errors"] == 0 for level in doc["levels"])
    assert doc["provenance"]["git_commit"] and doc["provenance"]["machine"]["cores"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
