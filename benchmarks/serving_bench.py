"""Measure serving on this machine: live streams by concurrency, bulk beside them,
batching, the response cache.

    python benchmarks/serving_bench.py [--seconds 60] [--parts streaming,bulk,...]
        [--out benchmarks/results/serving.json]

Starts the real tritonserver (from the nvidia-pytriton wheel, `harness.TritonProcess`)
on loopback with model repositories rendered by the same generator as `triton_models/`,
and loads it with `ttsfleet.bench` (the code behind `ttsfleet bench`; percentiles by
nearest rank, `harness.percentile`):
1. live streams (`tts_stream`, one instance), open loop (`ttsfleet.listeners`): N listeners
   each hear story after story of >= 15 s at 1x on their own clocks (--seconds per N,
   longer at low N: `level_seconds`); per N, TTFA
   p50/p95/p99 (to the first samples) and underruns, with the chunked engine
   (`streaming`) and the sentence engine (`streaming_sentence_engine`) in the same
   run, and the chunked engine without cutting work short for a new stream
   (`streaming_chunked_no_cut`, `cut_short: false`, at 8, 16 and 18 listeners);
   `streams_per_replica`: the most listeners with TTFA p95 <= 200 ms and no
   underrun; and each engine's TTFA for a 400-character first sentence against a
   32-character one (`first_sentence_length`);
   bulk (`bulk`, chunked engine, both models): `tts_batch` audio-seconds per second
   alone and beside 8 listeners, and those listeners' TTFA p95 with and without it;
   `int8`: the chunked engine with its INT8 frame part (precision int8, gated; built
   when the model loads if it is not) at 16 to 24 listeners (`streaming_int8`), the
   levels where FP32's compute runs out on two cores;
2. whole utterances (`tts_batch` on the sentence engine: on the chunked one it goes
   through `tts_stream`'s scheduler, part 1's `bulk`) at concurrency 8: dynamic
   batching against unbatched configurations with 1 and 2 instances, and which gives
   the most throughput within a p95 latency bound;
3. the response cache: latency of repeated requests (cache hits) p50/p99;
4. `cluster`: listeners at 1, 4 and 8 against the pod `make demo` runs (its own
   cluster, `bench-serving`, made and removed here), TTFA p95 at 8 against p50 at 1.
The load generator shares the 2 cores with the server: figures are for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ttsfleet import bench, client, demo, harness, listeners
from ttsfleet.cluster import local
from ttsfleet.triton.config import ModelConfig, render

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def triton(config: ModelConfig, cache_mib: int = 0, *extra: ModelConfig) -> Iterator[str]:
    """A tritonserver serving `config`'s model (and `extra` ones) on loopback; yields
    its gRPC address."""
    work = Path(tempfile.mkdtemp(prefix="ttsfleet-serving-"))
    for each in (config, *extra):
        model_dir = work / "models" / each.name
        shutil.copytree(REPO / "triton_models" / each.name, model_dir)
        (model_dir / "config.pbtxt").write_text(render(each))
    server = harness.TritonProcess(
        local.free_port(), local.free_port(), local.free_port(), work / "triton.log",
        models=tuple(each.name for each in (config, *extra)), repository=work / "models",
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


REALTIME_TTFA_MS = 200.0
# A listener starts a story about every 16 s: at low levels a minute holds a handful of
# streams, whose p95 is their worst. Those levels run until about this many streams
# have started (at most 4x --seconds).
STREAMS_PER_LEVEL = 40
STORY_SECONDS = 16.0


def level_seconds(seconds: float, level: int) -> float:
    """How long `level` listeners run: `seconds`, or longer at low levels (above)."""
    return min(4 * seconds, max(seconds, STREAMS_PER_LEVEL * STORY_SECONDS / level))


def streaming(
    seconds: float, engine: str, levels: tuple[int, ...], precision: str = "fp32",
    parameters: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """Listeners at each level, then the TTFA of a long first sentence against a short
    one (alone, 10 of each), with the given engine, precision and backend parameters."""
    out: list[dict[str, Any]] = []
    config = ModelConfig(
        streaming=True, instances=1, engine=engine, precision=precision, parameters=parameters
    )
    with triton(config) as address:
        for level in levels:
            result = asyncio.run(listeners.listen(address, level, level_seconds(seconds, level)))
            print(
                f"stream ({engine}, {precision}) {level} listeners: {json.dumps(result)}",
                flush=True,
            )
            out.append(result)
        firsts = {
            name: [client.stream(address, text).seconds_to_first_audio for _ in range(10)]
            for name, text in (("short", SHORT_SENTENCE), ("long", LONG_SENTENCE))
        }
    carried = 0
    for result in out:  # levels in order: the last one of an unbroken run that holds
        p95 = result["ttfa_ms"]["p95"]
        if result["errors"] or result["underruns"] or p95 is None or p95 > REALTIME_TTFA_MS:
            break
        carried = result["concurrency"]
    medians = {name: harness.percentile(values, 0.5) * 1000 for name, values in firsts.items()}
    length = {
        "short_chars": len(SHORT_SENTENCE), "long_chars": len(LONG_SENTENCE),
        "short_ttfa_ms_p50": round(medians["short"], 1),
        "long_ttfa_ms_p50": round(medians["long"], 1),
        "long_over_short": round(medians["long"] / medians["short"], 2),
    }  # fmt: skip
    print(f"stream ({engine}) first sentence length: {json.dumps(length)}", flush=True)
    return {"levels": out, "sentence_length": length, "streams_per_replica": carried}


def bulk(seconds: float, live: int = 8, workers: int = 4) -> dict[str, Any]:
    """`tts_batch` (through `tts_stream`'s scheduler at bulk priority) alone and beside
    `live` listeners, and the listeners' TTFA with and without it."""
    stream = ModelConfig(streaming=True, instances=1, engine="chunked")
    batch = ModelConfig(streaming=False, instances=1, engine="chunked")
    rng_texts = [listeners.story(random.Random(n)) for n in range(64)]  # noqa: S311

    def bulk_load(stop_after: float) -> float:
        """Audio seconds per second from `workers` threads for `stop_after` seconds."""
        # Each reply's seconds, appended (atomic): `made[0] += synthesize(...)` read
        # made[0] before the call and lost the other threads' replies that ended meanwhile.
        made: list[float] = []
        start = time.perf_counter()

        def worker(n: int) -> None:
            i = n
            while time.perf_counter() - start < stop_after:
                reply = client.synthesize(address, rng_texts[i % len(rng_texts)])
                made.append(reply.audio_seconds)
                i += workers

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(made) / (time.perf_counter() - start)

    with triton(stream, 0, batch) as address:
        alone_rate = bulk_load(seconds / 2)
        alone = asyncio.run(listeners.listen(address, live, seconds))
        rate: list[float] = []

        async def beside() -> None:
            rate.append(await asyncio.to_thread(bulk_load, seconds + 10))

        together = asyncio.run(listeners.listen(address, live, seconds, alongside=beside))
    result = {
        "live_listeners": live, "bulk_workers": workers,
        "bulk_audio_s_per_s_alone": round(alone_rate, 2),
        "bulk_audio_s_per_s_beside_live": round(rate[0], 2),
        "bulk_share_kept": round(rate[0] / alone_rate, 2),
        "live_alone": alone, "live_beside_bulk": together,
        "live_ttfa_p95_ratio": round(together["ttfa_ms"]["p95"] / alone["ttfa_ms"]["p95"], 2)
        if together["ttfa_ms"]["p95"] and alone["ttfa_ms"]["p95"]
        else None,
    }  # fmt: skip
    print(f"bulk: {json.dumps(result)}", flush=True)
    return result


def batching(seconds: float, bound_ms: float) -> dict[str, Any]:
    configs = {
        "unbatched, 1 instance": ModelConfig(
            streaming=False, instances=1, max_batch_size=1, engine="sentence"
        ),
        "unbatched, 2 instances": ModelConfig(
            streaming=False, instances=2, max_batch_size=1, engine="sentence"
        ),
        "dynamic batching (8, 2 ms), 1 instance": ModelConfig(
            streaming=False,
            instances=1,
            max_batch_size=8,
            max_queue_delay_microseconds=2000,
            engine="sentence",
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
    config = ModelConfig(streaming=False, instances=1, cache=True, engine="sentence")
    with triton(config, cache_mib=64) as address:
        first = client.synthesize(address, text)
        hits = [client.synthesize(address, text).seconds_total * 1000 for _ in range(requests)]
    return {
        "first_request_ms": round(first.seconds_total * 1000, 2),
        "hits": requests,
        "hit_latency_ms": bench.percentiles(hits),
    }


CLUSTER = "bench-serving"
CLUSTER_GOAL_MS = 250.0  # TTFA p95 at 8 listeners through the demo cluster's pod
CLUSTER_SPREAD = 4.0  # ... and at most this many times the p50 at 1


def cluster(seconds: float, levels: tuple[int, ...] = (1, 4, 8)) -> dict[str, Any]:
    """Listeners against the pod `make demo` runs (its cluster, operator, TtsDeployment
    and gateway all up on the same 2 cores), over the pod's own network namespace."""
    if local.load(CLUSTER):
        local.down(CLUSTER)
    try:
        with tempfile.TemporaryDirectory(prefix="ttsfleet-bench-demo-") as out:
            made = demo.run(CLUSTER, Path(out) / "demo.wav", say=print)
        out_levels = []
        for level in levels:
            result = asyncio.run(listeners.listen(made.address, level, seconds))
            print(f"cluster {level} listeners: {json.dumps(result)}", flush=True)
            out_levels.append(result)
    finally:
        if local.load(CLUSTER):
            local.down(CLUSTER)
    at = {result["concurrency"]: result for result in out_levels}
    p95_8, p50_1 = at[8]["ttfa_ms"]["p95"], at[1]["ttfa_ms"]["p50"]
    return {
        "through": "make demo's TtsDeployment pod (examples/local-cpu.yaml) on the local node",
        "levels": out_levels,
        "p95_at_8_over_p50_at_1": round(p95_8 / p50_1, 2) if p95_8 and p50_1 else None,
        "goal": {"p95_at_8_ms_at_most": CLUSTER_GOAL_MS, "p50_at_1_times_at_most": CLUSTER_SPREAD},
    }


PARTS = ("streaming", "bulk", "int8", "cluster", "batching", "cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bound-ms", type=float, default=2000.0)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {}  # the machine: in its provenance
    if args.out.exists():  # parts not run keep their last figures
        report = {k: v for k, v in json.loads(args.out.read_text()).items() if k != "provenance"}
    if "streaming" in parts:
        # The chunked engine and the sentence engine before it, in one run.
        chunked = streaming(args.seconds, "chunked", (1, 4, 8, 12, 16, 18, 20, 22))
        sentence = streaming(args.seconds, "sentence", (1, 4, 8))
        # The chunked engine as it was before a new stream could cut work short.
        uncut = streaming(
            args.seconds, "chunked", (8, 16, 18), parameters=(("cut_short", "false"),)
        )
        report["streaming"] = chunked["levels"]
        report["streaming_sentence_engine"] = sentence["levels"]
        report["streaming_chunked_no_cut"] = uncut["levels"]
        report["streams_per_replica"] = {
            "ttfa_p95_ms_at_most": REALTIME_TTFA_MS, "underruns": 0,
            "chunked": chunked["streams_per_replica"],
            "sentence": sentence["streams_per_replica"],
        }  # fmt: skip
        report["first_sentence_length"] = {
            "chunked": chunked["sentence_length"],
            "sentence": sentence["sentence_length"],
        }
        harness.write_results(args.out, report)  # each part kept as soon as it is measured
    if "bulk" in parts:
        report["bulk"] = bulk(args.seconds)
        harness.write_results(args.out, report)
    if "int8" in parts:
        int8 = streaming(args.seconds, "chunked", (16, 18, 20, 22, 24), precision="int8")
        report["streaming_int8"] = int8["levels"]
        carried = report.setdefault("streams_per_replica", {})
        carried["chunked_int8"] = int8["streams_per_replica"]
        harness.write_results(args.out, report)
    if "cluster" in parts:
        report["cluster"] = cluster(args.seconds)
        harness.write_results(args.out, report)
    if "batching" in parts:
        report["batching"] = batching(15.0, args.bound_ms)
    if "cache" in parts:
        report["cache"] = cache(500)
        print(json.dumps(report["cache"]), flush=True)
    harness.write_results(args.out, report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
