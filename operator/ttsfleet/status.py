"""What a `TtsDeployment`'s status says, computed from what its children report. Pure.

Conditions follow kstatus, which Argo CD, Flux and `kubectl wait` read: `Ready`,
`Reconciling` and `Stalled` (True means what it says), plus `MetricsUnavailable`
and `CapacityExhausted` (True means trouble).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ttsfleet.gpu.planner import Capacity

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
METRICS_UNAVAILABLE = "MetricsUnavailable"
CAPACITY_EXHAUSTED = "CapacityExhausted"
CONDITION_TYPES = (READY, RECONCILING, STALLED, METRICS_UNAVAILABLE, CAPACITY_EXHAUSTED)

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    """What the reconciler saw this time."""

    generation: int
    desired_replicas: int
    deployment: Manifest | None
    pods: Sequence[Manifest]
    scaling_mode: str
    # The autoscaler's word on metrics: (True means unavailable, reason, message).
    metrics: tuple[bool | None, str, str] | None = None
    # The planner's count of the slices the replicas need (see gpu.planner.capacity).
    capacity: Capacity | None = None
    slice_name: str | None = None


def _condition(kind: str, status: bool | None, reason: str, message: str) -> dict[str, str]:
    value = "Unknown" if status is None else ("True" if status else "False")
    return {"type": kind, "status": value, "reason": reason, "message": message}


def unschedulable_message(pods: Sequence[Manifest]) -> str | None:
    """The scheduler's reason for the first pod it could not place, if any."""
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return str(cond.get("message", "unschedulable"))
    return None


def unscheduled(pods: Sequence[Manifest]) -> int:
    """Pods still waiting for a node (not being deleted)."""
    return sum(
        1
        for pod in pods
        if not pod.get("spec", {}).get("nodeName")
        and not pod.get("metadata", {}).get("deletionTimestamp")
    )


def conditions_for(observed: Observed) -> list[dict[str, str]]:
    """Conditions for a spec that was applied; see `stalled_conditions` otherwise."""
    dep = observed.deployment or {}
    dep_status = dep.get("status") or {}
    desired = observed.desired_replicas
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    total = int(dep_status.get("replicas") or 0)
    rolled_out = (
        observed.deployment is not None
        and int(dep_status.get("observedGeneration") or 0)
        >= int(dep.get("metadata", {}).get("generation") or 0)
        and updated >= desired
        and total == desired
    )
    unschedulable = unschedulable_message(observed.pods)
    if unschedulable and observed.capacity is not None:
        have = observed.capacity
        capacity = _condition(
            CAPACITY_EXHAUSTED, True, "InsufficientCapacity",
            f"no capacity for {unscheduled(observed.pods)} replicas of {observed.slice_name}: "
            f"{have.nodes} nodes have {have.allocatable}, {have.in_use} in use, {have.free} free;"
            f" add nodes with {observed.slice_name} or lower spec.maxReplicas"
            f" (scheduler: {unschedulable})",
        )  # fmt: skip
    elif unschedulable:
        capacity = _condition(
            CAPACITY_EXHAUSTED, True, "Unschedulable",
            f"no capacity for {desired - ready} of {desired} replicas: {unschedulable}",
        )  # fmt: skip
    else:
        capacity = _condition(CAPACITY_EXHAUSTED, False, "Scheduled", "every replica has a node")
    if observed.scaling_mode == "builtin" and observed.metrics is not None:
        metrics = _condition(METRICS_UNAVAILABLE, *observed.metrics)
    elif observed.scaling_mode == "builtin":
        metrics = _condition(
            METRICS_UNAVAILABLE, None, "NotReadYet", "the autoscaler has not looked at metrics yet"
        )
    else:
        metrics = _condition(
            METRICS_UNAVAILABLE, False, "NotNeeded",
            f"scaling.mode {observed.scaling_mode}: the operator reads no metrics",
        )  # fmt: skip
    if ready >= desired and rolled_out:
        return [
            _condition(READY, True, "ReplicasReady", f"{ready}/{desired} replicas ready"),
            _condition(RECONCILING, False, "Reconciled", "children match the spec"),
            _condition(STALLED, False, "Reconciled", ""),
            metrics,
            capacity,
        ]
    if unschedulable:
        reason = "WaitingForCapacity"
    elif not rolled_out:
        reason = "RollingOut"
    else:
        reason = "WaitingForReplicas"
    message = f"{ready}/{desired} replicas ready"
    return [
        _condition(READY, False, reason, message),
        _condition(RECONCILING, True, reason, message),
        _condition(STALLED, False, "Progressing", ""),
        metrics,
        capacity,
    ]


def stalled_conditions(reason: str, message: str) -> list[dict[str, str]]:
    """Conditions for a spec that cannot be applied as it is; the user must change it."""
    return [
        _condition(READY, False, reason, message),
        _condition(RECONCILING, False, reason, "waiting for the spec to change"),
        _condition(STALLED, True, reason, message),
        _condition(METRICS_UNAVAILABLE, None, reason, "nothing is running"),
        _condition(CAPACITY_EXHAUSTED, None, reason, "nothing was scheduled"),
    ]


def merge_conditions(
    old: Sequence[Manifest], new: Sequence[dict[str, str]], generation: int, now: str
) -> list[Manifest]:
    """New conditions, keeping each one's lastTransitionTime while its status holds."""
    previous = {c.get("type"): c for c in old}
    merged = []
    for cond in new:
        before = previous.get(cond["type"])
        same = before is not None and before.get("status") == cond["status"]
        since = before.get("lastTransitionTime") if same and before else now
        merged.append(
            {**cond, "lastTransitionTime": since or now, "observedGeneration": generation}
        )
    return merged
