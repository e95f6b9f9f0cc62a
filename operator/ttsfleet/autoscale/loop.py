"""One autoscaler tick over every TtsDeployment with `scaling.mode: builtin`. Pure.

The operator calls `Autoscaler.decide` every couple of seconds with the objects and
the signals Prometheus gave (or the error it gave instead), and carries out what
comes back: scale writes through the scale subresource, Events, the
`MetricsUnavailable` condition and `status.autoscaling`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from ttsfleet.api.v1alpha1 import ScalingMode, TtsDeploymentSpec
from ttsfleet.autoscale.metrics import Key, Signals
from ttsfleet.autoscale.policy import Policy, Recommendation, Snapshot, State, recommend

Manifest = dict[str, Any]
# (True means unavailable, reason, message): the MetricsUnavailable condition.
MetricsCondition = tuple[bool | None, str, str]


@dataclass(frozen=True)
class Decision:
    key: Key
    current: int
    recommendation: Recommendation
    metrics: MetricsCondition

    @property
    def scale(self) -> bool:
        return self.recommendation.replicas != self.current


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
    )


@dataclass
class Autoscaler:
    states: dict[Key, State] = field(default_factory=dict)

    def decide(
        self, objects: list[Manifest], signals: dict[Key, Signals] | None, error: str | None,
        now: float,
    ) -> list[Decision]:  # fmt: skip
        """Decisions for the builtin-scaled objects; `signals` is None when `error` says why."""
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
                snapshot = Snapshot(current, **asdict(found))
            rec = recommend(snapshot, policy_for(spec), self.states.get(key, State()), now)
            self.states[key] = rec.state
            decisions.append(Decision(key, current, rec, metrics))
        for gone in set(self.states) - live:
            del self.states[gone]
        return decisions
