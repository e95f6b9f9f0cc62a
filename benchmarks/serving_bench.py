"""Measure serving on this machine: TTFA by concurrency, batching, the response cache.

    python benchmarks/serving_bench.py [--seconds 15] [--out benchmarks/results/serving.json]

Starts the real tritonserver (from the nvidia-pytriton wheel, `harness.TritonProcess`)
on loopback with model repositories rendered by the same generator as `triton_models/`,
and loads it with `ttsfleet.bench` (the code behind `ttsfleet bench`; percentiles by
nearest rank, `harness.percentile`):
1. streaming (`tts_stream`, one instance): TTFA and latency p50/p95/p99 at
   concurrency 1, 4 and 8;
2. whole utterances (`tts_batch`) at concurrency 8: dynamic batching against
   unbatched configurations with 1 and 2 instances, and which gives the most
   throughput within a p95 latency bound;
3. the response cache: latency of repeated requests (cache hits) p50/p99.
The load generator shares the 2 cores with the server: figures are for this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ttsfleet import bench, client, harness
from ttsfleet.cluster import local
from ttsfleet.triton.config import ModelConfig, render

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def triton(config: ModelConfig, cache_mib: int = 0) -> Iterator[str]:
    """A tritonserver serving one model of `config` on loopback; yields its gRPC address."""
    work = Path(tempfile.mkdtemp(prefix="ttsfleet-serving-"))
    model_dir = work / "models" / config.name
    shutil.copytree(REPO / "triton_models" / config.name, model_dir)
    (model_dir / "config.pbtxt").write_text(render(config))
    server = harness.TritonProcess(
        local.free_port(), local.free_port(), local.free_port(), work / "triton.log",
        models=(config.name,), repository=work / "models",
        extra_args=(f"--cache-config=local,size={cache_mib * 1024 * 1024}",) if cache_mib else (),
    )  # fmt: skip
    try:
        server.start()
        address = server.grpc_address
        client.stream(address, "Warm up.") if config.streaming else client.synthesize(
            address, "Warm up."
        )
        yield address
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def streaming(seconds: float) -> list[dict[str, Any]]:
    out = []
    with triton(ModelConfig(streaming=True, instances=1)) as address:
        balancer = client.Balancer(lambda: [address])
        for level in (1, 4, 8):
            result = bench.closed_loop(client.stream, balancer, level, seconds, 100_000)
            print(
                f"stream {result.label}: TTFA {result.ttfa_ms} latency {result.latency_ms}",
                flush=True,
            )
            out.append(asdict(result))
    return out


def batching(seconds: float, bound_ms: float) -> dict[str, Any]:
    configs = {
        "unbatched, 1 instance": ModelConfig(streaming=False, instances=1, max_batch_size=1),
        "unbatched, 2 instances": ModelConfig(streaming=False, instances=2, max_batch_size=1),
        "dynamic batching (8, 2 ms), 1 instance": ModelConfig(
            streaming=False, instances=1, max_batch_size=8, max_queue_delay_microseconds=2000
        ),
    }
    results: dict[str, Any] = {}
    for name, config in configs.items():
        with triton(config) as address:
            balancer = client.Balancer(lambda address=address: [address])
            result = bench.closed_loop(client.synthesize, balancer, 8, seconds, 100_000)
        print(
            f"batch {name}: {result.requests_per_second} req/s, p95 {result.latency_ms['p95']} ms",
            flush=True,
        )
        results[name] = asdict(result)
    within = {  # a config with no successful request (p95 None) is not within
        k: v
        for k, v in results.items()
        if v["latency_ms"]["p95"] is not None and v["latency_ms"]["p95"] <= bound_ms
    }
    best_unbatched = max(
        (v["requests_per_second"] for k, v in within.items() if k.startswith("unbatched")),
        default=0.0,
    )
    batched = next((v for k, v in within.items() if k.startswith("dynamic")), None)
    return {
        "concurrency": 8,
        "latency_bound_p95_ms": bound_ms,
        "configs": results,
        "batched_over_best_unbatched": round(batched["requests_per_second"] / best_unbatched, 2)
        if batched and best_unbatched
        else None,
    }


def cache(requests: int) -> dict[str, Any]:
    text = "Thanks for calling. How can I help you today?"
    with triton(ModelConfig(streaming=False, instances=1, cache=True), cache_mib=64) as address:
        first = client.synthesize(address, text)
        hits = [client.synthesize(address, text).seconds_total * 1000 for _ in range(requests)]
    return {
        "first_request_ms": round(first.seconds_total * 1000, 2),
        "hits": requests,
        "hit_latency_ms": bench.percentiles(hits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--bound-ms", type=float, default=2000.0)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json"
    )
    args = parser.parse_args()
    report: dict[str, Any] = {}  # the machine: in its provenance
    report["streaming"] = streaming(args.seconds)
    report["batching"] = batching(args.seconds, args.bound_ms)
    report["cache"] = cache(500)
    print(json.dumps(report["cache"]), flush=True)
    harness.write_results(args.out, report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
