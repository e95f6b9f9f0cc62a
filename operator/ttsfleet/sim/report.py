"""What a comparison says: a table, a JSON document, the goals, and plots."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from ttsfleet.sim.compare import Comparison, Tried
from ttsfleet.sim.policies import AS_DEPLOYED, BASELINES, UNITS

ORACLE_SLOW_RATIO = 1.03  # slow traces: misses at most this times the oracle's, equal cost
GAP_GOAL = 0.5  # step traces: close at least this share of the best peer's gap to the oracle
DEPLOYED_RATIO = 2.5  # step traces: this many times fewer misses than hpa and keda as deployed


def table(comparison: Comparison, slo_s: float) -> Table:
    out = Table(
        "policy", "target", "SLO attainment", "SLO misses", "replica-hours",
        "oscillations/h", "reaction p95 (s)",
        title=f"{comparison.trace}: TTFA SLO {slo_s * 1000:.0f} ms, {comparison.balancer} "
        f"balancer, {'replayed request by request' if comparison.replayed else 'fluid model'}",
        title_justify="left",
    )  # fmt: skip
    for name, result in comparison.results.items():
        target = comparison.targets.get(name)
        shown = "spec defaults" if target is None else f"{target:g} {UNITS[name]}"
        if target is not None and not comparison.within_budget.get(name, True):
            shown += " (over budget)" if name == "static-peak" else " (under budget)"
        s = result.summary()
        reaction = s["reaction_s_p95"]
        out.add_row(
            name, shown, f"{result.slo_attainment:.2%}", f"{s['slo_misses']:,}",
            f"{result.replica_hours:,.1f}", f"{result.oscillations_per_hour:.2f}",
            "-" if reaction is None else f"{reaction:.0f}",
        )  # fmt: skip
    return out


def as_json(comparison: Comparison) -> dict[str, Any]:
    """{"policies": {name: summary}} plus the targets kept and every sweep point."""
    return {
        "trace": comparison.trace,
        "model": {"balancer": comparison.balancer, "replayed": comparison.replayed},
        "policies": {
            name: {**r.summary(), "target": comparison.targets.get(name)}
            for name, r in comparison.results.items()
        },
        "sweeps": {
            name: [
                {
                    "target": x.target,
                    "slo_misses": round(x.result.slo_misses),
                    "slo_attainment": round(x.result.slo_attainment, 5),
                    "replica_hours": round(x.result.replica_hours, 2),
                }
                for x in tried
            ]
            for name, tried in comparison.sweeps.items()
        },
    }


def goals(comparison: Comparison, kind: str | None = None) -> dict[str, Any]:
    """The goals on this trace, with the numbers behind each verdict. `kind`: "slow" or
    "step" (`traces.KINDS`) adds that kind's goal against the oracle; None (a trace of
    unknown shape) only the goals every trace has."""
    results = comparison.results
    own = results["ttsfleet"]
    out: dict[str, Any] = {"oscillations_per_hour": round(own.oscillations_per_hour, 3)}
    out["no_oscillations"] = own.oscillations == 0
    # Dominated: a peer's swept point that spends no more and misses fewer.
    dominating = [
        f"{name}@{x.target:g}"
        for name in BASELINES
        for x in comparison.sweeps.get(name, [])
        if x.result.replica_hours <= own.replica_hours + 1e-9
        and x.result.slo_misses < own.slo_misses - 1e-6
    ]
    out["dominated_by"] = dominating
    out["never_dominated"] = not dominating
    peers = {n: results[n] for n in BASELINES if n in results}
    if peers:
        # Each peer's sweep read at exactly ttsfleet's replica-hours (linear between the
        # two targets around it): the comparison at equal cost, without sweep granularity.
        at_equal = {
            n: misses_at(comparison.sweeps[n], own.replica_hours)
            for n in peers
            if n in comparison.sweeps
        }
        known = {n: m for n, m in at_equal.items() if m is not None}
        out["peer_misses_at_equal_replica_hours"] = {n: round(m) for n, m in known.items()}
        if known and own.slo_misses:
            out["misses_ratio_at_equal_replica_hours"] = round(
                min(known.values()) / own.slo_misses, 3
            )
    if "static-peak" in results:
        static = results["static-peak"]
        out["saving_vs_static_peak"] = round(1 - own.replica_hours / static.replica_hours, 3)
        out["no_more_than_static_peak"] = own.replica_hours <= static.replica_hours + 1e-9
        if comparison.peak_sized_replica_hours:
            out["peak_sized_replicas"] = comparison.peak_sized_replicas
            out["saving_vs_peak_sized"] = round(
                1 - own.replica_hours / comparison.peak_sized_replica_hours, 3
            )
    out |= as_deployed(comparison, kind)
    oracle = misses_at(comparison.sweeps.get("oracle", []), own.replica_hours)
    if oracle is not None:
        out["oracle_misses_at_equal_replica_hours"] = round(oracle)
        out["misses_over_oracle"] = round(own.slo_misses / oracle, 3) if oracle else None
    if kind == "slow" and oracle is not None:
        out["within_3pct_of_oracle"] = own.slo_misses <= ORACLE_SLOW_RATIO * oracle + 1e-6
    known_peers = out.get("peer_misses_at_equal_replica_hours") or {}
    if kind == "step" and oracle is not None and known_peers:
        best = min(known_peers.values())
        gap = best - oracle
        closed = (
            (best - own.slo_misses) / gap if gap > 0 else (1.0 if own.slo_misses <= best else 0.0)
        )
        out["gap_closed"] = round(closed, 3)
        out["closes_half_the_gap"] = closed >= GAP_GOAL
    return out


def as_deployed(comparison: Comparison, kind: str | None) -> dict[str, Any]:
    """ttsfleet against each peer at `AS_DEPLOYED` (a point of its sweep): on step
    traces, at least DEPLOYED_RATIO x fewer misses than hpa-queue and keda at no more
    replica-hours, and no more misses than kpa with no flaps."""
    own = comparison.results["ttsfleet"]
    found: dict[str, Any] = {}
    for name, target in AS_DEPLOYED.items():
        point = next(
            (x.result for x in comparison.sweeps.get(name, []) if math.isclose(x.target, target)),
            None,
        )
        if point is None:
            continue
        found[name] = {
            "target": target, "slo_misses": round(point.slo_misses),
            "replica_hours": round(point.replica_hours, 2),
            "oscillations_per_hour": round(point.oscillations_per_hour, 3),
        }  # fmt: skip
    if not found:
        return {}
    out: dict[str, Any] = {"as_deployed": found}
    if kind == "step" and {"hpa-queue", "keda", "kpa"} <= set(found):
        cheaper = all(
            own.slo_misses * DEPLOYED_RATIO <= found[n]["slo_misses"]
            and own.replica_hours <= found[n]["replica_hours"] + 1e-9
            for n in ("hpa-queue", "keda")
        )
        out["beats_hpa_and_keda_as_deployed"] = cheaper
        out["no_worse_than_kpa_as_deployed"] = (
            own.slo_misses <= found["kpa"]["slo_misses"] and own.oscillations == 0
        )
    return out


def misses_at(tried: list[Tried], replica_hours: float) -> float | None:
    """SLO misses of a sweep interpolated at `replica_hours` (None: outside the sweep).

    Where the sweep's curve is not monotonic, the fewest misses of any two neighbouring
    targets (in replica-hours) that enclose the point: the peer at its best.
    """
    points = sorted((x.result.replica_hours, x.result.slo_misses) for x in tried)
    found = [
        m0 + (m1 - m0) * (replica_hours - h0) / (h1 - h0) if h1 > h0 else min(m0, m1)
        for (h0, m0), (h1, m1) in itertools.pairwise(points)
        if h0 <= replica_hours <= h1
    ]
    return min(found) if found else None


def plot(comparison: Comparison, directory: Path) -> list[Path]:
    """One PNG per policy: load, replicas (desired and Ready) and TTFA p95 over time."""
    import matplotlib  # noqa: PLC0415 - only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, result in comparison.results.items():
        s = result.series
        hours = [t / 3600 for t in s.t_s]
        fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
        axes[0].plot(hours, s.requests_per_s, color="tab:gray")
        axes[0].set_ylabel("requests/s")
        axes[1].plot(hours, s.replicas, label="replicas")
        axes[1].plot(hours, s.ready_replicas, label="ready")
        axes[1].set_ylabel("replicas")
        axes[1].legend(loc="upper left")
        axes[2].plot(hours, [math.nan if v is None else v * 1000 for v in s.ttfa_p95_s])
        axes[2].set_yscale("log")
        axes[2].set_ylabel("TTFA p95 (ms)")
        axes[2].set_xlabel("hours")
        fig.suptitle(f"ttsfleet sim: {comparison.trace}, {name}")
        path = directory / f"{comparison.trace}-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
