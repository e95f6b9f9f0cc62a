"""The goals on noisy traces the policy was not tuned on: each built-in step and ramp
trace made noisy with other seeds (`traces.noisy`: other bursts, jitter and outage).

    python hack/sim_seeds.py [--seeds 1,2,3,4,5,6] [--bases spike,flash-crowd,ramp]

`make bench-sim` judges the built-in `-noisy` traces (seed 11); this prints one line
per trace and seed, as a Markdown table: ttsfleet's misses, replica-hours and flaps,
whether a peer's swept point dominates it, whether it spends no more than static-peak,
and the gap to the oracle closed (steps) or its misses over the oracle's (ramp).
Diurnal is left out by default (a day at 1 s ticks: about a minute a policy run).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from ttsfleet.sim import compare, engine, report, traces
from ttsfleet.sim.service import calibrated


def judge(job: tuple[str, int]) -> dict[str, Any]:
    base, seed = job
    trace = traces.noisy(traces.BASES[base](), seed=seed)
    result = compare.compare(trace, None, engine.SimConfig(), calibrated())
    goals = report.goals(result, traces.KINDS[base])
    own = result.results["ttsfleet"]
    return {
        "trace": f"{base}-noisy, seed {seed}",
        "misses": round(own.slo_misses),
        "replica_hours": round(own.replica_hours, 1),
        "flaps": own.oscillations,
        "dominated_by": goals["dominated_by"],
        "no_more_than_static_peak": goals.get("no_more_than_static_peak"),
        "gap_closed": goals.get("gap_closed"),
        "misses_over_oracle": goals.get("misses_over_oracle"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5,6")
    parser.add_argument("--bases", default="spike,flash-crowd,ramp")
    args = parser.parse_args()
    jobs = [(b, int(s)) for b in args.bases.split(",") for s in args.seeds.split(",")]
    head = "trace | misses | replica-hours | flaps | dominated by | <= static | gap | / oracle"
    print(f"| {head} |")
    print("| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    with ProcessPoolExecutor(2) as pool:
        for row in pool.map(judge, jobs):
            print(
                f"| {row['trace']} | {row['misses']:,} | {row['replica_hours']:,} | {row['flaps']} "
                f"| {', '.join(row['dominated_by']) or '-'} "
                f"| {'yes' if row['no_more_than_static_peak'] else 'no'} "
                f"| {row['gap_closed'] if row['gap_closed'] is not None else '-'} "
                f"| {row['misses_over_oracle']} |"
            )


if __name__ == "__main__":
    main()
