"""The autoscaling simulator's verdict: every built-in trace, every policy, the goals.

    python benchmarks/sim_bench.py [--out benchmarks/results/sim.json]
                                   [--record benchmarks/results/autoscale_run.json]

For each built-in trace (`diurnal`, `spike`, `flash-crowd`, `ramp` and each one's
`-noisy` variant), runs ttsfleet's autoscaler (the real `recommend`), the peers with
their target sweeps and the oracle (perfect foresight, swept over utilisations)
(`ttsfleet.sim.compare`), each with
maxReplicas at 4x what the trace's peak needs, and checks the goals
(`ttsfleet.sim.report.goals`):
1. never dominated: no peer's swept point spends no more replica-hours and misses
   fewer; no more replica-hours than static-peak; no oscillations (flaps) per hour;
2. slow traces (diurnal, ramp, and their noisy variants): misses at most 1.03x the
   oracle's at equal replica-hours;
3. step traces (spike, flash-crowd, and their noisy variants): at least half of the
   gap between the best peer and the oracle (both read at ttsfleet's replica-hours)
   closed;
4. step traces, against the peers as users deploy them (`policies.AS_DEPLOYED`): at
   least 2.5x fewer misses than hpa-queue and keda at no more replica-hours, and no
   more misses than kpa with no flaps.
All of that behind the `random` balancer (the M/G/1-per-replica model the goals were
set on); the four base traces run again behind `p2c`, what the ttsfleet gateway does
(`behind_p2c`). Then times one 24 h run of a 1,000-replica fleet (the diurnal trace
scaled to need about 1,000 replicas at its peak, ttsfleet's policy; goal: under a
minute) and one 3 h replay of a trace at 1 s resolution, request by request (how CSV
files run; goal: under 2 minutes), and, when the recorded run of the real loop exists,
validates the simulator against it (behind the recorded run's round robin).
Pure computation on this machine's CPU: no cluster, no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from ttsfleet import harness
from ttsfleet.sim import compare, engine, policies, report, traces, validate
from ttsfleet.sim.engine import SimConfig, simulate
from ttsfleet.sim.service import DEFAULT_BALANCER, calibrated

REPO = Path(__file__).resolve().parent.parent
MINUTE_GOAL_S = 60.0


REPLAY_GOAL_S = 120.0


def goals_for(name: str, config: SimConfig, balancer: str = DEFAULT_BALANCER) -> dict[str, Any]:
    started = time.perf_counter()
    result = compare.compare(traces.load(name), None, config, calibrated(balancer=balancer))
    seconds = time.perf_counter() - started
    doc = report.as_json(result)
    verdict = report.goals(result, traces.KINDS.get(name))
    print(f"{name} ({balancer}): {json.dumps(doc['policies'])}", flush=True)
    print(f"{name} ({balancer}): goals {json.dumps(verdict)} ({seconds:.1f}s)", flush=True)
    return doc | {"goals": verdict, "seconds": round(seconds, 1)}


def compared(config: SimConfig, jobs: int) -> dict[str, dict[str, Any]]:
    """Every built-in trace behind the default balancer, the base ones behind p2c,
    `jobs` at a time (each comparison is single-threaded and independent)."""
    runs = [(name, DEFAULT_BALANCER) for name in traces.BUILTIN]
    runs += [(name, "p2c") for name in traces.BASES]
    longest_first = sorted(runs, key=lambda r: not r[0].startswith("diurnal"))
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        futures = {run: pool.submit(goals_for, run[0], config, run[1]) for run in longest_first}
    return {
        "traces": {name: futures[name, b].result() for name, b in runs if b == DEFAULT_BALANCER},
        "behind_p2c": {name: futures[name, b].result() for name, b in runs if b == "p2c"},
    }


def three_hour_replay(config: SimConfig) -> dict[str, Any]:
    """ttsfleet's policy on 3 h at 1 s resolution (the diurnal shape over 3 h, 100 to
    1,000 req/s, with per-second jitter), request by request and as the fluid model."""
    shape = traces.noisy(traces.Trace("3h", ((0.0, 100.0), (5400.0, 1000.0), (10800.0, 100.0))))
    trace = traces.Trace("3h-noisy", shape.points, per_request=True)
    service = calibrated()
    top = engine.bounded(config, trace, service).max_replicas or 0
    out: dict[str, Any] = {"requests_per_s": "100 -> 1,000 -> 100 over 3 h, jittered"}
    for replay in (True, False):
        started = time.perf_counter()
        result = simulate(
            trace, policies.TtsfleetScaler(policies.ttsfleet_policy(top)),
            replace(config, replay=replay), service,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        out["replay" if replay else "fluid"] = {
            "seconds": round(seconds, 1), "requests": round(result.requests),
            **result.summary(),
        }  # fmt: skip
    out["under_2_minutes"] = out["replay"]["seconds"] < REPLAY_GOAL_S
    print(f"3 h replay: {json.dumps(out)}", flush=True)
    return out


def day_of_a_thousand(config: SimConfig) -> dict[str, Any]:
    service = calibrated()
    per_replica = service.replica_rate * service.utilisation_for(config.slo_s, replicas=1000)
    trace = traces.diurnal(peak=per_replica * 1000 / 1.05)  # +5 % noise: ~1,000 at peak
    started = time.perf_counter()
    top = engine.bounded(config, trace, service).max_replicas or 0
    result = simulate(
        trace, policies.TtsfleetScaler(policies.ttsfleet_policy(top)), config, service
    )
    seconds = time.perf_counter() - started
    out = {
        "simulated_hours": result.duration_s / 3600,
        "peak_requests_per_s": round(trace.peak, 1),
        "peak_replicas": max(result.series.replicas),
        "seconds": round(seconds, 2),
        "under_a_minute": seconds < MINUTE_GOAL_S,
    }
    print(f"24 h, 1,000 replicas: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    results = REPO / "benchmarks" / "results"
    parser.add_argument("--out", type=Path, default=results / "sim.json")
    parser.add_argument("--record", type=Path, default=results / "autoscale_run.json")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1,
        help="traces compared side by side (the timed runs after them run alone)",
    )  # fmt: skip
    args = parser.parse_args()

    config = SimConfig()
    doc: dict[str, Any] = {  # the machine: in its provenance
        "config": {
            "slo_ms": config.slo_s * 1000,
            "cold_start_s": config.cold_start_s,
            "scrape_interval_s": config.scrape_interval_s,
            "tick_s": config.tick_s,
            "max_replicas": f"{engine.MAX_OVER_PEAK}x the trace's peak need",
        },
        "sweeps": {name: list(values) for name, values in policies.SWEEPS.items()},
        "balancer": DEFAULT_BALANCER,
        **compared(config, args.jobs),
        "day_of_a_thousand": day_of_a_thousand(config),
        "three_hour_replay": three_hour_replay(config),
    }
    if args.record.exists():
        try:
            checked = validate.validate(validate.load_record(args.record, config))
        except validate.RecordError as err:
            checked = {"error": str(err)}
        doc["validation"] = {k: v for k, v in checked.items() if k != "rows"} | {
            "record": str(args.record.relative_to(REPO) if args.record.is_absolute() and
                          args.record.is_relative_to(REPO) else args.record)
        }  # fmt: skip
        print(f"validation: {json.dumps(doc['validation'])}", flush=True)
    else:
        doc["validation"] = None
        print(f"validation: no recorded run at {args.record}", flush=True)
    met = {
        name: {k: v for k, v in t["goals"].items() if isinstance(v, bool)}
        for name, t in doc["traces"].items()
    }
    doc["all_goals_met"] = (
        all(all(v.values()) for v in met.values())
        and bool(doc["day_of_a_thousand"]["under_a_minute"])
        and bool(doc["three_hour_replay"]["under_2_minutes"])
    )
    harness.write_results(args.out, doc)
    print(f"Wrote {args.out}; all goals met: {doc['all_goals_met']}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
