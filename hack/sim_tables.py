"""Markdown tables of a `make bench-sim` result, as docs/simulator.md shows them.

    python hack/sim_tables.py [benchmarks/results/sim.json]

Prints, per trace, every policy's figures, then the goals table, the peers as users
deploy them, and the goals behind the gateway's p2c balancer (`behind_p2c`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,.{digits}f}"


def policies(name: str, doc: dict[str, Any]) -> list[str]:
    out = [
        f"**{name}**",
        "",
        "| policy | target | SLO attainment | SLO misses | replica-hours | oscillations/h "
        "| reaction p95 (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for policy, p in doc["policies"].items():
        target = "spec defaults" if p["target"] is None else f"{p['target']:g}"
        out.append(
            f"| {policy} | {target} | {p['slo_attainment'] * 100:.2f}% | {_n(p['slo_misses'])} "
            f"| {_n(p['replica_hours'], 1)} | {p['oscillations_per_hour']:g} "
            f"| {_n(p['reaction_s_p95'])} |"
        )
    return [*out, ""]


def goals(traces: dict[str, dict[str, Any]]) -> list[str]:
    out = [
        "| trace | ttsfleet: misses (replica-hours) | best peer at equal replica-hours / "
        "ttsfleet | oracle at equal replica-hours | ttsfleet / oracle | gap closed "
        "| vs static-peak | flaps/h | dominated by | goals met |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, doc in traces.items():
        own, g = doc["policies"]["ttsfleet"], doc["goals"]
        met = ", ".join(f"{k}: {_n(v)}" for k, v in g.items() if isinstance(v, bool))
        ratio = g.get("misses_ratio_at_equal_replica_hours")
        over = g.get("misses_over_oracle")
        saving = g.get("saving_vs_static_peak")
        out.append(
            f"| {name} | {_n(own['slo_misses'])} ({_n(own['replica_hours'])}) "
            f"| {'-' if ratio is None else f'{ratio}x'} "
            f"| {_n(g.get('oracle_misses_at_equal_replica_hours'))} "
            f"| {'-' if over is None else f'{over}x'} | {g.get('gap_closed', '-')} "
            f"| {'-' if saving is None else f'+{saving * 100:.1f}%'} "
            f"| {g['oscillations_per_hour']:g} | {', '.join(g['dominated_by']) or '-'} "
            f"| {met} |"
        )
    return [*out, ""]


def as_deployed(traces: dict[str, dict[str, Any]]) -> list[str]:
    out = [
        "| trace | ttsfleet: misses (replica-hours, flaps/h) | hpa-queue at 50 us "
        "| keda at 1 in flight | kpa at containerConcurrency 1 (0.7) "
        "| 2.5x fewer than hpa-queue and keda at no more cost | no more than kpa, no flaps |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, doc in traces.items():
        own, g = doc["policies"]["ttsfleet"], doc["goals"]

        def point(peer: str, g: dict[str, Any] = g) -> str:
            p = g.get("as_deployed", {}).get(peer)
            if p is None:
                return "-"
            return (
                f"{_n(p['slo_misses'])} ({_n(p['replica_hours'])}, {p['oscillations_per_hour']:g})"
            )

        out.append(
            f"| {name} | {_n(own['slo_misses'])} ({_n(own['replica_hours'])}, "
            f"{own['oscillations_per_hour']:g}) | {point('hpa-queue')} | {point('keda')} "
            f"| {point('kpa')} | {_n(g.get('beats_hpa_and_keda_as_deployed'))} "
            f"| {_n(g.get('no_worse_than_kpa_as_deployed'))} |"
        )
    return [*out, ""]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks/results/sim.json"
    doc = json.loads(path.read_text())
    lines: list[str] = []
    for name, trace in doc["traces"].items():
        lines += policies(name, trace)
    lines += ["### The goals", "", *goals(doc["traces"]), *as_deployed(doc["traces"])]
    if doc.get("behind_p2c"):
        lines += ["### Behind the gateway's p2c balancer", "", *goals(doc["behind_p2c"])]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
