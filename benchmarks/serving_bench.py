"""Measure serving on this machine: TTFA by concurrency, batching, the response cache.

    python benchmarks/serving_bench.py [--seconds 15] [--out benchmarks/results/serving.json]

Starts the real tritonserver (from the nvidia-pytriton wheel, `harness.TritonProcess`)
on loopback with model repositories rendered by the same generator as `triton_models/`,
and loads it with `ttsfleet.bench` (the code behind `ttsfleet bench`; percentiles by
nearest rank, `harness.percentile`):
1. streaming (`tts_stream`, one instance): TTFA and latency p50/p95/p99 at
   concurrency 1, 4 and 8, with the chunked engine (`streaming`) and the sentence
   engine before it (`streaming_sentence_engine`), and each one's TTFA for a
   400-character first sentence against a 32-character one (`first_sentence_length`);
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


SHORT_SENTENCE = "Thanks for calling, how are you?"  # 32 characters
LONG_SENTENCE = (  # one sentence of about 400 characters
    "Before we go any further with the booking that you asked about earlier this morning, "
    "I would like to read back the details that I have on file for you, including the "
    "travel dates, the names of everyone who will be staying in the room, the kind of "
    "room that you asked for, the breakfast option, and the total price with the taxes "
    "and the fees that the hotel adds at the end of the stay, so that nothing surprises you."
)


def streaming(seconds: float, engine: str) -> dict[str, Any]:
    """TTFA and latency at concurrency 1, 4 and 8, and TTFA of a long first sentence
    against a short one (alone, 10 of each), with the given engine."""
    out: list[dict[str, Any]] = []
    with triton(ModelConfig(streaming=True, instances=1, engine=engine)) as address:
        balancer = client.Balancer(lambda: [address])
        for level in (1, 4, 8):
            result = bench.closed_loop(client.stream, balancer, level, seconds, 100_000)
            print(
                f"stream ({engine}) {result.label}: TTFA {result.ttfa_ms} latency "
                f"{result.latency_ms}", flush=True,
            )  # fmt: skip
            out.append(asdict(result))
        firsts = {
            name: [client.stream(address, text).seconds_to_first_audio for _ in range(10)]
            for name, text in (("short", SHORT_SENTENCE), ("long", LONG_SENTENCE))
        }
    medians = {name: harness.percentile(values, 0.5) * 1000 for name, values in firsts.items()}
    length = {
        "short_chars": len(SHORT_SENTENCE), "long_chars": len(LONG_SENTENCE),
        "short_ttfa_ms_p50": round(medians["short"], 1),
        "long_ttfa_ms_p50": round(medians["long"], 1),
        "long_over_short": round(medians["long"] / medians["short"], 2),
    }  # fmt: skip
    print(f"stream ({engine}) first sentence length: {json.dumps(length)}", flush=True)
    return {"levels": out, "sentence_length": length}


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
    # The chunked engine (the default) and the sentence engine before it, in one run.
    chunked = streaming(args.seconds, "chunked")
    sentence = streaming(args.seconds, "sentence")
    report["streaming"] = chunked["levels"]
    report["streaming_sentence_engine"] = sentence["levels"]
    report["first_sentence_length"] = {
        "chunked": chunked["sentence_length"],
        "sentence": sentence["sentence_length"],
    }
    report["batching"] = batching(args.seconds, args.bound_ms)
    report["cache"] = cache(500)
    print(json.dumps(report["cache"]), flush=True)
    harness.write_results(args.out, report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
