"""Status conditions from what the children report (pure)."""

from __future__ import annotations

from typing import Any

from ttsfleet.status import Observed, conditions_for, merge_conditions, stalled_conditions


def deployment(
    ready: int, replicas: int, updated: int | None = None, gen: int = 1
) -> dict[str, Any]:
    return {
        "metadata": {"generation": gen},
        "status": {
            "observedGeneration": gen,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
        },
    }


def conds(observed: Observed) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in conditions_for(observed)}


def observed(dep: dict[str, Any] | None, desired: int, pods: list[Any] | None = None) -> Observed:
    return Observed(1, desired, dep, pods or [], "builtin")


def test_ready_when_every_replica_is_ready_and_rolled_out() -> None:
    c = conds(observed(deployment(2, 2), 2))
    assert c["Ready"]["status"] == "True"
    assert c["Reconciling"]["status"] == "False"
    assert c["Stalled"]["status"] == "False"


def test_reconciling_while_pods_start_or_roll() -> None:
    assert conds(observed(deployment(1, 2), 2))["Reconciling"]["status"] == "True"
    rolling = conds(observed(deployment(2, 3, updated=1), 2))
    assert rolling["Ready"]["status"] == "False"
    assert rolling["Ready"]["reason"] == "RollingOut"
    assert conds(observed(None, 1))["Ready"]["status"] == "False"


def test_unschedulable_pods_mean_capacity_exhausted_with_the_schedulers_words() -> None:
    pending = {
        "metadata": {},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/5 nodes are available: 2 Insufficient nvidia.com/mig-3g.40gb.",
                }
            ]
        },
    }
    c = conds(observed(deployment(16, 17), 17, [pending]))
    assert c["CapacityExhausted"]["status"] == "True"
    assert "Insufficient nvidia.com/mig-3g.40gb" in c["CapacityExhausted"]["message"]
    assert "no capacity for 1 of 17 replicas" in c["CapacityExhausted"]["message"]
    assert c["Ready"]["reason"] == "WaitingForCapacity"


def test_stalled_says_why() -> None:
    c = {x["type"]: x for x in stalled_conditions("PlacementUnavailable", "set placement.mode")}
    assert c["Stalled"]["status"] == "True" and c["Ready"]["status"] == "False"
    assert c["Stalled"]["message"] == "set placement.mode"


def test_transition_times_hold_while_a_status_holds() -> None:
    first = merge_conditions([], conditions_for(observed(deployment(1, 1), 1)), 1, "T1")
    again = merge_conditions(first, conditions_for(observed(deployment(1, 1), 1)), 1, "T2")
    assert {c["lastTransitionTime"] for c in again} == {"T1"}
    changed = merge_conditions(again, conditions_for(observed(deployment(0, 1), 1)), 1, "T3")
    ready = next(c for c in changed if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "T3"
