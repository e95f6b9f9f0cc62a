"""Leader failover, measured: kill the leader again and again, and pause it past its Lease.

    python benchmarks/chaos_bench.py [--kills 10] [--pauses 3] [--storm 30]
                                     [--out benchmarks/results/chaos.json]

Starts a local cluster of its own (simulated H100 nodes, the apiserver's audit log on),
installs the chart as the chaos suite does (ttsfleet.chaos.Pair: two replicas with
pod-bound tokens, the chart's RBAC and leader fence) with the operator's default Lease
timings (15/10/2 s), then:
1. `--kills` times: a storm of `--storm` new fleets, the leader SIGKILLed once a third
   of them exist, the standby finishing; the killed replica is started again and
   stands by for the next round. Failover is the time from the kill to the new
   leader's first accepted write of a fleet or a child (audit log), p50/p95 over the
   kills (nearest rank); the goal is lease duration + retry period + 2 s.
2. `--pauses` times: the leader SIGSTOPped in a storm until the standby leads, then
   SIGCONTed: its writes after it woke, accepted and refused, as the apiserver counts.
Every round's counts of what was lost or duplicated are recorded and summed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ttsfleet import chaos, harness

REPO = Path(__file__).resolve().parent.parent
COUNTS = ("not_ready", "missing", "duplicate_children", "missing_children", "orphans",
          "extra_pods")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--pauses", type=int, default=3)
    parser.add_argument("--storm", type=int, default=30, help="new fleets per round")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/chaos.json")
    args = parser.parse_args()
    timings = chaos.Timings()  # the operator's defaults: 15/10/2 s
    kills: list[dict[str, Any]] = []
    pauses: list[dict[str, Any]] = []
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="chaos-bench-") as workdir,
        chaos.chaos_cluster(f"bench-chaos-{os.getpid() % 10000}", Path(workdir)) as record,
    ):
        pair = chaos.Pair.make(record, Path(workdir), timings)
        try:
            pair.start()
            for round_ in range(args.kills):
                result = chaos.leader_kill_during_storm(
                    record, pair, timings, count=args.storm, kill_after=args.storm // 3
                )
                kills.append(result)
                print(f"kill {round_ + 1}/{args.kills}: failover {result['failover_s']} s, "
                      f"lease taken {result['lease_acquired_s']} s", flush=True)  # fmt: skip
                killed = pair.by_identity(result["killed"])
                assert killed is not None
                killed.start()  # back as the standby for the next round
                harness.wait_for("the restarted replica to stand by", killed.ready, 60)
            for round_ in range(args.pauses):
                result = chaos.paused_leader(record, pair, timings, count=args.storm)
                pauses.append(result)
                accepted = result["old_leader_writes_after_resume"]
                refused = result["old_leader_refused_after_resume"]
                print(f"pause {round_ + 1}/{args.pauses}: writes after waking {accepted} "
                      f"accepted, {refused} refused", flush=True)  # fmt: skip
        finally:
            pair.stop()
    failovers = [k["failover_s"] for k in kills if k["failover_s"] is not None]
    acquired = [k["lease_acquired_s"] for k in kills if k["lease_acquired_s"] is not None]
    goal = timings.failover_goal
    p95 = harness.percentile(failovers, 0.95) if failovers else None
    lost = {c: sum(r[c] for r in kills + pauses) for c in COUNTS}
    doc = {
        "timings_s": {
            "lease_duration": timings.lease_duration,
            "renew_deadline": timings.renew_deadline,
            "retry_period": timings.retry_period,
        },
        "kills": len(kills),
        "failover_s": {
            "definition": "SIGKILL of the leader -> the new leader's first accepted write of a "
            "fleet or a child (apiserver audit log); nearest-rank percentiles",
            "p50": harness.percentile(failovers, 0.5) if failovers else None,
            "p95": p95,
            "max": max(failovers, default=None),
            "all": failovers,
            "goal_p95_at_most": goal,
            "goal_met": p95 is not None and p95 <= goal and len(failovers) == len(kills),
        },
        "lease_taken_s": {
            "p50": harness.percentile(acquired, 0.5) if acquired else None,
            "p95": harness.percentile(acquired, 0.95) if acquired else None,
        },
        "pauses": len(pauses),
        "paused_leader_writes_after_waking": {
            "accepted": sum(p["old_leader_writes_after_resume"] for p in pauses),
            "refused_by_the_fence": sum(p["old_leader_refused_after_resume"] for p in pauses),
        },
        "lost_or_duplicated": lost,
        "kopf_writes": sum(k["kopf_writes"] for k in kills),
        "rounds": {"kills": kills, "pauses": pauses},
        "seconds": round(time.monotonic() - started, 1),
    }
    harness.write_results(args.out, doc, ["python", "benchmarks/chaos_bench.py", *sys.argv[1:]])
    print(f"failover p50 {doc['failover_s']['p50']} s, p95 {p95} s (goal <= {goal} s); "
          f"lost or duplicated {lost}; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
