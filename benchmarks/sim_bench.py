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
Then times one 24 h run of a 1,000-replica fleet (the diurnal trace scaled to need
about 1,000 replicas at its peak, ttsfleet's policy; goal: under a minute), and, when
the recorded run of the real loop exists, validates the simulator against it.
Pure computation on this machine's CPU: no cluster, no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ttsfleet import harness
from ttsfleet.sim import compare, engine, policies, report, traces, validate
from ttsfleet.sim.engine import SimConfig, simulate
from ttsfleet.sim.service import calibrated

REPO = Path(__file__).resolve().parent.parent
MINUTE_GOAL_S = 60.0


def goals_for(name: str, config: SimConfig) -> dict[str, Any]:
    started = time.perf_counter()
    result = compare.compare(traces.load(name), None, config)
    seconds = time.perf_counter() - started
    doc = report.as_json(result)
    verdict = report.goals(result, traces.KINDS.get(name))
    print(f"{name}: {json.dumps(doc['policies'])}", flush=True)
    print(f"{name}: goals {json.dumps(verdict)} ({seconds:.1f}s)", flush=True)
    return doc | {"goals": verdict, "seconds": round(seconds, 1)}


def day_of_a_thousand(config: SimConfig) -> dict[str, Any]:
    service = calibrated()
    per_replica = service.replica_rate * service.utilisation_for(config.slo_s)
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
        "traces": {name: goals_for(name, config) for name in traces.BUILTIN},
        "day_of_a_thousand": day_of_a_thousand(config),
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
    doc["all_goals_met"] = all(all(v.values()) for v in met.values()) and bool(
        doc["day_of_a_thousand"]["under_a_minute"]
    )
    harness.write_results(args.out, doc)
    print(f"Wrote {args.out}; all goals met: {doc['all_goals_met']}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
