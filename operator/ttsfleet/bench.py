"""`ttsfleet bench`: load a TtsDeployment (or Triton addresses) and measure it.

Closed loop: for each concurrency level, that many workers send requests back to
back for a while. Open loop: requests arrive at a fixed mean rate (Poisson),
whatever the server does, which is how a queue builds. Every request goes to the
next ready endpoint (round robin, refreshed as endpoints change). Reported per
level: time to first audio and latency p50/p95/p99 (nearest rank,
`harness.percentile`; None when no request succeeded), real-time factor,
throughput, errors.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ttsfleet import client
from ttsfleet.harness import percentile
from ttsfleet.serving.text import SAMPLE_REPLIES

# Short replies of a voice agent: one to three sentences, numbers included.
TEXTS = SAMPLE_REPLIES


@dataclass
class Sample:
    started: float
    seconds_to_first_audio: float = 0.0
    seconds_total: float = 0.0
    audio_seconds: float = 0.0
    error: str = ""


@dataclass
class LevelResult:
    """One concurrency level, or one open-loop rate."""

    label: str
    concurrency: int | None
    rate: float | None
    seconds: float
    requests: int
    errors: int
    ttfa_ms: dict[str, float | None]
    latency_ms: dict[str, float | None]
    rtf_mean: float | None
    requests_per_second: float
    audio_seconds_per_second: float
    error_examples: list[str] = field(default_factory=list)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and p99 (nearest rank, `harness.percentile`), rounded to 0.01; each None
    when there are no values (no figure rather than a made-up 0)."""
    quantiles = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
    if not values:
        return dict.fromkeys(quantiles)
    return {key: round(percentile(values, q), 2) for key, q in quantiles.items()}


def summarize(
    label: str, samples: list[Sample], seconds: float, concurrency: int | None, rate: float | None
) -> LevelResult:
    good = [s for s in samples if not s.error]
    audio = sum(s.audio_seconds for s in good)
    ratios = [s.seconds_total / s.audio_seconds for s in good if s.audio_seconds]
    return LevelResult(
        label=label,
        concurrency=concurrency,
        rate=rate,
        seconds=round(seconds, 2),
        requests=len(samples),
        errors=len(samples) - len(good),
        ttfa_ms=percentiles([s.seconds_to_first_audio * 1000 for s in good]),
        latency_ms=percentiles([s.seconds_total * 1000 for s in good]),
        rtf_mean=round(statistics.fmean(ratios), 4) if ratios else None,
        requests_per_second=round(len(good) / seconds, 2) if seconds else 0.0,
        audio_seconds_per_second=round(audio / seconds, 2) if seconds else 0.0,
        error_examples=sorted({s.error for s in samples if s.error})[:3],
    )


Call = Callable[[str, str], client.Result]


def one(call: Call, balancer: client.Balancer, text: str) -> Sample:
    sample = Sample(started=time.perf_counter())
    try:
        result = call(balancer.next(), text)
    except Exception as err:  # a failed request is a result, not a crash
        sample.error = str(err)[:200]
        sample.seconds_total = time.perf_counter() - sample.started
        return sample
    sample.seconds_to_first_audio = result.seconds_to_first_audio
    sample.seconds_total = result.seconds_total
    sample.audio_seconds = result.audio_seconds
    return sample


def closed_loop(
    call: Call, balancer: client.Balancer, concurrency: int, seconds: float, max_requests: int,
    texts: Sequence[str] = TEXTS, tick: Callable[[], None] = lambda: None,
) -> LevelResult:  # fmt: skip
    """`concurrency` workers, each sending its next request when the last one ends."""
    samples: list[Sample] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    issued = 0

    def worker(index: int) -> None:
        nonlocal issued
        rng = random.Random(index)  # noqa: S311 - picking texts, not secrets
        while time.perf_counter() < deadline:
            with lock:
                if issued >= max_requests:
                    return
                issued += 1
            sample = one(call, balancer, rng.choice(texts))
            with lock:
                samples.append(sample)
            tick()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(f"c={concurrency}", samples, time.perf_counter() - start, concurrency, None)


def open_loop(
    call: Call, balancer: client.Balancer, rate: float, seconds: float, max_in_flight: int = 64,
    texts: Sequence[str] = TEXTS, tick: Callable[[], None] = lambda: None, seed: int = 7,
) -> LevelResult:  # fmt: skip
    """Poisson arrivals at `rate` per second for `seconds`, at most `max_in_flight` at once."""
    rng = random.Random(seed)  # noqa: S311
    samples: list[Sample] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
        futures = []
        next_at = start
        while next_at < start + seconds:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            futures.append(pool.submit(one, call, balancer, rng.choice(texts)))
            next_at += rng.expovariate(rate)
        for future in futures:
            samples.append(future.result())
            tick()
    return summarize(f"rate={rate}/s", samples, time.perf_counter() - start, None, rate)


def plot(results: Sequence[LevelResult], path: Path, title: str) -> None:
    """TTFA and latency percentiles, and throughput, per level, as a PNG."""
    import matplotlib  # noqa: PLC0415 - only for --plot

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    def points(values: Sequence[float | None]) -> list[float]:
        return [math.nan if v is None else v for v in values]  # a level with no figure: a gap

    labels = [r.label for r in results]
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
    for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        left.plot(labels, points([r.ttfa_ms[key] for r in results]), style, label=f"TTFA {key}")
    left.plot(labels, points([r.latency_ms["p95"] for r in results]), "x-", label="latency p95")
    left.set_ylabel("milliseconds")
    left.set_title("Time to first audio")
    left.legend()
    right.bar(labels, [r.requests_per_second for r in results], color="tab:green")
    right.set_ylabel("requests per second")
    right.set_title("Throughput")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def as_json(results: Sequence[LevelResult], **context: Any) -> dict[str, Any]:
    return {**context, "levels": [asdict(r) for r in results]}
