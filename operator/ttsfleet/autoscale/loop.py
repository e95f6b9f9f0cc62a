"""One autoscaler tick over every TtsDeployment with `scaling.mode: builtin`. Pure.

The operator calls `Autoscaler.decide` every couple of seconds with the objects and
the signals Prometheus gave (or the error it gave instead), and carries out what
comes back: scale writes through the scale subresource, Events, the
`MetricsUnavailable` condition and `status.autoscaling`, and pod deletion costs.

Drain order: each replica's open streams become its
`controller.kubernetes.io/pod-deletion-cost` (more streams, higher cost), so the
ReplicaSet controller removes the idlest replicas first when the fleet shrinks;
preStop and the grace period let the streams still open there finish. Costs are
written just before a scale-down's write (those that changed since the last one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ttsfleet.api.v1alpha1 import PredictiveSpec, ScalingMode, TtsDeploymentSpec
from ttsfleet.autoscale import floors
from ttsfleet.autoscale.metrics import Key, PodStreams, Signals
from ttsfleet.autoscale.policy import Policy, Recommendation, Snapshot, State, recommend
from ttsfleet.failover import traffic

Manifest = dict[str, Any]
# (True means unavailable, reason, message): the MetricsUnavailable condition.
MetricsCondition = tuple[bool | None, str, str]

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
MAX_DELETION_COST = 2**31 - 1  # the annotation is an int32


def deletion_cost(open_streams: float) -> int:
    """The pod deletion cost of a replica with `open_streams` streams: the count itself."""
    if not math.isfinite(open_streams):
        return 0 if open_streams < 0 or math.isnan(open_streams) else MAX_DELETION_COST
    return min(max(round(open_streams), 0), MAX_DELETION_COST)


@dataclass(frozen=True)
class Decision:
    key: Key
    current: int
    recommendation: Recommendation
    metrics: MetricsCondition
    # Pod name -> deletion cost to write now (before the scale write when it shrinks).
    deletion_costs: dict[str, int] = field(default_factory=dict)
    floor: floors.Floor = floors.NONE

    @property
    def scale(self) -> bool:
        return self.recommendation.replicas != self.current

    @property
    def scale_down(self) -> bool:
        return self.recommendation.replicas < self.current


def policy_for(spec: TtsDeploymentSpec) -> Policy:
    scaling = spec.scaling
    return Policy(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        queue_depth_per_replica=float(scaling.targets.queue_depth_per_replica),
        ttfa_target_seconds=scaling.targets.time_to_first_audio_ms / 1000,
        streams_per_replica=spec.placement.streams_per_replica,
        stable_window=float(scaling.stable_window_seconds),
        panic_window=float(scaling.panic_window_seconds),
        scale_down_delay=float(scaling.scale_down_delay_seconds),
        reversal_window=float(scaling.reversal_window_seconds),
        short_seconds=0.75 * scaling.stable_window_seconds,
    )


Window = tuple[datetime, datetime]


def _predictive(
    objects: list[Manifest],
) -> Iterator[tuple[Key, TtsDeploymentSpec, PredictiveSpec]]:
    """The builtin-scaled fleets with a predicted floor."""
    for obj in objects:
        try:
            spec = TtsDeploymentSpec.model_validate(obj.get("spec") or {})
        except ValidationError:
            continue
        predictive = spec.scaling.predictive
        if spec.scaling.mode == ScalingMode.BUILTIN and predictive is not None:
            yield (obj["metadata"]["namespace"], obj["metadata"]["name"]), spec, predictive


def history_windows(objects: list[Manifest], wall: datetime) -> dict[Window, set[Key]]:
    """The past windows the predictive floors need, each with the fleets that need it."""
    out: dict[Window, set[Key]] = {}
    for key, _, predictive in _predictive(objects):
        for window in floors.history_windows(predictive, wall):
            out.setdefault(window, set()).add(key)
    return out


@dataclass(frozen=True)
class RegionView:
    """A TtsRegion as the autoscaler needs it: which region, the agent's view of every
    region (`status.regions`), and the fleets behind its gateway."""

    here: str
    view: Sequence[Mapping[str, Any]]
    fleets: frozenset[Key]


def region_floors(
    objects: list[Manifest], signals: Mapping[Key, Signals] | None, regions: Sequence[RegionView]
) -> dict[Key, floors.Floor]:
    """Each fleet behind a region's gateway holds its part of the region's needs: its own
    load, its `regionReserve` share of the reserve for a lost peer, and what the region
    takes on from lost peers now (`failover.traffic`)."""
    specs = {}
    for obj in objects:
        try:
            specs[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = (
                TtsDeploymentSpec.model_validate(obj.get("spec") or {})
            )
        except ValidationError:
            continue
    out: dict[Key, floors.Floor] = {}
    for region in regions:
        needs = traffic.needs(region.here, region.view)
        mine = [k for k in region.fleets if k in specs]
        streams = {}
        for key in mine:
            found = (signals or {}).get(key)
            streams[key] = (found.open_streams if found else None) or 0.0
        for key, part in traffic.fleet_parts(streams).items():
            spec = specs[key]
            made = traffic.fleet_floor(needs, spec.scaling.region_reserve, part,
                                       spec.placement.streams_per_replica)  # fmt: skip
            out[key] = floors.floor(out.get(key, floors.NONE), made)
    return out


def predicted_floors(
    objects: list[Manifest], wall: datetime, peaks: Mapping[Window, Mapping[Key, float]]
) -> dict[Key, floors.Floor]:
    """Each predictive fleet's floor from the peaks of its past windows (absent: no data)."""
    out: dict[Key, floors.Floor] = {}
    for key, spec, predictive in _predictive(objects):
        seen = [peaks.get(w, {}).get(key) for w in floors.history_windows(predictive, wall)]
        out[key] = floors.predicted_floor(predictive, seen, spec.placement.streams_per_replica)
    return out


@dataclass
class Autoscaler:
    states: dict[Key, State] = field(default_factory=dict)
    # The deletion costs known to be on the pods (told through `annotated`).
    costs: dict[Key, dict[str, int]] = field(default_factory=dict)

    def decide(
        self, objects: list[Manifest], signals: dict[Key, Signals] | None, error: str | None,
        now: float, pod_streams: PodStreams | None = None, wall: datetime | None = None,
        predicted: Mapping[Key, floors.Floor] | None = None,
    ) -> list[Decision]:  # fmt: skip
        """Decisions for the builtin-scaled objects; `signals` is None when `error` says why.

        `pod_streams` (None: not read this tick) gives each replica's open streams,
        from which come the deletion costs to write. `wall` (aware) is the time the
        scheduled floors are read at; `predicted` holds the predicted floors.
        """
        decisions = []
        live: set[Key] = set()
        for obj in objects:
            meta = obj["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            try:
                spec = TtsDeploymentSpec.model_validate(obj.get("spec") or {})
            except ValidationError:
                continue  # reported as Stalled by the reconciler
            if spec.scaling.mode != ScalingMode.BUILTIN:
                continue
            key = (meta["namespace"], meta["name"])
            live.add(key)
            current = spec.desired_replicas
            found = (signals or {}).get(key)
            if signals is None:
                metrics: MetricsCondition = (True, "PrometheusUnavailable", error or "")
                snapshot = Snapshot(current)
            elif found is None:
                metrics = (True, "NoSamples", "Prometheus has no samples of this fleet yet")
                snapshot = Snapshot(current)
            else:
                metrics = (False, "MetricsAvailable", "signals read from Prometheus")
                # Queue time and TTFA were measured on the Ready replicas, not on those
                # still starting: scaling from spec.replicas would compound each scale-up.
                ready = int((obj.get("status") or {}).get("readyReplicas") or 0)
                snapshot = Snapshot(current, **asdict(found), serving_replicas=ready)
            floor = floors.floor(
                floors.scheduled_floor(spec.scaling.schedules, wall) if wall else floors.NONE,
                (predicted or {}).get(key, floors.NONE),
            )
            policy = replace(policy_for(spec), floor=floor.replicas, floor_reason=floor.reason)
            rec = recommend(snapshot, policy, self.states.get(key, State()), now)
            self.states[key] = rec.state
            decision = Decision(key, current, rec, metrics, floor=floor)
            if pod_streams is not None:
                costs = self._costs_to_write(key, pod_streams.get(key, {}), decision.scale_down)
                decision = replace(decision, deletion_costs=costs)
            decisions.append(decision)
        for gone in set(self.states) - live:
            del self.states[gone]
        for gone in set(self.costs) - live:
            del self.costs[gone]
        return decisions

    def _costs_to_write(
        self, key: Key, streams: dict[str, float], scale_down: bool
    ) -> dict[str, int]:
        """Before a scale-down, the costs that differ from those on the pods; else none.

        A cost matters only when the ReplicaSet picks a pod to delete, so it is written
        just before the scale write that makes it pick: not on every tick (streams come
        and go by the second, and a patch per pod per tick would load the apiserver).
        """
        wanted = {pod: deletion_cost(value) for pod, value in streams.items()}
        known = self.costs.get(key, {})
        # Forget pods Prometheus no longer sees (deleted): their costs no longer matter.
        self.costs[key] = {pod: cost for pod, cost in known.items() if pod in wanted}
        if not scale_down:
            return {}
        return {pod: cost for pod, cost in wanted.items() if known.get(pod) != cost}

    def annotated(self, key: Key, costs: dict[str, int]) -> None:
        """The operator wrote these costs (or found the pods gone): not written again."""
        self.costs.setdefault(key, {}).update(costs)
