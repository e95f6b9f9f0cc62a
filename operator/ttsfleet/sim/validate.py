"""Replay a recorded run of the real autoscaler through the simulator, side by side.

A recorded run is JSON (benchmarks/autoscale_bench.py writes one):

    {
      "format": "ttsfleet-autoscale-run/v1",  # optional
      "trace": "step",                      # a name, for the report
      "cold_start_s": 12.0,                 # optional: Pod created -> Ready, measured
      "scrape_interval_s": 1.0,             # optional: Prometheus' scrape interval
      "policy": {"max_replicas": 2},        # optional: Policy fields the fleet used;
                                            # other keys (e.g. scrape_interval_seconds,
                                            # load) are read where known, else ignored
      "samples": [                          # one per sample, t_s increasing
        {"t_s": 0.0, "requests_per_s": 5.0, "replicas": 1, "ready_replicas": 1,
         "ttfa_p95_s": 0.081},             # ttfa_p95_s: null when not measured
        ...
      ]
    }

`replicas` is the TtsDeployment's spec.replicas (what the autoscaler asked for),
`ready_replicas` its Ready pods, `ttfa_p95_s` what Prometheus answered for
`ttsfleet_time_to_first_audio_seconds` p95 at that time, `requests_per_s` the offered
load. The load is replayed (linearly interpolated) with the same Policy, the first
sample's replicas as the starting size, the run's scrape interval and loop period
(`policy.tick_seconds`), and its cold start: `cold_start_s`, or else the median time
from a rise of `replicas` to `ready_replicas` reaching it in the samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ttsfleet.autoscale.policy import Policy
from ttsfleet.sim import policies
from ttsfleet.sim.engine import Result, SimConfig, simulate
from ttsfleet.sim.service import ServiceModel, calibrated
from ttsfleet.sim.traces import Trace

FORMAT = "ttsfleet-autoscale-run/v1"
SAMPLE_KEYS = ("t_s", "requests_per_s", "replicas", "ready_replicas", "ttfa_p95_s")


class RecordError(ValueError):
    """A recorded run that cannot be read; the message says what is wrong."""


@dataclass(frozen=True)
class Record:
    trace: Trace
    policy: Policy
    config: SimConfig
    samples: tuple[dict[str, Any], ...]
    loop_period_s: float = policies.LOOP_SECONDS
    cold_start_measured: bool = False


def load_record(path: Path, config: SimConfig | None = None) -> Record:
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise RecordError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path} is not JSON: {err}") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("samples"), list)
        or len(doc["samples"]) < 2
    ):
        raise RecordError(f"{path}: needs a `samples` list of at least 2 (see docs/simulator.md)")
    samples = tuple(doc["samples"])
    for i, s in enumerate(samples):
        missing = [k for k in SAMPLE_KEYS if k not in s]
        if missing:
            raise RecordError(f"{path}: sample {i} lacks {', '.join(missing)}")
    t0 = float(samples[0]["t_s"])
    points = tuple((float(s["t_s"]) - t0, float(s["requests_per_s"])) for s in samples)
    known = {f.name for f in fields(Policy)}
    given = doc.get("policy") or {}
    if not isinstance(given, dict):
        raise RecordError(f"{path}: `policy` must be an object of Policy fields")
    overrides = {k: v for k, v in given.items() if k in known}  # other keys describe the run
    policy = replace(policies.ttsfleet_policy(), **overrides)
    base = config or SimConfig()
    scrape: Any = doc.get("scrape_interval_s") or given.get("scrape_interval_seconds")
    scrape = scrape or base.scrape_interval_s
    sim = replace(
        base,
        cold_start_s=float(doc.get("cold_start_s", base.cold_start_s)),
        scrape_interval_s=float(scrape),
        min_replicas=policy.min_replicas,
        max_replicas=policy.max_replicas,
        initial_replicas=int(samples[0]["replicas"]),
        slo_s=policy.ttfa_target_seconds,
    )
    period = float(given.get("tick_seconds", policies.LOOP_SECONDS))
    measured = "cold_start_s" not in doc and cold_start(samples) is not None
    if measured:
        sim = replace(sim, cold_start_s=cold_start(samples) or sim.cold_start_s)
    trace = Trace(str(doc.get("trace", path.stem)), points)
    return Record(trace, policy, sim, samples, period, measured)


def cold_start(samples: tuple[dict[str, Any], ...]) -> float | None:
    """Median seconds from a rise of `replicas` to Ready replicas reaching it (None: none)."""
    lags = []
    for i in range(1, len(samples)):
        before, now = int(samples[i - 1]["replicas"]), int(samples[i]["replicas"])
        if now > before:
            t0 = float(samples[i]["t_s"])
            ready = next((s for s in samples[i:] if int(s["ready_replicas"]) >= now), None)
            if ready is not None:
                lags.append(float(ready["t_s"]) - t0)
    return sorted(lags)[len(lags) // 2] if lags else None


# The recorded runs (`make bench-autoscale`) send their load through
# `ttsfleet.client.Balancer`, a round robin over the Ready endpoints.
BALANCER = "round-robin"


def validate(record: Record, service: ServiceModel | None = None) -> dict[str, Any]:
    """The simulator on the recorded load and policy, next to the record, and the error
    (by default behind the recorded run's balancer, BALANCER)."""
    service = service or calibrated(balancer=BALANCER)
    scaler = policies.TtsfleetScaler(record.policy, period_s=record.loop_period_s)
    result: Result = simulate(record.trace, scaler, record.config, service)
    series = result.series
    t0 = float(record.samples[0]["t_s"])
    rows = []
    for s in record.samples:
        t = float(s["t_s"]) - t0
        j = max(0, min(len(series.t_s) - 1, _index_at(series.t_s, t)))
        rows.append({
            "t_s": round(t, 1),
            "requests_per_s": s["requests_per_s"],
            "replicas": s["replicas"], "sim_replicas": series.replicas[j],
            "ready_replicas": s["ready_replicas"], "sim_ready_replicas": series.ready_replicas[j],
            "ttfa_p95_s": s["ttfa_p95_s"], "sim_ttfa_p95_s": series.ttfa_p95_s[j],
        })  # fmt: skip
    replica_errors = [abs(r["replicas"] - r["sim_replicas"]) for r in rows]
    ttfa_pairs = [
        (float(r["ttfa_p95_s"]), float(r["sim_ttfa_p95_s"]))
        for r in rows
        if r["ttfa_p95_s"] is not None and r["sim_ttfa_p95_s"] is not None
    ]
    ttfa_errors = sorted(abs(a - b) for a, b in ttfa_pairs)
    return {
        "trace": record.trace.name,
        "balancer": service.balancer,
        "samples": len(rows),
        "cold_start_s": record.config.cold_start_s,
        "cold_start_from": "the record's replicas and ready_replicas"
        if record.cold_start_measured
        else "the record or --cold-start",
        "scrape_interval_s": record.config.scrape_interval_s,
        "loop_period_s": record.loop_period_s,
        "error": {
            "replicas_mean_abs": round(sum(replica_errors) / len(rows), 3),
            "replicas_max_abs": max(replica_errors),
            "ttfa_p95_median_abs_ms": round(ttfa_errors[len(ttfa_errors) // 2] * 1000, 1)
            if ttfa_errors
            else None,
            "ttfa_p95_within_2x": round(
                sum(
                    1
                    for a, b in ttfa_pairs
                    if a > 0 and b > 0 and abs(math.log(b / a)) <= math.log(2)
                )
                / len(ttfa_pairs),
                3,
            )
            if ttfa_pairs
            else None,
        },
        "rows": rows,
    }


def _index_at(times: list[float], t: float) -> int:
    """The last sample at or before t (0 before the first)."""
    lo, hi = 0, len(times)
    while lo < hi:
        mid = (lo + hi) // 2
        if times[mid] <= t + 1e-9:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1
