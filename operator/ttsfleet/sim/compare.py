"""Every policy on one trace, each baseline at its best swept target.

ttsfleet runs first: its replica-hours are the budget, its SLO attainment the bar.
- hpa, hpa-queue, keda, kpa, and the oracle (over utilisations): every target of
  `policies.SWEEPS` runs, and more beyond its ends until the sweep spans 0.5-2x
  ttsfleet's replica-hours (`sweep`); the one kept is the cheapest that spends at least ttsfleet's
  replica-hours (the peer with the same budget or more, as close to it as the sweep
  allows); when no target spends that much, the most expensive one (`within_budget`
  is then False).
- static-peak: the smallest fixed size whose SLO attainment is at least ttsfleet's
  (bisection between one replica and the maximum); the size the trace's peak needs at
  the SLO is recorded too (`peak_sized_replicas`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ttsfleet.sim import policies
from ttsfleet.sim.engine import (
    Result,
    Scaler,
    SimConfig,
    bounded,
    max_replicas,
    peak_need,
    simulate,
)
from ttsfleet.sim.service import ServiceModel, calibrated
from ttsfleet.sim.traces import Trace


@dataclass(frozen=True)
class Tried:
    target: float
    result: Result


@dataclass
class Comparison:
    trace: str
    balancer: str = "random"  # in front of the replicas (`ServiceModel.balancer`)
    replayed: bool = False  # request by request (`des.Replay`), else the fluid model
    results: dict[str, Result] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    within_budget: dict[str, bool] = field(default_factory=dict)
    sweeps: dict[str, list[Tried]] = field(default_factory=dict)
    # Sized for the trace's peak at the SLO (ServiceModel.need), all the time: the
    # textbook static peak, next to the smallest fixed size that matches ttsfleet.
    peak_sized_replicas: int = 0
    peak_sized_replica_hours: float = 0.0


POLICIES = policies.POLICIES


SPAN = (0.5, 2.0)  # a sweep reaches from this share of ttsfleet's replica-hours to that
STRETCH = 1.25  # each target added beyond the listed ones: x or / this
MAX_ADDED = 12  # targets added at most, each way


def sweep(name: str, run: Callable[[float], Result], own_hours: float) -> list[Tried]:
    """`policies.SWEEPS[name]` run, then targets added beyond its ends until the sweep
    spends from SPAN[0] to SPAN[1] times `own_hours` (or cannot: a target at its limit,
    or MAX_ADDED more each way). Every peer's targets ask for fewer replicas as they
    grow. Sorted by target."""
    tried = {t: run(t) for t in policies.SWEEPS[name]}
    limit = policies.TARGET_LIMITS.get(name, math.inf)
    for _ in range(MAX_ADDED):  # dearer: smaller targets
        if max(r.replica_hours for r in tried.values()) >= SPAN[1] * own_hours:
            break
        target = min(tried) / STRETCH
        tried[target] = run(target)
    for _ in range(MAX_ADDED):  # cheaper: larger targets, up to the limit
        if min(r.replica_hours for r in tried.values()) <= SPAN[0] * own_hours:
            break
        target = min(max(tried) * STRETCH, limit)
        if target in tried:
            break
        tried[target] = run(target)
    return [Tried(t, tried[t]) for t in sorted(tried)]


def unknown_policies(names: list[str]) -> list[str]:
    return [n for n in names if n not in policies.POLICIES]


def compare(
    trace: Trace,
    names: list[str] | None = None,
    config: SimConfig | None = None,
    service: ServiceModel | None = None,
) -> Comparison:
    """Run the named policies (all by default) on the trace; see the module docstring."""
    service = service or calibrated()
    config = bounded(config or SimConfig(), trace, service)
    top = max_replicas(config)
    wanted = list(names or policies.POLICIES)
    bad = unknown_policies(wanted)
    if bad:
        raise ValueError(f"unknown policy {bad[0]!r}: use one of {', '.join(policies.POLICIES)}")
    replayed = config.replay if config.replay is not None else trace.per_request
    out = Comparison(trace.name, service.balancer, replayed)
    out.peak_sized_replicas = min(peak_need(trace, config, service), top)
    out.peak_sized_replica_hours = (
        out.peak_sized_replicas * math.ceil(trace.duration_s / config.tick_s) * config.tick_s / 3600
    )
    own = simulate(
        trace,
        policies.TtsfleetScaler(policies.ttsfleet_policy(top, config.min_replicas)),
        config,
        service,
    )
    if "ttsfleet" in wanted:
        out.results["ttsfleet"] = own
    rates = trace.sampled(config.tick_s)

    def swept(name: str, target: float) -> Scaler:
        if name == "oracle":
            lead = config.cold_start_s + policies.LOOP_SECONDS
            return policies.oracle(target, rates, config.tick_s, service.replica_rate, lead)
        return policies.baseline(name, target, top, config.min_replicas)

    for name in (*policies.BASELINES, "oracle"):
        if name not in wanted:
            continue

        def run(target: float, name: str = name) -> Result:
            return simulate(trace, swept(name, target), config, service)

        tried = sweep(name, run, own.replica_hours)
        # The cheapest target that spends at least ttsfleet's replica-hours.
        fits = [x for x in tried if x.result.replica_hours >= own.replica_hours - 1e-9]
        best = (
            min(fits, key=lambda x: x.result.replica_hours)
            if fits
            else max(tried, key=lambda x: x.result.replica_hours)
        )
        out.sweeps[name] = tried
        out.results[name], out.targets[name] = best.result, best.target
        out.within_budget[name] = bool(fits)
    if "static-peak" in wanted:
        lo, hi = config.min_replicas, top

        def fixed(n: int) -> SimConfig:
            return replace(config, initial_replicas=n)

        found: dict[int, Result] = {}
        while lo < hi:
            mid = (lo + hi) // 2
            found[mid] = simulate(trace, policies.Static(mid), fixed(mid), service)
            if found[mid].slo_attainment >= own.slo_attainment:
                hi = mid
            else:
                lo = mid + 1
        if lo not in found:
            found[lo] = simulate(trace, policies.Static(lo), fixed(lo), service)
        out.results["static-peak"], out.targets["static-peak"] = found[lo], float(lo)
        out.within_budget["static-peak"] = found[lo].slo_attainment >= own.slo_attainment
        out.sweeps["static-peak"] = [Tried(float(n), r) for n, r in sorted(found.items())]
    return out
