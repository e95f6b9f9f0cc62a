"""What a comparison says: a table, a JSON document, the goals, and plots."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from ttsfleet.sim.compare import Comparison, Tried
from ttsfleet.sim.policies import BASELINES, UNITS

MISSES_RATIO_GOAL = 3.0  # ttsfleet: at least 3x fewer SLO misses than the best peer
STATIC_SAVING_GOAL = 0.45  # and at least 45 % fewer replica-hours than static peak


def table(comparison: Comparison, slo_s: float) -> Table:
    out = Table(
        "policy", "target", "SLO attainment", "SLO misses", "replica-hours",
        "oscillations/h", "reaction p95 (s)",
        title=f"{comparison.trace}: TTFA SLO {slo_s * 1000:.0f} ms", title_justify="left",
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


def goals(comparison: Comparison) -> dict[str, Any]:
    """The issue's goals on this trace, with the numbers behind each verdict."""
    results = comparison.results
    own = results["ttsfleet"]
    out: dict[str, Any] = {"oscillations_per_hour": round(own.oscillations_per_hour, 3)}
    out["no_oscillations"] = own.oscillations == 0
    peers = {n: results[n] for n in BASELINES if n in results}
    if peers:
        best_name = min(peers, key=lambda n: peers[n].slo_misses)
        best = peers[best_name]
        ratio = best.slo_misses / own.slo_misses if own.slo_misses else math.inf
        out["best_peer"] = best_name
        out["misses_ratio"] = round(ratio, 2) if math.isfinite(ratio) else None
        out["replica_hours_vs_best_peer"] = round(own.replica_hours / best.replica_hours, 3)
        out["fewer_misses_3x"] = (
            ratio >= MISSES_RATIO_GOAL and own.replica_hours <= best.replica_hours + 1e-9
        )
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
                min(known.values()) / own.slo_misses, 2
            )
    if "static-peak" in results:
        static = results["static-peak"]
        saving = 1 - own.replica_hours / static.replica_hours
        out["saving_vs_static_peak"] = round(saving, 3)
        if comparison.peak_sized_replica_hours:
            out["peak_sized_replicas"] = comparison.peak_sized_replicas
            out["saving_vs_peak_sized"] = round(
                1 - own.replica_hours / comparison.peak_sized_replica_hours, 3
            )
        out["fewer_replica_hours_45pct"] = (
            saving >= STATIC_SAVING_GOAL and static.slo_attainment >= own.slo_attainment - 1e-9
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
