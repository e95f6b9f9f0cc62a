"""The autoscalers the simulator compares: ttsfleet's own, and its peers at their defaults.

- `ttsfleet`: the real `recommend` (autoscale/policy.py) every 2 s (the operator's
  AUTOSCALE_SECONDS), on Snapshots of what Prometheus shows (autoscale/metrics.py's
  four queries), with the Policy the operator builds from a TtsDeployment's defaults
  (`loop.policy_for`), maxReplicas raised to the simulator's bound.
- `hpa`: Kubernetes' HorizontalPodAutoscaler on CPU utilisation (busy share of the
  ready pods, over metrics-server's 15 s resolution): 15 s sync period, 10 % tolerance,
  desired = ceil(ready * utilisation / target), scale-down stabilisation 300 s (the
  largest recommendation of the last 300 s), scale-up at most max(x2, +4) per period.
- `hpa-queue`: the same HPA on Triton's queue metric as Triton's Helm chart configures
  it (`avg_time_queue_us`: queue time per request over 30 s, an AverageValue target).
- `keda`: a ScaledObject with a Prometheus trigger on requests in the fleet
  (`nv_inference_pending_request_count + ttsfleet_inflight_streams`, AverageValue per
  replica), through the HPA KEDA creates: read fresh at each 15 s HPA sync (KEDA's
  default; its 30 s pollingInterval only wakes a fleet from zero, and the value is
  cached between polls only with the opt-in `useCachedMetrics`, `cached_metrics`
  here), the HPA's 300 s scale-down stabilisation, 10 % tolerance and scale-up limits.
- `kpa`: Knative's pod autoscaler on concurrency (requests in flight per pod, as the
  queue-proxy reports them): 2 s tick, 60 s stable window, 6 s panic window, panic at
  200 % of the ready pods (each tick over it extends the panic, which ends a stable
  window after the last), no scale-down while panicking, scale-down at most /2 a tick.
- `static-peak`: a fixed size (the simulator's sweep picks the smallest one that
  matches ttsfleet's SLO attainment).
- `oracle`: not an autoscaler but the bound on one: perfect foresight of the load, no
  panic, no delay of its own. Every 2 s it asks for what the highest load of the next
  cold start and period needs at a fixed utilisation (its target): replicas it orders
  now are Ready for that load, and those it keeps cover everything until then.
Every baseline takes a target; `SWEEPS` lists the values the simulator tries.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ttsfleet.autoscale.policy import Policy, Snapshot, State, recommend
from ttsfleet.sim.engine import View

LOOP_SECONDS = 2.0  # handlers.AUTOSCALE_SECONDS


def ttsfleet_policy(max_replicas: int = 1000, min_replicas: int = 1) -> Policy:
    """The Policy `loop.policy_for` builds from a TtsDeployment with default scaling."""
    return Policy(min_replicas=min_replicas, max_replicas=max_replicas)


@dataclass
class TtsfleetScaler:
    policy: Policy = field(default_factory=ttsfleet_policy)
    name: str = "ttsfleet"
    period_s: float = LOOP_SECONDS
    state: State = field(default_factory=State)
    serving: bool = True  # pass Ready replicas as Snapshot.serving_replicas

    def decide(self, view: View, now: float, current: int, ready: int) -> int:
        # The operator passes the spec's replicas (desired) as the size, and Ready ones as
        # the replicas behind the measurements.
        snapshot = Snapshot(
            current,
            serving_replicas=ready if self.serving else None,
            pending_requests=view.pending_requests(now),
            queue_seconds_per_request=view.queue_seconds(now),
            ttfa_p95_seconds=view.ttfa_p95(now),
            open_streams=view.open_stream_count(now),
            completed_per_second=view.completed_per_second(now),
        )
        rec = recommend(snapshot, self.policy, self.state, now)
        self.state = rec.state
        return rec.replicas


@dataclass
class Hpa:
    """HPA's replica calculator and default behaviour on a per-pod metric."""

    target: float
    signal: str = "utilisation"  # or "queue_seconds"
    name: str = "hpa"
    period_s: float = 15.0
    tolerance: float = 0.1
    stabilisation_s: float = 300.0
    max_replicas: int = 1000
    min_replicas: int = 1
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)

    def metric(self, view: View, now: float) -> float | None:
        if self.signal == "utilisation":
            return view.utilisation(now, 15.0)
        return view.queue_seconds(now, 30.0)

    def raw(self, view: View, now: float, current: int, ready: int) -> int:
        value = self.metric(view, now)
        if value is None:
            return current
        ratio = value / self.target
        if abs(ratio - 1) <= self.tolerance:
            return current
        return math.ceil(ratio * ready)

    def decide(self, view: View, now: float, current: int, ready: int) -> int:
        rec = min(max(self.raw(view, now, current, ready), self.min_replicas), self.max_replicas)
        self.recommendations.append((now, rec))
        while self.recommendations and self.recommendations[0][0] < now - self.stabilisation_s:
            self.recommendations.popleft()
        if rec < current:  # scale down to the largest recommendation of the window
            rec = min(current, max(r for _, r in self.recommendations))
        return min(rec, max(2 * current, current + 4))


KEDA_POLLING_S = 30.0  # pollingInterval: how long a cached value lasts (useCachedMetrics)


@dataclass
class Keda(Hpa):
    """KEDA's HPA on an external metric (AverageValue): read at each 15 s sync, or every
    pollingInterval with `cached_metrics` (useCachedMetrics: true)."""

    signal: str = "in_system"
    name: str = "keda"
    cached_metrics: bool = False

    def __post_init__(self) -> None:
        if self.cached_metrics:  # the HPA still syncs every 15 s; the value moves every 30 s
            self.period_s = KEDA_POLLING_S

    def raw(self, view: View, now: float, current: int, ready: int) -> int:
        pending, streams = view.pending_requests(now), view.open_stream_count(now)
        if pending is None or streams is None:
            return current
        ratio = (pending + streams) / (self.target * max(ready, 1))
        if abs(ratio - 1) <= self.tolerance:
            return current
        return math.ceil(ratio * max(ready, 1))


@dataclass
class Kpa:
    """Knative's KPA: concurrency per pod against a target, stable and panic windows."""

    target: float
    name: str = "kpa"
    period_s: float = 2.0
    stable_s: float = 60.0
    panic_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_down_rate: float = 2.0
    max_replicas: int = 1000
    min_replicas: int = 1
    panic_since: float | None = None  # the last time over the panic threshold

    def decide(self, view: View, now: float, current: int, ready: int) -> int:
        stable, burst = view.concurrency(now, self.stable_s), view.concurrency(now, self.panic_s)
        if stable is None or burst is None:
            return current
        pods = max(ready, 1)
        want_stable = math.ceil(stable / self.target)
        want_panic = math.ceil(burst / self.target)
        if burst / self.target / pods >= self.panic_threshold:
            self.panic_since = now  # starts or extends the panic
        elif self.panic_since is not None and now - self.panic_since >= self.stable_s:
            self.panic_since = None
        want = max(want_panic, current) if self.panic_since is not None else want_stable
        want = max(want, math.floor(pods / self.max_scale_down_rate))
        return min(max(want, self.min_replicas), self.max_replicas)


@dataclass
class Static:
    target: float  # replicas
    name: str = "static-peak"
    period_s: float = 1.0  # sets its size at the first tick when it does not start there

    def decide(self, view: View, now: float, current: int, ready: int) -> int:
        return round(self.target)


@dataclass
class Oracle:
    """Perfect foresight at a fixed utilisation (see the module docstring)."""

    target: float  # utilisation
    needs: list[float] = field(repr=False, default_factory=list)  # per tick, see `oracle`
    tick_s: float = 1.0
    name: str = "oracle"
    period_s: float = LOOP_SECONDS

    def decide(self, view: View, now: float, current: int, ready: int) -> int:
        i = min(round(now / self.tick_s), len(self.needs) - 1)
        return math.ceil(self.needs[i] / self.target - 1e-9)


def window_max(values: list[float], ahead: int) -> list[float]:
    """Per index i, the largest of values[i : i + ahead + 1] (one pass)."""
    out = [0.0] * len(values)
    window: deque[int] = deque()  # indices, their values decreasing
    for j in range(len(values) - 1, -1, -1):
        while window and values[window[-1]] <= values[j]:
            window.pop()
        window.append(j)
        while window[0] > j + ahead:
            window.popleft()
        out[j] = values[window[0]]
    return out


def oracle(
    target: float, rates: list[float], tick_s: float, replica_rate: float, lead_s: float
) -> Oracle:
    """The oracle at utilisation `target` on a trace sampled as `rates` (requests/s per
    tick): at each tick, the busy replicas the highest rate of the next `lead_s` needs."""
    ahead = max(1, math.ceil(lead_s / tick_s))
    needs = [r / replica_rate for r in window_max(rates, ahead)]
    return Oracle(target, needs, tick_s)


BASELINES = ("hpa", "hpa-queue", "keda", "kpa")
POLICIES = ("ttsfleet", *BASELINES, "oracle", "static-peak")

# Targets tried per baseline (static-peak is searched by bisection instead).
SWEEPS: dict[str, tuple[float, ...]] = {
    "hpa": (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7),  # CPU utilisation
    # queue seconds per request; 50 us is Triton's chart's value
    "hpa-queue": (0.00005, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1),
    "keda": (0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.8, 1.0),  # requests in flight per replica
    "kpa": (0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0),  # concurrency per pod
    "oracle": (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75),  # utilisation
}
# Each peer as users deploy it, not swept: HPA on Triton's queue metric at the value
# Triton's chart sets (50 us); KEDA with one request in flight per replica (what one
# unbatched instance serves; KEDA's Prometheus trigger has no default threshold);
# KPA with containerConcurrency 1 at Knative's default 70 % target utilisation.
AS_DEPLOYED = {"hpa-queue": 0.00005, "keda": 1.0, "kpa": 0.7}

# Where a target stops meaning anything (a utilisation of a whole replica or more).
TARGET_LIMITS = {"hpa": 0.95, "oracle": 0.95}
UNITS = {
    "hpa": "CPU utilisation",
    "hpa-queue": "queue seconds per request",
    "keda": "requests in flight per replica",
    "kpa": "concurrency per pod",
    "oracle": "utilisation",
    "static-peak": "replicas",
}


def baseline(
    name: str, target: float, max_replicas: int = 1000, min_replicas: int = 1
) -> Hpa | Kpa | Static:
    """A baseline by name at a target (the oracle needs the trace: see `oracle`)."""
    if name == "hpa":
        return Hpa(target, max_replicas=max_replicas, min_replicas=min_replicas)
    if name == "hpa-queue":
        return Hpa(
            target, "queue_seconds", "hpa-queue", max_replicas=max_replicas,
            min_replicas=min_replicas,
        )  # fmt: skip
    if name == "keda":
        return Keda(target, max_replicas=max_replicas, min_replicas=min_replicas)
    if name == "kpa":
        return Kpa(target, max_replicas=max_replicas, min_replicas=min_replicas)
    if name == "static-peak":
        return Static(target)
    raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
